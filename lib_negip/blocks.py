"""Block weights: on which transformer blocks of the UNet a side's image prompt acts.

A side's ``layers`` value is a preset name or explicit ``"index:weight"`` pairs. Indices count
the UNet's transformer blocks (SpatialTransformers) in input, middle, output order, as ComfyUI
IPAdapter_plus's weight types do: SD1.x UNets have 16 (0-15), SDXL UNets 11 (0-10); every
cross-attention layer of a block's depth takes its block's weight. A block weight multiplies
the side's weight; a block that is not listed gets 0.

The presets follow ComfyUI IPAdapter_plus's weight types, which for SDXL are InstantStyle's
blocks (style: ``up_blocks.0.attentions.1``, composition: ``down_blocks.2.attentions.1``).
The tables are in ``docs/blocks.md``. One difference: the middle block keeps its weight where a
preset lists it (IPAdapter_plus registers it under a key ComfyUI never calls, so it is skipped
there today, which its issues report as a bug).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lib_negip.errors import ArgumentError

ALL = "all"
PRESETS: tuple[str, ...] = ("all", "style", "composition", "style and composition", "strong style")
WEIGHT_MIN, WEIGHT_MAX = -1.0, 5.0

#: Blocks per UNet layout: SD1.x (16 transformer blocks, depth 1) and SDXL (11 blocks).
SD1_BLOCKS, SDXL_BLOCKS = 16, 11
_FAMILY_BY_BLOCKS = {SD1_BLOCKS: "SD1.x", SDXL_BLOCKS: "SDXL"}


def _weights(pairs: Mapping[int, float]) -> Mapping[int, float]:
    return MappingProxyType(dict(pairs))


_SD1_STYLE = dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), 1.0)
_SD1_COMPOSITION = {4: 0.25, 5: 1.0}
_SDXL_STYLE = {6: 1.0}
_SDXL_COMPOSITION = {3: 1.0}

#: Preset -> {block index: weight} per number of blocks; unlisted blocks get 0.
PRESET_TABLES: Mapping[int, Mapping[str, Mapping[int, float]]] = MappingProxyType(
    {
        SD1_BLOCKS: MappingProxyType(
            {
                "style": _weights(_SD1_STYLE),
                "composition": _weights(_SD1_COMPOSITION),
                "style and composition": _weights({**_SD1_STYLE, **_SD1_COMPOSITION}),
                "strong style": _weights({i: 1.0 for i in range(16) if i not in (4, 5)}),
            }
        ),
        SDXL_BLOCKS: MappingProxyType(
            {
                "style": _weights(_SDXL_STYLE),
                "composition": _weights(_SDXL_COMPOSITION),
                "style and composition": _weights({**_SDXL_STYLE, **_SDXL_COMPOSITION}),
                "strong style": _weights({i: 1.0 for i in range(11) if i != 3}),
            }
        ),
    }
)

#: The most transformer blocks of a UNet family this extension knows (SD1.x; SDXL has 11).
MOST_BLOCKS = 16

_PAIR = re.compile(
    r"^\s*(\d+)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity))\s*$"
)
EXAMPLE = '"3:1, 6:0.8"'


@dataclass(frozen=True)
class LayerSpec:
    """A parsed ``layers`` value: a preset, or explicit block weights."""

    preset: str | None = ALL
    pairs: tuple[tuple[int, float], ...] = ()

    @property
    def is_all(self) -> bool:
        return self.preset == ALL

    def text(self) -> str:
        """The canonical text (the infotext's and the API's form)."""
        if self.preset is not None:
            return self.preset
        return ", ".join(f"{index}:{weight:.12g}" for index, weight in self.pairs)


def _normalised(text: str) -> str:
    return " ".join(text.strip().lower().split())


#: Every block of SDXL's 11 or SD1.x's 16 written out with long weights fits in a few hundred.
MAX_TEXT_LENGTH = 1000


def parse_layers(field: str, value: object) -> LayerSpec:
    """A ``layers`` value checked for its syntax (the block range needs the model: see
    :func:`block_weights`). None or an empty string means ``all``."""
    if value is None:
        return LayerSpec()
    if not isinstance(value, str):
        msg = (
            f"{field} must be a preset ({', '.join(repr(p) for p in PRESETS)}) or "
            f"'index:weight' pairs such as {EXAMPLE}; got {repr(value)[:60]} ({type(value).__name__})."
        )
        raise ArgumentError(msg)
    if len(value) > MAX_TEXT_LENGTH:
        msg = (
            f"{field} is {len(value):,} characters long ({value[:40]!r}...); block weights are "
            f"at most {MAX_TEXT_LENGTH} characters: a preset, or 'index:weight' pairs such as "
            f"{EXAMPLE}."
        )
        raise ArgumentError(msg)
    text = _normalised(value)
    if not text:
        return LayerSpec()
    if text in PRESETS:
        return LayerSpec(preset=text)
    pairs: dict[int, float] = {}
    # Matched in lower case, quoted back as written.
    for part in " ".join(value.strip().split()).split(","):
        if not part.strip():
            msg = (
                f"{field}: an empty entry between commas; write 'index:weight' pairs such as "
                f"{EXAMPLE}."
            )
            raise ArgumentError(msg)
        match = _PAIR.match(part.lower())
        if match is None:
            msg = (
                f"{field}: {part.strip()!r} is neither a preset ({', '.join(repr(p) for p in PRESETS)}) "
                f"nor an 'index:weight' pair; write for example {EXAMPLE} (SD1.x blocks 0-15, "
                "SDXL blocks 0-10; unlisted blocks get 0)."
            )
            raise ArgumentError(msg)
        if len(match[1].lstrip("0")) > 6:  # no UNet has that many blocks (nor int() digits)
            shown = match[1] if len(match[1]) <= 12 else f"{match[1][:12]}..."
            raise ArgumentError(_no_such_block(field, shown))
        index, weight = int(match[1]), float(match[2])
        if not math.isfinite(weight) or not WEIGHT_MIN <= weight <= WEIGHT_MAX:
            msg = (
                f"{field}: the weight of block {index} must be a finite number from "
                f"{WEIGHT_MIN:g} to {WEIGHT_MAX:g}; got {match[2]}. Example: {EXAMPLE}."
            )
            raise ArgumentError(msg)
        if index in pairs:
            msg = f"{field}: block {index} is listed twice; list each block once, e.g. {EXAMPLE}."
            raise ArgumentError(msg)
        pairs[index] = weight + 0.0
    return LayerSpec(preset=None, pairs=tuple(sorted(pairs.items())))


def _no_such_block(field: str, shown: object) -> str:
    return (
        f"{field}: block {shown} does not exist: SD1.x UNets have blocks 0-15, SDXL ones 0-10. "
        f"Write for example {EXAMPLE}; unlisted blocks get 0."
    )


def check_known_blocks(field: str, spec: LayerSpec, limit: int = MOST_BLOCKS) -> None:
    """Refuse an index past ``limit`` blocks (by default, past every UNet family this extension
    knows), where the UNet that will use ``spec`` is not known yet."""
    outside = [index for index, _weight in spec.pairs if index >= max(limit, MOST_BLOCKS)]
    if outside:
        raise ArgumentError(_no_such_block(field, outside[0]))


def family_of_blocks(n_blocks: int) -> str:
    family = _FAMILY_BY_BLOCKS.get(n_blocks)
    return f"{family} ({n_blocks} blocks, 0-{n_blocks - 1})" if family else f"{n_blocks} blocks"


def block_weights(field: str, spec: LayerSpec, n_blocks: int) -> tuple[float, ...]:
    """The weight of each of a UNet's ``n_blocks`` transformer blocks for ``spec``."""
    if spec.is_all:
        return (1.0,) * n_blocks
    if spec.preset is not None:
        table = PRESET_TABLES.get(n_blocks)
        if spec.preset not in PRESETS:
            msg = f"{field}: unknown preset {spec.preset!r}; the presets are {', '.join(PRESETS)}."
            raise ArgumentError(msg)
        if table is None:
            msg = (
                f"{field}: the preset {spec.preset!r} is defined for SD1.x (16 transformer "
                f"blocks) and SDXL (11) UNets, but this UNet has {n_blocks}: use 'all' or "
                f"explicit 'index:weight' pairs (0-{n_blocks - 1}), e.g. {EXAMPLE}."
            )
            raise ArgumentError(msg)
        pairs = table[spec.preset]
    else:
        pairs = dict(spec.pairs)
        outside = [index for index in pairs if index >= n_blocks]
        if outside:
            msg = (
                f"{field}: block {outside[0]} does not exist; the loaded model is "
                f"{family_of_blocks(n_blocks)}. Write for example {EXAMPLE}; unlisted "
                "blocks get 0."
            )
            raise ArgumentError(msg)
    return tuple(float(pairs.get(index, 0.0)) for index in range(n_blocks))


def layer_scales(
    positive: tuple[float, ...], negative: tuple[float, ...], blocks_of_layers: list[int]
) -> list[tuple[float, float]]:
    """(positive, negative) block weight of each cross-attention layer, from its block index."""
    return [(positive[block], negative[block]) for block in blocks_of_layers]


#: The default: every block at the side's weight.
ALL_LAYERS = LayerSpec()
