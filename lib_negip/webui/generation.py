"""One generation, from ``process`` to ``postprocess``.

``process``
    parse and validate the arguments, find the UNet, resolve the model files through the
    registry ("auto" by the loaded checkpoint's family), load the adapter and the encoder
    (cached), make the noise negative, store the image prompts by content, encode the images
    (cached by content), build the :class:`~lib_negip.prompt.ImagePrompt` and start an
    :class:`~lib_negip.session.ImagePromptSession`.
``on_cfg_denoiser`` (registered to run after every other extension's callback)
    hijack the UNet that is about to run, if not yet, and append the image blocks to the cond and
    uncond conditioning.
``post_sample``
    write the infotext (only when the image prompts acted, or had nothing to do by the user's
    own settings) and take the hijack off before the VAE decodes.
``before_process_batch``
    resume this generation if one nested in a hook between batches ended it.
``postprocess``
    remove everything.

A1111 catches and only logs exceptions raised in Script hooks and callbacks, so an error found
there would still give an image without the requested image prompts. Every such error is kept
and raised where it reaches the user (see :mod:`lib_negip.webui.failures`): from the UNet's next
call (:class:`~lib_negip.hijack.FailureTrap`) and, where no UNet can be found, from the
generation's ``p.sample`` (:class:`SampleTrap`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_negip import logger
from lib_negip.errors import (
    ArgumentError,
    IncompatibleModelError,
    ModelFileError,
    NegIPError,
    UnreachedError,
)
from lib_negip.hijack import FailureTrap, release_negpip_hooks
from lib_negip.session import ImagePromptSession, SideImages, build_image_prompt, pass_progress
from lib_negip.webui import backend
from lib_negip.webui.failures import explain_out_of_memory, request_error, wants_ui_words
from lib_negip.webui.models import (
    MODELS,
    entry_label,
    resolve_adapter,
    resolve_auto_adapter,
    resolve_encoder,
)
from lib_negip.webui.settings import (
    OPT_ENCODER_ON_GPU,
    OPT_STORE_IMAGES,
    setting_bool,
    store_folder,
)


class SampleTrap:
    """Raises a stored error from the generation's ``p.sample``, then removes itself.

    The raise path where no UNet can be found (an unknown web UI): A1111 and its forks call
    ``p.sample`` from ``process_images`` outside every Script hook, so an exception there
    reaches the user like one from the UNet.
    """

    def __init__(self, p: Any, error: BaseException, cleanup: Callable[[], None]) -> None:
        self.p = p
        self._saved = vars(p).get("sample")

        def sample(*args: Any, **kwargs: Any) -> Any:
            self.disarm()
            cleanup()
            raise error

        self._ours = sample
        p.sample = sample

    def disarm(self) -> None:
        if vars(self.p).get("sample") is self._ours:
            if self._saved is None:
                del self.p.sample
            else:
                self.p.sample = self._saved


class CallbackWatch:
    """Checks, at the UNet's first call of a generation, that our denoiser callback ran before
    it: a web UI that samples without calling ``on_cfg_denoiser`` would make the image without
    the image prompts. Removes itself after the first call.

    A generation that A1111 ended with an error after our ``process`` and before sampling (a
    Hires. fix upscaler that does not exist) gets no ``postprocess``: the watch stays on the UNet
    until the next generation's ``process`` ends it. A UNet call of another job meanwhile
    (training an embedding) is not that generation's, and the watch lets it through. (It does
    not end the generation there: were the job begun afresh within a generation, its sampling
    would still get the image prompts through the denoiser callback.)"""

    def __init__(self, unet: nn.Module, generation: Generation, raise_as: Callable) -> None:
        self.generation = generation
        self.raise_as = raise_as
        self._handle: RemovableHandle | None = unet.register_forward_pre_hook(self._check)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check(self, module: nn.Module, args: tuple) -> None:
        self.remove()
        if self.generation.job != _job():
            logger.debug("Negative Image Prompt: a UNet call of another job; not checked")
            return
        if self.generation.callback_calls == 0 and Generation.current is self.generation:
            Generation.abort()
            host = backend.host_kind()
            if host == backend.UNKNOWN:
                msg = (
                    "The UNet was called without the extension's conditioning callback "
                    f"(on_cfg_denoiser) running first: {host} samples in a way this extension "
                    "cannot follow, so the image would be made without the image prompts. Switch "
                    "Negative Image Prompt off for this generation, or use a supported web UI."
                )
            else:  # a known host samples through the callback: something ran the UNet before
                msg = (
                    "The UNet was called before sampling began, without the extension's "
                    "conditioning callback (on_cfg_denoiser): a script or extension runs the UNet "
                    "on its own first (as the 'img2img alternative test' script's noise inversion "
                    "and Tiled Diffusion's Noise Inversion do), and this extension cannot tell "
                    "that from sampling without the image prompts. Switch Negative Image Prompt "
                    "off for this generation, or run that script without it."
                )
            error = UnreachedError(msg)
            logger.error("Negative Image Prompt: %s", error)
            raise self.raise_as(error)


def _job() -> tuple[Any, ...] | None:
    """The web UI's current job: ``shared.state`` is begun afresh for each request and button
    press (its start time); None where the host keeps no such state (then every call counts as
    the same job)."""
    from modules import shared

    state = getattr(shared, "state", None)
    started = getattr(state, "time_start", None)
    return None if started is None else (getattr(state, "job_timestamp", None), started)


class Generation:
    """The state between ``process`` and ``postprocess``; at most one exists at a time."""

    lock = threading.Lock()
    current: Generation | None = None
    failure: BaseException | None = None  # kept until raised from a UNet call, or end()
    failure_job: tuple[Any, ...] | None = None  # the job (see _job) the failure belongs to
    trap: FailureTrap | None = None
    sample_trap: SampleTrap | None = None

    def __init__(self, p: Any, session: ImagePromptSession, infotext: dict[str, Any]) -> None:
        self.p = p
        self.job = _job()  # the web UI's job (a request, a button press) it belongs to
        # Whether the model it began on keeps the GPU nearly empty: it may end on another (a
        # refiner without --medvram-sdxl's mark), and the adapter's GPU copies must go then too.
        self.low_vram = backend.low_vram()
        self.session = session
        self.infotext = infotext  # written at post_sample, when the image prompts acted
        self.callback_calls = 0
        self.watch: CallbackWatch | None = None
        # txt2img's "upscale" of a result (✨) samples only the Hires. fix pass, on the result
        # given as its first pass: image prompts set for the first pass have nothing to do.
        self.first_pass_given = False
        # The sides with images of their own (a noise negative's included): a side without
        # follows the other one, so its steps are no news (see _warn_idle_sides).
        self.sides_with_images: tuple[str, ...] = ("positive", "negative")
        # The infotext went into p before sampling (for params.txt) and no post_sample has
        # confirmed it yet: a generation that ends now takes it out again.
        self.infotext_provisional = False

    @classmethod
    def end(cls) -> None:
        """Remove everything a generation installed; safe to call at any time."""
        with cls.lock:
            current, cls.current = cls.current, None
            trap, cls.trap = cls.trap, None
            sample_trap, cls.sample_trap = cls.sample_trap, None
            cls.failure = None
        if current is not None:
            if current.infotext_provisional:
                params = getattr(current.p, "extra_generation_params", None) or {}
                for key in current.infotext:
                    params.pop(key, None)
                current.infotext_provisional = False
            current.session.close()
            if current.low_vram or backend.low_vram():  # the adapter leaves the GPU with it
                current.session.release_device_copies()
            if current.watch is not None:
                current.watch.remove()
        for pending in (trap, sample_trap):
            if pending is not None:
                pending.disarm()

    @classmethod
    def abort(cls) -> None:
        """:meth:`end` for a generation that an error ends while sampling: A1111 then skips
        every script's ``postprocess``, so NegPiP's hooks, which only its postprocess removes,
        are taken off too (:func:`~lib_negip.hijack.release_negpip_hooks`)."""
        cls.end()
        unet = backend.current_unet()
        if unet is not None:
            release_negpip_hooks(unet)

    @classmethod
    def fail(cls, error: BaseException, p: Any = None, *, log: bool = True) -> None:
        """Keep ``error`` and raise it where it reaches the user (A1111 swallows it here): the
        next UNet call, or ``p.sample`` where no UNet is known. ``log``: also log it."""
        if log and isinstance(error, NegIPError):
            logger.error("Negative Image Prompt: %s", error)
        elif log:
            logger.exception("Negative Image Prompt failed", exc_info=error)
        cls.end()
        raised = request_error(error, for_ui=wants_ui_words(p))
        with cls.lock:
            cls.failure = raised
            cls.failure_job = _job()
            if p is not None and hasattr(p, "sample"):
                cls.sample_trap = SampleTrap(p, raised, cleanup=cls.abort)
        unet = backend.current_unet()
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
            job = cls.failure_job
            cls.trap = FailureTrap(unet, failure, cleanup=cls.abort, due=lambda: _job() == job)


def process(p: Any, values: Sequence[Any]) -> None:
    """Script.process: validate, load, encode; any failure is raised where it reaches the user."""
    Generation.end()  # whatever an earlier failed generation left behind
    try:
        from lib_negip.args import parse_script_args

        args = parse_script_args(without_ui_references(p, values))
        overrides = getattr(p, "negip_overrides", None)
        if overrides and not args.enabled:
            from lib_negip.webui.xyz import disabled_message

            raise ArgumentError(disabled_message(overrides))
        if overrides:
            from lib_negip.args import parse_api_dict

            args = parse_api_dict({"enabled": True, **overrides}, base=args)
        if not args.enabled:
            return
        if _interrupted():
            raise InterruptedEarlier(INTERRUPTED_EARLIER)
        start(p, args)
    except Interrupted as error:
        # A1111 makes no image after an Interrupt (its loop stops before sampling); should a
        # host sample anyway, the trap refuses it rather than drawing without the image prompts.
        # A script that calls process_images once per piece (SD upscale's tiles, Loopback's
        # loops) goes on through its pieces after an Interrupt: said once per job.
        job = _job()
        if not isinstance(error, InterruptedEarlier) or job is None or _NOTED[0] != job:
            _NOTED[0] = job
            logger.info("Negative Image Prompt: %s", error)
        Generation.fail(error, p, log=False)
    except Exception as error:  # every failure must reach the user: see Generation.fail
        Generation.fail(explain_out_of_memory(error), p)


class Interrupted(NegIPError):
    """The user pressed Interrupt while the image prompts were being prepared."""


class InterruptedEarlier(Interrupted):
    """The user had pressed Interrupt before this generation's image prompts were prepared."""


