"""Downloading the official IP-Adapter models and image encoders (h94/IP-Adapter on Hugging Face).

Every download goes to a temporary name in the target folder that the model registry never
lists (hidden, ``.part``), is checked (not empty, not a web page or an LFS pointer, a
safetensors header that parses and fits the file, a JSON object for ``config.json``) and only
then renamed to its final name with :func:`os.replace`. On any failure the temporary file is
deleted and :class:`DownloadError` says what happened, so a partial file is never listed or
loaded.

The transfer itself is a ``fetch(url, destination)`` function: the host passes one built on
A1111's downloader (:func:`a1111_fetch`, which shows A1111's progress bar); the default is
:func:`urllib_fetch`. No A1111 import here.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lib_negip import __version__, files, logger
from lib_negip.adapter import AdapterSpec
from lib_negip.errors import ArgumentError, ModelFileError, NegIPError

HF_BASE_URL = "https://huggingface.co/h94/IP-Adapter/resolve/main"

#: ``fetch(url, destination)``: write the body of ``url`` to the file ``destination``.
Fetch = Callable[[str, Path], None]

ADAPTER_FOLDER = "ipadapter"  # under A1111's models folder
ENCODER_FOLDER = "clip_vision"

_CHUNK = 1024 * 1024
_HASH_SUFFIX = re.compile(r"\s*\[[0-9A-Fa-f]{8,64}\]$")
_TIMEOUT_S = 60.0


class DownloadError(ModelFileError):
    """A download that failed (network, HTTP status, disk, or a damaged file received)."""


@dataclass(frozen=True)
class OfficialFile:
    """One file of an official model: where it is in the repository and where it goes."""

    repo_path: str  # in h94/IP-Adapter, e.g. "models/image_encoder/model.safetensors"
    target: str  # relative to the kind's folder, e.g. "CLIP-ViT-H-14-laion2B-s32B-b79K/config.json"

    def url(self, base_url: str = HF_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.repo_path}"


@dataclass(frozen=True)
class OfficialModel:
    """An official model: an adapter file, or an encoder folder (config.json + weights)."""

    name: str  # the name the registry lists it under once downloaded
    kind: Literal["adapter", "encoder"]
    files: tuple[OfficialFile, ...]  # the weights last: a model folder is complete when they exist
    encoder: str | None = None  # adapters: the official encoder it needs
    architecture: str | None = None  # encoders: the open_clip architecture

    @property
    def folder(self) -> str:
        """The folder under A1111's ``models`` it goes to: "ipadapter" or "clip_vision"."""
        return ADAPTER_FOLDER if self.kind == "adapter" else ENCODER_FOLDER

    @property
    def weights(self) -> OfficialFile:
        return self.files[-1]

    @property
    def source_folder(self) -> str:
        """The repository folder it comes from, e.g. "sdxl_models/image_encoder"."""
        return self.weights.repo_path.rsplit("/", 1)[0]


VIT_H_ENCODER = "CLIP-ViT-H-14-laion2B-s32B-b79K"
VIT_BIGG_ENCODER = "CLIP-ViT-bigG-14-laion2B-39B-b160k"


def _encoder(name: str, architecture: str, source: str) -> OfficialModel:
    return OfficialModel(
        name=name,
        kind="encoder",
        # config.json first: the registry lists the folder once the weights exist.
        files=(
            OfficialFile(f"{source}/config.json", f"{name}/config.json"),
            OfficialFile(f"{source}/model.safetensors", f"{name}/model.safetensors"),
        ),
        architecture=architecture,
    )


def _adapter(stem: str, folder: str, encoder: str) -> OfficialModel:
    file_name = f"{stem}.safetensors"
    return OfficialModel(
        name=stem,
        kind="adapter",
        files=(OfficialFile(f"{folder}/{file_name}", file_name),),
        encoder=encoder,
    )


