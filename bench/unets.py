"""Full-size (and tiny) random ldm UNets with the SD1.5 and SDXL layouts, and the attention
implementations the step benchmark compares against.

Random weights, cheaply: the UNet is built on the ``meta`` device (no default initialisation of
~0.9 or ~2.6 billion parameters), given uninitialised storage on the target device and then
filled in place, parameter by parameter, with the scales ``tests/tiny_unets.randomize_`` uses:
matrices N(0, 1/fan_in), norm scales N(1, 0.1^2), biases N(0, 0.05^2). ldm's zero-initialised
output layers are randomised too, so every layer does real arithmetic; timing does not depend
on the values as long as they are finite and not denormal, which these are.

SD1.5: ldm's ``UNetModel`` with ``v1-inference.yaml``'s parameters (model_channels 320,
channel_mult 1,2,4,4, attention at ds 4,2,1, 8 heads, context 768): 16 ``attn2`` layers.
``use_checkpoint`` is off (no gradients are taken; ldm's checkpoint wrapper would only add
Python overhead to both sides of every comparison).

SDXL: sgm's block layout built from ldm's classes, as ``tests/tiny_unets.py`` does: levels of
320/640/1280 channels, attention at levels 1 and 2 with transformer depth 2 and 10, a depth-10
middle transformer, head width 64, linear ``proj_in``/``proj_out``, context 2048, and the
2816-wide ``vector`` (ADM) embedding: 70 ``attn2`` layers. ldm's ``SpatialTransformer`` takes a
per-block list of contexts, so the deep transformers are a subclass that gives every block the
same context, as sgm's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetShape:
    family: str  # "sd15" or "sdxl"
    model_channels: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    context_dim: int
    num_heads: int = -1  # SD1.5: a head count
    head_width: int = -1  # SDXL: a head width
    depths: tuple[int, ...] = ()  # SDXL: transformer depth at levels 1, 2 and the middle
    adm_channels: int = 0  # SDXL: width of the pooled-text + size ``vector``


SHAPES: dict[tuple[str, bool], UNetShape] = {
    ("sd15", False): UNetShape("sd15", 320, (1, 2, 4, 4), (4, 2, 1), 768, num_heads=8),
    ("sdxl", False): UNetShape(
        "sdxl", 320, (1, 2, 4), (4, 2), 2048, head_width=64, depths=(2, 10, 10), adm_channels=2816
    ),
    # Tiny twins with the same block layouts (and so the same number of attn2 layers).
    ("sd15", True): UNetShape("sd15", 32, (1, 2, 4, 4), (4, 2, 1), 64, num_heads=8),
    ("sdxl", True): UNetShape(
        "sdxl", 32, (1, 2, 4), (4, 2), 96, head_width=16, depths=(2, 10, 10), adm_channels=48
    ),
}


def build_unet(
    family: str, *, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """A random ldm ``UNetModel`` of the family's layout, eval, no grad, on device/dtype."""
    shape = SHAPES[(family, tiny)]
    with torch.device("meta"):
        unet = _sd15(shape) if family == "sd15" else _sdxl(shape)
    unet = unet.to_empty(device=device)
    buffers = [name for name, _ in unet.named_buffers()]
    if buffers:
        msg = f"unexpected buffers left uninitialised: {buffers[:4]}"
        raise RuntimeError(msg)
    randomize_(unet, seed)
    unet = unet.to(dtype).eval().requires_grad_(False)
    if dtype != torch.float32:
        _half_precision(unet, dtype)
    return unet


def _half_precision(unet: nn.Module, dtype: torch.dtype) -> None:
    """What A1111 arranges for a half-precision ldm UNet: activations in ``dtype`` (ldm casts
    its input to ``unet.dtype``, float32 unless built with use_fp16), the float32 timestep
    embedding cast before the time MLP, and GroupNorms in float32 (ldm's GroupNorm32 runs on
    ``x.float()`` and casts back)."""
    unet.dtype = dtype
    unet.time_embed.register_forward_pre_hook(lambda _module, args: (args[0].to(dtype),))
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            module.float()