INTERRUPTED = (
    "Interrupted while the image prompts were being prepared: nothing was drawn. Generate "
    "again to make the image."
)
INTERRUPTED_EARLIER = (
    "Interrupted: the image prompts are not prepared for the rest of this job, which the web "
    "UI does not sample (a script's remaining pieces, such as SD upscale's tiles)."
)
_NOTED: list[Any] = [None]  # the job whose InterruptedEarlier was last logged


def _interrupted() -> bool:
    from modules import shared

    state = getattr(shared, "state", None)
    return bool(
        getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False)
    )


def stop_if_interrupted() -> None:
    """Raise :class:`Interrupted` once the user has pressed Interrupt (or Stop after this
    image): checked between images, so that many large image prompts do not hold the
    interrupt back until all of them are stored and encoded."""
    if _interrupted():
        raise Interrupted(INTERRUPTED)


def _stopped() -> bool:
    """Whether the user pressed Interrupt or Skip (A1111 then ends sampling early, without a
    model call if it comes before the first step)."""
    from modules import shared

    state = getattr(shared, "state", None)
    return bool(getattr(state, "interrupted", False) or getattr(state, "skipped", False))


def without_ui_references(p: Any, values: Sequence[Any]) -> Sequence[Any]:
    """The UI's values without the references of the hidden ``infotext_images`` field: a
    pasted infotext puts the stored images into the file boxes themselves, which the user may
    then change; the hidden references are for API requests (the API's ``infotext`` field).
    Its restored noise seed stays (it has no box of its own), and so do the counts of an
    infotext made with storing off, whose images the user must add again (or the generation
    is refused, as the API's)."""
    from lib_negip.args import FIELD_ORDER, without_stored_references

    index = FIELD_ORDER.index("infotext_images")
    if not wants_ui_words(p) or len(values) <= index or isinstance(values[0], Mapping):
        return values
    hidden = values[index]
    kept = without_stored_references("infotext_images", hidden) if isinstance(hidden, str) else ""
    return [*values[:index], kept, *values[index + 1 :]]