#: The official files by name: SD1.5 adapters in ``models/``, SDXL in ``sdxl_models/``, and the
#: two image encoders (transformers layout with config.json).
OFFICIAL_MODELS: dict[str, OfficialModel] = {
    model.name: model
    for model in (
        _adapter("ip-adapter_sd15", "models", VIT_H_ENCODER),
        _adapter("ip-adapter_sd15_light", "models", VIT_H_ENCODER),
        _adapter("ip-adapter_sd15_vit-G", "models", VIT_BIGG_ENCODER),
        _adapter("ip-adapter-plus_sd15", "models", VIT_H_ENCODER),
        _adapter("ip-adapter-plus-face_sd15", "models", VIT_H_ENCODER),
        _adapter("ip-adapter-full-face_sd15", "models", VIT_H_ENCODER),
        _adapter("ip-adapter_sdxl", "sdxl_models", VIT_BIGG_ENCODER),
        _adapter("ip-adapter_sdxl_vit-h", "sdxl_models", VIT_H_ENCODER),
        _adapter("ip-adapter-plus_sdxl_vit-h", "sdxl_models", VIT_H_ENCODER),
        _adapter("ip-adapter-plus-face_sdxl_vit-h", "sdxl_models", VIT_H_ENCODER),
        _encoder(VIT_H_ENCODER, "ViT-H-14", "models/image_encoder"),
        _encoder(VIT_BIGG_ENCODER, "ViT-bigG-14", "sdxl_models/image_encoder"),
    )
}


def official_model(name: str) -> OfficialModel:
    """The official model called ``name`` (stem, file name, or "name [hash]" from infotext);
    :class:`ArgumentError` if there is none."""
    key = _HASH_SUFFIX.sub("", name.strip()).casefold().removesuffix(".safetensors")
    for candidate in OFFICIAL_MODELS.values():
        if candidate.name.casefold() == key:
            return candidate
    msg = (
        f"{name!r} is not an official IP-Adapter model this extension can download; known: "
        f"{', '.join(OFFICIAL_MODELS)}. Download other models by hand into models/ipadapter "
        "(adapters) or models/clip_vision (image encoders)"
    )
    raise ArgumentError(msg)


def is_official(name: str) -> bool:
    """Whether ``name`` (stem, file name or "name [hash]") is an official downloadable model."""
    try:
        official_model(name)
    except ArgumentError:
        return False
    return True


def official_encoder_for(needs: AdapterSpec | str | None) -> str | None:
    """The name of the official image encoder for an adapter's spec or an open_clip
    architecture ("ViT-H-14", "ViT-bigG-14"); None when no official encoder fits."""
    architecture = needs.encoder_architecture if isinstance(needs, AdapterSpec) else needs
    return next(
        (
            m.name
            for m in OFFICIAL_MODELS.values()
            if m.kind == "encoder" and architecture is not None and m.architecture == architecture
        ),
        None,
    )


def encoder_for_official(adapter_name: str) -> OfficialModel:
    """The official image encoder an official adapter needs."""
    adapter = official_model(adapter_name)
    if adapter.encoder is None:
        msg = f"{adapter.name} is an image encoder, not an IP-Adapter; choose an IP-Adapter name"
        raise ArgumentError(msg)
    return OFFICIAL_MODELS[adapter.encoder]


def missing_files(name: str, models_dir: Path) -> list[OfficialFile]:
    """The files of official model ``name`` not (or empty) under ``models_dir`` yet."""
    model = official_model(name)
    folder = Path(models_dir) / model.folder
    return [f for f in model.files if not _present(folder / f.target)]


def missing_official_for(adapter_name: str, models_dir: Path) -> list[OfficialFile]:
    """The encoder files the official adapter ``adapter_name`` needs that are not under
    ``models_dir`` (A1111's ``models``) yet; empty when its encoder is there."""
    return missing_files(encoder_for_official(adapter_name).name, models_dir)


