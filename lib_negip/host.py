"""The A1111 glue: the only module besides ``ui.py`` that imports ``modules.*`` (lazily).

Flow of one generation (see DESIGN.md, "Data flow"):

``process``
    parse and validate the arguments, resolve the model files through the registry, load the
    adapter and the encoder (cached), encode the images (cached by content), build the
    :class:`~lib_negip.prompt.ImagePrompt` and start an
    :class:`~lib_negip.session.ImagePromptSession`; write the infotext.
``on_cfg_denoiser`` (registered to run after every other extension's callback)
    hijack the UNet that is about to run, if not yet, and append the image blocks to the cond and
    uncond conditioning.
``postprocess``
    remove the hijack.

A1111 catches and only logs exceptions raised in Script hooks and callbacks, so an error found
there would still give an image without the requested image prompts. Every such error is kept
and raised from the UNet's next forward call instead (:class:`~lib_negip.hijack.FailureTrap`),
where it reaches the user: the UI shows the message, the API answers HTTP 422 with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lib_negip import logger
from lib_negip.cache import LRUCache
from lib_negip.errors import (
    ArgumentError,
    IncompatibleModelError,
    ModelFileError,
    NegIPError,
    ResourceError,
)
from lib_negip.hijack import FailureTrap, KeyValueWeights
from lib_negip.session import (
    FeatureCache,
    ImagePromptSession,
    SideImages,
    build_image_prompt,
    pass_progress,
)

TITLE = "Negative Image Prompt"
SECTION = ("negip", "Negative Image Prompt")

# Settings (Settings tab, section "Negative Image Prompt"): key -> (default, label).
OPT_ADAPTER_DIRS = "negip_extra_adapter_dirs"
OPT_ENCODER_DIRS = "negip_extra_encoder_dirs"
OPT_MODELS_IN_MEMORY = "negip_models_in_memory"
OPT_IMAGES_IN_MEMORY = "negip_images_in_memory"
OPT_ENCODER_ON_GPU = "negip_encoder_on_gpu"
OPT_AUTO_DOWNLOAD = "negip_auto_download"

#: The sliders' ranges, which also bound values that arrive through the API unchecked.
MODELS_IN_MEMORY_RANGE = (1, 8)
IMAGES_IN_MEMORY_RANGE = (0, 512)

DEFAULTS: dict[str, Any] = {
    OPT_ADAPTER_DIRS: "",
    OPT_ENCODER_DIRS: "",
    OPT_MODELS_IN_MEMORY: 2,
    OPT_IMAGES_IN_MEMORY: 64,
    OPT_ENCODER_ON_GPU: False,
    OPT_AUTO_DOWNLOAD: False,
}


# Settings that decide which files the server reads or downloads: never changed through the API
# (POST /sdapi/v1/options, a request's override_settings); A1111 1.7+ enforces restrict_api.
RESTRICTED_SETTINGS = (OPT_ADAPTER_DIRS, OPT_ENCODER_DIRS, OPT_AUTO_DOWNLOAD)
FOLDER_SETTINGS = (OPT_ADAPTER_DIRS, OPT_ENCODER_DIRS)


def opt(key: str) -> Any:
    from modules import shared

    return getattr(shared.opts, key, DEFAULTS[key])


# --------------------------------------------------------------------------------------------
# Errors that reach the user


@functools.cache
def _request_error_class(error_type: type[NegIPError]) -> type[Exception]:
    """``error_type`` that is also FastAPI's ``HTTPException`` with status 422.

    The API turns an exception raised while generating into a response from its attributes
    (``status_code``, ``detail``); an ``HTTPException`` is answered without a traceback in the
    log. starlette 0.26's ``HTTPException`` has no ``__str__`` of its own and does not
    initialise ``Exception``: both bases are initialised explicitly.
    """
    try:
        from fastapi import HTTPException
    except ImportError:  # no web stack: the plain error is just as clear
        return error_type

    def __init__(self, message: str) -> None:
        error_type.__init__(self, message)
        HTTPException.__init__(self, status_code=422, detail=message)

    def __str__(self) -> str:
        return str(self.detail)

    return type(
        error_type.__name__,
        (error_type, HTTPException),
        {"__init__": __init__, "__str__": __str__, "__module__": __name__},
    )


def request_error(error: BaseException) -> Exception:
    """The exception to raise for ``error`` so that the UI and the API show its message."""
    if isinstance(error, NegIPError):
        return _request_error_class(type(error))(str(error))
    message = (
        f"Negative Image Prompt failed: {type(error).__name__}: {error}. The console has the "
        "details; please report it with them."
    )
    return _request_error_class(NegIPError)(message)


# --------------------------------------------------------------------------------------------
# Models


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


def _file_key(path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError as error:
        msg = (
            f"{path.name} was listed but cannot be opened now ({error.strerror or error}): it was "
            "moved, deleted or is not readable; press the refresh button beside the model list"
        )
        raise ModelFileError(msg) from error
    return str(path), stat.st_size, stat.st_mtime_ns


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
        """Adapter folders and encoder folders, as DESIGN.md lists them."""
        from modules import paths, shared

        from lib_negip.registry import ModelFolder

        models = Path(paths.models_path)
        ipadapter = models / "ipadapter"
        ipadapter.mkdir(parents=True, exist_ok=True)
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
        adapter_dirs += _split_dirs(opt(OPT_ADAPTER_DIRS))
        encoder_dirs += _split_dirs(opt(OPT_ENCODER_DIRS))
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
        models = _setting_int(OPT_MODELS_IN_MEMORY, *MODELS_IN_MEMORY_RANGE)
        self.adapters.set_limit(models)
        self.encoders.set_limit(models)
        self.features.set_limit(_setting_int(OPT_IMAGES_IN_MEMORY, *IMAGES_IN_MEMORY_RANGE))

    def adapter(self, path: Path) -> LoadedAdapter:
        key = _file_key(path)
        loaded = self.adapters.get(key)
        if loaded is None:
            self.file_reads += 1
            with _reading(path):
                loaded = _load_adapter(path)
            self.adapters.put(key, loaded)
        return loaded

    def encoder(self, path: Path) -> tuple[Any, tuple]:
        from lib_negip.encoder import load_image_encoder

        key = _file_key(path)
        encoder = self.encoders.get(key)
        if encoder is None:
            self.file_reads += 1
            with _reading(path):
                encoder = load_image_encoder(path)
            self.encoders.put(key, encoder)
        return encoder, key

    def clear(self) -> None:
        self.adapters.clear()
        self.encoders.clear()
        self.features.clear()


def _setting_int(key: str, low: int, high: int) -> int:
    """A numeric setting as an int in [low, high]; A1111 does not check values set through the
    API (override_settings, POST /sdapi/v1/options), so anything may arrive here."""
    value = opt(key)
    try:
        number = int(float(value))  # sliders store floats
    except (TypeError, ValueError, OverflowError):
        logger.warning("Setting %s is %r, not a number: using %s", key, value, DEFAULTS[key])
        return DEFAULTS[key]
    return min(max(number, low), high)


def _a1111_hash(path: Path) -> str | None:
    """sha256 through A1111's hash cache (cache.json): each file is hashed once, ever; None
    with --no-hashing."""
    from modules import hashes

    return hashes.sha256(str(path), f"negip/{path.name}")


def _split_dirs(value: str) -> list[Path]:
    parts = [part.strip() for part in str(value or "").replace("\n", ";").split(";")]
    return [Path(part).expanduser() for part in parts if part]


def _controlnet_folders(data_dir: Path) -> list[Path]:
    from modules import paths

    roots = {Path(paths.script_path) / "extensions", data_dir / "extensions"}
    found = []
    for root in sorted(roots):
        if root.is_dir():
            found += [p for p in sorted(root.iterdir()) if "controlnet" in p.name.lower()]
    return found


MODELS = Models()


# --------------------------------------------------------------------------------------------
# One generation


class Generation:
    """The state between ``process`` and ``postprocess``; at most one exists at a time."""

    lock = threading.Lock()
    current: Generation | None = None
    failure: BaseException | None = None  # kept until raised from a UNet call, or end()
    trap: FailureTrap | None = None

    def __init__(self, p: Any, session: ImagePromptSession) -> None:
        self.p = p
        self.session = session

    @classmethod
    def end(cls) -> None:
        """Remove everything a generation installed; safe to call at any time."""
        with cls.lock:
            current, cls.current = cls.current, None
            trap, cls.trap = cls.trap, None
            cls.failure = None
        if current is not None:
            current.session.close()
        if trap is not None:
            trap.disarm()

    @classmethod
    def fail(cls, error: BaseException) -> None:
        """Keep ``error`` and raise it from the next UNet call (A1111 swallows it here)."""
        if isinstance(error, NegIPError):
            logger.error("Negative Image Prompt: %s", error)
        else:
            logger.exception("Negative Image Prompt failed", exc_info=error)
        cls.end()
        with cls.lock:
            cls.failure = request_error(error)
        unet = _current_unet()
        if unet is not None:  # else armed at the first denoiser call, on the UNet loaded by then
            cls.rearm_on(unet)

    @classmethod
    def rearm_on(cls, unet: Any) -> None:
        """Keep the pending failure's trap on the UNet about to run: the one loaded after
        process, the refiner, a reloaded model."""
        with cls.lock:
            failure, trap = cls.failure, cls.trap
            if failure is None or (trap is not None and trap.armed and trap.unet is unet):
                return
            if trap is not None:
                trap.disarm()
            cls.trap = FailureTrap(unet, failure, cleanup=cls.end)


def _current_unet() -> Any:
    from modules import shared

    model = getattr(shared, "sd_model", None)
    return getattr(getattr(model, "model", None), "diffusion_model", None)


def process(p: Any, values: Sequence[Any]) -> None:
    """Script.process: validate, load, encode; any failure is raised at the first UNet call."""
    Generation.end()  # whatever an earlier failed generation left behind
    try:
        from lib_negip.args import parse_script_args

        args = parse_script_args(values)
        overrides = getattr(p, "negip_overrides", None)
        if overrides and args.enabled:
            from lib_negip.args import parse_api_dict

            args = parse_api_dict({"enabled": True, **overrides}, base=args)
        if not args.enabled:
            return
        start(p, args)
    except Exception as error:  # every failure must reach the user: see Generation.fail
        Generation.fail(explain_out_of_memory(error))


def explain_out_of_memory(error: BaseException) -> BaseException:
    """``error`` as a :class:`ResourceError` that says what to change, if it is one of the
    out-of-memory errors (torch's, A1111's "CUDA out of memory" RuntimeErrors, MemoryError)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(error).strip()
    gpu = isinstance(error, oom) or (
        isinstance(error, RuntimeError) and "out of memory" in text.lower()
    )
    if not gpu and not isinstance(error, MemoryError):
        return error
    what = text.splitlines()[0][:200] if text else type(error).__name__
    if gpu:
        msg = (
            f"Negative Image Prompt ran out of GPU memory while preparing the image prompts "
            f"({what}): use fewer images per side, turn off 'Keep the image encoder on the GPU' "
            "and lower 'IP-Adapters and image encoders kept loaded' in Settings > Negative Image "
            "Prompt, or free GPU memory (a smaller batch, --medvram)."
        )
    else:
        msg = (
            f"Negative Image Prompt ran out of memory while preparing the image prompts ({what}): "
            "use fewer or smaller images (the encoder sees 224x224 pixels; a few megapixels are "
            "plenty), and lower 'Encoded images kept in memory' and 'IP-Adapters and image "
            "encoders kept loaded' in Settings > Negative Image Prompt."
        )
    return ResourceError(msg)