def _loaded_model() -> Any:
    from modules import shared

    return getattr(shared, "sd_model", None)


def start(p: Any, args: Any) -> None:
    """Load what ``args`` asks for and begin the generation's session."""
    from modules import shared

    from lib_negip.args import to_infotext

    old_torch = backend.old_torch_message()
    if old_torch is not None:
        raise UnreachedError(old_torch)
    sd_model = _loaded_model()
    unet = backend.find_unet(sd_model)
    if sd_model is not None and unet is None:
        raise UnreachedError(backend.unsupported_message())
    if args.hires_pass == "second" and getattr(p, "init_images", None) is not None:
        # img2img has no Hires. fix: its one pass gets the image prompts. A txt2img request's
        # args reach an img2img of an extension's own (ADetailer's inpainting, when the user
        # lets this script run there), where "second" would have refused that pass.
        args = dataclasses.replace(args, hires_pass="both")
    if args.hires_pass == "second" and not getattr(p, "enable_hr", False):
        msg = (
            "hires_pass is 'second' but Hires. fix is off, so the image prompts would never "
            "apply: enable Hires. fix or choose 'both' / 'first'."
        )
        raise ArgumentError(msg)
    noise_seed = _noise_seed(p, args)
    args = _with_stored_images(args, for_api=not wants_ui_words(p))
    MODELS.apply_limits()
    adapter_entry, encoder_entry = _resolve_models(args, unet)
    loaded = MODELS.adapter(Path(adapter_entry.path))
    encoder, encoder_key = MODELS.encoder(Path(encoder_entry.path))
    adapter_entry.spec.check_encoder(
        encoder.spec, adapter_name=adapter_entry.name, encoder_name=encoder_entry.name
    )
    if unet is not None:  # a wrong family fails now, before any image is encoded
        check_family(loaded.spec, adapter_entry.name, unet)
    if args.hires_pass == "second" and getattr(p, "enable_hr", False):
        check_hires_checkpoint(p, loaded.spec, adapter_entry.name)

    negative_images = args.negative_images
    if args.negative_noise > 0.0:
        from lib_negip.noise import noise_images

        negative_images = noise_images(
            args.positive_images, args.negative_noise, args.negative_noise_type, noise_seed
        )
    prompt = _encode(
        args,
        negative_images,
        loaded,
        encoder,
        encoder_key,
        names=(adapter_entry.name, encoder_entry.name),
    )
    for_ui = wants_ui_words(p)
    session = ImagePromptSession(
        prompt,
        loaded.weights,
        hires_pass=args.hires_pass,
        upcast=bool(getattr(shared.opts, "upcast_attn", False)),
        # An exception through the UNet ends the generation at once (A1111 skips postprocess);
        # a transformed block is answered like every other refusal.
        on_abort=Generation.abort,
        raise_as=functools.partial(request_error, for_ui=for_ui),
    )
    if unet is not None:  # block weights for blocks this UNet lacks fail now too
        session.check_fits(unet)
    # Stored once the request is known to be honoured: a refused one leaves no file behind.
    references = _store(args) if setting_bool(OPT_STORE_IMAGES) else None
    infotext = to_infotext(
        args,
        entry_label(adapter_entry),
        entry_label(encoder_entry),
        references,
        noise_seed=noise_seed,
    )
    generation = Generation(p, session, infotext)
    generation.sides_with_images = tuple(
        side
        for side, images in (("positive", args.positive_images), ("negative", negative_images))
        if images
    )
    generation.first_pass_given = (
        args.hires_pass == "first"
        and bool(getattr(p, "enable_hr", False))
        and getattr(p, "firstpass_image", None) is not None
    )
    with Generation.lock:
        Generation.current = generation
    # Kept on p (A1111's p is an unhashable dataclass) until its postprocess: see before_batch.
    p.negip_generation = generation
    if unet is not None and not session.idle_by_choice:  # weights 0: nothing to watch for
        generation.watch = CallbackWatch(
            unet, generation, functools.partial(request_error, for_ui=for_ui)
        )