def download_official(
    name: str,
    models_dir: Path,
    *,
    fetch: Fetch | None = None,
    base_url: str = HF_BASE_URL,
) -> Path:
    """Download the official model ``name`` under ``models_dir`` (A1111's ``models`` folder);
    returns its weights file.

    Adapters go to ``models/ipadapter/<file>``, image encoders to
    ``models/clip_vision/<encoder name>/`` with their ``config.json`` (see
    :attr:`OfficialModel.folder` and :attr:`OfficialFile.target`). Files already there are
    kept. Raises :class:`ArgumentError` for an unknown name and :class:`DownloadError` when a
    download fails (nothing partial is left behind).
    """
    model = official_model(name)
    target_dir = Path(models_dir) / model.folder
    for official in model.files:
        destination = target_dir / official.target
        if _present(destination):
            logger.debug("%s: %s is already there", model.name, official.target)
            continue
        url = official.url(base_url)
        shown = f"models/{model.folder}/{official.target}"
        logger.info("downloading %s to %s", url, shown)
        download_file(url, destination, fetch=fetch, shown_as=shown)
    return target_dir / model.weights.target


def download_file(
    url: str, destination: Path, *, fetch: Fetch | None = None, shown_as: str | None = None
) -> Path:
    """Download ``url`` to ``destination`` atomically: a temporary name, checks, then rename.

    ``shown_as`` names the destination in messages (default: its file name); messages never
    contain absolute paths.
    """
    destination = Path(destination)
    shown = shown_as or destination.name
    # A folder made here (an encoder's) goes again after a failure, if nothing else is in it.
    created = None if destination.parent.exists() else destination.parent
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"Cannot create the folder for {shown} ({_reason(exc)}); nothing was downloaded"
        raise DownloadError(msg) from exc
    temporary = temporary_path(destination)
    try:
        (fetch or urllib_fetch)(url, temporary)
        if not temporary.is_file():
            msg = "the downloader finished without writing the file"
            raise DownloadError(msg)
        verify_download(temporary, destination.name)
        os.replace(temporary, destination)
    except NegIPError as exc:
        _remove_partial(temporary, created)
        msg = f"Downloading {shown} from {url} failed: {exc}. Nothing was saved; try again"
        raise DownloadError(msg) from exc
    except Exception as exc:
        _remove_partial(temporary, created)
        # OSError texts carry absolute paths; messages may reach API clients.
        reason = _reason(exc).replace(str(temporary), shown).replace(str(destination.parent), ".")
        msg = (
            f"Downloading {shown} from {url} failed: {reason}. Nothing was saved; try again, or "
            f"download the file by hand to {shown}"
        )
        raise DownloadError(msg) from exc
    except BaseException:  # an interrupt: still never leave a partial file behind
        _remove_partial(temporary, created)
        raise
    logger.info("downloaded %s (%d bytes)", shown, destination.stat().st_size)
    return destination


def temporary_path(destination: Path) -> Path:
    """A unique temporary name beside ``destination`` that the registry never lists
    (hidden and ``.part``); A1111's downloader adds its own ``.partial`` on top, also skipped."""
    return destination.with_name(f".negip-{uuid.uuid4().hex[:12]}-{destination.name}.part")


def verify_download(path: Path, final_name: str) -> None:
    """Raise :class:`DownloadError` unless ``path`` looks like a complete ``final_name``."""
    size = path.stat().st_size
    if size == 0:
        msg = "the server sent an empty file"
        raise DownloadError(msg)
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        msg = f"the server sent a Git LFS pointer ({size} bytes) instead of the file"
        raise DownloadError(msg)
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
        msg = (
            f"the server sent a web page ({size} bytes) instead of the file (a login page, a "
            "proxy or an error page)"
        )
        raise DownloadError(msg)
    suffix = Path(final_name).suffix.lower()
    if suffix in files.SAFETENSORS_SUFFIXES:
        try:
            files._check_safetensors_header(path)
        except ModelFileError as exc:
            text = str(exc).replace(str(path), "the downloaded file")
            msg = f"the file received is not a complete safetensors file ({text})"
            raise DownloadError(msg) from exc
    elif suffix == ".json":
        try:
            parsed = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = f"the file received is not valid JSON ({exc}); the download was cut short?"
            raise DownloadError(msg) from exc
        if not isinstance(parsed, dict):
            msg = f"the file received is a JSON {type(parsed).__name__}, not an object"
            raise DownloadError(msg)