def start(p: Any, args: Any) -> None:
    """Load what ``args`` asks for and begin the generation's session."""
    from modules import devices, shared

    from lib_negip.args import to_infotext

    if args.hires_pass == "second" and not getattr(p, "enable_hr", False):
        msg = (
            "hires_pass is 'second' but Hires. fix is off, so the image prompts would never "
            "apply: enable Hires. fix or choose 'both' / 'first'."
        )
        raise ArgumentError(msg)
    MODELS.apply_limits()
    registry = MODELS.registry()
    adapter_entry = resolve_adapter(registry, args.model)
    encoder_entry = resolve_encoder(registry, args.image_encoder, adapter_entry)
    if not (Path(adapter_entry.path).is_file() and Path(encoder_entry.path).is_file()):
        # Removed since the last scan: scan again, so that "auto" takes an encoder that is
        # there and a name that is gone is answered as unknown.
        registry.refresh()
        adapter_entry = resolve_adapter(registry, args.model)
        encoder_entry = resolve_encoder(registry, args.image_encoder, adapter_entry)
    loaded = MODELS.adapter(Path(adapter_entry.path))
    encoder, encoder_key = MODELS.encoder(Path(encoder_entry.path))
    adapter_entry.spec.check_encoder(
        encoder.spec, adapter_name=adapter_entry.name, encoder_name=encoder_entry.name
    )

    spec = loaded.spec
    device = devices.device
    on_device = _EncoderOnDevice(
        encoder, device, torch.float32 if device.type == "cpu" else devices.dtype
    )
    try:
        features = functools.partial(
            MODELS.features.features, on_device, encoder_key, spec.encoder_output
        )
        if spec.encoder_output == "image_embeds":

            def unconditional() -> torch.Tensor:
                return torch.zeros(1, spec.encoder_dim)
        else:

            def unconditional() -> torch.Tensor:
                return MODELS.features.unconditional(
                    on_device, encoder_key, spec.encoder_output, encoder.spec.image_size
                )

        prompt = build_image_prompt(
            adapter=loaded.adapter,
            encoder_output=spec.encoder_output,
            positive=SideImages(args.positive_images, args.positive_weight, args.positive_window),
            negative=SideImages(args.negative_images, args.negative_weight, args.negative_window),
            combine=args.combine,
            features=features,
            unconditional=unconditional,
        )
    except BaseException:
        # Never leave the encoder on the GPU after a failure, whatever the setting says: after
        # an out-of-memory error it may be half moved and holds memory the user needs back.
        _encoder_to_cpu(encoder)
        raise
    if not opt(OPT_ENCODER_ON_GPU) and encoder.device.type != "cpu":
        _encoder_to_cpu(encoder)

    if not all(
        bool(torch.isfinite(side.tokens).all()) for side in (prompt.positive, prompt.negative)
    ):
        msg = (
            f"The image tokens made with {encoder_entry.name} and {adapter_entry.name} are not "
            "finite numbers (NaN or infinity): one of the two files has damaged weights (download "
            "it again), or half precision overflowed on this GPU (try --no-half)."
        )
        raise ModelFileError(msg)
    session = ImagePromptSession(
        prompt,
        loaded.weights,
        hires_pass=args.hires_pass,
        upcast=bool(getattr(shared.opts, "upcast_attn", False)),
        # An exception through the UNet ends the generation at once (A1111 skips postprocess);
        # a transformed block is answered like every other refusal.
        on_abort=Generation.end,
        raise_as=request_error,
    )
    unet = _current_unet()
    if unet is not None:  # a wrong family fails now, before any step runs
        check_family(spec, adapter_entry.name, unet)
        session.check_fits(unet)
    p.extra_generation_params.update(
        to_infotext(args, entry_label(adapter_entry), entry_label(encoder_entry))
    )
    with Generation.lock:
        Generation.current = Generation(p, session)


