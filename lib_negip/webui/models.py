"""The model folders, the registry that lists them and the caches of loaded models."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lib_negip import logger
from lib_negip.cache import LRUCache
from lib_negip.errors import ArgumentError, IncompatibleModelError, ModelFileError, NegIPError
from lib_negip.hijack import KeyValueWeights
from lib_negip.session import FeatureCache
from lib_negip.webui.settings import (
    IMAGES_IN_MEMORY_RANGE,
    MODELS_IN_MEMORY_RANGE,
    OPT_ADAPTER_DIRS,
    OPT_AUTO_DOWNLOAD,
    OPT_ENCODER_DIRS,
    OPT_IMAGES_IN_MEMORY,
    OPT_MODELS_IN_MEMORY,
    opt,
    setting_bool,
    setting_int,
)


@dataclasses.dataclass
class LoadedAdapter:
    """A cached adapter: its projection for the image tokens, its fused key/value weights."""

    adapter: Any  # lib_negip.adapter.IPAdapter, its per-layer modules released
    weights: list[KeyValueWeights]

    @property
    def spec(self) -> Any:
        return self.adapter.spec

    def release(self) -> None:
        for kv in self.weights:
            kv.release_device_copies()


def _load_adapter(path: Path) -> LoadedAdapter:
    from torch import nn

    from lib_negip.adapter import load_adapter

    adapter = load_adapter(path)
    weights = [KeyValueWeights(k, v) for k, v in adapter.layer_weights()]
    adapter.layers = nn.ModuleList()  # the fused copies are all the attention needs
    return LoadedAdapter(adapter=adapter, weights=weights)


def _file_key(path: Path) -> tuple[Any, ...]:
    """What tells a loaded file from the one there now: its path, size, mtime and change stamp
    (a file replaced by one of the same size and mtime, as ``cp -p`` leaves it, has another)."""
    from lib_negip.registry import change_stamp

    try:
        stat = path.stat()
    except OSError as error:
        msg = (
            f"{path.name} was listed but cannot be opened now ({error.strerror or error}): it was "
            "moved, deleted or is not readable; press the refresh button beside the model list"
        )
        raise ModelFileError(msg) from error
    return str(path), stat.st_size, stat.st_mtime_ns, change_stamp(stat)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors while loading a listed file, worded as the registry words them: no server folders
    (API answers must not reveal them), a file that cannot be opened said so."""
    from lib_negip.registry import _without_folders

    try:
        yield
    except NegIPError as error:
        raise type(error)(_without_folders(str(error), path)) from error
    except OSError as error:
        msg = f"{path} cannot be read ({error.strerror or error}): check that the file is readable"
        raise ModelFileError(_without_folders(msg, path)) from error


class Models:
    """Registry + bounded caches of loaded adapters and encoders, shared by all generations."""

    def __init__(self) -> None:
        self._registry: Any = None
        self._dirs: tuple = ()
        self.adapters: LRUCache[tuple, LoadedAdapter] = LRUCache(2, lambda _k, v: v.release())
        self.encoders: LRUCache[tuple, Any] = LRUCache(2)
        self.features = FeatureCache()
        self.file_reads = 0  # model files loaded from disk; cache hits do not count

    def folders(self) -> tuple[list[Path], list[Path]]:
        """Adapter folders and encoder folders, as the README's "Models" section lists them."""
        from modules import paths, shared

        from lib_negip.registry import ModelFolder

        models = Path(paths.models_path)
        ipadapter = models / "ipadapter"
        try:
            ipadapter.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a broken link (an unmounted drive), a file of that name
            _warn_once(ipadapter.name, f"models/ipadapter cannot be used ({error.strerror})")
        # The ControlNet extension's folders hold other models too: only IP-Adapter names count.
        adapter_dirs: list = [
            ipadapter,
            ModelFolder(models / "ControlNet", only_ip_adapter_names=True),
        ]
        encoder_dirs: list = [models / "clip_vision"]
        data_dir = Path(getattr(shared.cmd_opts, "data_dir", ".") or ".")
        for extension in _controlnet_folders(data_dir):
            adapter_dirs.append(ModelFolder(extension / "models", only_ip_adapter_names=True))
            encoder_dirs.append(extension / "annotator" / "downloads" / "clip_vision")
        base = Path(getattr(paths, "data_path", ".") or ".")  # as the store folder's
        adapter_dirs += _split_dirs(opt(OPT_ADAPTER_DIRS), base)
        encoder_dirs += _split_dirs(opt(OPT_ENCODER_DIRS), base)
        return adapter_dirs, encoder_dirs

    def registry(self, refresh: bool = False) -> Any:
        from lib_negip.registry import ModelRegistry

        dirs = self.folders()
        key = tuple(tuple(map(repr, group)) for group in dirs)
        if self._registry is None or key != self._dirs:
            self._registry = ModelRegistry(*dirs, hash_file=_a1111_hash)
            self._dirs = key
        elif refresh:
            self._registry.refresh()
        return self._registry

    def apply_limits(self) -> None:
        models = setting_int(OPT_MODELS_IN_MEMORY, *MODELS_IN_MEMORY_RANGE)
        self.adapters.set_limit(models)
        self.encoders.set_limit(models)
        self.features.set_limit(setting_int(OPT_IMAGES_IN_MEMORY, *IMAGES_IN_MEMORY_RANGE))

    def adapter(self, path: Path) -> LoadedAdapter:
        key = _file_key(path)
        loaded = self.adapters.get(key)
        if loaded is None:
            self.file_reads += 1
            with _reading(path):
                loaded = _load_adapter(path)
            _evict_older_versions(self.adapters, key)
            self.adapters.put(key, loaded)
        return loaded

    def encoder(self, path: Path) -> tuple[Any, tuple]:
        from lib_negip.encoder import load_image_encoder
        from lib_negip.registry import config_stamp

        # the config.json beside the weights is part of the encoder (its head, its activation)
        key = (*_file_key(path), config_stamp(path.parent))
        encoder = self.encoders.get(key)
        if encoder is None:
            self.file_reads += 1
            with _reading(path):
                encoder = load_image_encoder(path)
            _evict_older_versions(self.encoders, key)
            self.encoders.put(key, encoder)
        return encoder, key

    def clear(self) -> None:
        self.adapters.clear()
        self.encoders.clear()
        self.features.clear()


