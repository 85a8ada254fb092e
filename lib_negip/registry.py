"""The model registry: which IP-Adapters and image encoders are installed, under which names.

The host hands in the folders to scan (``models/ipadapter``, the ControlNet extension's model
folders, ``models/clip_vision``, the ControlNet extension's ``annotator/downloads/clip_vision``,
extra folders from the settings); nothing here imports A1111.

Decisions (see ``docs/architecture.md``):

- Folders are scanned recursively (symlinks followed, loops cut), except hidden folders
  (``.x``). Files skipped, so that a download in progress is never listed: hidden ones, the
  names Python's ``tempfile`` gives (``tmp`` and 8 letters, digits or ``_``), partial downloads
  (``*.tmp``, ``*.part``, ``*.partial``, ``*.crdownload``, ``*.incomplete``), and a model file
  beside such a twin or an ``.aria2`` control file (downloaders that write into the final name).
- Adapter folders list ``.safetensors``/``.bin``/``.pth``/``.pt``; in folders shared with other
  models (the ControlNet extension's ``models/ControlNet`` and ``extensions/*controlnet*/models``
  unless the host says otherwise with :class:`ModelFolder`) only names containing "ip-adapter"/"ip_adapter"/
  "ipadapter". Encoder folders list the same suffixes, unfiltered.
- A model's name is its file stem. h94/transformers-style folders (``image_encoder/`` holding
  ``model.safetensors`` or ``pytorch_model.bin`` and ``config.json``) are one model named after
  the folder; the generic folder name ``image_encoder`` is qualified by its parent when that
  lies inside the scanned folder (``image_encoder (sdxl_models)``).
- Names are unique, case-insensitively: files are ordered by folder (in the order given), then
  relative path (case-insensitively), then ``.safetensors`` before ``.bin``/``.pth``/``.pt``;
  the first keeps the plain name, later ones get ``(extension)`` (a twin in the same folder) or
  ``(parent folder or folder label)``, then both, then a number. The same file
  reached twice (a symlinked folder) is listed once. "None" and "auto" are reserved.
- Specs are read from the files WITHOUT loading the weights (the safetensors header; a zip
  ``torch.save`` file through ``mmap``) and cached by (path, size, mtime), so refreshing is a
  directory walk plus ``stat`` calls. (size, mtime) alone would miss a file replaced by one of
  the same size with its modification time kept (``cp -p``, ``rsync -a``, an unpacked archive):
  every key also holds the inode number and the status-change time, which any write, rename or
  replacement sets and no user tool sets back (where the file system keeps them). A file that
  cannot be read or detected is listed with an ``error`` and never chosen by "auto"; choosing
  it by name raises that error.
- Hashes (A1111's short hash: the first 10 hex digits of the file's sha256) are computed only
  when asked, and cached by the same key. An infotext's "name [hash]" picks, among files of that
  name, the one with that hash, for adapters and encoders alike, also when the name's folder
  qualifier changed since (its twin removed: "x (sub)" is listed as "x" now).
- A link whose target is missing (a drive that is not mounted) is listed with that error.
- Names are never paths: anything path-like is refused before any lookup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from stat import S_ISREG
from typing import Any, TypeVar

import torch

from lib_negip import download, files, logger
from lib_negip.adapter import AdapterSpec, detect_adapter
from lib_negip.encoder import (
    CONFIG_NAMES as ENCODER_CONFIG_NAMES,
)
from lib_negip.encoder import (
    KNOWN_ARCHITECTURES,
    EncoderSpec,
    detect_encoder,
    read_encoder_config,
)
from lib_negip.errors import (
    ArgumentError,
    IncompatibleModelError,
    ModelFileError,
    NegIPError,
    UnsupportedModelError,
)

ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
ENCODER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
#: Weight file names of an h94/transformers model folder, preferred first.
FOLDER_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
#: Config files read beside an encoder's weights (the same ones the encoder loader reads).
#: Folder names that say nothing by themselves; such a model is qualified by its parent folder.
GENERIC_FOLDER_NAMES = ("image_encoder",)
#: File names that mark a file in a shared folder (the ControlNet extension's) as an IP-Adapter.
IP_ADAPTER_NAME_MARKERS = ("ip-adapter", "ip_adapter", "ipadapter")

#: Transformer blocks (the index range of ``positive_layers`` / ``negative_layers``) of the UNet
#: an adapter with this many cross-attention layers is for: SD1.x 16 (depth 1), SDXL 11.
BLOCKS_BY_LAYERS = {16: 16, 70: 11}

NO_ADAPTER = "None"
AUTO_ADAPTER = "auto"  # resolved by the host, which knows the loaded checkpoint's family
AUTO_ENCODER = "auto"

ADAPTER_FOLDER_HINT = "models/ipadapter"
ENCODER_FOLDER_HINT = "models/clip_vision"
_PATHS_REFUSED = "model names are the ones listed by GET /negip/v1/models; paths are not accepted"
#: A request that finds no such model looks at the folders again (generation._resolve_models);
#: the UI's words (wording.py) send the user to the refresh button, which lists it.
_FOUND_NEXT = "the next request finds it"

_PARTIAL_SUFFIXES = (
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".incomplete",
    ".download",
)
# A downloader writing straight into the final name leaves one of these beside it meanwhile.
_IN_PROGRESS_TWINS = (*_PARTIAL_SUFFIXES, ".aria2")
#: A name from Python's ``tempfile`` (what some downloaders write to before renaming).
_TEMPFILE_NAME = re.compile(r"^tmp[a-z0-9_]{8}(\.|$)")
_SUFFIX_RANK = {".safetensors": 0, ".bin": 1, ".pth": 2, ".pt": 3}
_HASH_IN_NAME = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9A-Fa-f]{8,64})\]$")
_HASH_CHUNK = 1024 * 1024
_NAMES_SHOWN = 8

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):  # torch >= 2.1
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

HashFunction = Callable[[Path], "str | None"]


def is_skipped_name(name: str) -> bool:
    """Whether a file or folder name is hidden, temporary or a partial download (never listed).
    A name that only starts with "tmp" ("tmp-style.safetensors") is a model like any other."""
    lower = name.lower()
    return (
        lower.startswith(".")
        or _TEMPFILE_NAME.match(lower) is not None
        or lower.endswith(_PARTIAL_SUFFIXES)
    )


@dataclass(frozen=True)
class ModelFolder:
    """A folder to scan, as the host describes it.

    ``label`` names the folder in de-duplicated model names (default: the folder's name).
    ``only_ip_adapter_names`` (adapter folders only) lists only files whose names contain
    "ip-adapter", "ip_adapter" or "ipadapter" (case-insensitive), for folders shared with other
    models; None (the default, and what a plain path means) decides by the path: the ControlNet
    extension's folders (``models/ControlNet``, ``extensions/<name with "controlnet">/models``)
    are shared, every other folder is not.
    """

    path: Path
    label: str | None = None
    only_ip_adapter_names: bool | None = None

    @property
    def display_label(self) -> str:
        return self.label or self.path.name or str(self.path)


def _as_folder(folder: Path | str | ModelFolder, *, adapters: bool) -> ModelFolder:
    given = folder if isinstance(folder, ModelFolder) else ModelFolder(Path(folder))
    path = Path(given.path)
    only = given.only_ip_adapter_names
    if not adapters:
        only = False  # encoder folders hold encoders only, whatever their names
    elif only is None:
        only = _is_controlnet_folder(path)
    return dataclasses.replace(given, path=path, only_ip_adapter_names=only)


def _is_controlnet_folder(path: Path) -> bool:
    """``models/ControlNet`` or ``extensions/<...controlnet...>/models``: only these two names,
    so that an install path that happens to contain "controlnet" filters nothing."""
    name = path.name.casefold()
    return name == "controlnet" or (
        name == "models" and "controlnet" in path.parent.name.casefold()
    )


def change_stamp(stat: os.stat_result) -> tuple[int, int]:
    """(status-change time, inode) of a file: they change when the file is written, renamed or
    replaced, also by one of the same size and modification time."""
    return stat.st_ctime_ns, stat.st_ino


class _HashCache:
    """sha256 of files, cached by (real path, size, mtime, change stamp); computed outside the
    lock."""

    def __init__(self, hash_file: HashFunction | None) -> None:
        self._hash_file = hash_file or _sha256_of_file
        self._values: dict[tuple[Any, ...], str | None] = {}
        self._lock = threading.Lock()

    def sha256(
        self, path: Path, size: int, mtime_ns: int, change: tuple[int, int] | None = None
    ) -> str | None:
        key = (os.path.realpath(path), size, mtime_ns, change)
        with self._lock:
            if key in self._values:
                return self._values[key]
        value = self._hash_file(path)
        value = value.lower() if value else None
        with self._lock:
            self._values[key] = value
        return value


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelEntry:
    """One installed model file. ``path`` is for loading only: never show it to API clients."""

    name: str  # unique (case-insensitively) among models of its kind
    path: Path = field(repr=False)  # the weights file
    size: int
    mtime_ns: int = field(repr=False)
    error: str | None  # why it cannot be used; None when its spec was detected
    error_type: type[NegIPError] = field(default=ModelFileError, repr=False, compare=False)
    _hashes: _HashCache | None = field(default=None, repr=False, compare=False)
    #: (size, mtime) of the config.json read with an encoder's weights; None for adapters
    config_stamp: tuple[int, int] | None = field(default=None, repr=False)
    #: :func:`change_stamp` of the weights file when it was listed
    change: tuple[int, int] | None = field(default=None, repr=False)
    #: Set on the entry a "name [hash]" lookup returns when the hash given is not this file's.
    hash_mismatch: bool = False

    @property
    def file_name(self) -> str:
        """The weights file's name (``model.safetensors`` for a model folder)."""
        return self.path.name

    @property
    def sha256(self) -> str | None:
        """The file's sha256 (hex), computed on first use (slow for big files) and cached.

        None when the host's hash function declines (A1111's ``--no-hashing``).
        """
        if self._hashes is None:
            return _sha256_of_file(self.path)
        return self._hashes.sha256(self.path, self.size, self.mtime_ns, self.change)

    @property
    def short_hash(self) -> str | None:
        """A1111's short hash: the first 10 hex digits of the sha256."""
        full = self.sha256
        return full[:10] if full else None

    @property
    def infotext_name(self) -> str:
        """``"name [short hash]"``, the form stored in infotext (just the name without a hash)."""
        short = self.short_hash
        return f"{self.name} [{short}]" if short else self.name

    def changed_on_disk(self) -> bool:
        """Whether the file is gone or is not the one listed (another size, mtime or change
        stamp): its name, hash and spec are then stale until the registry is refreshed."""
        try:
            stat = self.path.stat()
        except OSError:
            return True
        now = (stat.st_size, stat.st_mtime_ns, change_stamp(stat))
        return now != (self.size, self.mtime_ns, self.change or change_stamp(stat))

    def raise_error(self) -> None:
        """Raise the recorded error, if any, as its original exception type."""
        if self.error is not None:
            raise self.error_type(self.error)


@dataclass(frozen=True)
class AdapterEntry(ModelEntry):
    """An IP-Adapter file and its detected :class:`AdapterSpec` (None when ``error``)."""

    spec: AdapterSpec | None = None

    def usable_spec(self) -> AdapterSpec:
        """The spec; raises the recorded error for a file that cannot be used."""
        self.raise_error()
        if self.spec is None:  # pragma: no cover - an entry has a spec or an error
            msg = f"{self.name} has no detected spec"
            raise ModelFileError(msg)
        return self.spec


@dataclass(frozen=True)
class EncoderEntry(ModelEntry):
    """An image encoder file and its detected :class:`EncoderSpec` (None when ``error``)."""

    spec: EncoderSpec | None = None

    def changed_on_disk(self) -> bool:
        """Also when its config.json changed: it decides the encoder's head and activation, so
        an edited config makes another encoder from the same weights."""
        return super().changed_on_disk() or config_stamp(self.path.parent) != self.config_stamp

    def usable_spec(self) -> EncoderSpec:
        """The spec; raises the recorded error for a file that cannot be used."""
        self.raise_error()
        if self.spec is None:  # pragma: no cover - an entry has a spec or an error
            msg = f"{self.name} has no detected spec"
            raise ModelFileError(msg)
        return self.spec


# --------------------------------------------------------------------------------------------
# Reading specs without loading weights


def read_meta_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A model file's tensors as ``meta`` tensors (names, shapes, dtypes), without the weights.

    ``.safetensors``: only the header is read. ``.bin``/``.pth``/``.pt`` in torch's zip format:
    loaded with ``weights_only=True, mmap=True`` (the data is mapped, not read); other torch
    files: a full ``weights_only`` load. Both go through :func:`files.set_torch_load`'s hook.
    Raises :class:`ModelFileError` with the reason when the file cannot be read.
    """
    path = Path(path)
    files._check_path(path)  # missing, empty, LFS pointer, web page: clear messages
    if path.suffix.lower() in files.SAFETENSORS_SUFFIXES:
        return _safetensors_meta(path)
    return _pickle_meta(path)


def _safetensors_meta(path: Path) -> dict[str, torch.Tensor]:
    files._check_safetensors_header(path)  # length, JSON, data within the file
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len).decode("utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape = info["dtype"], [int(n) for n in info["shape"]]
            start, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            msg = (
                f"{path} has a corrupt safetensors header entry for {key!r} ({exc!r}); the file "
                "is damaged: download it again"
            )
            raise ModelFileError(msg) from exc
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            msg = (
                f"{path}: tensor {key!r} has the dtype {dtype_name!r}, which this extension cannot "
                f"read; expected one of {', '.join(_SAFETENSORS_DTYPES)}: use a float16/float32 "
                "release of the model"
            )
            raise UnsupportedModelError(msg)
        numel = 1
        for n in shape:
            numel *= n
        itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
        if min(shape, default=0) < 0 or end - start != numel * itemsize:
            msg = (
                f"{path}: the header gives tensor {key!r} the shape {shape} ({dtype_name}) but "
                f"{end - start} bytes of data; the file is damaged: download it again"
            )
            raise ModelFileError(msg)
        tensors[key] = torch.empty(shape, dtype=dtype, device="meta")
    if not tensors:
        msg = f"{path} contains no tensors; expected model weights: choose the model file itself"
        raise ModelFileError(msg)
    return tensors


def _pickle_meta(path: Path) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(path):
        tree = _mmap_load(path)
        flat = files._flatten_tensors(tree, path)
    else:  # the legacy pickle format cannot be memory-mapped
        flat = files.load_state_dict(path)
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in flat.items()}
    del flat  # drops the mapping (on Windows it would hold the file open)
    return meta


def _mmap_load(path: Path) -> Any:
    load = files._torch_load if files._torch_load is not None else torch.load
    try:
        try:
            return load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except TypeError as exc:  # torch < 2.1, or a host hook without mmap
            if "mmap" not in str(exc):
                raise
            logger.debug("%s: torch.load has no mmap; reading the whole file", path.name)
            return files._load_pickle(path)
    except NegIPError:
        raise
    except Exception as exc:
        # The full loader turns every torch failure (pickled code, truncation) into a
        # ModelFileError that says what to do; if it succeeds, only the mapping failed.
        logger.debug("%s: mmap load failed (%r); reading the whole file", path.name, exc)
        return files._load_pickle(path)


def read_adapter_spec(path: str | Path) -> AdapterSpec:
    """Detect an IP-Adapter file's spec from its tensor shapes, without loading its weights."""
    path = Path(path)
    return detect_adapter(read_meta_state_dict(path), name=path.name)


def read_encoder_spec(path: str | Path) -> EncoderSpec:
    """Detect an image encoder file's spec (config.json beside it), without loading its weights."""
    path = Path(path)
    config = read_encoder_config(path.parent)
    return detect_encoder(read_meta_state_dict(path), config)


# --------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class _Found:
    """A model file found by the scan, before naming."""

    path: Path
    folder_index: int
    relative: tuple[str, ...]  # path parts below the scanned folder, for ordering
    base_name: str
    parent_label: str  # the folder that qualifies a duplicate name
    stat: os.stat_result  # the link's own (``lstat``) for a link whose target is missing
    config: os.stat_result | None  # config.json beside an encoder's weights
    dangling: bool = False  # a symbolic link whose target is missing


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted file names) for ``root`` and its non-hidden subfolders, loops cut."""
    seen: set[str] = set()
    for current, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        yield Path(current), sorted(names)


def _in_progress(name: str, names: set[str]) -> bool:
    lower = name.lower()
    return any(lower + twin in names for twin in _IN_PROGRESS_TWINS)


def _stat_file(path: Path) -> os.stat_result | None:
    try:
        stat = path.stat()  # follows symlinks; a broken one raises
    except OSError:
        return None
    return stat if S_ISREG(stat.st_mode) else None


def _scan(
    folders: Sequence[ModelFolder], suffixes: tuple[str, ...], *, with_config: bool
) -> list[_Found]:
    """Every listable model file under ``folders``, in listing order (see the module notes)."""
    found: list[_Found] = []
    seen_real: set[str] = set()
    for index, folder in enumerate(folders):
        root = folder.path
        if not root.is_dir():
            continue
        for current, names in _walk(root):
            lowered = {n.lower() for n in names}
            relative = current.relative_to(root).parts
            nested = bool(relative)
            parent_label = current.name if nested else folder.display_label
            weights = _folder_weights(current, names)
            for name in names:
                path = current / name
                lower = name.lower()
                if is_skipped_name(name) or not lower.endswith(suffixes):
                    continue
                if folder.only_ip_adapter_names and not any(
                    m in lower for m in IP_ADAPTER_NAME_MARKERS
                ):
                    continue
                if _in_progress(name, lowered):
                    logger.debug("%s: a download into it is in progress; skipped", name)
                    continue
                is_folder_model = lower in FOLDER_WEIGHT_NAMES
                if is_folder_model and name != weights:
                    continue  # pytorch_model.bin beside model.safetensors: one model
                stat = _stat_file(path)
                dangling = stat is None and _is_dangling_link(path)
                if dangling:
                    stat = path.lstat()
                elif stat is None:
                    continue
                real = os.path.realpath(path)
                if real in seen_real:
                    continue
                seen_real.add(real)
                if is_folder_model:
                    base, qualifier = _folder_model_name(current, root, folder)
                else:
                    base, qualifier = Path(name).stem, parent_label
                config = _config_stat(current) if with_config else None
                found.append(
                    _Found(
                        path=path,
                        folder_index=index,
                        relative=(*relative, name),
                        base_name=base,
                        parent_label=qualifier,
                        stat=stat,
                        config=config,
                        dangling=dangling,
                    )
                )
    found.sort(key=_order)
    return found


def _folder_weights(current: Path, names: list[str]) -> str | None:
    """The weights file of a model folder: the first of :data:`FOLDER_WEIGHT_NAMES` that is a
    file, else the first that is a link to a missing file (listed with that error)."""
    by_lower = {n.lower(): n for n in names}
    present = [by_lower[wanted] for wanted in FOLDER_WEIGHT_NAMES if wanted in by_lower]
    for name in present:
        if _stat_file(current / name) is not None:
            return name
    return next((name for name in present if _is_dangling_link(current / name)), None)


def _is_dangling_link(path: Path) -> bool:
    try:
        return path.is_symlink() and not path.exists()
    except OSError:
        return False


def _folder_model_name(current: Path, root: Path, folder: ModelFolder) -> tuple[str, str]:
    """(name, qualifier for duplicates) of a model folder: its own name, and for a generic name
    ("image_encoder") its parent's too, where the parent tells something."""
    if current == root:
        if folder.label:
            return folder.label, folder.label
        # The host pointed at the model folder itself (".../sdxl_models/image_encoder").
        name, parent, qualify = current.name, current.parent.name, True
    else:
        inside = current.parent != root
        name = current.name
        parent = current.parent.name if inside else folder.display_label
        qualify = inside
    if qualify and parent and name.casefold() in GENERIC_FOLDER_NAMES:
        return f"{name} ({parent})", parent
    return name, parent