def check_family(spec: Any, adapter_name: str, unet: Any) -> None:
    """Raise :class:`IncompatibleModelError` naming both families when the adapter's context
    width is not the checkpoint's (the layer-by-layer check says the same in shapes only)."""
    from lib_negip.adapter import family_of
    from lib_negip.unet_layers import cross_attention_layers

    layers = cross_attention_layers(unet)
    width = layers[0].context_dim if layers else None
    if width is None or width == spec.cross_attention_dim:
        return
    msg = (
        f"{adapter_name} is an IP-Adapter for {family_of(spec.cross_attention_dim)}, but the "
        f"loaded checkpoint is {family_of(width)}: the adapter is for another model family. "
        "Choose an IP-Adapter made for the loaded checkpoint, or load a checkpoint of the "
        "adapter's family."
    )
    raise IncompatibleModelError(msg)


class _EncoderOnDevice:
    """The cached encoder, moved to the sampling device only when an image really has to be
    encoded: a generation whose images are all cached moves (and converts) nothing."""

    def __init__(self, encoder: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.encoder = encoder
        self.device = device
        self.dtype = dtype

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        return self.encoder.preprocess(images)

    def encode(self, pixel_values: torch.Tensor, output: str) -> torch.Tensor:
        self.encoder.to(device=self.device, dtype=self.dtype)  # may fail half way: see start
        return self.encoder.encode(pixel_values, output)


def _encoder_to_cpu(encoder: Any) -> None:
    from modules import devices

    encoder.to(device=torch.device("cpu"), dtype=torch.float32)
    devices.torch_gc()


def entry_label(entry: Any) -> str:
    """ "name [hash]" for the infotext, as A1111 labels checkpoints."""
    return entry.infotext_name


def resolve_adapter(registry: Any, name: str) -> Any:
    """The registry entry of ``name``, downloading an official file when allowed."""
    try:
        return registry.resolve_adapter(name)
    except ArgumentError:
        if not (opt(OPT_AUTO_DOWNLOAD) and _download_official(name)):
            raise
        registry.refresh()
        return registry.resolve_adapter(name)


def resolve_encoder(registry: Any, name: str, adapter: Any) -> Any:
    """The registry entry of image encoder ``name`` ("auto" included) for the adapter entry
    ``adapter`` (its name appears in the answers), downloading the official one when allowed."""
    try:
        return registry.resolve_encoder(name, adapter)
    except NegIPError:
        if name != "auto" or not opt(OPT_AUTO_DOWNLOAD):
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


# --------------------------------------------------------------------------------------------
# Sampling


def on_cfg_denoiser(params: Any) -> None:
    """Append the image blocks to this denoiser call's conditioning."""
    generation = Generation.current
    unet = _current_unet()
    if unet is not None:
        Generation.rearm_on(unet)
    if generation is None or unet is None:
        return
    p = getattr(params.denoiser, "p", None)
    if p is not None and p is not generation.p:
        return  # a generation our process did not see (its own p): not ours to change
    try:
        _append(generation, params, unet)
    except Exception as error:  # raised from the UNet call that follows
        Generation.fail(error)


def _append(generation: Generation, params: Any, unet: Any) -> None:
    from modules import shared

    denoiser = params.denoiser
    progress = pass_progress(
        int(getattr(denoiser, "step", 0) or 0),
        int(getattr(denoiser, "steps", 0) or 0),
        int(getattr(denoiser, "total_steps", 0) or 0),
    )
    pad = None
    if getattr(shared.opts, "pad_cond_uncond_v0", False):
        pad = "repeat_last"
    elif getattr(shared.opts, "pad_cond_uncond", False):
        pad = "empty_chunks"
    empty = getattr(shared.sd_model, "cond_stage_model_empty_prompt", None) if pad else None
    p = generation.p
    appended = generation.session.conditioning(
        unet,
        params.text_cond,
        params.text_uncond,
        progress=progress,
        hires=bool(getattr(p, "is_hr_pass", False)),
        pad=pad,
        empty=empty,
    )
    if appended is None:
        return
    params.text_cond = appended.cond
    params.text_uncond = appended.uncond
    if appended.padded:
        # A1111 resets its own "padded" flag after the callbacks; say it in the infotext for it.
        key = "Pad conds v0" if pad == "repeat_last" else "Pad conds"
        p.extra_generation_params[key] = True


def post_sample(p: Any) -> None:
    """Script.post_sample: sampling is over and the VAE decodes next. Take the hijack off the
    UNet now, so that a failure from here on (the VAE out of memory) leaves the UNet as it was;
    the next batch's first denoiser call puts it back."""
    generation = Generation.current
    if generation is not None:
        generation.session.close()


def postprocess(p: Any) -> None:
    Generation.end()


# --------------------------------------------------------------------------------------------
# Registration with A1111


def models_listing() -> dict[str, Any]:
    """The body of ``GET /negip/v1/models``."""
    return MODELS.registry(refresh=True).describe()


def adapter_choices(refresh: bool = False) -> list[str]:
    return MODELS.registry(refresh=refresh).adapter_names()


def encoder_choices(refresh: bool = False) -> list[str]:
    return MODELS.registry(refresh=refresh).encoder_names()


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    options = {
        OPT_ADAPTER_DIRS: shared.OptionInfo(
            DEFAULTS[OPT_ADAPTER_DIRS],
            "Extra folders with IP-Adapter models (separate with ;)",
        ),
        OPT_ENCODER_DIRS: shared.OptionInfo(
            DEFAULTS[OPT_ENCODER_DIRS],
            "Extra folders with image encoders (CLIP vision; separate with ;)",
        ),
        OPT_MODELS_IN_MEMORY: shared.OptionInfo(
            DEFAULTS[OPT_MODELS_IN_MEMORY],
            "IP-Adapters and image encoders kept loaded (each)",
            gr.Slider,
            {"minimum": MODELS_IN_MEMORY_RANGE[0], "maximum": MODELS_IN_MEMORY_RANGE[1], "step": 1},
        ),
        OPT_IMAGES_IN_MEMORY: shared.OptionInfo(
            DEFAULTS[OPT_IMAGES_IN_MEMORY],
            "Encoded images kept in memory",
            gr.Slider,
            {"minimum": IMAGES_IN_MEMORY_RANGE[0], "maximum": IMAGES_IN_MEMORY_RANGE[1], "step": 1},
        ),
        OPT_ENCODER_ON_GPU: shared.OptionInfo(
            DEFAULTS[OPT_ENCODER_ON_GPU],
            "Keep the image encoder on the GPU after encoding (faster with new images, uses VRAM)",
        ),
        OPT_AUTO_DOWNLOAD: shared.OptionInfo(
            DEFAULTS[OPT_AUTO_DOWNLOAD],
            "Download missing official IP-Adapter and image encoder files (h94/IP-Adapter) when a "
            "generation needs them",
        ),
    }
    for key, info in options.items():
        info.section = SECTION
        if key in RESTRICTED_SETTINGS:
            info.restrict_api = True  # an attribute: an older OptionInfo lacks the argument
        if key in FOLDER_SETTINGS and getattr(shared, "hide_dirs", None) is not None:
            info.component_args = shared.hide_dirs  # --hide-ui-dir-config hides and locks it
        shared.opts.add_option(key, info)


def on_app_started(_demo: Any, app: Any) -> None:
    app.add_api_route("/negip/v1/models", models_listing, methods=["GET"])
    # Registered now, after every extension's scripts loaded, so that ours runs last and
    # sees (and appends after) whatever other callbacks did to the conditioning.
    from modules import script_callbacks

    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="negip")