def _resolve_models(args: Any, unet: Any) -> tuple[Any, Any]:
    """The registry entries of the adapter ("auto": by the loaded checkpoint) and encoder."""
    from lib_negip.args import AUTO_MODEL

    registry = MODELS.registry()
    scanned = AUTO_MODEL in (args.model, str(args.image_encoder).casefold())
    if scanned:
        # "auto" chooses among the files there now: without a scan it kept a lesser adapter
        # after the one it prefers was put back, until someone pressed the refresh button. A
        # scan reads only files it has not seen: a listing of the folders and a stat per file.
        registry.refresh()

    def resolve() -> tuple[Any, Any]:
        if args.model == AUTO_MODEL:
            if unet is None:
                msg = (
                    "model is 'auto', which chooses the IP-Adapter that fits the loaded "
                    "checkpoint, but no checkpoint is loaded: load one, or name the IP-Adapter."
                )
                raise ArgumentError(msg)
            adapter = resolve_auto_adapter(registry, unet, args.image_encoder)
        else:
            adapter = resolve_adapter(registry, args.model)
        return adapter, resolve_encoder(registry, args.image_encoder, adapter)

    try:
        adapter_entry, encoder_entry = resolve()
    except NegIPError:
        if scanned:
            raise  # the folders were listed just now
        # The answer tells an API caller to put a file into models/ipadapter (or the encoders'
        # folder); one put there since the last scan must be found without a call that rescans
        # (the UI's refresh button, GET /negip/v1/models). A scan reads only files it has not
        # seen, so this costs a listing of the folders; the request is resolved again only
        # where the scan found something new.
        found = registry.contents()
        registry.refresh()
        if registry.contents() == found:
            raise
        adapter_entry, encoder_entry = resolve()
    if adapter_entry.changed_on_disk() or encoder_entry.changed_on_disk():
        # Removed or replaced since the last scan: scan again, so that "auto" takes a file that
        # is there, a name that is gone is answered as unknown, and a file replaced under its
        # name is checked and named (infotext hash) as the file that is loaded.
        registry.refresh()
        adapter_entry, encoder_entry = resolve()
    return adapter_entry, encoder_entry


def _noise_seed(p: Any, args: Any) -> int:
    """The seed of a noise negative: the generation's, or the one restored from an infotext
    while the generation's seed is still the restored image's own (see
    :func:`lib_negip.args.split_noise_seed`)."""
    seed = _seed_of(p)
    restored = args.restored_noise_seed
    if restored is None and args.negative_noise > 0.0:
        restored = _upscaled_image_noise_seed(p)
    return restored[0] if restored is not None and restored[1] == seed else seed


