"""Reading model files into flat CPU state dicts, safely.

``.safetensors`` is read with safetensors; ``.bin``/``.pth``/``.pt``/``.ckpt`` only with
``torch.load(weights_only=True)``, which refuses pickled code instead of running it. Nested
dicts (the IP-Adapter ``.bin`` is ``{"image_proj": {...}, "ip_adapter": {...}}``) are flattened
with ``.`` so that both containers of one model give the same keys.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lib_negip import logger
from lib_negip.errors import ModelFileError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
MODEL_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# A1111 replaces torch.load with a checker (modules/safe.py) that rejects zip entries written by
# current torch (".format_version"); the host hands us the original loader. weights_only=True is
# itself the safe loader, so nothing is lost by bypassing the checker.
_torch_load: Callable[..., Any] | None = None

# Safetensors headers are small JSON; anything this large is garbage, not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def set_torch_load(fn: Callable[..., Any] | None) -> None:
    """Use ``fn`` (A1111's ``modules.safe.unsafe_torch_load``) instead of ``torch.load``.

    ``fn`` is always called with ``weights_only=True`` and ``map_location="cpu"``. ``None``
    goes back to ``torch.load`` as it is at call time.
    """
    global _torch_load
    _torch_load = fn


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a model file into a flat ``{key: tensor}`` dict on the CPU.

    Raises :class:`ModelFileError` with a message for the user when the file cannot be read.
    """
    path = Path(path)
    _check_path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        tree: Mapping[str, Any] = _load_safetensors(path)
    else:
        tree = _load_pickle(path)
    return _flatten_tensors(tree, path)


def describe_state_dict(state_dict: Mapping[str, Any], limit: int = 6) -> str:
    """Summarise a state dict for error messages: count, dtypes and a few keys with shapes."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return "no tensors"
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    dtype_text = ", ".join(f"{name} x{count}" for name, count in dtypes.most_common())
    keys = sorted(tensors)
    shown = ", ".join(f"{k} {list(tensors[k].shape)}" for k in keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} tensors ({dtype_text}): {shown}{more}"


def _check_path(path: Path) -> None:
    suffix = path.suffix.lower()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in MODEL_SUFFIXES)
        hint = (
            f"; it holds {', '.join(inside[:4])}: choose one of those files"
            if inside
            else "; choose the model file itself"
        )
        msg = f"{path} is a folder, not a model file{hint}"
        raise ModelFileError(msg)
    if not path.exists():
        msg = f"model file {path} does not exist: check the name, or refresh the model list"
        raise ModelFileError(msg)
    if suffix not in MODEL_SUFFIXES:
        msg = (
            f"{path.name} has the extension {suffix or '(none)'!r}, which this extension does not "
            f"read; expected one of {', '.join(MODEL_SUFFIXES)}: use the .safetensors or .bin "
            "release of the model"
        )
        raise ModelFileError(msg)
    size = path.stat().st_size
    if size == 0:
        msg = f"{path} is empty (0 bytes): the download failed; download the model again"
        raise ModelFileError(msg)
    with path.open("rb") as f:
        head = f.read(64)
    # Failed downloads commonly leave a Git LFS pointer or an HTML error page under the model's name.
    if head.startswith(b"version https://git-lfs"):
        msg = (
            f"{path} is a Git LFS pointer ({size} bytes), not the model: download the real file "
            "(the 'download' link, or git lfs pull)"
        )
        raise ModelFileError(msg)
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
        msg = (
            f"{path} is a web page ({size} bytes), not a model: the download saved an error or "
            "login page; download the model again"
        )
        raise ModelFileError(msg)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        msg = (
            f"{path} could not be read as safetensors ({type(exc).__name__}: {exc}); "
            "the file is damaged: download it again"
        )
        raise ModelFileError(msg) from exc


def _check_safetensors_header(path: Path) -> None:
    """Check the header ourselves: safetensors' own errors ("MetadataIncompleteBuffer") say
    nothing a user can act on, and their wording differs between releases."""
    size = path.stat().st_size
    damaged = "the file is damaged or not a safetensors file: download it again"
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            msg = (
                f"{path} is truncated: {size} bytes, too short for a safetensors header; {damaged}"
            )
            raise ModelFileError(msg)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
            msg = (
                f"{path} has a corrupt safetensors header: it declares {header_len} header bytes "
                f"in a file of {size} bytes; {damaged}"
            )
            raise ModelFileError(msg)
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError) as exc:
        msg = f"{path} has a corrupt safetensors header ({type(exc).__name__}: {exc}); {damaged}"
        raise ModelFileError(msg) from exc
    needed = 8 + header_len + data_end
    if needed > size:
        msg = (
            f"{path} is truncated: its header describes {needed} bytes but the file has {size} "
            "bytes (an interrupted download?); download it again"
        )
        raise ModelFileError(msg)


_CHECKPOINT_CONTEXT_KEY = re.compile(r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")


def checkpoint_context_width(path: str | Path) -> int | None:
    """The cross-attention context width of a web UI checkpoint (768 for SD1.x, 2048 for SDXL),
    read from its safetensors header alone, without loading a tensor. None where the header
    cannot tell: another container (a pickle cannot be read without loading it), an unreadable
    or damaged file (the web UI says so itself when it loads it), no ``attn2.to_k`` weight."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > _MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(header_len).decode("utf-8"))
        widths = {
            int(entry["shape"][1])
            for key, entry in header.items()
            if _CHECKPOINT_CONTEXT_KEY.match(key) and len(entry["shape"]) == 2
        }
    except (
        OSError,
        struct.error,
        UnicodeDecodeError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ):
        return None
    return widths.pop() if len(widths) == 1 else None


_REFUSED_GLOBAL = re.compile(r"Unsupported (?:global|class)[:\s]+(?:GLOBAL\s+)?([\w.]+)")


# torch.save writes a zip archive (current) or a protocol-2 pickle (legacy, before torch 1.6).
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def _load_pickle(path: Path) -> Any:
    with path.open("rb") as f:
        head = f.read(16)
    if not head.startswith(_TORCH_FILE_STARTS):
        msg = (
            # Four bytes name a format (b'GGUF', b'\x89PNG'); more would show a linked file's text.
            f"{path} is not a readable torch file: it starts with {head[:4]!r}, where a .bin/.pth/.pt "
            "model starts with a zip or pickle header; it is damaged or another kind of file: "
            "download the model again"
        )
        raise ModelFileError(msg)
    if head.startswith(b"PK"):
        _refuse_torchscript(path)
    load = _torch_load if _torch_load is not None else torch.load
    try:
        return load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported operand" in text:
            # The weights-only unpickler met a byte that is no pickle instruction: garbage, not code.
            found = re.search(r"Unsupported operand \d+", text)
            what = found.group(0) if found else "an invalid pickle instruction"
            msg = (
                f"{path} is not a readable torch file: its data is damaged ({what}, not a valid "
                "PyTorch pickle); download the model again"
            )
            raise ModelFileError(msg) from exc
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            found = _REFUSED_GLOBAL.search(text)
            what = f" (it refers to {found.group(1)})" if found else ""
            msg = (
                f"{path} contains pickled code or Python objects other than tensors{what}; it "
                "was not loaded, because unpickling it could run that code. Use the "
                ".safetensors release of this model, or a .bin from a source you trust that "
                "holds only tensors"
            )
            raise ModelFileError(msg) from exc
        msg = f"{path} is not a readable torch file ({exc}); download it again"
        raise ModelFileError(msg) from exc
    except OSError as exc:  # permissions, a lock, the disk: not the file's content
        msg = f"{path} cannot be read ({exc.strerror or exc}): check that the file is readable"
        raise ModelFileError(msg) from exc
    except Exception as exc:
        # torch reports truncation and garbage as RuntimeError, EOFError, KeyError, ...
        msg = (
            f"{path} could not be read as a torch file ({type(exc).__name__}: "
            f"{_first_line(exc)}); it is damaged or truncated: download it again"
        )
        raise ModelFileError(msg) from exc


def _refuse_torchscript(path: Path) -> None:
    """Refuse a TorchScript archive before ``torch.load`` sees it: torch before 2.6 hands such a
    zip to ``torch.jit.load``, which ignores ``weights_only`` and runs the code it holds (A1111
    1.10 installs torch 2.1.2). A state dict's zip holds only ``data.pkl``, its tensors' data
    and bookkeeping; TorchScript adds ``code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load says what is wrong with it
    for name in names:
        parts = name.split("/")
        if "code" in parts[:-1] or parts[-1] in ("constants.pkl", "bytecode.pkl"):
            msg = (
                f"{path} is a TorchScript archive (it holds code, {name}), not a state dict of "
                "tensors; it was not loaded, because loading it could run that code. Use the "
                ".safetensors release of this model"
            )
            raise ModelFileError(msg)


def _first_line(exc: BaseException) -> str:
    # torch appends paragraphs of advice; the first sentence is the fact.
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ")[0][:200] if lines else ""


def _flatten_tensors(tree: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(tree, Mapping):
        msg = (
            f"{path} holds a {type(tree).__name__}, not a dict of tensors; expected a state "
            "dict: use the model's published file"
        )
        raise ModelFileError(msg)
    # Training checkpoints wrap the weights with bookkeeping (epoch, optimizer, ...).
    wrapped = tree.get("state_dict")
    if isinstance(wrapped, Mapping):
        dropped = [str(k) for k in tree if k != "state_dict"]
        if dropped:
            logger.debug("%s: using 'state_dict', ignoring %s", path.name, dropped)
        tree = wrapped
    flat: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in _walk(tree, ""):
        if not isinstance(value, torch.Tensor):
            skipped.append(f"{key} ({type(value).__name__})")
            continue
        if key in flat:
            msg = f"{path} has the key {key!r} twice after flattening nested dicts; the file is not a usable state dict"
            raise ModelFileError(msg)
        flat[key] = value
    if skipped:
        logger.debug("%s: ignoring %d non-tensor entries: %s", path.name, len(skipped), skipped[:8])
    if not flat:
        msg = (
            f"{path} contains no tensors (found {', '.join(skipped[:6]) or 'an empty dict'}); "
            "expected model weights: choose the model file itself"
        )
        raise ModelFileError(msg)
    return flat


def _walk(tree: Mapping[Any, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _walk(value, f"{name}.")
        else:
            yield name, value
