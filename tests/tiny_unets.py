"""Tiny random ldm UNets with the real block layouts, and their diffusers twins.

SD1.5 layout: 4 levels, 2 res blocks each, attention at the first three levels and the middle:
16 ``attn2`` layers. SDXL layout: 3 levels, attention at levels 1 and 2 with transformer depth
2 and 10, middle depth 10: 70 ``attn2`` layers. ldm's ``UNetModel`` (the one A1111 uses for
SD1.x) takes a single transformer depth, so the SDXL layout is built at depth 2 and its deep
transformers are replaced by depth-10 ``SpatialTransformer``s of the same classes; sgm (A1111's
SDXL code) uses the same block naming and the same attention attributes.

Every parameter is randomised: with default initialisation (zero output layers, LayerNorm 1/0)
a wrong implementation could pass by accident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

CHUNK = 77


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter with random values of a sensible scale, in place."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                param.copy_(noise / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    return module.eval().requires_grad_(False)


@dataclass(frozen=True)
class TinyUNetConfig:
    family: str  # "sd15" or "sdxl"
    model_channels: int
    context_dim: int
    heads: int  # SD1.5 uses a head count, SDXL a head width; tiny models use a head count
    transformer_depth: tuple[int, ...]  # per level with attention, then the middle block

    @property
    def num_layers(self) -> int:
        # Two res blocks per level on the way down, three on the way up.
        down = sum(depth * 2 for depth in self.transformer_depth[:-1])
        up = sum(depth * 3 for depth in self.transformer_depth[:-1])
        return down + up + self.transformer_depth[-1]


SD15 = TinyUNetConfig(
    "sd15", model_channels=32, context_dim=64, heads=4, transformer_depth=(1, 1, 1, 1)
)
SDXL = TinyUNetConfig(
    "sdxl", model_channels=32, context_dim=96, heads=4, transformer_depth=(2, 10, 10)
)


def make_ldm_unet(config: TinyUNetConfig, seed: int = 0) -> nn.Module:
    """A random ldm ``UNetModel`` with the family's block layout and tiny widths."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if config.family == "sd15":
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=config.model_channels,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            num_heads=config.heads,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=config.context_dim,
            legacy=False,
        )
    else:
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=config.model_channels,
            attention_resolutions=[4, 2],
            num_res_blocks=2,
            channel_mult=[1, 2, 4],
            num_heads=config.heads,
            use_spatial_transformer=True,
            use_linear_in_transformer=True,
            transformer_depth=1,
            context_dim=config.context_dim,
            legacy=False,
        )
        # SDXL's transformers are 2 blocks deep at level 1 and 10 at level 2 and the middle.
        shallow, deep = config.transformer_depth[0], config.transformer_depth[1]
        for blocks, depths in (
            (unet.input_blocks, {4: shallow, 5: shallow, 7: deep, 8: deep}),
            (unet.output_blocks, {0: deep, 1: deep, 2: deep, 3: shallow, 4: shallow, 5: shallow}),
        ):
            for index, depth in depths.items():
                blocks[index][1] = _deep_transformer(blocks[index][1], depth, config)
        unet.middle_block[1] = _deep_transformer(
            unet.middle_block[1], config.transformer_depth[2], config
        )
    generator = torch.Generator().manual_seed(seed)
    return randomize_(unet, generator)


def _deep_transformer(old: nn.Module, depth: int, config: TinyUNetConfig) -> nn.Module:
    """An ldm ``SpatialTransformer`` of ``depth`` blocks that, like sgm's, gives every block the
    same context (ldm's own class indexes a per-block context list and fails past depth 1)."""
    from ldm.modules.attention import SpatialTransformer

    class DeepSpatialTransformer(SpatialTransformer):
        def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context=context)

    channels = old.in_channels
    return DeepSpatialTransformer(
        channels,
        config.heads,
        channels // config.heads,
        depth=depth,
        context_dim=[config.context_dim] * depth,
        use_linear=True,
    )


def diffusers_config(config: TinyUNetConfig) -> dict:
    """The ``UNet2DConditionModel`` config with the same layout as :func:`make_ldm_unet`."""
    c = config.model_channels
    if config.family == "sd15":
        return {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (c, 2 * c, 4 * c, 4 * c),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": config.context_dim,
            "attention_head_dim": config.heads,  # diffusers' legacy name for the head count
        }
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (c, 2 * c, 4 * c),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": config.context_dim,
        "attention_head_dim": config.heads,
        "use_linear_projection": True,
    }


def make_diffusers_twin(ldm_unet: nn.Module, config: TinyUNetConfig) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` holding the same weights as ``ldm_unet``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_config = diffusers_config(config)
    twin = UNet2DConditionModel(**unet_config)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ldm_unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(twin.config))
    missing, unexpected = twin.load_state_dict(converted, strict=False)
    if missing or unexpected:
        msg = f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        raise AssertionError(msg)
    return twin.eval().requires_grad_(False)


def text_context(rows: int, context_dim: int, chunks: int = 1, seed: int = 1) -> torch.Tensor:
    """Random text conditioning [rows, 77 * chunks, C]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, CHUNK * chunks, context_dim, generator=generator)


def latents(rows: int, size: int = 8, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, size, size, generator=generator)