def register() -> None:
    """Called once by the entry script."""
    from modules import safe, script_callbacks

    from lib_negip import files

    # A1111's torch.load (modules/safe.py) refuses files saved by current torch (".format_version")
    # and returns None after logging a traceback; ours always loads with weights_only=True.
    files.set_torch_load(safe.unsafe_torch_load)
    _console_logging()
    script_callbacks.on_ui_settings(on_ui_settings, name="negip")
    script_callbacks.on_app_started(on_app_started, name="negip")
    script_callbacks.on_before_ui(register_xyz_axes, name="negip")
    script_callbacks.on_script_unloaded(shutdown, name="negip")


def _console_logging() -> None:
    """Show our records in the console, each as one "LEVEL:negip:message" line.

    Without --loglevel A1111 configures no logging: our records would go to logging's last
    resort (warnings and errors only, without level or name) until some code's first
    ``logging.warning(...)`` configures the root logger, and the format would depend on that.
    With --loglevel (root configured before extensions load) they go to A1111's handler.
    """
    if logging.root.handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler added later would print every record twice


def shutdown() -> None:
    Generation.end()
    MODELS.clear()


# --------------------------------------------------------------------------------------------
# X/Y/Z plot


def _xyz_module() -> Any:
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "xyz_grid"):
            return data.module
    return None


def _override(field: str) -> Any:
    def apply(p: Any, value: Any, _values: Any) -> None:
        overrides = dict(getattr(p, "negip_overrides", None) or {})
        overrides[field] = value
        p.negip_overrides = overrides

    return apply


XYZ_AXES = (
    ("[NegIP] Positive weight", float, "positive_weight"),
    ("[NegIP] Negative weight", float, "negative_weight"),
    ("[NegIP] Positive start", float, "positive_start"),
    ("[NegIP] Positive end", float, "positive_end"),
    ("[NegIP] Negative start", float, "negative_start"),
    ("[NegIP] Negative end", float, "negative_end"),
    ("[NegIP] Model", str, "model"),
)


def register_xyz_axes() -> None:
    xyz = _xyz_module()
    if xyz is None:
        return
    present = {option.label for option in xyz.axis_options}
    for label, kind, field in XYZ_AXES:
        if label in present:
            continue
        choices = (lambda: adapter_choices()[1:]) if field == "model" else None
        xyz.axis_options.append(xyz.AxisOption(label, kind, _override(field), choices=choices))
