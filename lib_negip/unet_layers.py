"""The UNet's cross-attention layers, in the order IP-Adapter files number them.

IP-Adapter weights are keyed ``"{2i+1}.to_k_ip.weight"``, where ``i`` counts the cross-attention
(``attn2``) layers in diffusers' processor order: every down block, then every up block, then the
middle block. In ldm/sgm names that is ``input_blocks``, then ``output_blocks``, then
``middle_block``, each by block index and transformer index. The order is derived here from the
model's own module tree, so any block layout (SD1.x, SDXL, odd test sizes) maps the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lib_negip.errors import IncompatibleModelError

# Group order of the adapter's layer numbering.
_GROUP_ORDER = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
_NUMBER = re.compile(r"^\d+$")


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One ``attn2`` module and where it sits."""

    name: str  # e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    module: nn.Module

    @property
    def context_dim(self) -> int:
        return self.module.to_k.in_features

    @property
    def inner_dim(self) -> int:
        return self.module.to_k.out_features


def _is_cross_attention(module: nn.Module) -> bool:
    return all(hasattr(module, attr) for attr in ("to_q", "to_k", "to_v", "to_out", "heads"))


def _order_key(name: str) -> tuple[int, tuple[int, ...]]:
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part in _GROUP_ORDER:
            numbers = tuple(int(p) for p in parts[position + 1 :] if _NUMBER.match(p))
            return _GROUP_ORDER[part], numbers
    msg = (
        f"Cross-attention layer '{name}' is not inside input_blocks, middle_block or "
        "output_blocks: this is not an ldm/sgm Stable Diffusion UNet that IP-Adapter knows."
    )
    raise IncompatibleModelError(msg)


def cross_attention_layers(unet: nn.Module) -> list[CrossAttentionLayer]:
    """All ``attn2`` modules of an ldm/sgm UNet in IP-Adapter layer order."""
    found = [
        CrossAttentionLayer(name, module)
        for name, module in unet.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and _is_cross_attention(module)
    ]
    found.sort(key=lambda layer: _order_key(layer.name))
    return found


def adapter_key(layer_index: int) -> int:
    """The number in the adapter's ``"{k}.to_k_ip.weight"`` key of layer ``layer_index``."""
    return 2 * layer_index + 1


# Group order of the transformer blocks' numbering: input, middle, output (ComfyUI's
# IPAdapter_plus counts them so; the adapter file numbers its layers input, output, middle).
_BLOCK_GROUP_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


def transformer_block_of(name: str) -> str:
    """The transformer block (SpatialTransformer) an ``attn2`` belongs to, by module path:
    "input_blocks.4.1.transformer_blocks.3.attn2" -> "input_blocks.4.1"."""
    head, marker, _ = name.partition(".transformer_blocks.")
    if not marker:
        msg = f"Cross-attention layer '{name}' is not inside a transformer block."
        raise IncompatibleModelError(msg)
    return head


def _block_order_key(path: str) -> tuple[int, tuple[int, ...]]:
    parts = path.split(".")
    for position, part in enumerate(parts):
        if part in _BLOCK_GROUP_ORDER:
            numbers = tuple(int(p) for p in parts[position + 1 :] if _NUMBER.match(p))
            return _BLOCK_GROUP_ORDER[part], numbers
    msg = f"Transformer block '{path}' is not inside input_blocks, middle_block or output_blocks."
    raise IncompatibleModelError(msg)


def transformer_blocks(layers: list[CrossAttentionLayer]) -> list[str]:
    """The distinct transformer blocks of ``layers``, numbered input, middle, output (SD1.x:
    16 blocks, SDXL: 11; every layer of a block's depth shares its block's index)."""
    return sorted({transformer_block_of(layer.name) for layer in layers}, key=_block_order_key)


def block_indices(layers: list[CrossAttentionLayer]) -> list[int]:
    """For each layer of ``layers`` (in their order), the index of its transformer block."""
    index = {path: i for i, path in enumerate(transformer_blocks(layers))}
    return [index[transformer_block_of(layer.name)] for layer in layers]