def _config_stat(current: Path) -> os.stat_result | None:
    for name in ENCODER_CONFIG_NAMES:
        stat = _stat_file(current / name)
        if stat is not None:
            return stat
    return None


def config_stamp(folder: Path) -> tuple[int, int] | None:
    """(size, mtime) of the encoder config in ``folder`` (None without one): part of what an
    encoder is, beside its weights file."""
    stat = _config_stat(Path(folder))
    return None if stat is None else (stat.st_size, stat.st_mtime_ns)


def _order(found: _Found) -> tuple[Any, ...]:
    *dirs, name = found.relative
    suffix = Path(name).suffix.lower()
    return (
        found.folder_index,
        tuple(d.casefold() for d in dirs),
        Path(name).stem.casefold(),
        _SUFFIX_RANK.get(suffix, 9),
        name,
    )


def _unique_names(found: Sequence[_Found], *reserved: str) -> list[str]:
    """Deterministic unique names: the first of a name keeps it, later ones are qualified."""
    taken = {name.casefold() for name in reserved}
    per_folder = Counter((item.path.parent, item.base_name.casefold()) for item in found)
    names: list[str] = []
    for item in found:
        ext = item.path.suffix.lower().lstrip(".")
        same_folder_twin = per_folder[item.path.parent, item.base_name.casefold()] > 1
        first_choice = (
            f"{item.base_name} ({ext})"
            if same_folder_twin
            else f"{item.base_name} ({item.parent_label})"
        )
        candidates = [
            item.base_name,
            first_choice,
            f"{item.base_name} ({item.parent_label}, {ext})",
        ]
        name = next((c for c in candidates if c.casefold() not in taken), None)
        number = 2
        while name is None:
            candidate = f"{item.base_name} ({number})"
            if candidate.casefold() not in taken:
                name = candidate
            number += 1
        taken.add(name.casefold())
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Name checks


