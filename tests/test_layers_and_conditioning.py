"""Layer order against the reference tables; the appended block; step windows."""

from __future__ import annotations

import pytest
import torch
from tiny_unets import SD15, SDXL, make_ldm_unet

from lib_negip.conditioning import (
    PATTERN,
    BlockRow,
    TokenLayout,
    append_blocks,
    make_block,
    pad_text_to_same_length,
    read_rows,
)
from lib_negip.errors import ArgumentError, ConditioningError, IncompatibleModelError
from lib_negip.prompt import ImagePrompt, SidePrompt, StepWindow
from lib_negip.unet_layers import adapter_key, cross_attention_layers

# ipadapter-formats.md, "Which UNet layer each ip_adapter key belongs to": SD1.x.
SD15_TABLE = {
    1: "input_blocks.1",
    3: "input_blocks.2",
    5: "input_blocks.4",
    7: "input_blocks.5",
    9: "input_blocks.7",
    11: "input_blocks.8",
    13: "output_blocks.3",
    15: "output_blocks.4",
    17: "output_blocks.5",
    19: "output_blocks.6",
    21: "output_blocks.7",
    23: "output_blocks.8",
    25: "output_blocks.9",
    27: "output_blocks.10",
    29: "output_blocks.11",
    31: "middle_block",
}
SD15_INNER = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


def sdxl_table() -> list[str]:
    """The SDXL rows of the table: i = 0..69 -> '<block>.1.transformer_blocks.<t>.attn2'."""
    rows = []
    for block, depth in (("input_blocks.4", 2), ("input_blocks.5", 2)):
        rows += [f"{block}.1.transformer_blocks.{t}.attn2" for t in range(depth)]
    for block in ("input_blocks.7", "input_blocks.8"):
        rows += [f"{block}.1.transformer_blocks.{t}.attn2" for t in range(10)]
    for index in (0, 1, 2):
        rows += [f"output_blocks.{index}.1.transformer_blocks.{t}.attn2" for t in range(10)]
    for index in (3, 4, 5):
        rows += [f"output_blocks.{index}.1.transformer_blocks.{t}.attn2" for t in range(2)]
    rows += [f"middle_block.1.transformer_blocks.{t}.attn2" for t in range(10)]
    return rows


def test_sd15_layer_order_matches_reference_table() -> None:
    layers = cross_attention_layers(make_ldm_unet(SD15))
    names = {adapter_key(i): layer.name for i, layer in enumerate(layers)}
    assert names == {k: f"{block}.1.transformer_blocks.0.attn2" for k, block in SD15_TABLE.items()}


def test_sd15_full_size_layer_widths_match_reference_table() -> None:
    """The real SD1.5 UNet config, built on the meta device (no memory, no weights)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            num_heads=8,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=768,
            legacy=False,
        )
    layers = cross_attention_layers(unet)
    assert [layer.inner_dim for layer in layers] == SD15_INNER
    assert {layer.context_dim for layer in layers} == {768}


def test_sdxl_layer_order_matches_reference_table() -> None:
    layers = cross_attention_layers(make_ldm_unet(SDXL))
    assert [layer.name for layer in layers] == sdxl_table()
    # Level widths: 2x base channels at input_blocks.4/.5 and output_blocks.3-5, 4x elsewhere,
    # as 640 / 1280 in the real SDXL UNet.
    c = SDXL.model_channels
    expected = [2 * c] * 4 + [4 * c] * 20 + [4 * c] * 30 + [2 * c] * 6 + [4 * c] * 10
    assert [layer.inner_dim for layer in layers] == expected


def test_prefix_of_the_outer_model_is_ignored_and_foreign_layouts_refused() -> None:
    outer = torch.nn.Module()
    outer.diffusion_model = make_ldm_unet(SD15)
    layers = cross_attention_layers(outer)
    assert layers[0].name == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"
    assert layers[-1].name.startswith("diffusion_model.middle_block")

    stray = torch.nn.Module()
    stray.blocks = torch.nn.ModuleList([outer.diffusion_model.middle_block])
    with pytest.raises(IncompatibleModelError, match="not inside input_blocks"):
        cross_attention_layers(stray)


@pytest.mark.parametrize(
    ("n_tokens", "n_meta"), [(4, 1), (16, 1), (257, 1), (76, 3), (153, 3), (75, 4)]
)
def test_layout_never_looks_like_plain_text(n_tokens: int, n_meta: int) -> None:
    """Plain text is whole chunks of 77, or that plus the ControlNet extension's marker token:
    neither may look like text + our block, with or without the marker."""
    layout = TokenLayout.for_tokens(n_tokens)
    assert layout.n_meta == n_meta
    for chunks in range(1, 6):
        for marker in (0, 1):
            assert not layout.carries_block(77 * chunks + marker)
            assert layout.carries_block(77 * chunks + marker + layout.total)
        assert not layout.carries_block(77 * chunks + layout.total + 2)
    assert not layout.carries_block(layout.total)
    assert not layout.carries_block(layout.total + 1)


def test_block_and_rows_round_trip() -> None:
    layout = TokenLayout.for_tokens(6)
    positive = torch.randn(6, 8)
    negative = torch.randn(3, 8)
    cond, uncond = append_blocks(
        torch.randn(2, 77, 8),
        torch.randn(1, 77, 8),
        make_block(positive, 0.5, layout, side=0),
        make_block(negative, -1.0, layout, side=1),
    )
    assert cond.shape == (2, 84, 8)
    assert uncond.shape == (1, 84, 8)
    context = torch.cat([cond, uncond])
    assert torch.equal(context[0, 77:83], positive)
    assert torch.equal(context[2, 77:80], negative)
    assert read_rows(context, layout) == (
        BlockRow(side=0, weight=0.5, count=6),
        BlockRow(side=0, weight=0.5, count=6),
        BlockRow(side=1, weight=-1.0, count=3),
    )
    assert torch.equal(cond[0, -1, 2:6], torch.tensor(PATTERN))
    with pytest.raises(ConditioningError, match="changed before they reached the UNet"):
        read_rows(context * 1.1, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_read_the_token_count_exactly_in_every_dtype(dtype: torch.dtype) -> None:
    """The count of real tokens survives half precision: bfloat16 holds integers exactly only
    up to 256 (one full-face image has 257 tokens), float16 up to 2048 (nine concatenated)."""
    for count in (1, 4, 63, 64, 65, 256, 257, 2313, 16 * 257):
        layout = TokenLayout.for_tokens(count + 3)  # the other side is longer
        block = make_block(torch.randn(count, 8, dtype=dtype), 0.75, layout, side=1)
        context = torch.cat([torch.randn(1, 77, 8, dtype=dtype), block], dim=1)
        assert read_rows(context, layout) == (BlockRow(side=1, weight=0.75, count=count),), count


class DictWithShape(dict):
    """A1111's SDXL conditioning type (modules.prompt_parser.DictWithShape), as A1111 defines it."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def test_sdxl_conditioning_keeps_its_type_and_vector() -> None:
    layout = TokenLayout.for_tokens(4)
    vector = torch.randn(1, 16)
    cond = DictWithShape({"crossattn": torch.randn(1, 77, 8), "vector": vector})
    uncond = DictWithShape({"crossattn": torch.randn(1, 154, 8), "vector": vector})
    block = make_block(torch.randn(4, 8), 1.0, layout)
    new_cond, new_uncond = append_blocks(cond, uncond, block, block)
    assert type(new_cond) is DictWithShape
    assert new_cond.shape == (1, 82, 8)
    assert new_uncond.shape == (1, 159, 8)
    assert new_cond["vector"] is vector
    assert cond.shape == (1, 77, 8)  # the callback's inputs are not changed in place


