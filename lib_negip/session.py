"""One generation's image prompt, from A1111's ``process`` to ``postprocess``, without A1111.

``lib_negip.webui.generation`` maps A1111's objects onto these plain calls:

- :class:`FeatureCache` encodes each distinct image once per encoder (keyed by content), so
  batch count, X/Y/Z grids and repeated generations do not run the encoder again;
- :func:`build_image_prompt` turns the two sides' images into an :class:`ImagePrompt`;
- :class:`ImagePromptSession` keeps the current UNet hijacked and appends the image blocks to
  the conditioning of every denoiser call; :func:`pass_progress` places a denoiser call in its
  sampling pass for the step windows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from lib_negip import logger
from lib_negip.adapter import family_of
from lib_negip.blocks import ALL_LAYERS, LayerSpec, block_weights, layer_scales
from lib_negip.cache import LRUCache, image_digest
from lib_negip.conditioning import PadMode, append_blocks
from lib_negip.errors import ArgumentError, IncompatibleModelError
from lib_negip.hijack import AttentionHijack, KeyValueWeights
from lib_negip.prompt import Combine, ImagePrompt, SidePrompt, StepWindow, side_tokens
from lib_negip.unet_layers import block_indices, cross_attention_layers, transformer_blocks

HIRES_PASSES = ("both", "first", "second")


class Encoder(Protocol):
    """The part of :class:`lib_negip.encoder.ImageEncoder` used here."""

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def encode(self, pixel_values: torch.Tensor, output: str) -> torch.Tensor: ...


class FeatureCache:
    """Encoder outputs per (encoder, output kind, image content), float32 on the CPU."""

    def __init__(self, limit: int = 64) -> None:
        self._features: LRUCache[tuple, torch.Tensor] = LRUCache(limit)
        self.encoder_calls = 0  # counted, so tests and the benchmark can prove cache hits

    def set_limit(self, limit: int) -> None:
        self._features.set_limit(limit)

    def clear(self) -> None:
        self._features.clear()

    def features(
        self,
        encoder: Encoder,
        encoder_key: Hashable,
        output: str,
        images: Sequence[Image.Image],
    ) -> torch.Tensor:
        """[I, ...] features of ``images``; only images not seen before reach the encoder."""
        keys = [(encoder_key, output, image_digest(image)) for image in images]
        rows = {key: self._features.get(key) for key in keys}
        missing = {key: image for key, image in zip(keys, images, strict=True) if rows[key] is None}
        if missing:
            self.encoder_calls += 1
            encoded = encoder.encode(encoder.preprocess(list(missing.values())), output)
            for key, row in zip(missing, encoded.float().cpu(), strict=True):
                rows[key] = row
                self._features.put(key, row)
        return torch.stack([rows[key] for key in keys])

    def unconditional(
        self, encoder: Encoder, encoder_key: Hashable, output: str, image_size: int
    ) -> torch.Tensor:
        """[1, ...] encoder output for an all-zero normalised pixel tensor (the reference's
        "no image" input for hidden-state adapters)."""
        key = (encoder_key, output, "unconditional")
        cached = self._features.get(key)
        if cached is None:
            self.encoder_calls += 1
            pixels = torch.zeros(1, 3, image_size, image_size)
            cached = encoder.encode(pixels, output).float().cpu()[0]
            self._features.put(key, cached)
        return cached[None]


class Projector(Protocol):
    """The part of :class:`lib_negip.adapter.IPAdapter` used here."""

    def project(self, embeds: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SideImages:
    """What the user asked for one CFG side."""

    images: Sequence[Image.Image]
    weight: float
    window: StepWindow
    layers: LayerSpec = ALL_LAYERS
    mask: torch.Tensor | None = None  # [h, w], values 0..1


def build_image_prompt(
    *,
    adapter: Projector,
    encoder_output: str,
    positive: SideImages,
    negative: SideImages,
    combine: Combine,
    features: Any,
    unconditional: Any,
) -> ImagePrompt:
    """The :class:`ImagePrompt` of one generation.

    features(images) -> [I, ...] encoder outputs; unconditional() -> [1, ...] the reference's
    "no image" features. A side without images takes the unconditional tokens with the other
    side's weight, window, blocks and mask, as plain IP-Adapter does for its uncond rows.
    """
    if not positive.images and not negative.images:
        msg = "An image prompt needs at least one positive or negative image."
        raise ValueError(msg)
    with torch.inference_mode():
        none_tokens = None
        sides = []
        for side, other in ((positive, negative), (negative, positive)):
            if side.images:
                tokens = side_tokens(adapter, features(side.images), combine)
                sides.append(SidePrompt(tokens, side.weight, side.window, side.layers, side.mask))
            else:
                if none_tokens is None:
                    none_tokens = adapter.project(unconditional())[0]
                sides.append(
                    SidePrompt(none_tokens, other.weight, other.window, other.layers, other.mask)
                )
    logger.debug(
        "image prompt: %s positive tokens, %s negative tokens (%s)",
        sides[0].tokens.shape[0],
        sides[1].tokens.shape[0],
        encoder_output,
    )
    return ImagePrompt(positive=sides[0], negative=sides[1])


def pass_progress(call: int, steps: int, total_calls: int) -> float:
    """Where a denoiser call lies in its sampling pass, as the start of its sampling step.

    A1111 counts denoiser calls (``denoiser.step``) against an estimate of the pass's calls
    (``denoiser.total_steps``: ``2 * steps`` for second-order samplers such as Heun, which really
    make ``2 * steps - 1``). Mapping a call to its sampling step (call * steps // total_calls)
    gives both calls of a Heun step the same progress, ``step / steps``, as a first-order
    sampler's single call, so a window selects the same steps whatever the sampler. Samplers that
    make more calls than estimated stay in the last step.
    """
    if steps <= 0:
        return 0.0
    total_calls = max(total_calls, steps)
    step = min(call * steps // total_calls, steps - 1)
    return step / steps


@dataclass(frozen=True)
class Appended:
    """What one denoiser call's conditioning became."""

    cond: Any
    uncond: Any
    padded: bool  # cond and uncond text lengths differed and were padded here


MaskRegion = tuple[float, float, float, float]  # left, top, right, bottom as fractions


def crop_mask(mask: torch.Tensor, region: MaskRegion | None) -> torch.Tensor:
    """The part of ``mask`` [h, w] inside ``region`` (fractions of its width and height): the
    masks cover the whole image, and inpainting "only masked" samples a part of it."""
    if region is None:
        return mask
    h, w = mask.shape
    left, top, right, bottom = region
    x0, x1 = round(left * w), max(round(right * w), round(left * w) + 1)
    y0, y1 = round(top * h), max(round(bottom * h), round(top * h) + 1)
    return mask[min(y0, h - 1) : min(y1, h), min(x0, w - 1) : min(x1, w)]


def resolve_layers(prompt: ImagePrompt, unet: nn.Module) -> tuple[list[tuple[float, float]], int]:
    """Each cross-attention layer's (positive, negative) block weight on ``unet``, and the
    UNet's number of transformer blocks; raises :class:`ArgumentError` for a block the UNet
    does not have."""
    layers = cross_attention_layers(unet)
    n_blocks = len(transformer_blocks(layers))
    positive = block_weights("positive_layers", prompt.positive.layers, n_blocks)
    negative = block_weights("negative_layers", prompt.negative.layers, n_blocks)
    return layer_scales(positive, negative, block_indices(layers)), n_blocks


class ImagePromptSession:
    """Keeps the sampling UNet hijacked and appends the image blocks in every denoiser call."""

    def __init__(
        self,
        prompt: ImagePrompt,
        weights: Sequence[KeyValueWeights],
        *,
        hires_pass: str = "both",
        upcast: bool = False,
        on_abort: Callable[[], None] | None = None,
        raise_as: Callable[[BaseException], BaseException] | None = None,
    ) -> None:
        """``on_abort`` and ``raise_as`` go to every hijack: see :class:`AttentionHijack`."""
        if hires_pass not in HIRES_PASSES:
            msg = f"hires_pass must be one of {HIRES_PASSES}, got {hires_pass!r}"
            raise ValueError(msg)
        self.prompt = prompt
        self.weights = list(weights)
        self.hires_pass = hires_pass
        self.upcast = upcast
        self.on_abort = on_abort
        self.raise_as = raise_as
        self.context_dim = self.weights[0].shape[1]
        self.mask_region: MaskRegion | None = None
        self.appended = 0  # denoiser calls whose conditioning got the image blocks
        # Per side: the appended calls where its window was open (the negative side's only
        # where the uncond rows ran too); the negative side's calls whose uncond rows the
        # sampler skipped, and those that had no uncond conditioning at all (Forge at CFG 1);
        # with their values when the current batch began.
        self.side_calls = [0, 0]
        self.uncond_skipped = 0
        self.uncond_absent = 0
        self._batch_side_calls = (0, 0, 0, 0)
        self._carried = 0  # UNet calls that carried them, of hijacks already removed
        self._batch_start = (0, 0)  # (appended, carried) when the current batch began
        self._unet: nn.Module | None = None
        self._hijack: AttentionHijack | None = None
        self._zero_blocks = False  # the last UNet's blocks all at weight 0

    @property
    def acted(self) -> bool:
        """Whether the image prompts reached the UNet in at least one call."""
        return self._carried_total() > 0

    @property
    def acted_in_batch(self) -> bool:
        """Whether they reached the UNet in a call of the current batch (since
        :meth:`begin_batch`)."""
        return self._carried_total() > self._batch_start[1]

    @property
    def appended_in_batch(self) -> bool:
        """Whether a denoiser call of the current batch got the image blocks."""
        return self.appended > self._batch_start[0]

    def begin_batch(self) -> None:
        """A new batch (of A1111's batch count) starts: it must carry the image prompts itself."""
        self._batch_start = (self.appended, self._carried_total())
        self._batch_side_calls = (*self.side_calls, self.uncond_skipped, self.uncond_absent)

    def idle_sides_in_batch(self) -> dict[str, str]:
        """The sides with a weight other than 0 that had no call of the current batch, each with
        why: "window" (its step window held none of the steps sampled), "uncond skipped" (the
        negative side's window was open, but the sampler left out the uncond rows that carry it:
        A1111's Negative Guidance minimum sigma, or Ignore negative prompt during early
        sampling) or "no uncond" (there was no uncond conditioning at all: Forge at CFG 1).
        Empty while no call got the image blocks (see :attr:`appended_in_batch`)."""
        if not self.appended_in_batch:
            return {}
        reasons = {name: self._idle_reason(index) for index, name in enumerate(_SIDE_NAMES)}
        return {name: why for name, why in reasons.items() if why is not None}

    def _side_acted_in_batch(self, index: int) -> bool:
        return self.side_calls[index] > self._batch_side_calls[index]

    def _idle_reason(self, index: int) -> str | None:
        """Why side ``index`` had no call of the current batch (see
        :meth:`idle_sides_in_batch`); None when it had one, or its weight is 0."""
        if self.prompt.sides[index].weight == 0.0 or self._side_acted_in_batch(index):
            return None
        if index == 1 and self.uncond_absent > self._batch_side_calls[3]:
            return "no uncond"
        if index == 1 and self.uncond_skipped > self._batch_side_calls[2]:
            return "uncond skipped"
        return "window"

    def _carried_total(self) -> int:
        current = self._hijack.carried if self._hijack is not None else 0
        return self._carried + current

    @property
    def hijack(self) -> AttentionHijack | None:
        """The hijack of the UNet now sampling (None before the first call or on a UNet the
        adapter does not fit)."""
        return self._hijack

    def check_fits(self, unet: nn.Module) -> None:
        """Raise :class:`IncompatibleModelError` unless the adapter fits this UNet, and
        :class:`ArgumentError` for block weights it does not have."""
        scales, _ = resolve_layers(self.prompt, unet)
        AttentionHijack(unet, self.weights, self.prompt.layout, layer_scales=scales)

    def set_mask_region(self, region: MaskRegion | None) -> None:
        """The part of the image the sampling covers (inpainting "only masked"); the masks are
        cropped to it. None: the whole image."""
        if region == self.mask_region:
            return
        self.mask_region = region
        if self._hijack is not None:
            self._hijack.set_masks(self._masks())

    def _masks(self) -> list[torch.Tensor | None]:
        return [
            None if side.mask is None else crop_mask(side.mask, self.mask_region)
            for side in self.prompt.sides
        ]

    def applies_to_pass(self, hires: bool) -> bool:
        if self.hires_pass == "both":
            return True
        return hires == (self.hires_pass == "second")

    def conditioning(
        self,
        unet: nn.Module,
        text_cond: Any,
        text_uncond: Any,
        *,
        progress: float,
        hires: bool = False,
        pad: PadMode | None = None,
        empty: torch.Tensor | None = None,
        latent: tuple[int, int] | None = None,
        uncond_runs: bool = True,
    ) -> Appended | None:
        """The conditioning for this denoiser call, or None to leave it as it is.

        latent: the size of the latent this denoiser call denoises (its ``x``), where known;
        with a mask, UNet calls on pieces of it are refused (see ``expect_block``).
        uncond_runs: whether the UNet call runs the uncond rows (the negative side's): A1111
        skips them on some steps with Negative Guidance minimum sigma and early CFG skipping.

        While nothing is appended (a pass or steps outside the windows) the hijack's hooks are
        off the UNet, so those steps run exactly the unhijacked UNet, at its speed; they come
        back (the same hijack, with what it already projected) when a window opens.
        """
        if not self.applies_to_pass(hires) or not self._can_act():
            # Both weights 0 too: the UNet runs exactly as without the extension, unhooked, and
            # nothing another extension does to it (its own UNet calls, tiles) concerns us.
            self._unhook()
            return None
        hijack = self._hijack_for(unet, hires=hires, progress=progress)
        if hijack is None:
            return None
        crossattn = text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond
        blocks = self.prompt.blocks_at(progress, crossattn.device, crossattn.dtype)
        if blocks is None:
            if hijack.installed:
                hijack.remove()
            return None
        hijack.install()  # a no-op when installed
        self._count_sides(progress, uncond_runs, absent=text_uncond is None)
        if text_uncond is None:
            # Forge leaves out the uncond conditioning where CFG is 1 (its hires pass' own CFG
            # scale): only the cond rows run, with the positive side.
            cond, _ = append_blocks(text_cond, text_cond, *blocks)
            hijack.expect_block(latent)
            self.appended += 1
            return Appended(cond=cond, uncond=None, padded=False)
        uncond_crossattn = (
            text_uncond["crossattn"] if isinstance(text_uncond, dict) else text_uncond
        )
        padded = pad is not None and crossattn.shape[1] != uncond_crossattn.shape[1]
        cond, uncond = append_blocks(text_cond, text_uncond, *blocks, pad=pad, empty=empty)
        hijack.expect_block(latent)
        self.appended += 1
        return Appended(cond=cond, uncond=uncond, padded=padded)

    def _count_sides(self, progress: float, uncond_runs: bool, *, absent: bool = False) -> None:
        positive, negative = (side.weight_at(progress) for side in self.prompt.sides)
        if positive != 0.0:
            self.side_calls[0] += 1
        if negative != 0.0:
            if absent:
                self.uncond_absent += 1
            elif uncond_runs:
                self.side_calls[1] += 1
            else:
                self.uncond_skipped += 1

    def _hijack_for(
        self, unet: nn.Module, *, hires: bool = False, progress: float = 0.0
    ) -> AttentionHijack | None:
        if unet is self._unet:
            return self._hijack
        # A different UNet mid-generation: the refiner, a Hires. fix checkpoint, a model reload.
        self._remove()
        self._unet = unet
        layers = cross_attention_layers(unet)
        try:
            if not layers or layers[0].context_dim != self.context_dim:
                raise IncompatibleModelError(self._misfit_message(layers, hires=hires))
            scales, _ = resolve_layers(self.prompt, unet)
            self._zero_blocks = all(scale == (0.0, 0.0) for scale in scales)
            if self._zero_blocks:
                return None  # every block at weight 0: exactly the UNet without image prompts
            hijack = AttentionHijack(
                unet,
                self.weights,
                self.prompt.layout,
                side_tokens=[side.tokens for side in self.prompt.sides],
                layer_scales=scales,
                masks=self._masks(),
                upcast=self.upcast,
                on_abort=self.on_abort,
                raise_as=self.raise_as,
            )
        except (IncompatibleModelError, ArgumentError) as error:
            left_out = self._sides_left_out(progress)
            if self._can_act() and (not self.acted_in_batch or left_out):
                # No step so far had the image prompts (or those of one side) and none of this
                # model's will: the image would come without them (a Hires. fix checkpoint with
                # hires_pass "second", a refiner taking over before a window opens).
                self._unet = None
                if self.acted_in_batch and isinstance(error, IncompatibleModelError):
                    raise IncompatibleModelError(
                        self._misfit_message(layers, hires=hires, sides=left_out)
                    ) from error
                raise
            acted = [
                name for index, name in enumerate(_SIDE_NAMES) if self._side_acted_in_batch(index)
            ]
            if isinstance(error, IncompatibleModelError):
                reason = (
                    f"{self._model_words(hires)} is {_family_of_layers(layers)}, which the "
                    f"IP-Adapter for {family_of(self.context_dim)} does not fit"
                )
            else:
                reason = str(error).rstrip(".")
            logger.info(
                "Negative Image Prompt: %s, so that model's steps run without image prompts; "
                "the %simage prompts acted in the steps before it.",
                reason,
                f"{acted[0]} " if len(acted) == 1 else "",  # one side: say which
            )
            return None
        hijack.install()
        self._hijack = hijack
        return hijack

    def _can_act(self) -> bool:
        return any(side.weight != 0.0 for side in self.prompt.sides)

    @property
    def idle_by_choice(self) -> bool:
        """Whether the settings themselves give the image prompts nothing to do: both weights
        0, or every block of the sampling UNet at weight 0 (unlike windows that hold no step,
        which depend on the steps sampled)."""
        return not self._can_act() or self._zero_blocks

    def _sides_left_out(self, progress: float) -> list[str]:
        """The sides (weight other than 0) that had no step of this batch although their step
        window reaches ``progress``, where a model they do not fit takes over: all of their
        steps go to that model. A window that ended before holds no step by itself, and a
        negative side whose rows A1111 skipped is not the new model's doing (both are warned
        about at the batch's end)."""
        return [
            name
            for index, name in enumerate(_SIDE_NAMES)
            if self._idle_reason(index) == "window"
            and self.prompt.sides[index].window.end > progress
        ]

    @staticmethod
    def _model_words(hires: bool) -> str:
        return (
            "the model sampling the Hires. fix pass (a Hires. fix checkpoint or the refiner)"
            if hires
            else "the model that took over sampling (the refiner, or a reloaded checkpoint)"
        )

    def _misfit_message(self, layers: list, *, hires: bool, sides: Sequence[str] = ()) -> str:
        model = self._model_words(hires)
        family = _family_of_layers(layers)
        if sides:
            which = " and ".join(f"the {side}" for side in sides)
            plural = "s" if len(sides) > 1 else ""
            lost = (
                f"{which} image prompts' step window{plural} hold{'' if plural else 's'} no step "
                "before it, so they would do nothing"
            )
        else:
            lost = (
                "no step before it had the image prompts, so the image would be made without them"
            )
        if hires:
            advice = (
                "Choose a Hires. fix checkpoint or refiner of the adapter's family (or none), or "
                "let the image prompts act before it takes over: set hires_pass to 'both' or "
                "'first', or start the step windows earlier."
            )
        else:
            advice = (
                "Choose a refiner of the adapter's family (or none), or let the image prompts act "
                "before it takes over: switch to the refiner later, or start the step windows "
                "earlier."
            )
        return (
            f"The IP-Adapter is for {family_of(self.context_dim)}, but {model} is {family}, and "
            f"{lost}. {advice}"
        )

    def _unhook(self) -> None:
        if self._hijack is not None and self._hijack.installed:
            self._hijack.remove()

    def _remove(self) -> None:
        if self._hijack is not None:
            self._hijack.remove()
            self._carried += self._hijack.carried
        self._hijack = None
        self._unet = None

    def close(self) -> None:
        """Remove the hijack; a later :meth:`conditioning` call installs it again."""
        self._remove()

    def release_device_copies(self) -> None:
        """Drop the adapter weights' copies cast to the sampling device (kept by default, so a
        cached adapter moves to the GPU once): for a host that keeps the GPU nearly empty."""
        for weights in self.weights:
            weights.release_device_copies()


_SIDE_NAMES = ("positive", "negative")  # the order of ImagePrompt.sides


def _family_of_layers(layers: list) -> str:
    width = layers[0].context_dim if layers else None
    return family_of(width) if width is not None else "a model without cross-attention"
