"""The image prompt of one generation: tokens, weight and step window for each CFG side.

The positive side conditions the conditional rows, the negative side the "unconditional" rows.
A side without images uses the reference implementation's unconditional image tokens, with the
other side's weight and window, so that plain IP-Adapter (positive only) behaves exactly as the
reference and a negative-only prompt pushes away from its image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from lib_negip.blocks import ALL_LAYERS, LayerSpec
from lib_negip.conditioning import TokenLayout, make_block
from lib_negip.errors import ArgumentError

Combine = Literal["average", "concat"]


@dataclass(frozen=True)
class StepWindow:
    """The part of a sampling pass where a side is active, as fractions of the pass.

    Half-open ``[start, end)`` over the pass's progress ``step / steps`` (0 at the first
    denoiser call, approaching 1 at the last), so ``[0, 1)`` covers every step and two
    windows ``[0, a)`` and ``[a, 1)`` never overlap nor leave a gap.
    """

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            msg = f"A step window needs 0 <= start <= end <= 1; got start {self.start}, end {self.end}."
            raise ArgumentError(msg)

    def contains(self, progress: float) -> bool:
        return self.start <= progress < self.end


@dataclass(frozen=True)
class SidePrompt:
    """What one CFG side appends: tokens [n, C], their weight and step window, the UNet blocks
    they act on and an optional mask [h, w] (values 0..1) over the image."""

    tokens: torch.Tensor
    weight: float
    window: StepWindow = StepWindow()
    layers: LayerSpec = ALL_LAYERS
    mask: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            msg = f"An image prompt weight must be a finite number, got {self.weight}."
            raise ArgumentError(msg)

    def weight_at(self, progress: float) -> float:
        return self.weight if self.window.contains(progress) else 0.0


@dataclass(frozen=True)
class ImagePrompt:
    """Positive (cond rows) and negative (uncond rows) sides of one generation."""

    positive: SidePrompt
    negative: SidePrompt
    layout: TokenLayout = field(init=False)
    _blocks: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        widths = {self.positive.tokens.shape[-1], self.negative.tokens.shape[-1]}
        if len(widths) != 1:
            msg = f"Positive and negative tokens have different widths {sorted(widths)}."
            raise ValueError(msg)
        n = max(self.positive.tokens.shape[0], self.negative.tokens.shape[0])
        object.__setattr__(self, "layout", TokenLayout.for_tokens(n))

    @property
    def sides(self) -> tuple[SidePrompt, SidePrompt]:
        """Positive then negative: a block's ``side`` index (see ``make_block``) points here."""
        return (self.positive, self.negative)

    def blocks_at(
        self, progress: float, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cond and uncond blocks to append at this point of the pass, or None.

        None when both sides are outside their windows (or at weight 0): nothing is appended
        and the UNet runs exactly as without the extension. Blocks are built once per
        (weights, device, dtype) and reused, so a denoiser call allocates nothing new.
        """
        weights = (self.positive.weight_at(progress), self.negative.weight_at(progress))
        if weights == (0.0, 0.0):
            return None
        key = (weights, device, dtype)
        blocks = self._blocks.get(key)
        if blocks is None:
            blocks = tuple(
                make_block(
                    side.tokens.to(device=device, dtype=dtype), weight, self.layout, side=index
                )
                for index, (side, weight) in enumerate(zip(self.sides, weights, strict=True))
            )
            self._blocks[key] = blocks
        return blocks


class Adapter(Protocol):
    """What :func:`side_tokens` needs of an adapter (``lib_negip.adapter.IPAdapter``)."""

    def project(self, embeds: torch.Tensor) -> torch.Tensor: ...


def side_tokens(adapter: Adapter, features: torch.Tensor, combine: Combine) -> torch.Tensor:
    """Image tokens [n, C] of one side from its encoder features.

    features: [I, D] pooled embeds or [I, S, D] hidden states of the side's I images.
    ``average`` averages the image features before the projection (one image's worth of
    tokens); ``concat`` projects each image and concatenates the tokens (I times as many).
    """
    if combine == "average":
        return adapter.project(features.mean(dim=0, keepdim=True))[0]
    if combine == "concat":
        tokens = adapter.project(features)  # [I, N, C]
        return tokens.reshape(-1, tokens.shape[-1])
    msg = f"combine must be 'average' or 'concat', got {combine!r}."
    raise ArgumentError(msg)
