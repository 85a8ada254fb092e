"""Correctness at the REAL shapes, with full-size random weights (slow: minutes, GBs of RAM).

- The full SD1.5 UNet (320/640/1280, context 768, 16 cross-attention layers) hijacked with a
  full-size base adapter against diffusers' UNet with the same weights and IP-Adapter.
- SDXL's 70 cross-attention layers at their real widths (640/1280 inner, context 2048, heads of
  64) with a full-size ip-adapter-plus_sdxl_vit-h adapter (Perceiver projection included) against
  diffusers' attention processor and projection, layer by layer.
- The SDXL UNet's real module tree (built on the meta device) maps onto the adapter's 70 layers.
The full-size ViT-H-14 encoder is checked in tests/test_encoder.py (also marked slow).
"""

from __future__ import annotations

import pytest
import torch
from conftest import reference_library
from test_hijack import (
    TIMESTEPS,
    diffusers_rows,
    load_into_diffusers,
    ours,
)
from tiny_adapters import SDXL_INNER_DIMS, make_adapter_state_dict
from tiny_unets import TinyUNetConfig, make_diffusers_twin, make_ldm_unet, randomize_
from torch import nn

from lib_negip.adapter import adapter_from_state_dict
from lib_negip.conditioning import TokenLayout, make_block
from lib_negip.hijack import AttentionHijack
from lib_negip.unet_layers import cross_attention_layers

pytestmark = pytest.mark.slow

SD15_FULL = TinyUNetConfig(
    "sd15", model_channels=320, context_dim=768, heads=8, transformer_depth=(1, 1, 1, 1)
)
SDXL_FULL = TinyUNetConfig(
    "sdxl", model_channels=320, context_dim=2048, heads=0, transformer_depth=(2, 10, 10)
)


def test_full_size_sd15_unet_matches_diffusers() -> None:
    reference_library("diffusers", "UNet2DConditionModel")
    unet = make_ldm_unet(SD15_FULL, seed=11)
    layers = cross_attention_layers(unet)
    assert [layer.inner_dim for layer in layers] == [320, 320, 640, 640, 1280, 1280] + [
        1280
    ] * 3 + [640] * 3 + [320] * 3 + [1280]
    generator = torch.Generator().manual_seed(12)
    weights = [
        (
            torch.randn(layer.module.to_k.weight.shape, generator=generator) * 768**-0.5,
            torch.randn(layer.module.to_k.weight.shape, generator=generator) * 768**-0.5,
        )
        for layer in layers
    ]
    twin = make_diffusers_twin(unet, SD15_FULL)
    load_into_diffusers(twin, weights)
    x = torch.randn(1, 4, 8, 8, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, 768, generator=generator)
    positive = torch.randn(4, 768, generator=generator)
    negative = torch.randn(4, 768, generator=generator)

    got = ours(unet, weights, x, text[:1], text[1:], positive, negative, (0.7, 1.1))
    expected = diffusers_rows(twin, x, text, [positive[None], negative[None]], [0.7, 1.1])
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 1e-5 * max(scale, 1.0)
    plain = unet(x, TIMESTEPS, context=text)
    assert (got - plain).abs().max().item() > 1e-3 * scale


def test_sdxl_real_module_tree_maps_onto_the_70_adapter_layers() -> None:
    with torch.device("meta"):
        unet = make_sdxl_meta_unet()
    layers = cross_attention_layers(unet)
    assert [layer.inner_dim for layer in layers] == list(SDXL_INNER_DIMS)
    assert {layer.context_dim for layer in layers} == {2048}


def make_sdxl_meta_unet() -> nn.Module:
    """The SDXL block layout at real widths (320/640/1280, heads of 64), parameters on meta."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from tiny_unets import _deep_transformer

    unet = UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 4],
        num_head_channels=64,
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=2048,
        legacy=False,
    )
    for blocks, depths in (
        (unet.input_blocks, {4: 2, 5: 2, 7: 10, 8: 10}),
        (unet.output_blocks, {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2}),
    ):
        for index, depth in depths.items():
            old = blocks[index][1]
            config = TinyUNetConfig("sdxl", 320, 2048, old.in_channels // 64, (2, 10, 10))
            blocks[index][1] = _deep_transformer(old, depth, config)
    config = TinyUNetConfig("sdxl", 320, 2048, 1280 // 64, (2, 10, 10))
    unet.middle_block[1] = _deep_transformer(unet.middle_block[1], 10, config)
    return unet


class OneLayerAtATime(nn.Module):
    """A "UNet" whose call runs one of its attn2 layers: the hijack splits the context at the
    UNet's call, as in a real UNet, and the layers are compared one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList()

    def forward(self, x, timesteps=None, context=None, layer: int = 0):
        return self.input_blocks[layer].attn2(x, context=context)


