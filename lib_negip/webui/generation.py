"""One generation, from ``process`` to ``postprocess``.

``process``
    parse and validate the arguments, resolve the model files through the registry, load the
    adapter and the encoder (cached), encode the images (cached by content), build the
    :class:`~lib_negip.prompt.ImagePrompt` and start an
    :class:`~lib_negip.session.ImagePromptSession`; write the infotext.
``on_cfg_denoiser`` (registered to run after every other extension's callback)
    hijack the UNet that is about to run, if not yet, and append the image blocks to the cond and
    uncond conditioning.
``post_sample`` / ``postprocess``
    remove the hijack.

A1111 catches and only logs exceptions raised in Script hooks and callbacks, so an error found
there would still give an image without the requested image prompts. Every such error is kept
and raised from the UNet's next forward call instead (:class:`~lib_negip.hijack.FailureTrap`),
where it reaches the user (see :mod:`lib_negip.webui.failures`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lib_negip import logger
from lib_negip.errors import ArgumentError, IncompatibleModelError, ModelFileError, NegIPError
from lib_negip.hijack import FailureTrap
from lib_negip.session import ImagePromptSession, SideImages, build_image_prompt, pass_progress
from lib_negip.webui.failures import explain_out_of_memory, request_error
from lib_negip.webui.models import MODELS, entry_label, resolve_adapter, resolve_encoder
from lib_negip.webui.settings import OPT_ENCODER_ON_GPU, opt


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