def _upscaled_image_noise_seed(p: Any) -> Any:
    """The noise seed of the picture A1111's ✨ (txt2img's "upscale" under the results) runs
    the Hires. fix pass on. A1111 gives the pass that picture's seed but nothing else of its
    infotext, and the picture of a batch after the first was made with the batch's noise (the
    first seed's): it is read from the picture's own infotext. None when ✨ did not start this
    generation; a warning when the picture carries no readable infotext."""
    if not getattr(p, "txt2img_upscale", False):
        return None
    from lib_negip.args import infotext_noise_seed

    image = getattr(p, "firstpass_image", None)
    try:
        from modules import images, infotext_utils

        text, _ = images.read_info_from_image(image)
        found = infotext_noise_seed(infotext_utils.parse_generation_parameters(text or ""))
    except Exception as error:  # an unreadable text, a malformed value, another host's API
        logger.warning("could not read the infotext of the picture to upscale: %s", error)
        found = None
    if found is None:
        logger.warning(
            "Negative Image Prompt: the picture to upscale names no noise seed in its infotext "
            "(saved without it?), so its noise negative is made with the picture's own seed, "
            "which differs from the batch's noise for a picture after the first of a batch"
        )
    return found


def _seed_of(p: Any) -> int:
    """The generation's seed (the first image's, once A1111 has drawn a random one)."""
    seeds = getattr(p, "all_seeds", None)
    seed = seeds[0] if seeds else getattr(p, "seed", 0)
    try:
        return int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    except (TypeError, ValueError):
        return 0


def image_store() -> Any:
    from lib_negip.store import ImageStore

    folder, shown = store_folder()
    return ImageStore(folder, shown_as=shown)


def _with_stored_images(args: Any, *, for_api: bool) -> Any:
    """API requests restored from an infotext name their image prompts by reference
    (``infotext_images``): load them from the store for every side or mask the request does
    not give itself. The UI restores them into its own components instead (see ui.py)."""
    references = args.references
    if not references or not for_api:
        return args
    from lib_negip.args import stored_images_budget

    store = image_store()
    wanted = [  # what the request does not give itself
        (field, references[field] if field.endswith("images") else references[field][:1])
        for field in ("positive_images", "negative_images", "positive_mask", "negative_mask")
        if references.get(field) and getattr(args, field) in (None, ())
    ]
    budget = stored_images_budget(args)  # from the files' headers, before decoding any
    for field, refs in wanted:
        for ref in refs:
            budget.take_pixels(f"{field} (stored {ref})", store.pixels(ref))
    changes: dict[str, Any] = {}
    for field, refs in wanted:
        if field.endswith("images"):
            changes[field] = tuple(store.load(ref) for ref in refs)
        else:
            changes[field] = store.load(refs[0], mask=True)
    return dataclasses.replace(args, **changes, infotext_images="") if changes else args


def _store(args: Any) -> dict[str, list[str]]:
    """Store the image prompts and masks once each; their references by field."""
    store = image_store()
    references: dict[str, list[str]] = {}
    try:
        for field in ("positive_images", "negative_images"):
            references[field] = []
            for image in getattr(args, field):
                stop_if_interrupted()
                references[field].append(store.save(image))
        for field in ("positive_mask", "negative_mask"):
            mask = getattr(args, field)
            if mask is not None:
                references[field] = [store.save(mask)]
    except OSError as error:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        msg = (
            f"The image prompts cannot be stored in {store.shown_as} ({error.strerror or error}): "
            f"{'free disk space or ' if full else ''}choose another folder in Settings > "
            "Negative Image Prompt, or switch storing image prompts off there."
        )
        raise ModelFileError(msg) from error
    return references


def _mask_tensor(mask: Any) -> torch.Tensor | None:
    """An "L" mask image as a tensor [h, w] of values 0..1."""
    if mask is None:
        return None
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def _encode(
    args: Any,
    negative_images: Sequence[Any],
    loaded: Any,
    encoder: Any,
    encoder_key: Any,
    *,
    names: tuple[str, str],
) -> Any:
    """The generation's :class:`~lib_negip.prompt.ImagePrompt` (images encoded, cached)."""
    from modules import devices

    spec = loaded.spec
    device = devices.device
    low_vram = backend.low_vram()
    on_device = _EncoderOnDevice(
        encoder, device, torch.float32 if device.type == "cpu" else devices.dtype, low_vram
    )
    try:
        encode_side = functools.partial(
            MODELS.features.features, on_device, encoder_key, spec.encoder_output
        )

        def features(images: Sequence[Any]) -> torch.Tensor:
            stop_if_interrupted()
            return encode_side(images)

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
            positive=SideImages(
                args.positive_images,
                args.positive_weight,
                args.positive_window,
                args.positive_layer_spec,
                _mask_tensor(args.positive_mask),
            ),
            negative=SideImages(
                tuple(negative_images),
                args.negative_weight,
                args.negative_window,
                args.negative_layer_spec,
                _mask_tensor(args.negative_mask),
            ),
            combine=args.combine,
            features=features,
            unconditional=unconditional,
        )
    except BaseException:
        # Never leave the encoder on the GPU after a failure, whatever the setting says: after
        # an out-of-memory error it may be half moved and holds memory the user needs back.
        _encoder_to_cpu(encoder)
        raise
    if not keep_encoder_on_gpu(low_vram) and encoder.device.type != "cpu":
        _encoder_to_cpu(encoder)
    if not all(
        bool(torch.isfinite(side.tokens).all()) for side in (prompt.positive, prompt.negative)
    ):
        adapter_name, encoder_name = names
        msg = (
            f"The image tokens made with {encoder_name} and {adapter_name} are not finite numbers "
            "(NaN or infinity): one of the two files has damaged weights (download it again), or "
            "half precision overflowed on this GPU (try --no-half)."
        )
        raise ModelFileError(msg)
    return prompt


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
        "Choose an IP-Adapter made for the loaded checkpoint (or 'auto'), or load a checkpoint "
        "of the adapter's family."
    )
    raise IncompatibleModelError(msg)