def check_model_name(name: object, kind: str = "model") -> str:
    """The name, stripped; :class:`ArgumentError` if it is not a string or looks like a path."""
    if not isinstance(name, str):
        msg = f"the {kind} name must be a string; found {type(name).__name__} {name!r}: {_PATHS_REFUSED}"
        raise ArgumentError(msg)
    stripped = name.strip()
    path_like = (
        "\x00" in name
        or "/" in name
        or "\\" in name
        or (stripped != "" and stripped.strip(".") == "")  # ".", ".."
        or bool(re.match(r"^[A-Za-z]:", stripped))
        or PurePosixPath(stripped).is_absolute()
        or PureWindowsPath(stripped).is_absolute()
        or stripped.startswith("~")
    )
    if path_like:
        msg = f"{name!r} looks like a file path, not a model name: {_PATHS_REFUSED}"
        raise ArgumentError(msg)
    return stripped


def _names_hint(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return shown + more


_E = TypeVar("_E", bound=ModelEntry)


def _lookup(entries: Sequence[_E], name: str) -> _E | None:
    """By name, then by file name (first in listing order), each exact, then case-insensitive."""
    for same in (lambda a, b: a == b, lambda a, b: a.casefold() == b.casefold()):
        for attribute in ("name", "file_name"):
            for entry in entries:
                if same(getattr(entry, attribute), name):
                    return entry
    return None


# --------------------------------------------------------------------------------------------
# The registry


class ModelRegistry:
    """Installed IP-Adapters and image encoders, scanned from the host's folders.

    ``adapter_dirs`` and ``encoder_dirs`` are paths or :class:`ModelFolder` (label, name filter
    for shared folders), in priority order. ``hash_file`` replaces the sha256 computation (the
    host may pass one backed by A1111's persistent hash cache; returning None means hashing is
    disabled). Thread-safe: A1111 serves the UI and the API from several threads.
    """

    def __init__(
        self,
        adapter_dirs: Sequence[Path | str | ModelFolder],
        encoder_dirs: Sequence[Path | str | ModelFolder],
        *,
        hash_file: HashFunction | None = None,
    ) -> None:
        self._adapter_folders = [_as_folder(f, adapters=True) for f in adapter_dirs]
        self._encoder_folders = [_as_folder(f, adapters=False) for f in encoder_dirs]
        self._hashes = _HashCache(hash_file)
        self._lock = threading.RLock()
        # (real path, size, mtime, config stat) -> (spec, error, error type)
        self._specs: dict[tuple[Any, ...], tuple[Any, str | None, type[NegIPError]]] = {}
        self._adapters: tuple[AdapterEntry, ...] = ()
        self._encoders: tuple[EncoderEntry, ...] = ()
        self._scanned = False

    # listing ---------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan the folders; unchanged files (same path, size, mtime) are not read again."""
        with self._lock:
            live: set[tuple[Any, ...]] = set()
            adapters = _scan(self._adapter_folders, ADAPTER_SUFFIXES, with_config=False)
            encoders = _scan(self._encoder_folders, ENCODER_SUFFIXES, with_config=True)
            self._adapters = tuple(
                AdapterEntry(**self._entry_fields(item, name, "adapter", live))
                for item, name in zip(
                    adapters, _unique_names(adapters, NO_ADAPTER, AUTO_ADAPTER), strict=True
                )
            )
            self._encoders = tuple(
                EncoderEntry(**self._entry_fields(item, name, "encoder", live))
                for item, name in zip(encoders, _unique_names(encoders, AUTO_ENCODER), strict=True)
            )
            self._specs = {k: v for k, v in self._specs.items() if k in live}
            self._scanned = True
        logger.debug(
            "model registry: %d IP-Adapters, %d image encoders",
            len(self._adapters),
            len(self._encoders),
        )

    def adapters(self) -> list[AdapterEntry]:
        """The installed IP-Adapters in listing order (scanned on first use)."""
        self._ensure_scanned()
        return list(self._adapters)

    def encoders(self) -> list[EncoderEntry]:
        """The installed image encoders in listing order (scanned on first use)."""
        self._ensure_scanned()
        return list(self._encoders)

    def contents(self) -> tuple[tuple[Any, ...], ...]:
        """What the last scan found: each file's path, size and modification time."""
        self._ensure_scanned()
        return tuple(
            (e.path, e.size, e.mtime_ns, e.change) for e in (*self._adapters, *self._encoders)
        )

    def adapter_names(self) -> list[str]:
        """Choices for the UI: "auto" first, then every adapter (broken ones too: choosing one
        shows why it cannot be used)."""
        return [AUTO_ADAPTER, *(e.name for e in self.adapters())]

    def encoder_names(self) -> list[str]:
        """Choices for the UI: "auto" first, then every encoder."""
        return [AUTO_ENCODER, *(e.name for e in self.encoders())]

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """The body of ``GET /negip/v1/models``: names and detected specs, no paths."""
        adapters = []
        for entry in self.adapters():
            spec = entry.spec
            adapters.append(
                {
                    "name": entry.name,
                    "file_name": entry.file_name,
                    "variant": spec.variant if spec else None,
                    "family": spec.family if spec else None,
                    "tokens": _tokens(spec) if spec else None,
                    "encoder": spec.encoder_architecture if spec else None,
                    "layers": spec.num_layers if spec else None,
                    "blocks": BLOCKS_BY_LAYERS.get(spec.num_layers) if spec else None,
                    "error": entry.error,
                }
            )
        encoders = []
        for entry in self.encoders():
            spec = entry.spec
            encoders.append(
                {
                    "name": entry.name,
                    "file_name": entry.file_name,
                    "architecture": spec.architecture if spec else None,
                    "width": spec.width if spec else None,
                    "projection_dim": spec.projection_dim if spec else None,
                    "error": entry.error,
                }
            )
        return {"adapters": adapters, "encoders": encoders}

    # resolving -------------------------------------------------------------------------------

    def resolve_adapter(self, name: str) -> AdapterEntry:
        """The adapter named ``name``: a listed name, a file name, or "name [hash]" (infotext).

        A hash that differs from the file's is logged and flagged (``hash_mismatch``); among
        files of the same stem the one with that hash wins. Raises :class:`ArgumentError` for
        path-like or unknown names, and the file's own error for an unusable file.
        """
        wanted = check_model_name(name, "IP-Adapter")
        if not wanted or wanted == NO_ADAPTER:
            msg = (
                f"no IP-Adapter was chosen ({name!r}); expected one of "
                f"{_names_hint([e.name for e in self.adapters()]) or '(none installed)'}: "
                f"choose a model, or disable Negative Image Prompt"
            )
            raise ArgumentError(msg)
        entry, wanted_hash = self._find(wanted, self.adapters)
        if entry is None:
            raise ArgumentError(self._unknown_message(name, "IP-Adapter", self.adapters()))
        if wanted_hash:
            entry = self._fresh(entry, self.adapters)
            entry = self._check_hash(entry, wanted_hash, self.adapters(), "IP-Adapter")
        entry.raise_error()
        return entry

    def resolve_encoder(
        self, name: str, adapter: AdapterSpec | AdapterEntry, *, adapter_name: str | None = None
    ) -> EncoderEntry:
        """The image encoder for ``adapter``: the one named, or with "auto" the first that fits.

        "auto" prefers an encoder whose architecture is the one the adapter was trained with,
        then listing order. Raises :class:`IncompatibleModelError` when none fits or the named
        one does not fit, :class:`ArgumentError` for path-like or unknown names.
        """
        spec, adapter_label = _adapter_and_label(adapter, adapter_name)
        wanted = check_model_name(name, "image encoder")
        if not wanted or wanted.casefold() == AUTO_ENCODER:
            return self._auto_encoder(spec, adapter_label)
        entry, wanted_hash = self._find(wanted, self.encoders)
        if entry is None:
            raise ArgumentError(self._unknown_message(name, "image encoder", self.encoders()))
        if wanted_hash:
            entry = self._fresh(entry, self.encoders)
            entry = self._check_hash(entry, wanted_hash, self.encoders(), "image encoder")
        spec.check_encoder(entry.usable_spec(), adapter_name=adapter_label, encoder_name=entry.name)
        return entry

    # internals -------------------------------------------------------------------------------

    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self.refresh()

    def _entry_fields(
        self, item: _Found, name: str, kind: str, live: set[tuple[Any, ...]]
    ) -> dict[str, Any]:
        config = item.config
        key = (
            kind,
            os.path.realpath(item.path),
            item.stat.st_size,
            item.stat.st_mtime_ns,
            change_stamp(item.stat),
            (config.st_size, config.st_mtime_ns) if config else None,
        )
        live.add(key)
        cached = self._specs.get(key)
        if item.dangling:  # read again at each refresh: the drive may be mounted meanwhile
            cached = (None, _dangling_message(item.path, kind), ModelFileError)
        elif cached is None:
            cached, transient = self._read(item.path, kind)
            if not transient:  # a file that could not be opened is read again at the next refresh
                self._specs[key] = cached
        spec, error, error_type = cached
        return {
            "name": name,
            "path": item.path,
            "size": item.stat.st_size,
            "mtime_ns": item.stat.st_mtime_ns,
            "change": change_stamp(item.stat),
            "config_stamp": (config.st_size, config.st_mtime_ns) if config else None,
            "error": error,
            "error_type": error_type,
            "_hashes": self._hashes,
            "spec": spec,
        }

    def _read(self, path: Path, kind: str) -> tuple[tuple[Any, str | None, type[NegIPError]], bool]:
        """(spec, error, error type) of a file, and whether the error may go away by itself
        (the file could not be opened: permissions, a lock, a file system error)."""
        transient = False
        try:
            # Module-level lookups, so that tests can count the reads.
            spec = read_adapter_spec(path) if kind == "adapter" else read_encoder_spec(path)
        except NegIPError as exc:
            error, error_type = _without_folders(str(exc), path), type(exc)
            transient = isinstance(exc.__cause__, OSError)
        except OSError as exc:
            error, error_type = (
                _without_folders(f"{path} cannot be read ({exc})", path),
                ModelFileError,
            )
            transient = True
        except Exception as exc:  # a bug or an odd file: list it with the reason, keep going
            logger.warning("could not inspect %s", _shown(path), exc_info=True)
            error = _without_folders(
                f"{path} could not be inspected ({type(exc).__name__}: {exc})", path
            )
            error_type = ModelFileError
        else:
            return (spec, None, ModelFileError), False
        logger.warning("%s %s is listed but cannot be used: %s", kind, _shown(path), error)
        return (None, error, error_type), transient

    def _find(self, wanted: str, listing: Callable[[], list[_E]]) -> tuple[_E | None, str | None]:
        """Look a name up (once more after a refresh, for files added since); with its hash.

        "name (folder) [hash]" whose qualified name is no longer listed (its twin was removed,
        or another folder now comes first) is the file of that name and hash, if one is there.
        """
        match = _HASH_IN_NAME.match(wanted)
        for attempt in range(2):
            if attempt:
                self.refresh()
            entries = listing()
            entry = _lookup(entries, wanted)
            if entry is not None:
                return entry, None
            if match and match.group("name"):
                entry = _lookup(entries, match.group("name"))
                if entry is not None:
                    return entry, match.group("hash").lower()
        if match:
            label = match.group("name")
            stems = {label.casefold(), _QUALIFIER.sub("", label).casefold()}
            wanted_hash = match.group("hash").lower()
            entries = listing()
            # A file of that name first, then any file: a renamed file (or folder) keeps its
            # hash, as A1111 finds a renamed checkpoint by its hash. Files not hashed yet are
            # hashed now, once (they are cached), on this failing path only.
            named = [entry for entry in entries if _stem(entry) in stems]
            others = [entry for entry in entries if entry.error is None and entry not in named]
            for entry in (*named, *others):
                if (entry.sha256 or "").startswith(wanted_hash):
                    logger.info("%s is the file listed as %s now", wanted, entry.name)
                    return entry, wanted_hash
        return None, None

    def _fresh(self, entry: _E, listing: Callable[[], list[_E]]) -> _E:
        """``entry`` as its file is now: the folders are scanned again when the file changed
        since they were (a hash compared with the old file's would warn of a mismatch that is
        not there, or miss one that is)."""
        try:
            stat = entry.path.stat()
        except OSError:
            return entry  # gone: loading it says so
        if (stat.st_size, stat.st_mtime_ns, change_stamp(stat)) == (
            entry.size,
            entry.mtime_ns,
            entry.change,
        ):
            return entry
        self.refresh()
        return next((other for other in listing() if other.name == entry.name), entry)

    def _check_hash(self, entry: _E, wanted_hash: str, entries: Sequence[_E], kind: str) -> _E:
        current = entry.sha256
        if current is None or current.startswith(wanted_hash):
            return entry
        # The same model may sit in several folders; the hash says which one was meant.
        stem = _stem(entry)
        for other in entries:
            if other is entry or _stem(other) != stem:
                continue
            other_hash = other.sha256
            if other_hash and other_hash.startswith(wanted_hash):
                logger.info("%s [%s] is the file %s", entry.name, wanted_hash, other.name)
                return other
        logger.warning(
            "%s %s has the hash %s, not %s as requested (the infotext was made with another "
            "file of that name); using %s",
            kind,
            entry.name,
            current[:10],
            wanted_hash,
            _shown(entry.path),
        )
        return dataclasses.replace(entry, hash_mismatch=True)

    def _auto_encoder(self, spec: AdapterSpec, adapter_label: str) -> EncoderEntry:
        for attempt in range(2):
            if attempt:
                self.refresh()
            # (not the architecture it was trained with, listing position, entry)
            fitting = [
                (e.spec.architecture != spec.encoder_architecture, index, e)
                for index, e in enumerate(self.encoders())
                if e.spec is not None and spec.fits_encoder(e.spec)
            ]
            if fitting:
                chosen = min(fitting, key=lambda f: f[:2])[2]
                logger.debug("image encoder for %s: %s (auto)", adapter_label, chosen.name)
                return chosen
        raise IncompatibleModelError(self._no_encoder_message(spec, adapter_label))

    def _no_encoder_message(self, spec: AdapterSpec, adapter_label: str) -> str:
        arch = spec.encoder_architecture
        dim_name = "projection dim" if spec.encoder_output == "image_embeds" else "hidden width"
        need = (
            f"the {arch} image encoder ({dim_name} {spec.encoder_dim})"
            if arch
            else (f"an image encoder with {dim_name} {spec.encoder_dim}")
        )
        found = [
            f"{e.name} ({e.spec.architecture}, width {e.spec.width}, projection "
            f"{e.spec.projection_dim})"
            if e.spec
            else f"{e.name} (unreadable)"
            for e in self.encoders()
        ]
        have = (
            f"none of the installed image encoders fits ({_names_hint(found)})"
            if found
            else "no image encoder is installed"
        )
        official_name = download.official_encoder_for(arch)
        official = download.OFFICIAL_MODELS[official_name] if official_name else None
        where = (
            f"put {official.name} (h94/IP-Adapter {official.source_folder}: "
            f"{' and '.join(f.target.rsplit('/', 1)[-1] for f in official.files)}) into "
            f"{ENCODER_FOLDER_HINT}/{official.name}/"
            if official
            else f"put a fitting CLIP vision encoder into {ENCODER_FOLDER_HINT}"
        )
        auto = (
            ", or enable the automatic download of image encoders in Settings to fetch it"
            if official
            else ""
        )
        return f"{adapter_label} needs {need}, but {have}: {where}; {_FOUND_NEXT}{auto}"

    def _unknown_message(self, name: str, kind: str, entries: Sequence[ModelEntry]) -> str:
        names = [e.name for e in entries]
        folder = ADAPTER_FOLDER_HINT if kind == "IP-Adapter" else ENCODER_FOLDER_HINT
        misplaced = self._folder_named_like(name.strip(), kind)
        if misplaced:
            return (
                f"there is no {kind} named {name!r}: {misplaced} is a folder, not a model file "
                f"(an unpacked download?). Put the model file itself into {folder}: {_FOUND_NEXT}"
            )
        listed = f"installed: {_names_hint(names)}" if names else f"no {kind} is installed"
        return (
            f"there is no {kind} named {name!r} ({listed}); {_PATHS_REFUSED}. Put the file into "
            f"{folder}: {_FOUND_NEXT}"
        )

    def _folder_named_like(self, name: str, kind: str) -> str | None:
        """``label/x.safetensors`` where a scanned folder holds a FOLDER of the model's name."""
        adapters = kind == "IP-Adapter"
        folders = self._adapter_folders if adapters else self._encoder_folders
        suffixes = ADAPTER_SUFFIXES if adapters else ENCODER_SUFFIXES
        if name.lower().endswith(suffixes):
            candidates = [name]
        else:
            candidates = [name + suffix for suffix in suffixes]
        for folder in folders:
            for candidate in candidates:
                try:
                    is_folder = (folder.path / candidate).is_dir()
                except OSError:  # a name the file system cannot hold (too long): no such folder
                    is_folder = False
                if is_folder:
                    return f"{folder.display_label}/{candidate}"
        return None


#: The folder qualifier of a listed name: "x (sub)", "x (bin)", "x (2)".
_QUALIFIER = re.compile(r"\s*\([^()]*\)$")


def _stem(entry: ModelEntry) -> str:
    """The name a model has before qualifiers: its file stem, or its folder's name for a model
    folder (``image_encoder/model.safetensors``), case-folded."""
    if entry.file_name.lower() in FOLDER_WEIGHT_NAMES:
        return entry.path.parent.name.casefold()
    return entry.path.stem.casefold()


def _dangling_message(path: Path, kind: str) -> str:
    folder = ADAPTER_FOLDER_HINT if kind == "adapter" else ENCODER_FOLDER_HINT
    return (
        f"{_shown(path)} is a link to a file that is not there (a drive that is not mounted, or "
        f"a file moved away): mount the drive or mend the link, or put the file itself into "
        f"{folder}"
    )


def _adapter_and_label(
    adapter: AdapterSpec | AdapterEntry, adapter_name: str | None
) -> tuple[AdapterSpec, str]:
    if isinstance(adapter, AdapterEntry):
        return adapter.usable_spec(), adapter_name or adapter.name
    return adapter, adapter_name or "this IP-Adapter"


def _tokens(spec: AdapterSpec) -> int | None:
    """Image tokens per image; for full-face those of the published encoder it needs."""
    if spec.num_tokens is not None:
        return spec.num_tokens
    known = KNOWN_ARCHITECTURES.get(spec.encoder_architecture or "")
    if known is None:
        return None
    _, _, patch, image_size, _ = known
    return spec.tokens_for(1 + (image_size // patch) ** 2)


def _without_folders(message: str, path: Path) -> str:
    """``message`` with the folders above the model removed (API answers must not reveal
    server paths): "clip_h.pth", "image_encoder/config.json"."""
    base = path.parent.parent if path.name.lower() in FOLDER_WEIGHT_NAMES else path.parent
    return message.replace(str(base) + os.sep, "").replace(str(base), base.name)


def _shown(path: Path) -> str:
    """The model's file as shown to users: its name, or "folder/name" for a model folder."""
    return _without_folders(str(path), path)