def randomize_(module: nn.Module, seed: int) -> None:
    """Fill every parameter in place (see the module docstring for the scales)."""
    generator = None
    with torch.no_grad():
        for name, param in module.named_parameters():
            if generator is None:
                generator = torch.Generator(param.device).manual_seed(seed)
            if param.dim() >= 2:
                param.normal_(0.0, math.prod(param.shape[1:]) ** -0.5, generator=generator)
            elif name.endswith("weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.05, generator=generator)


def _sd15(shape: UNetShape) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(
        image_size=32,  # unused by the forward
        in_channels=4,
        out_channels=4,
        model_channels=shape.model_channels,
        attention_resolutions=list(shape.attention_resolutions),
        num_res_blocks=2,
        channel_mult=list(shape.channel_mult),
        num_heads=shape.num_heads,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=shape.context_dim,
        use_checkpoint=False,
        legacy=False,
    )


def _sdxl(shape: UNetShape) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=shape.model_channels,
        attention_resolutions=list(shape.attention_resolutions),
        num_res_blocks=2,
        channel_mult=list(shape.channel_mult),
        num_head_channels=shape.head_width,
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=shape.context_dim,
        use_checkpoint=False,
        legacy=False,
    )
    shallow, deep, middle = shape.depths
    # input_blocks 4, 5 (level 1) and 7, 8 (level 2); output_blocks 0-2 (level 2), 3-5 (level 1).
    for blocks, depths in (
        (unet.input_blocks, {4: shallow, 5: shallow, 7: deep, 8: deep}),
        (unet.output_blocks, {0: deep, 1: deep, 2: deep, 3: shallow, 4: shallow, 5: shallow}),
    ):
        for index, depth in depths.items():
            blocks[index][1] = _deep_transformer(blocks[index][1].in_channels, depth, shape)
    unet.middle_block[1] = _deep_transformer(unet.middle_block[1].in_channels, middle, shape)
    # sgm's "sequential" ADM embedding of the 2816-wide vector, added to the time embedding.
    time_embed_dim = shape.model_channels * 4
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(
        nn.Linear(shape.adm_channels, time_embed_dim),
        nn.SiLU(),
        nn.Linear(time_embed_dim, time_embed_dim),
    )
    return unet


def _deep_transformer(channels: int, depth: int, shape: UNetShape) -> nn.Module:
    from ldm.modules.attention import SpatialTransformer

    class SharedContextSpatialTransformer(SpatialTransformer):
        """Every block attends to the same context, as in sgm."""

        def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context=context)

    heads = channels // shape.head_width
    return SharedContextSpatialTransformer(
        channels,
        heads,
        shape.head_width,
        depth=depth,
        context_dim=[shape.context_dim] * depth,
        use_linear=True,
        use_checkpoint=False,
    )


def unet_inputs(
    family: str,
    *,
    tiny: bool,
    latent: int,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 1,
    seed: int = 1,
) -> dict[str, Any]:
    """Inputs of one batched cond+uncond UNet call for ``batch`` images (A1111's batch size):
    x [2B, 4, S, S], timesteps [2B], the text conditioning of each side [B, 77, C] and, for
    SDXL, y [2B, adm]."""
    shape = SHAPES[(family, tiny)]
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=generator).to(device=device, dtype=dtype)

    return {
        "x": randn(2 * batch, 4, latent, latent),
        "timesteps": torch.full((2 * batch,), 700.0, device=device),
        "text_cond": randn(batch, 77, shape.context_dim),
        "text_uncond": randn(batch, 77, shape.context_dim),
        "y": randn(2 * batch, shape.adm_channels) if shape.adm_channels else None,
    }


# --------------------------------------------------------------------------------------------
# Attention implementations, installed on the class as A1111 installs its optimisations


def sdpa_forward(self: nn.Module, x: torch.Tensor, context: Any = None, mask: Any = None,
                 **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """Cross-attention through ``F.scaled_dot_product_attention`` (the benchmark's own code, in
    the shape of A1111's "sdp" optimisation: module calls to to_q/to_k/to_v and to_out)."""
    source = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)  # [B, T, inner]
    batch, _, inner = q.shape
    heads = self.heads
    head_dim = inner // heads

    def split_heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, H, T, d]

    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v))
    # Like A1111's: the heads' output in the query's dtype (float16 under autocast, where x,
    # the output of a LayerNorm, is float32).
    out = out.transpose(1, 2).reshape(batch, -1, inner).to(q.dtype)
    return self.to_out(out)


class AttentionSwitch:
    """Selects the class-level ``CrossAttention.forward``: ldm's own or the SDPA one."""

    def __init__(self) -> None:
        from ldm.modules.attention import CrossAttention

        self.cls = CrossAttention
        self.stock = CrossAttention.forward
        self.current = "stock"

    def use(self, name: str) -> None:
        if name == self.current:
            return
        self.cls.forward = self.stock if name == "stock" else sdpa_forward
        self.current = name

    def restore(self) -> None:
        self.use("stock")