def check_hires_checkpoint(p: Any, spec: Any, adapter_name: str) -> None:
    """Refuse, before the first pass, a Hires. fix checkpoint of another family when only the
    Hires. fix pass is to have the image prompts: no step could have them. The sampling would
    find it too, but only after the whole first pass. The family is read from a safetensors
    header; a checkpoint that does not tell (a pickle) is left to that later check."""
    from lib_negip.adapter import family_of
    from lib_negip.files import checkpoint_context_width

    name = getattr(p, "hr_checkpoint_name", None)
    if not isinstance(name, str) or name in ("", "Use same checkpoint"):
        return
    try:
        from modules import sd_models

        info = sd_models.get_closet_checkpoint_match(name)
        filename = getattr(info, "filename", None)
    except Exception as error:  # another host's sd_models: the later check still holds
        logger.debug("could not look up the Hires. fix checkpoint %r: %s", name, error)
        return
    if not filename:
        return  # unknown: the web UI refuses the name itself
    width = checkpoint_context_width(filename)
    if width is None or width == spec.cross_attention_dim:
        return
    label = getattr(info, "short_title", None) or name
    msg = (
        f"{adapter_name} is an IP-Adapter for {family_of(spec.cross_attention_dim)}, but the "
        f"Hires. fix checkpoint {label} is {family_of(width)}, and hires_pass is 'second', so "
        "no step could have the image prompts. Choose a Hires. fix checkpoint of the adapter's "
        "family (or 'Use same checkpoint'), or set hires_pass to 'both' or 'first'."
    )
    raise IncompatibleModelError(msg)


def keep_encoder_on_gpu(low_vram: bool) -> bool:
    """Whether the encoder stays on the GPU after encoding: as the setting says, but never
    under --lowvram / --medvram, where nothing of ours stays on the GPU."""
    return not low_vram and setting_bool(OPT_ENCODER_ON_GPU)


class _EncoderOnDevice:
    """The cached encoder, moved to the sampling device only when an image really has to be
    encoded: a generation whose images are all cached moves (and converts) nothing."""

    def __init__(
        self, encoder: Any, device: torch.device, dtype: torch.dtype, low_vram: bool = False
    ) -> None:
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.low_vram = low_vram  # free the GPU of the host's model part first (once)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        return self.encoder.preprocess(images)

    def encode(self, pixel_values: torch.Tensor, output: str) -> torch.Tensor:
        if self.low_vram and self.device.type != "cpu":
            backend.free_gpu_for_encoder()
            self.low_vram = False
        self.encoder.to(device=self.device, dtype=self.dtype)  # may fail half way: see start
        return self.encoder.encode(pixel_values, output)


def _encoder_to_cpu(encoder: Any) -> None:
    from modules import devices

    encoder.to(device=torch.device("cpu"), dtype=torch.float32)
    devices.torch_gc()


def on_cfg_denoiser(params: Any) -> None:
    """Append the image blocks to this denoiser call's conditioning."""
    generation = Generation.current
    unet = backend.sampling_unet(params.denoiser)
    if unet is not None:
        Generation.rearm_on(unet)
    if generation is None or unet is None:
        return
    p = getattr(params.denoiser, "p", None)
    if p is not None and p is not generation.p:
        return  # a generation our process did not see (its own p): not ours to change
    generation.callback_calls += 1
    try:
        generation.session.set_mask_region(mask_region(generation.p))
        _append(generation, params, unet)
    except Exception as error:  # raised from the UNet call that follows
        Generation.fail(error, generation.p)


#: A1111's timestep samplers, by function name: how many more denoiser calls than sampling
#: steps they make (PLMS and UniPC evaluate the model twice in their first step).
TIMESTEP_SAMPLER_EXTRA_CALLS = {"ddim": 0, "ddim_cfgpp": 0, "plms": 1, "unipc": 1}