def test_padding_matches_a1111_options() -> None:
    empty = torch.randn(1, 77, 8)
    cond, uncond = torch.randn(2, 231, 8), torch.randn(1, 77, 8)
    padded_cond, padded_uncond = pad_text_to_same_length(cond, uncond, "empty_chunks", empty)
    assert padded_cond is cond
    assert torch.equal(padded_uncond, torch.cat([uncond, empty, empty], dim=1))
    padded_cond, padded_uncond = pad_text_to_same_length(uncond, cond[:1], "empty_chunks", empty)
    assert torch.equal(padded_cond, torch.cat([uncond, empty, empty], dim=1))

    _, repeated = pad_text_to_same_length(cond, uncond, "repeat_last", None)
    assert torch.equal(repeated, torch.cat([uncond, uncond[:, -1:].repeat(1, 154, 1)], dim=1))
    _, cut = pad_text_to_same_length(uncond, cond[:1], "repeat_last", None)
    assert torch.equal(cut, cond[:1, :77])

    # Padding happens before the blocks, so the image tokens stay last.
    layout = TokenLayout.for_tokens(4)
    block = make_block(torch.randn(4, 8), 1.0, layout)
    new_cond, new_uncond = append_blocks(
        cond, uncond, block, block, pad="empty_chunks", empty=empty
    )
    assert new_cond.shape == (2, 236, 8)
    assert new_uncond.shape == (1, 236, 8)
    assert torch.equal(new_uncond[:, -layout.total :], block)


def test_step_window_is_half_open() -> None:
    window = StepWindow(0.25, 0.5)
    steps = 8
    active = [window.contains(step / steps) for step in range(steps)]
    assert active == [False, False, True, True, False, False, False, False]
    assert all(StepWindow().contains(step / steps) for step in range(steps))
    with pytest.raises(ArgumentError, match="start <= end"):
        StepWindow(0.6, 0.4)
    with pytest.raises(ArgumentError, match="finite"):
        SidePrompt(torch.zeros(4, 8), float("nan"))


def test_image_prompt_blocks_follow_windows_and_are_reused() -> None:
    prompt = ImagePrompt(
        positive=SidePrompt(torch.randn(4, 8), 1.0, StepWindow(0.0, 0.5)),
        negative=SidePrompt(torch.randn(4, 8), 0.7, StepWindow(0.25, 1.0)),
    )
    device, dtype = torch.device("cpu"), torch.float32
    first = prompt.blocks_at(0.0, device, dtype)
    assert first[0][0, -1, 0] == 1.0
    assert first[1][0, -1, 0] == 0.0
    assert prompt.blocks_at(0.1, device, dtype) is first  # no new allocation per call
    both = prompt.blocks_at(0.3, device, dtype)
    assert both[1][0, -1, 0].item() == pytest.approx(0.7)
    outside = ImagePrompt(
        positive=SidePrompt(torch.randn(4, 8), 1.0, StepWindow(0.0, 0.5)),
        negative=SidePrompt(torch.randn(4, 8), 1.0, StepWindow(0.0, 0.5)),
    )
    assert outside.blocks_at(0.5, device, dtype) is None