def _evict_older_versions(cache: LRUCache, key: tuple[Any, ...]) -> None:
    """Drop what was loaded from ``key``'s path before the file was replaced (another size or
    mtime): no request can use it again."""
    for old in cache.keys():  # noqa: SIM118 (a copy: entries are evicted in the loop)
        if old[0] == key[0] and old != key:
            cache.evict(old)


def _a1111_hash(path: Path) -> str | None:
    """sha256 through A1111's hash cache (cache/hashes, cache.json before 1.8): each file is
    hashed once; None with --no-hashing. A1111 keys that cache by title alone, so the title is
    the file's real path (encoders in folders are all called model.safetensors) with its size
    and change stamp: A1111 checks only the mtime, so a file replaced by one of the same size and
    mtime (``cp -p``) kept the old hash across restarts, and the infotext named the old file."""
    from modules import hashes

    from lib_negip.registry import change_stamp

    stat = path.stat()
    ctime, inode = change_stamp(stat)
    title = f"negip/{os.path.realpath(path)}@{stat.st_size}:{ctime}:{inode}"
    _forget_if_replaced(hashes, path, title)
    return hashes.sha256(str(path), title)


def _forget_if_replaced(hashes: Any, path: Path, title: str) -> None:
    """Drop the cached hash of ``title`` unless it was computed for the file's mtime. A1111
    hashes a file again only when it is NEWER than the one hashed: a file replaced by an older
    one (``mv`` of an earlier download, ``cp -p``, ``rsync -t``, an unpacked archive) kept the
    replaced file's hash, so the infotext named the old file and a restore's hash check read it
    too. (The registry's own cache already tells files apart by size and mtime.)"""
    cache = getattr(hashes, "cache", None)
    if not callable(cache):
        return
    try:
        entries = cache("hashes")
        cached = entries.get(title)
        if isinstance(cached, dict) and cached.get("mtime") != os.path.getmtime(path):
            del entries[title]
    except (OSError, KeyError, TypeError, AttributeError):
        return  # the file is gone (the hash then fails by itself), or another cache layout


def _split_dirs(value: str, base: Path) -> list[Path]:
    """The folders of an extra-folders setting; relative ones are inside the data folder (as
    the store folder's). One that is not a folder is warned about once and skipped."""
    parts = [part.strip() for part in str(value or "").replace("\n", ";").split(";")]
    folders = []
    for part in filter(None, parts):
        folder = base / Path(part).expanduser()
        if folder.is_dir():
            folders.append(folder)
        else:
            reason = "is a file" if folder.exists() else "does not exist"
            _warn_once(part, f"the extra model folder {part!r} {reason}; it is skipped")
    return folders


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """A console warning about a model folder setting, once per folder and process."""
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("Negative Image Prompt: %s", message)


def _controlnet_folders(data_dir: Path) -> list[Path]:
    from modules import paths

    roots = {Path(paths.script_path) / "extensions", data_dir / "extensions"}
    found = []
    for root in sorted(roots):
        if root.is_dir():
            found += [p for p in sorted(root.iterdir()) if "controlnet" in p.name.lower()]
    return found


MODELS = Models()


def entry_label(entry: Any) -> str:
    """ "name [hash]" for the infotext, as A1111 labels checkpoints."""
    return entry.infotext_name


#: The official base adapter(s) of each model family (by UNet context width), which "auto"
#: prefers; then the other fitting adapters (see :func:`auto_adapter_order`).
OFFICIAL_BASE: dict[int, tuple[str, ...]] = {
    768: ("ip-adapter_sd15",),
    2048: ("ip-adapter_sdxl", "ip-adapter_sdxl_vit-h"),
}


_VARIANT_ORDER = {"base": 0, "plus": 1, "full_face": 2}