def test_sdxl_70_real_layers_with_full_size_plus_adapter_match_diffusers() -> None:
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    from ldm.modules.attention import CrossAttention

    generator = torch.Generator().manual_seed(21)
    state = make_adapter_state_dict(
        "plus",
        cross_dim=2048,
        layer_inner_dims=SDXL_INNER_DIMS,
        encoder_dim=1280,
        num_tokens=16,
        resampler_dim=1280,
        depth=4,
        heads=20,
        generator=generator,
    )
    adapter = adapter_from_state_dict(state, name="ip-adapter-plus_sdxl_vit-h (random)")
    assert adapter.spec.num_layers == 70
    image_proj = {
        k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")
    }
    reference_proj = (
        UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
            None, image_proj, low_cpu_mem_usage=False
        )
        .float()
        .eval()
    )

    hidden = torch.randn(2, 257, 1280, generator=generator)  # ViT-H penultimate states
    with torch.no_grad():
        expected_tokens = reference_proj(hidden)
    tokens = adapter.project(hidden)
    assert (tokens - expected_tokens).abs().max().item() < 1e-4
    positive, negative = tokens[0], tokens[1]

    # One layer at a time (a whole SDXL UNet in float32 twice over would not fit in RAM here).
    container = OneLayerAtATime()
    references = []
    for inner in SDXL_INNER_DIMS:
        heads = inner // 64
        ldm_attention = CrossAttention(inner, context_dim=2048, heads=heads, dim_head=64)
        randomize_(ldm_attention, generator)
        holder = nn.Module()
        holder.attn2 = ldm_attention
        container.input_blocks.append(holder)
        references.append(
            Attention(inner, cross_attention_dim=2048, heads=heads, dim_head=64, out_bias=True)
        )
    layout = TokenLayout.for_tokens(16)
    text = torch.randn(2, 77, 2048, generator=generator)
    context = torch.cat(
        [
            torch.cat([text[:1], make_block(positive, 0.8, layout)], dim=1),
            torch.cat([text[1:], make_block(negative, 0.5, layout)], dim=1),
        ]
    )
    layer_weights = adapter.layer_weights()
    hijack = AttentionHijack(container, layer_weights, layout)
    hijack.install()
    worst = 0.0
    try:
        for index, (holder, reference) in enumerate(
            zip(container.input_blocks, references, strict=True)
        ):
            reference.load_state_dict(holder.attn2.state_dict())
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=reference.inner_dim,
                cross_attention_dim=2048,
                num_tokens=[16],
                scale=[1.0],
            )
            k, v = layer_weights[index]
            processor.to_k_ip[0].weight.data.copy_(k)
            processor.to_v_ip[0].weight.data.copy_(v)
            reference.set_processor(processor)
            inner = reference.inner_dim
            x = torch.randn(2, 64, inner, generator=generator)
            got = container(x, None, context=context, layer=index)
            rows = []
            for row, (image, scale) in enumerate(((positive, 0.8), (negative, 0.5))):
                processor.scale = [scale]
                with torch.no_grad():
                    rows.append(
                        reference(
                            x[row : row + 1],
                            encoder_hidden_states=(text[row : row + 1], [image[None, None]]),
                        )
                    )
            expected = torch.cat(rows)
            worst = max(
                worst, (got - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)
            )
    finally:
        hijack.remove()
    assert worst < 1e-5
    # The image term is far above that tolerance (the last layer, without any image tokens):
    plain = holder.attn2(x, context=text)
    assert (got - plain).abs().max().item() > 1e-2 * got.abs().max().item()