def urllib_fetch(url: str, destination: Path, *, timeout: float = _TIMEOUT_S) -> None:
    """The default ``fetch``: stream ``url`` into ``destination`` with urllib.

    Refuses early when the announced size exceeds the free disk space, and raises when the
    connection closes before the announced size arrived.
    """
    request = urllib.request.Request(
        url, headers={"User-Agent": f"sd-webui-negative-image-prompt/{__version__}"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None:
            free = shutil.disk_usage(destination.parent).free
            if expected > free:
                raise OSError(
                    errno.ENOSPC,
                    f"{expected} bytes are needed but only {free} bytes are free on the disk",
                )
        written = 0
        with destination.open("wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except http.client.IncompleteRead as exc:
                    written += len(exc.partial)
                    raise _connection_closed(written, expected) from exc
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
        if expected is not None and written != expected:
            raise _connection_closed(written, expected)


def a1111_fetch(load_file_from_url: Callable[..., str]) -> Fetch:
    """A ``fetch`` built on A1111's ``modules.modelloader.load_file_from_url`` (its progress bar).

    It is called with ``model_dir`` and ``file_name`` of the temporary destination, which never
    exists beforehand, so A1111's "use the file present" shortcut never applies.
    """

    def fetch(url: str, destination: Path) -> None:
        written = load_file_from_url(
            url, model_dir=str(destination.parent), file_name=destination.name
        )
        if os.path.abspath(written) != os.path.abspath(destination):
            _remove(Path(written))
            msg = "A1111's downloader saved the file under another name than requested"
            raise DownloadError(msg)

    return fetch


def _connection_closed(written: int, expected: int | None) -> ConnectionError:
    of = f" of {expected}" if expected is not None else ""
    return ConnectionError(f"the connection closed after {written}{of} bytes")


def _present(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # e.g. still open on Windows; it stays hidden and unlisted
        logger.warning("could not remove the partial download %s: %s", path.name, exc)


def _remove_partial(temporary: Path, created: Path | None = None) -> None:
    """The temporary file and whatever the downloader left beside it under that unique name
    (its own partial file, which not every downloader removes after a failure), and the
    folder ``created`` for it when nothing else is in it."""
    _remove(temporary)
    try:
        leftovers = [p for p in temporary.parent.iterdir() if p.name.startswith(temporary.name)]
    except OSError:
        return
    for path in leftovers:
        _remove(path)
    if created is not None:
        with contextlib.suppress(OSError):  # not empty: a file of the same model is there
            created.rmdir()


def _reason(exc: BaseException) -> str:
    """What went wrong, in words a user can act on."""
    if isinstance(exc, urllib.error.HTTPError):
        advice = {
            401: "the server wants a login (a token, or a proxy in the way)",
            403: "access was refused (a token, or a proxy in the way)",
            404: "the file is not at this address (was it moved on Hugging Face?)",
            429: "too many requests: wait a while",
        }.get(exc.code, "the server refused the request")
        return f"HTTP {exc.code} {exc.reason}: {advice}"
    if isinstance(exc, urllib.error.URLError):
        return f"could not connect ({exc.reason}): check the internet connection and proxy"
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection closed early ({len(exc.partial)} bytes received)"
    if isinstance(exc, TimeoutError):
        return "the server stopped sending data (timeout)"
    if isinstance(exc, ConnectionError):
        return f"{exc}: the network connection broke"
    if isinstance(exc, http.client.HTTPException):
        return f"the connection failed ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        detail = exc.strerror or str(exc)
        return f"the disk is full ({detail}): free some space"
    if isinstance(exc, PermissionError):
        return f"no permission to write there ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}"