def auto_adapter_order(entries: list[Any], width: int, layers: int) -> list[Any]:
    """The adapters "auto" may choose for a UNet of context width ``width`` with ``layers``
    cross-attention layers, best first: the family's official base adapter(s), then the others:
    by variant (base, plus, full-face), within a variant the general adapters before those made
    for faces, then by name. Unreadable files are left out."""
    base = OFFICIAL_BASE.get(width, ())
    fitting = [
        entry
        for entry in entries
        if entry.spec is not None
        and entry.spec.cross_attention_dim == width
        and entry.spec.num_layers == layers
    ]

    def rank(entry: Any) -> tuple[int, int, bool, str]:
        name = entry.name.casefold()
        official = base.index(name) if name in base else len(base)
        # Then the general adapters before the ones made for faces.
        variant = _VARIANT_ORDER.get(entry.spec.variant, len(_VARIANT_ORDER))
        return (official, variant, "face" in name, name)

    return sorted(fitting, key=rank)


def resolve_auto_adapter(registry: Any, unet: Any, encoder_name: str) -> Any:
    """The adapter "auto" chooses for ``unet``: the first of :func:`auto_adapter_order` for
    which an image encoder is installed (or the first, whose missing encoder is then reported).
    """
    from lib_negip.adapter import family_of
    from lib_negip.unet_layers import cross_attention_layers

    layers = cross_attention_layers(unet)
    width = layers[0].context_dim if layers else 0
    candidates = auto_adapter_order(registry.adapters(), width, len(layers))
    if not candidates and setting_bool(OPT_AUTO_DOWNLOAD):
        for name in OFFICIAL_BASE.get(width, ())[:1]:
            if _download_official(name):
                registry.refresh()
        candidates = auto_adapter_order(registry.adapters(), width, len(layers))
    for entry in candidates:
        try:
            registry.resolve_encoder(encoder_name, entry)
        except NegIPError:
            continue
        return entry
    if candidates:
        return candidates[0]  # resolving its encoder says what is missing
    others = [f"{entry.name} ({entry.spec.family})" for entry in registry.adapters() if entry.spec]
    found = f"installed for other families: {', '.join(others)}" if others else "none installed"
    official = ", ".join(OFFICIAL_BASE.get(width, ()))
    wanted = f"an IP-Adapter for it ({official})" if official else "an IP-Adapter made for it"
    # A download is offered only where one can help: for a family with an official adapter,
    # and (API) while the setting that would fetch it is off.
    switch_on = (
        ", or switch 'Download missing official IP-Adapter and image encoder files' on in "
        "Settings > Negative Image Prompt"
        if official and not setting_bool(OPT_AUTO_DOWNLOAD)
        else ""
    )
    msg = (
        f"model is 'auto', but no installed IP-Adapter fits the loaded checkpoint, which is "
        f"{family_of(width)} ({found}). Put {wanted} into models/ipadapter{switch_on}."
    )
    get = (
        f"Get {wanted} with 'Download official models' in the Negative Image Prompt accordion, "
        "or put a file into models/ipadapter and press the refresh button."
        if official
        else f"Put {wanted} into models/ipadapter and press the refresh button."
    )
    ui = (
        f"No installed IP-Adapter fits the loaded checkpoint, which is {family_of(width)} "
        f"({found}). {get}"
    )
    raise IncompatibleModelError(msg, ui=ui)


def resolve_adapter(registry: Any, name: str) -> Any:
    """The registry entry of ``name``, downloading an official file when allowed."""
    try:
        return registry.resolve_adapter(name)
    except ArgumentError:
        if not (setting_bool(OPT_AUTO_DOWNLOAD) and _download_official(name)):
            raise
        registry.refresh()
        return registry.resolve_adapter(name)


def resolve_encoder(registry: Any, name: str, adapter: Any) -> Any:
    """The registry entry of image encoder ``name`` ("auto" included) for the adapter entry
    ``adapter`` (its name appears in the answers), downloading the official one when allowed."""
    try:
        return registry.resolve_encoder(name, adapter)
    except NegIPError:
        if name != "auto" or not setting_bool(OPT_AUTO_DOWNLOAD):
            raise
        from lib_negip import download

        needed = download.official_encoder_for(adapter.spec)
        if needed is None or not _download_official(needed):
            raise
        registry.refresh()
        return registry.resolve_encoder(name, adapter)


def _download_official(name: str) -> bool:
    """Download an official file with A1111's own downloader (progress bar in the console)."""
    from modules import modelloader, paths

    from lib_negip import download

    if not download.is_official(name):
        return False

    def fetch(url: str, destination: Path) -> None:
        modelloader.load_file_from_url(
            url, model_dir=str(destination.parent), file_name=destination.name, progress=True
        )

    download.download_official(name, Path(paths.models_path), fetch=fetch)
    return True


def models_listing() -> dict[str, Any]:
    """The body of ``GET /negip/v1/models``."""
    return MODELS.registry(refresh=True).describe()


def adapter_choices(refresh: bool = False) -> list[str]:
    return MODELS.registry(refresh=refresh).adapter_names()


def encoder_choices(refresh: bool = False) -> list[str]:
    return MODELS.registry(refresh=refresh).encoder_names()