def pass_length(denoiser: Any) -> tuple[int, int]:
    """(sampling steps, denoiser calls) of the pass ``denoiser`` runs, for :func:`pass_progress`.

    A1111 gives ``steps`` and ``total_steps``, right for its k-diffusion samplers. Its timestep
    samplers (DDIM, DDIM CFG++, PLMS, UniPC) run ``len(schedule) - 1`` steps instead: in txt2img
    the schedule has ``len(range(0, 1000, 1000 // n))`` timesteps for ``n`` steps (19 steps for
    20, 24 for 25, 30 for 30); in img2img and the hires pass, which report ``t_enc + 1``, it is
    the first ``t_enc`` of them (``t_enc - 1`` steps, where Euler makes ``t_enc + 1``). Counted
    by calling A1111 1.10.1's sampler functions. Without this a window over the last steps of
    such a pass would never open.
    """
    steps = int(getattr(denoiser, "steps", 0) or 0)
    total = int(getattr(denoiser, "total_steps", 0) or 0)
    sampler = getattr(denoiser, "sampler", None)
    function = getattr(sampler, "funcname", None)
    name = function if isinstance(function, str) else getattr(function, "__name__", None)
    if (
        type(denoiser).__name__ != "CFGDenoiserTimesteps"
        or name not in TIMESTEP_SAMPLER_EXTRA_CALLS
        or steps <= 0
    ):
        return steps, total
    if getattr(denoiser, "init_latent", None) is not None:  # img2img, the hires pass
        real = steps - 2
    else:
        from modules import shared

        config = getattr(sampler, "config", None)
        options = getattr(config, "options", None) or {}
        discard = bool(
            options.get("discard_next_to_last_sigma")
            or getattr(shared.opts, "always_discard_next_to_last_sigma", False)
        )
        n = steps + discard
        real = len(range(0, 1000, 1000 // n)) - 1 if n <= 1000 else steps
    real = max(real, 1)
    return real, real + TIMESTEP_SAMPLER_EXTRA_CALLS[name]


def mask_region(p: Any) -> tuple[float, float, float, float] | None:
    """The part of the image that inpainting "only masked" samples, as fractions (left, top,
    right, bottom) of the whole image; None when the whole image is sampled."""
    paste_to = getattr(p, "paste_to", None)
    overlay = getattr(p, "mask_for_overlay", None)
    if not getattr(p, "inpaint_full_res", False) or not paste_to or overlay is None:
        return None
    x, y, w, h = paste_to
    width, height = overlay.size
    if width <= 0 or height <= 0:
        return None
    return (x / width, y / height, (x + w) / width, (y + h) / height)


def _append(generation: Generation, params: Any, unet: Any) -> None:
    from modules import shared

    denoiser = params.denoiser
    progress = pass_progress(int(getattr(denoiser, "step", 0) or 0), *pass_length(denoiser))
    pad = None
    if backend.host_kind() in backend.PADDING_HOSTS:  # Forge never pads (its option is unused)
        if getattr(shared.opts, "pad_cond_uncond_v0", False):
            pad = "repeat_last"
        elif getattr(shared.opts, "pad_cond_uncond", False):
            pad = "empty_chunks"
    empty = getattr(shared.sd_model, "cond_stage_model_empty_prompt", None) if pad else None
    p = generation.p
    x = getattr(params, "x", None)
    appended = generation.session.conditioning(
        unet,
        params.text_cond,
        params.text_uncond,
        progress=progress,
        hires=bool(getattr(p, "is_hr_pass", False)),
        pad=pad,
        empty=empty,
        latent=tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) else None,
        uncond_runs=not _uncond_skipped(denoiser, params),
    )
    if appended is None:
        return
    params.text_cond = appended.cond
    params.text_uncond = appended.uncond
    if appended.padded:
        # A1111 resets its own "padded" flag after the callbacks; say it in the infotext for it.
        key = "Pad conds v0" if pad == "repeat_last" else "Pad conds"
        p.extra_generation_params[key] = True


def _uncond_skipped(denoiser: Any, params: Any) -> bool:
    """Whether A1111's denoiser will leave the uncond rows (the negative side's) out of this
    call's UNet run: it decides right after the callbacks, for Ignore negative prompt during
    early sampling (``skip_early_cond``) and Negative Guidance minimum sigma (``s_min_uncond``,
    on odd steps or every step), as A1111 1.10 does (and the hosts built on its denoiser, which
    also pad as it does). False on Forge, or where it cannot be told: only a console note
    depends on it."""
    from modules import shared

    if backend.host_kind() not in backend.PADDING_HOSTS:
        return False
    try:
        opts = shared.opts
        step, total = int(denoiser.step), int(denoiser.total_steps)
        early = float(getattr(opts, "skip_early_cond", 0.0) or 0.0)
        if early != 0.0 and total > 0 and step / total <= early:
            return True
        s_min = float(getattr(getattr(denoiser, "p", None), "s_min_uncond", 0.0) or 0.0)
        if s_min <= 0.0 or not (step % 2 or getattr(opts, "s_min_uncond_all", False)):
            return False
        image_cfg = getattr(denoiser, "image_cfg_scale", None)
        edit = getattr(shared.sd_model, "cond_stage_key", None) == "edit" and image_cfg not in (
            None,
            1.0,
        )
        return not edit and float(params.sigma[0]) < s_min
    except Exception:
        return False


def process_batch(p: Any) -> None:
    """Script.process_batch: A1111 writes ``params.txt`` (what the ↙ paste button restores with
    an empty prompt) right after it, before sampling; the infotext goes in now too. If the
    image prompts then do not reach the UNet, :func:`post_sample` takes it out again."""
    generation = Generation.current
    if generation is not None and generation.p is p:
        p.extra_generation_params.update(generation.infotext)
        generation.infotext_provisional = True


def post_sample(p: Any) -> None:
    """Script.post_sample: sampling is over and the VAE decodes next.

    The infotext is written now, before A1111 makes the images' infotexts, and only if the
    image prompts reached the UNet (or the user's own settings gave them nothing to do: weights
    0, windows outside the steps). The hijack comes off the UNet, so that a failure from here on
    (the VAE out of memory) leaves the UNet as it was; the next batch's first denoiser call puts
    it back.
    """
    from lib_negip.args import is_infotext_key

    generation = Generation.current
    if generation is None or generation.p is not p:
        return
    session = generation.session
    reached = session.acted_in_batch or not session.appended_in_batch
    written = generation.infotext if reached else {}
    params = p.extra_generation_params
    # A1111's X/Y/Z plot gives its cells one dict: what an earlier cell wrote (a noise seed, or
    # all of it) must not stay in a cell whose own infotext does not say it.
    for key in [key for key in params if is_infotext_key(key) and key not in written]:
        del params[key]
    params.update(written)
    generation.infotext_provisional = False
    if not reached:
        logger.warning(
            "Negative Image Prompt: the image prompts did not reach the UNet in this batch; "
            "its infotext does not name them"
        )
    elif generation.first_pass_given and not session.appended_in_batch:
        logger.info(
            "Negative Image Prompt: the image prompts are set for the first pass only, and "
            "this upscale of a result samples only the Hires. fix pass"
        )
    elif not session.appended_in_batch and not session.idle_by_choice and _stopped():
        logger.info(
            "Negative Image Prompt: the batch was interrupted (or skipped) before a step had "
            "the image prompts"
        )
    elif not session.appended_in_batch and not session.idle_by_choice:
        logger.warning(
            "Negative Image Prompt: no step of this batch had the image prompts, so the image is "
            "the one without them: their step windows hold none of the steps sampled (a window "
            "narrower than one step, or start = end), or the pass they are set for ran no step "
            "(Hires. fix with denoising strength 0, a sampler that made no model call)"
        )
    else:
        _warn_idle_sides(generation)
    session.close()
    session.begin_batch()


def _warn_idle_sides(generation: Generation) -> None:
    """One side's images did nothing in this batch while the other's acted: say why."""
    for side, why in generation.session.idle_sides_in_batch().items():
        if side not in generation.sides_with_images:
            continue  # an empty side follows the other one: plain IP-Adapter's "no image" side
        if why == "window":
            reason = (
                f"its step window ({side}_start to {side}_end) holds none of the steps sampled "
                "(a window narrower than one step, or start = end)"
            )
        elif why == "uncond skipped":
            reason = (
                "the sampler skipped the unconditional pass, which carries the negative side, "
                "at every step where its window was open (A1111's Negative Guidance minimum "
                "sigma, or Ignore negative prompt during early sampling, acts on negative "
                "image prompts as on the negative text prompt)"
            )
        else:
            reason = (
                "the sampler ran no unconditional pass, which carries the negative side, at "
                "any step where its window was open: Forge leaves that pass out where the CFG "
                "scale is 1 (also in the Hires. fix pass, whose own CFG scale is 1 by default); "
                "raise the CFG scale to use negative image prompts"
            )
        logger.warning(
            "Negative Image Prompt: the %s image prompts had no step of this batch, so the "
            "image is the one without them: %s",
            side,
            reason,
        )


def before_batch(p: Any) -> None:
    """Script.before_process_batch: resume ``p``'s generation if another one ended it.

    An extension that runs a generation of its own from a hook between batches (ADetailer's
    inpainting from ``postprocess_image``, when the user lets this script run in it) starts and
    ends its own image prompts there; the outer generation's next batch would then sample
    without its image prompts, under an infotext that names them.
    """
    generation = getattr(p, "__dict__", {}).get("negip_generation")
    if generation is None or Generation.current is generation:
        return
    Generation.end()  # whatever the nested generation left
    with Generation.lock:
        Generation.current = generation
    logger.debug("Negative Image Prompt: resumed the generation a nested one had ended")


def postprocess(p: Any) -> None:
    getattr(p, "__dict__", {}).pop("negip_generation", None)
    Generation.end()
