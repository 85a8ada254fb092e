"""Block weights and masks of the engine against diffusers 0.42.1 as the reference.

Block weights: ``positive_layers`` / ``negative_layers`` (presets and ``"index:weight"`` pairs)
become per-layer scales of the hijack; diffusers gets the same blocks through its own
``set_ip_adapter_scale`` with InstantStyle's dict form (``{"up": {"block_0": [0.0, 1.0, 0.0]}}``),
built here from an independent table of diffusers block names (the research notes' tables), not
from ``lib_negip.unet_layers``. diffusers has one scale per processor, not per row, so it runs one
row at a time: the cond row with the positive side's blocks and tokens, the uncond row with the
negative side's.

Masks: diffusers' ``ip_adapter_masks`` (one mask per adapter for every row) runs per row as
well, the cond row with the positive mask, the uncond row with the negative one. diffusers takes
the mask at the latent's resolution and downsamples it per layer with bicubic interpolation (no
clamp); the engine stretches a side's mask over the latent first (antialiased when shrinking),
then does the same bicubic downsample and clamps to 0..1.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_library
from test_hijack import (
    FLOAT32_NOISE,
    TIMESTEPS,
    adapter_layers,
    config_of,
    hook_state,
    ldm_unet,
    load_into_diffusers,
    sided_context,
    tokens,
    unet_pair,
)
from tiny_unets import SDXL, TinyUNetConfig, latents, make_ldm_unet, randomize_, text_context
from torch import nn

from lib_negip.blocks import PRESETS, block_weights, layer_scales, parse_layers
from lib_negip.conditioning import TokenLayout, append_blocks, make_block
from lib_negip.hijack import (
    AttentionHijack,
    KeyValueWeights,
    layer_grid,
    mask_at_grid,
    mask_at_latent,
)
from lib_negip.prompt import ImagePrompt, SidePrompt
from lib_negip.session import ImagePromptSession, resolve_layers
from lib_negip.unet_layers import block_indices, cross_attention_layers

# --------------------------------------------------------------------------------------------
# diffusers' names of the transformer blocks, in the engine's block order (input, middle,
# output), written out from the research notes' tables (section 1.2), for the tiny layouts of
# tests/tiny_unets.py (SD1.5: cross-attention down blocks 0-2, up blocks 1-3; SDXL: down 1-2,
# up 0-1), which are also the full-size layouts.

SD15_BLOCKS = (
    "down_blocks.0.attentions.0",
    "down_blocks.0.attentions.1",
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
)
SDXL_BLOCKS = (
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.0.attentions.0",
    "up_blocks.0.attentions.1",
    "up_blocks.0.attentions.2",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
)
BLOCK_NAMES = {"sd15": SD15_BLOCKS, "sdxl": SDXL_BLOCKS}

#: InstantStyle's README dicts for SDXL (the presets "style", "composition" and both).
INSTANTSTYLE_SDXL = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "composition": {"down": {"block_2": [0.0, 1.0]}},
    "style and composition": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}


def diffusers_scale_dict(weights: tuple[float, ...], family: str) -> dict:
    """Per-block weights (engine order) in ``set_ip_adapter_scale``'s dict form."""
    names = BLOCK_NAMES[family]
    assert len(weights) == len(names)
    scale: dict = {"down": {}, "up": {}}
    for name, weight in zip(names, weights, strict=True):
        if name.startswith("mid_block"):
            scale["mid"] = weight
            continue
        group, block, _, attention = name.split(".")
        key = "down" if group == "down_blocks" else "up"
        entries = scale[key].setdefault(f"block_{block}", [])
        assert int(attention) == len(entries)
        entries.append(weight)
    return scale


def scaled(config: float | dict, factor: float) -> float | dict:
    """A scale config (float or nested dict / lists) multiplied by ``factor``."""
    if isinstance(config, dict):
        return {key: scaled(value, factor) for key, value in config.items()}
    if isinstance(config, list):
        return [value * factor for value in config]
    return config * factor


def diffusers_config_for(text: str, family: str) -> float | dict:
    """The diffusers scale config of a ``layers`` value at weight 1 ("all" is the plain 1.0)."""
    spec = parse_layers("layers", text)
    if spec.is_all:
        return 1.0
    n_blocks = len(BLOCK_NAMES[family])
    return diffusers_scale_dict(block_weights("layers", spec, n_blocks), family)


def set_diffusers_scale(twin: nn.Module, config: float | dict) -> None:
    """diffusers' own ``IPAdapterMixin.set_ip_adapter_scale`` (it only needs ``.unet``)."""
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=twin), copy.deepcopy(config))


def processor_scales(twin: nn.Module) -> list[float]:
    """The IP scale of every attn2 processor, in diffusers' (= the adapter's) layer order."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return [
        processor.scale[0]
        for processor in twin.attn_processors.values()
        if isinstance(processor, IPAdapterAttnProcessor2_0)
    ]


# --------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(params=["never", "always"])
def term_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both forms of the image term: per head and block-diagonal."""
    from lib_negip import hijack as hijack_module

    monkeypatch.setattr(hijack_module, "BLOCK_DIAGONAL", request.param)
    return request.param


def scales_for(
    unet: nn.Module, positive: str, negative: str, width: int
) -> list[tuple[float, float]]:
    """Per-layer (positive, negative) block weights as the session resolves them."""
    prompt = ImagePrompt(
        SidePrompt(torch.zeros(4, width), 1.0, layers=parse_layers("positive_layers", positive)),
        SidePrompt(torch.zeros(4, width), 1.0, layers=parse_layers("negative_layers", negative)),
    )
    scales, _ = resolve_layers(prompt, unet)
    return scales


def ours(
    unet: nn.Module,
    layers,
    x: torch.Tensor,
    text: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    weights: tuple[float, float],
    *,
    scales: list[tuple[float, float]] | None = None,
    masks: tuple = (),
) -> torch.Tensor:
    """Row 0 (cond) with the positive tokens, row 1 (uncond) with the negative ones; blocks
    naming their side, as the session makes them."""
    layout = TokenLayout.for_tokens(max(positive.shape[0], negative.shape[0]))
    context = sided_context(text, positive, negative, weights, layout)
    hijack = AttentionHijack(
        unet,
        layers,
        layout,
        side_tokens=[positive, negative],
        layer_scales=scales,
        masks=masks,
    )
    hijack.install()
    try:
        return unet(x, TIMESTEPS[: x.shape[0]], context=context)
    finally:
        hijack.remove()


def reference(
    twin: nn.Module,
    x: torch.Tensor,
    text: torch.Tensor,
    images: tuple[torch.Tensor, torch.Tensor],
    configs: tuple[float | dict, float | dict],
    masks: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """diffusers, one row at a time: its scales (set by ``set_ip_adapter_scale``) and its
    ``ip_adapter_masks`` act on every row of a call."""
    rows = []
    for row in range(2):
        set_diffusers_scale(twin, configs[row])
        kwargs = {}
        if masks[row] is not None:
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [masks[row][None, None]]}
        rows.append(
            twin(
                x[row : row + 1],
                TIMESTEPS[:1],
                encoder_hidden_states=text[row : row + 1],
                added_cond_kwargs={"image_embeds": [images[row][None, None]]},
                **kwargs,
            ).sample
        )
    return torch.cat(rows)


ADAPTER_SEED = 40


def loaded_pair(family: str) -> tuple[nn.Module, nn.Module, list]:
    """The UNet pair (shared with tests/test_hijack.py) with this file's adapter loaded into
    the diffusers twin; loaded again only when another test loaded other weights."""
    unet, twin = unet_pair(family)
    layers = adapter_layers(unet, seed=ADAPTER_SEED)
    processor = next(
        (p for p in twin.attn_processors.values() if hasattr(p, "to_k_ip")),
        None,
    )
    if processor is None or not torch.equal(processor.to_k_ip[0].weight, layers[0][0]):
        load_into_diffusers(twin, layers)
    return unet, twin, layers


def setup(family: str, size: tuple[int, int] = (8, 8), seed: int = 40):
    """The UNet pair with one adapter loaded into both, inputs for two rows (one image)."""
    unet, twin, layers = loaded_pair(family)
    width = config_of(family).context_dim
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 4, *size, generator=generator).repeat(2, 1, 1, 1)
    text = text_context(2, width, seed=seed + 2)
    positive, negative = tokens(4, width, seed + 3), tokens(4, width, seed + 4)
    return SimpleNamespace(
        unet=unet, twin=twin, layers=layers, x=x, text=text, pos=positive, neg=negative
    )


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# Block weights


PAIRS = [
    ("style", "composition"),
    ("composition", "style"),
    ("style and composition", "strong style"),
    ("strong style", "all"),
    ("all", "style and composition"),
]


def test_the_pairs_cover_every_preset_on_both_sides() -> None:
    assert {p for p, _ in PAIRS} == set(PRESETS)
    assert {n for _, n in PAIRS} == set(PRESETS)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_expansion_of_our_block_table(family: str) -> None:
    """The dict built from the block-name table expands, by diffusers' own
    ``_maybe_expand_lora_scales`` (default 0, as ``set_ip_adapter_scale`` calls it), to exactly
    one weight per block name; InstantStyle's SDXL dicts are the presets."""
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    _, twin = unet_pair(family)
    names = BLOCK_NAMES[family]
    weights = tuple(0.25 * (i + 1) for i in range(len(names)))  # all distinct
    (expanded,) = _maybe_expand_lora_scales(
        twin, [diffusers_scale_dict(weights, family)], default_scale=0.0
    )
    assert expanded == dict(zip(names, weights, strict=True))
    if family == "sdxl":
        for preset, instantstyle in INSTANTSTYLE_SDXL.items():
            ours_dict = diffusers_config_for(preset, family)
            assert _maybe_expand_lora_scales(twin, [ours_dict], 0.0) == _maybe_expand_lora_scales(
                twin, [instantstyle], 0.0
            ), preset


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("text", [*PRESETS, "3:1, 6:0.8", "0:-1, 4:2.5, 10:0.125"])
def test_per_layer_scales_equal_diffusers_set_ip_adapter_scale(family: str, text: str) -> None:
    """Layer by layer, the block weight the session resolves equals the scale diffusers'
    ``set_ip_adapter_scale`` gives that layer's processor (no UNet call: every layer checked)."""
    unet, twin, _ = loaded_pair(family)
    set_diffusers_scale(twin, diffusers_config_for(text, family))
    expected = processor_scales(twin)
    scales = scales_for(unet, text, "0:0", config_of(family).context_dim)
    assert [p for p, _ in scales] == expected
    assert [n for _, n in scales] == [0.0] * len(expected)
    if text != "all":  # a preset that acts on some layers only: the check can tell them apart
        assert len(set(expected)) > 1


def test_instantstyle_dicts_set_the_layers_of_our_sdxl_presets() -> None:
    """InstantStyle's own SDXL dicts (its README) through diffusers' ``set_ip_adapter_scale``
    give exactly the layers of our SDXL presets."""
    unet, twin, _ = loaded_pair("sdxl")
    for preset, instantstyle in INSTANTSTYLE_SDXL.items():
        set_diffusers_scale(twin, instantstyle)
        expected = processor_scales(twin)
        assert sum(expected) == 10 * len(preset.split(" and "))  # 10 layers per block
        assert [p for p, _ in scales_for(unet, preset, "all", SDXL.context_dim)] == expected


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("positive", "negative"), PAIRS)
def test_presets_per_side_match_diffusers(
    family: str, positive: str, negative: str, term_form: str
) -> None:
    s = setup(family)
    weights = (0.8, 1.3)
    width = config_of(family).context_dim
    scales = scales_for(s.unet, positive, negative, width)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, scales=scales)
    configs = (
        scaled(diffusers_config_for(positive, family), weights[0]),
        scaled(diffusers_config_for(negative, family), weights[1]),
    )
    expected = reference(s.twin, s.x, s.text, (s.pos, s.neg), configs)
    assert worst(got, expected) < FLOAT32_NOISE
    # The blocks matter: every layer at its side's weight gives another result on both rows.
    everywhere = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights)
    for row, text in enumerate((positive, negative)):
        if text != "all":
            assert worst(got[row], everywhere[row]) > 100 * FLOAT32_NOISE, (row, text)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_explicit_pairs_match_diffusers(family: str, term_form: str) -> None:
    s = setup(family, seed=50)
    positive, negative = "3:1, 6:0.8", "0:-0.5, 5:1.5, 10:2"
    scales = scales_for(s.unet, positive, negative, config_of(family).context_dim)
    weights = (0.9, 0.7)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, scales=scales)
    configs = (
        scaled(diffusers_config_for(positive, family), weights[0]),
        scaled(diffusers_config_for(negative, family), weights[1]),
    )
    expected = reference(s.twin, s.x, s.text, (s.pos, s.neg), configs)
    assert worst(got, expected) < FLOAT32_NOISE
    plain = s.unet(s.x, TIMESTEPS, context=s.text)
    assert worst(got, plain) > 100 * FLOAT32_NOISE


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_all_is_bit_identical_to_no_layer_scales(family: str, term_form: str) -> None:
    s = setup(family, seed=60)
    scales = scales_for(s.unet, "all", "all", config_of(family).context_dim)
    assert set(scales) == {(1.0, 1.0)}
    with_scales = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, (0.7, 1.2), scales=scales)
    without = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, (0.7, 1.2))
    assert torch.equal(with_scales, without)


def kv_weights(unet: nn.Module, seed: int = 3) -> list[KeyValueWeights]:
    return [KeyValueWeights(k, v) for k, v in adapter_layers(unet, seed=seed)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize(("positive", "negative"), [("0:0", "0:0"), ("3:0, 6:0", "composition")])
def test_all_blocks_at_zero_the_session_does_not_hijack(
    family: str, positive: str, negative: str
) -> None:
    """Both sides at block weight 0 everywhere: nothing appended, no hook, the plain UNet bit
    for bit. With one side acting the same session does hijack (the check can fail)."""
    unet = ldm_unet(family)
    width = config_of(family).context_dim
    prompt = ImagePrompt(
        SidePrompt(tokens(4, width, 1), 0.9, layers=parse_layers("positive_layers", positive)),
        SidePrompt(tokens(4, width, 2), 0.6, layers=parse_layers("negative_layers", negative)),
    )
    session = ImagePromptSession(prompt, kv_weights(unet))
    x, text = latents(2, seed=70), text_context(2, width, seed=71)
    clean = hook_state(unet)
    plain = unet(x, TIMESTEPS, context=text)
    try:
        appended = session.conditioning(unet, text[:1], text[1:], progress=0.0)
        if negative == "composition":
            assert appended is not None
            assert hook_state(unet) != clean
            got = unet(x, TIMESTEPS, context=torch.cat([appended.cond, appended.uncond]))
            assert worst(got, plain) > 100 * FLOAT32_NOISE
            return
        assert appended is None
        assert session.hijack is None
        assert hook_state(unet) == clean
        assert torch.equal(unet(x, TIMESTEPS, context=text), plain)
    finally:
        session.close()
    assert hook_state(unet) == clean


def layer_hooks(layer) -> tuple[int, int, int]:
    module = layer.module
    return tuple(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m))
        for m in (module.to_q, module.to_out[0], module)
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_layers_at_zero_on_both_sides_carry_no_hooks(family: str) -> None:
    s = setup(family, seed=80)
    width = config_of(family).context_dim
    scales = scales_for(s.unet, "style", "composition", width)
    targets = cross_attention_layers(s.unet)
    idle = [i for i, scale in enumerate(scales) if scale == (0.0, 0.0)]
    assert idle  # the presets leave blocks out on both sides
    assert len(idle) < len(targets)
    layout = TokenLayout.for_tokens(4)
    hijack = AttentionHijack(
        s.unet, s.layers, layout, side_tokens=[s.pos, s.neg], layer_scales=scales
    )
    hijack.install()
    try:
        for phase in ("installed", "after a call"):
            for index, layer in enumerate(targets):
                hooks = layer_hooks(layer)
                if index in idle:
                    assert hooks == (0, 0, 0), (phase, layer.name)
                else:
                    assert hooks[:2] == (1, 1), (phase, layer.name)
            cond, uncond = append_blocks(
                s.text[:1],
                s.text[1:],
                make_block(s.pos, 1.0, layout, side=0),
                make_block(s.neg, 1.0, layout, side=1),
            )
            s.unet(s.x, TIMESTEPS, context=torch.cat([cond, uncond]))
    finally:
        hijack.remove()
    assert all(layer_hooks(layer) == (0, 0, 0) for layer in targets)


# --------------------------------------------------------------------------------------------
# Masks


def smooth_mask(size: tuple[int, int], seed: int, amplitude: float = 0.25) -> torch.Tensor:
    """A smooth mask with values in 0.5 +- amplitude: bicubic downsampling keeps it in 0..1
    (its weights sum to 1 with at most 1.89 in absolute value in 2D), so the clamp is inert."""
    generator = torch.Generator().manual_seed(seed)
    a, b, phase = torch.rand(3, generator=generator).tolist()
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    wave = torch.sin(2 * math.pi * ((0.5 + a) * xx + phase)) * torch.cos(
        2 * math.pi * (0.3 + b) * yy
    )
    return 0.5 + amplitude * wave


def sharp_mask(size: tuple[int, int]) -> torch.Tensor:
    """0/1 regions with edges between pixels: bicubic overshoots there."""
    h, w = size
    mask = torch.zeros(h, w)
    mask[: h // 2, : (w * 5) // 8] = 1.0
    mask[(h * 3) // 4 :, w // 4 :] = 1.0
    return mask


def grids_of(unet: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The real query grid of every attn2 layer for a latent of ``size`` (from the module's
    input), in adapter order; the UNet runs on zeros."""
    found: dict[int, tuple[int, int]] = {}
    handles = []
    transformers = {}
    for name, module in unet.named_modules():
        if hasattr(module, "transformer_blocks"):
            transformers[name] = module
    layers = cross_attention_layers(unet)
    for index, layer in enumerate(layers):
        owner = transformers[layer.name.partition(".transformer_blocks.")[0]]

        def record(module, args, index=index):
            found[index] = tuple(args[0].shape[-2:])

        handles.append(owner.register_forward_pre_hook(record))
    try:
        width = layers[0].context_dim
        unet(torch.zeros(1, 4, *size), TIMESTEPS[:1], context=torch.zeros(1, 77, width))
    finally:
        for handle in handles:
            handle.remove()
    return [found[i] for i in range(len(layers))]


@pytest.fixture
def clamp_watch(monkeypatch: pytest.MonkeyPatch):
    """diffusers' mask downsampling, clamped to 0..1 as the engine does; records whether the
    clamp changed anything (False: plain diffusers) and the grids it used."""
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.image_processor import IPAdapterMaskProcessor

    original = IPAdapterMaskProcessor.downsample
    watch = SimpleNamespace(changed=False, calls=0, queries=[])

    def downsample(mask, batch_size, num_queries, value_embed_dim):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a grid that does not fit the mask's aspect ratio
            out = original(mask, batch_size, num_queries, value_embed_dim)
        watch.calls += 1
        watch.queries.append(num_queries)
        clamped = out.clamp(0.0, 1.0)
        watch.changed |= not torch.equal(clamped, out)
        return clamped

    monkeypatch.setattr(IPAdapterMaskProcessor, "downsample", staticmethod(downsample))
    return watch


MASK_CASES = {
    "sd15 8x8": ("sd15", (8, 8)),
    "sd15 16x24": ("sd15", (16, 24)),
    "sd15 40x24 (odd 5x3 grid)": ("sd15", (40, 24)),
    "sdxl 16x12": ("sdxl", (16, 12)),
    "sdxl 12x20 (odd 3x5 grid)": ("sdxl", (12, 20)),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masks_match_diffusers_ip_adapter_masks(case: str, term_form: str, clamp_watch) -> None:
    family, size = MASK_CASES[case]
    s = setup(family, size=size, seed=90)
    pos_mask, neg_mask = smooth_mask(size, 1), smooth_mask(size, 2)
    weights = (0.9, 1.1)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(pos_mask, neg_mask))
    expected = reference(
        s.twin, s.x, s.text, (s.pos, s.neg), (weights[0], weights[1]), (pos_mask, neg_mask)
    )
    assert clamp_watch.calls > 0
    assert not clamp_watch.changed  # plain diffusers: the clamp did nothing
    # diffusers' grid formula found every real grid (no aspect warning, checked in the watch)
    grids = grids_of(s.unet, size)
    assert {h * w for h, w in grids} == set(clamp_watch.queries)
    assert worst(got, expected) < FLOAT32_NOISE
    unmasked = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights)
    assert worst(got, unmasked) > 100 * FLOAT32_NOISE
    # each side has its own mask: swapping them changes both rows
    swapped = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(neg_mask, pos_mask))
    assert worst(got[0], swapped[0]) > 100 * FLOAT32_NOISE
    assert worst(got[1], swapped[1]) > 100 * FLOAT32_NOISE


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sharp_masks_match_diffusers_plus_the_clamp(family: str, clamp_watch) -> None:
    """A 0/1 mask overshoots under bicubic downsampling: the engine equals diffusers with its
    downsampled mask clamped to 0..1 (and differs from plain diffusers)."""
    size = (16, 16)
    s = setup(family, size=size, seed=100)
    pos_mask = sharp_mask(size)
    neg_mask = 1.0 - sharp_mask(size).flip(0)
    weights = (1.0, 0.8)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(pos_mask, neg_mask))
    expected = reference(s.twin, s.x, s.text, (s.pos, s.neg), weights, (pos_mask, neg_mask))
    assert clamp_watch.changed  # the clamp acted
    assert worst(got, expected) < FLOAT32_NOISE


def test_the_clamp_is_the_only_difference_from_diffusers_downsample() -> None:
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.image_processor import IPAdapterMaskProcessor

    mask = sharp_mask((16, 16))
    overshoot = False
    for grid in ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1)):
        tokens_ = grid[0] * grid[1]
        theirs = IPAdapterMaskProcessor.downsample(mask[None], 1, tokens_, 1)[0, :, 0]
        overshoot |= bool((theirs > 1).any() or (theirs < 0).any())
        assert torch.equal(mask_at_grid(mask, layer_grid((16, 16), tokens_)), theirs.clamp(0, 1))
    assert overshoot


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_mask_larger_than_the_latent_is_stretched_antialiased(
    family: str, term_form: str, clamp_watch
) -> None:
    """The host gives masks at the image's size: the engine equals diffusers given the mask
    resized to the latent with antialiased bilinear interpolation."""
    size = (8, 8) if family == "sd15" else (16, 12)
    s = setup(family, size=size, seed=110)
    big = smooth_mask((size[0] * 8, size[1] * 8), 3)
    big[5, :] = 0.0  # a thin line that plain bilinear downsampling would mostly skip
    other = smooth_mask((size[0] * 5 + 3, size[1] * 5 + 1), 4)  # odd size, not a multiple
    at_latent = [
        F.interpolate(m[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
        for m in (big, other)
    ]
    weights = (1.2, 0.5)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(big, other))
    expected = reference(s.twin, s.x, s.text, (s.pos, s.neg), weights, tuple(at_latent))
    assert worst(got, expected) < FLOAT32_NOISE
    assert not clamp_watch.changed


def test_white_mask_is_bit_identical_to_no_mask(term_form: str) -> None:
    s = setup("sd15", seed=120)
    weights = (0.9, 0.6)
    white = torch.ones(20, 30)
    plain_prompt = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights)
    for masks in ((white, None), (None, white), (white, white.clone())):
        got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=masks)
        assert torch.equal(got, plain_prompt)
    # a mask just below white is not "no mask": the check can tell
    almost = torch.full((20, 30), 0.5)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(almost, None))
    assert not torch.equal(got, plain_prompt)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_black_mask_on_one_side_is_that_side_at_weight_zero(family: str, term_form: str) -> None:
    s = setup(family, seed=130)
    black = torch.zeros(8, 8)
    weights = (0.9, 0.6)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(black, None))
    zero = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, (0.0, weights[1]))
    assert torch.equal(got, zero)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, masks=(None, black))
    zero = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, (weights[0], 0.0))
    assert torch.equal(got, zero)
    full = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights)
    assert worst(got, full) > 100 * FLOAT32_NOISE


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_black_masks_on_both_sides_are_the_plain_unet(family: str, term_form: str) -> None:
    s = setup(family, seed=140)
    black = torch.zeros(64, 64)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, (1.0, 1.0), masks=(black, black))
    assert torch.equal(got, s.unet(s.x, TIMESTEPS, context=s.text))


def test_masks_with_block_weights_match_diffusers(term_form: str, clamp_watch) -> None:
    """Both at once: per-side presets and per-side masks (SDXL at 16x12)."""
    s = setup("sdxl", size=(16, 12), seed=150)
    positive, negative = "style and composition", "strong style"
    scales = scales_for(s.unet, positive, negative, SDXL.context_dim)
    masks = (smooth_mask((16, 12), 5), smooth_mask((16, 12), 6))
    weights = (1.1, 0.7)
    got = ours(s.unet, s.layers, s.x, s.text, s.pos, s.neg, weights, scales=scales, masks=masks)
    configs = (
        scaled(diffusers_config_for(positive, "sdxl"), weights[0]),
        scaled(diffusers_config_for(negative, "sdxl"), weights[1]),
    )
    expected = reference(s.twin, s.x, s.text, (s.pos, s.neg), configs, masks)
    assert worst(got, expected) < FLOAT32_NOISE


# --------------------------------------------------------------------------------------------
# Mask resizing and grids at odd sizes


@pytest.mark.parametrize(
    ("mask_size", "latent"),
    [((600, 904), (75, 113)), ((64, 64), (8, 8)), ((97, 31), (13, 11)), ((75, 40), (75, 13))],
)
def test_mask_at_latent_is_antialiased_bilinear_when_shrinking(
    mask_size: tuple[int, int], latent: tuple[int, int]
) -> None:
    mask = (torch.rand(*mask_size, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    expected = F.interpolate(
        mask[None, None], size=latent, mode="bilinear", align_corners=False, antialias=True
    )[0, 0]
    got = mask_at_latent(mask, latent)
    assert torch.equal(got, expected)
    if mask_size[0] > 2 * latent[0] and mask_size[1] > 2 * latent[1]:
        plain = F.interpolate(mask[None, None], size=latent, mode="bilinear")[0, 0]
        assert not torch.allclose(got, plain, atol=1e-3)


def test_mask_at_latent_keeps_a_thin_line() -> None:
    mask = torch.zeros(600, 600)
    mask[301, :] = 1.0  # one pixel wide, between the sample points of plain bilinear
    latent = (75, 75)
    assert not F.interpolate(mask[None, None], size=latent, mode="bilinear")[0, 0].any()
    got = mask_at_latent(mask, latent)
    assert got.sum().item() == pytest.approx(75 / 8, rel=1e-4)  # the line's area is kept
    assert (got[37] > 0).all()


def test_mask_at_latent_upscaling_and_same_size() -> None:
    mask = smooth_mask((5, 7), 8)
    up = mask_at_latent(mask, (10, 14))
    assert torch.equal(
        up, F.interpolate(mask[None, None], size=(10, 14), mode="bilinear", antialias=False)[0, 0]
    )
    assert mask_at_latent(mask, (5, 7)) is mask


def test_layer_grid_of_odd_latents() -> None:
    assert [layer_grid((75, 75), n * n) for n in (75, 38, 19, 10)] == [
        (75, 75),
        (38, 38),
        (19, 19),
        (10, 10),
    ]
    assert [layer_grid((75, 51), h * w) for h, w in ((38, 26), (19, 13), (10, 7))] == [
        (38, 26),
        (19, 13),
        (10, 7),
    ]
    # A stride-2 convolution with padding 1 gives these sizes, as the grid assumes.
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    h = torch.zeros(1, 1, 75, 51)
    sizes = []
    for _ in range(3):
        h = conv(h)
        sizes.append(tuple(h.shape[-2:]))
    assert sizes == [(38, 26), (19, 13), (10, 7)]


class _A1111Cat:
    """``torch`` as ldm's openaimodel sees it under A1111 (``sd_hijack_unet``): a skip
    connection of another size is resized (nearest) to it, so odd latents run."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def cat(tensors, *args, **kwargs):
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = F.interpolate(a, b.shape[-2:], mode="nearest")
            tensors = (a, b)
        return torch.cat(tensors, *args, **kwargs)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("size", [(27, 19), (13, 9), (16, 12)])
def test_layer_grid_is_the_real_grid_of_every_layer(
    family: str, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ldm.modules.diffusionmodules import openaimodel

    monkeypatch.setattr(openaimodel, "th", _A1111Cat())
    unet = ldm_unet(family)
    grids = grids_of(unet, size)
    assert [layer_grid(size, h * w) for h, w in grids] == grids
    assert len(set(grids)) > 1


def test_where_diffusers_grid_formula_differs_the_real_grid_is_used() -> None:
    """Latent 10x6 reaches a 2x1 grid; diffusers' formula (from the mask's aspect ratio) lays
    those 2 queries out as 1x2. The engine follows the UNet's halving."""
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.image_processor import IPAdapterMaskProcessor

    assert layer_grid((10, 6), 2) == (2, 1)
    mask = torch.tensor([[1.0] * 6] * 5 + [[0.0] * 6] * 5)  # top half
    theirs = IPAdapterMaskProcessor.downsample(mask[None], 1, 2, 1)[0, :, 0]
    ours_ = mask_at_grid(mask, (2, 1))
    assert ours_.tolist() == pytest.approx([1.0, 0.0], abs=0.1)  # top row, bottom row
    assert theirs[0].item() == pytest.approx(theirs[1].item())  # left and right: no difference


class GridLayers(nn.Module):
    """A "UNet" of attn2 layers, each run on its own query grid of one latent: the hijack
    splits the context at this call and reads the latent's size from ``x``."""

    def __init__(self, grids: list[tuple[int, int]], inner: int, context_dim: int, heads: int):
        from ldm.modules.attention import CrossAttention

        super().__init__()
        self.grids = grids
        self.input_blocks = nn.ModuleList()
        generator = torch.Generator().manual_seed(9)
        for _ in grids:
            holder = nn.Module()
            holder.attn2 = randomize_(
                CrossAttention(
                    inner, context_dim=context_dim, heads=heads, dim_head=inner // heads
                ),
                generator,
            )
            self.input_blocks.append(holder)

    def forward(self, x, timesteps=None, context=None, hidden=None):
        return [
            block.attn2(h, context=context)
            for block, h in zip(self.input_blocks, hidden, strict=True)
        ]


@pytest.mark.parametrize("latent", [(75, 75), (75, 51)])
@pytest.mark.parametrize(
    "mask_scale",
    [1, 4],
)
def test_odd_latent_masks_match_diffusers_layer_by_layer(
    latent: tuple[int, int], mask_scale: int, term_form: str, clamp_watch
) -> None:
    """Every grid of an odd latent (75 -> 38 -> 19 -> 10) with per-side masks, against
    diffusers' attention processor with ``ip_adapter_masks`` at the latent's size (its
    downsampled mask clamped, as the engine does: the positive mask has sharp edges); masks
    four times larger go through the antialiased resize first."""
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    h, w = latent
    grids = [(h, w)]
    for _ in range(3):
        h, w = (h + 1) // 2, (w + 1) // 2
        grids.append((h, w))
    inner, context_dim, heads = 32, 64, 2
    container = GridLayers(grids, inner, context_dim, heads)
    generator = torch.Generator().manual_seed(10)
    weights_kv = [
        (
            torch.randn(inner, context_dim, generator=generator) * context_dim**-0.5,
            torch.randn(inner, context_dim, generator=generator) * context_dim**-0.5,
        )
        for _ in grids
    ]
    text = torch.randn(2, 77, context_dim, generator=generator)
    positive = torch.randn(4, context_dim, generator=generator)
    negative = torch.randn(4, context_dim, generator=generator)
    hidden = [torch.randn(2, gh * gw, inner, generator=generator) for gh, gw in grids]
    big = (latent[0] * mask_scale, latent[1] * mask_scale)
    masks = (sharp_mask(big) * 0.6 + 0.2, smooth_mask(big, 11))
    at_latent = [mask_at_latent(m, latent) for m in masks]
    if mask_scale > 1:
        for m, resized in zip(masks, at_latent, strict=True):
            expected = F.interpolate(m[None, None], size=latent, mode="bilinear", antialias=True)
            assert torch.equal(resized, expected[0, 0])

    layout = TokenLayout.for_tokens(4)
    row_weights = (0.9, 1.3)
    context = sided_context(text, positive, negative, row_weights, layout)
    hijack = AttentionHijack(
        container, weights_kv, layout, side_tokens=[positive, negative], masks=masks
    )
    hijack.install()
    try:
        got = container(torch.zeros(2, 4, *latent), None, context=context, hidden=hidden)
    finally:
        hijack.remove()

    for index, (grid, kv) in enumerate(zip(grids, weights_kv, strict=True)):
        attn2 = container.input_blocks[index].attn2
        attention = Attention(inner, cross_attention_dim=context_dim, heads=heads, dim_head=16)
        attention.load_state_dict(attn2.state_dict())
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=inner, cross_attention_dim=context_dim, num_tokens=[4], scale=[1.0]
        )
        processor.to_k_ip[0].weight.data.copy_(kv[0])
        processor.to_v_ip[0].weight.data.copy_(kv[1])
        attention.set_processor(processor)
        rows = []
        for row, image in enumerate((positive, negative)):
            processor.scale = [row_weights[row]]
            with torch.no_grad():
                rows.append(
                    attention(
                        hidden[index][row : row + 1],
                        encoder_hidden_states=(text[row : row + 1], [image[None, None]]),
                        ip_adapter_masks=[at_latent[row][None, None]],
                    )
                )
        expected = torch.cat(rows)
        scale = max(expected.abs().max().item(), 1.0)
        assert worst(got[index], expected) < FLOAT32_NOISE * scale, (index, grid)
        assert clamp_watch.queries[-1] == grid[0] * grid[1]
        unmasked = attn2(hidden[index], context=text)
        assert worst(got[index], unmasked) > 100 * FLOAT32_NOISE


# --------------------------------------------------------------------------------------------
# Full size (slow)

SD15_FULL = TinyUNetConfig(
    "sd15", model_channels=320, context_dim=768, heads=8, transformer_depth=(1, 1, 1, 1)
)


@pytest.mark.slow
def test_full_size_sd15_style_and_composition_match_diffusers() -> None:
    """The full SD1.5 UNet, positive "style", negative "composition", with masks."""
    reference_library("diffusers", "UNet2DConditionModel")
    from tiny_unets import make_diffusers_twin

    unet = make_ldm_unet(SD15_FULL, seed=31)
    layers = cross_attention_layers(unet)
    generator = torch.Generator().manual_seed(32)
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
    scales = scales_for(unet, "style", "composition", 768)
    row_weights = (0.9, 1.2)
    masks = (smooth_mask((8, 8), 21), None)
    got = ours(unet, weights, x, text, positive, negative, row_weights, scales=scales, masks=masks)
    configs = (
        scaled(diffusers_config_for("style", "sd15"), row_weights[0]),
        scaled(diffusers_config_for("composition", "sd15"), row_weights[1]),
    )
    expected = reference(twin, x, text, (positive, negative), configs, masks)
    scale = expected.abs().max().item()
    assert worst(got, expected) < 1e-5 * max(scale, 1.0)
    del twin
    gc.collect()
    plain = unet(x, TIMESTEPS, context=text)
    assert worst(got, plain) > 1e-3 * scale


def _sdxl_block_scales(positive: str, negative: str) -> tuple[list[tuple[float, float]], list]:
    """Per-layer scales of the real SDXL module tree (meta device), and its layers."""
    from test_real_shapes import make_sdxl_meta_unet

    with torch.device("meta"):
        meta = make_sdxl_meta_unet()
    layers = cross_attention_layers(meta)
    indices = block_indices(layers)
    n_blocks = max(indices) + 1
    assert n_blocks == 11
    return (
        layer_scales(
            block_weights("p", parse_layers("p", positive), n_blocks),
            block_weights("n", parse_layers("n", negative), n_blocks),
            indices,
        ),
        layers,
    )


def _diffusers_sdxl_scales(config: dict) -> list[float]:
    """diffusers' set_ip_adapter_scale on the real SDXL UNet layout (meta device)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    with torch.device("meta"):
        twin = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            layers_per_block=2,
        )
        processors = {}
        for name in twin.attn_processors:
            if name.endswith("attn2.processor"):
                processors[name] = IPAdapterAttnProcessor2_0(
                    hidden_size=8, cross_attention_dim=8, num_tokens=[16], scale=[1.0]
                )
            else:
                processors[name] = AttnProcessor2_0()
        twin.set_attn_processor(processors)
    set_diffusers_scale(twin, config)
    return processor_scales(twin)


@pytest.mark.slow
def test_sdxl_real_width_layers_with_presets_per_side_match_diffusers() -> None:
    """SDXL's 70 cross-attention layers at real widths, positive "style" and negative
    "composition" (InstantStyle's blocks): the layer scales equal diffusers'
    set_ip_adapter_scale on the real layout, and each layer's output equals diffusers'
    processor at that scale (one layer at a time, to keep the memory low)."""
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    from ldm.modules.attention import CrossAttention
    from test_real_shapes import OneLayerAtATime

    scales, meta_layers = _sdxl_block_scales("style", "composition")
    assert [p for p, _ in scales] == _diffusers_sdxl_scales(INSTANTSTYLE_SDXL["style"])
    assert [n for _, n in scales] == _diffusers_sdxl_scales(INSTANTSTYLE_SDXL["composition"])
    active = [i for i, s in enumerate(scales) if s != (0.0, 0.0)]
    assert len(active) == 20

    generator = torch.Generator().manual_seed(41)
    container = OneLayerAtATime()
    kv = []
    for layer in meta_layers:
        inner = layer.inner_dim
        holder = nn.Module()
        # Only the layers that act need real weights: the others (meta tensors, no memory)
        # must get no hooks and are never computed.
        acts = scales[len(container.input_blocks)] != (0.0, 0.0)
        with torch.device("cpu" if acts else "meta"):
            holder.attn2 = CrossAttention(inner, context_dim=2048, heads=inner // 64, dim_head=64)
            shape = (inner, 2048)
            if acts:
                randomize_(holder.attn2, generator)
                kv.append(
                    (
                        torch.randn(shape, generator=generator) * 2048**-0.5,
                        torch.randn(shape, generator=generator) * 2048**-0.5,
                    )
                )
            else:
                kv.append((torch.empty(shape), torch.empty(shape)))
        container.input_blocks.append(holder)
    layout = TokenLayout.for_tokens(16)
    text = torch.randn(2, 77, 2048, generator=generator)
    positive = torch.randn(16, 2048, generator=generator)
    negative = torch.randn(16, 2048, generator=generator)
    row_weights = (0.8, 1.1)
    context = sided_context(text, positive, negative, row_weights, layout)
    hijack = AttentionHijack(
        container, kv, layout, side_tokens=[positive, negative], layer_scales=scales
    )
    hijack.install()
    worst_relative = 0.0
    checked = 0
    try:
        for index, holder in enumerate(container.input_blocks):
            if scales[index] == (0.0, 0.0):
                assert layer_hooks(SimpleNamespace(module=holder.attn2)) == (0, 0, 0)
                continue
            inner = holder.attn2.to_q.out_features
            x = torch.randn(2, 64, inner, generator=generator)
            got = container(x, None, context=context, layer=index)
            reference_attention = Attention(
                inner, cross_attention_dim=2048, heads=inner // 64, dim_head=64, out_bias=True
            )
            reference_attention.load_state_dict(holder.attn2.state_dict())
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=inner, cross_attention_dim=2048, num_tokens=[16], scale=[1.0]
            )
            processor.to_k_ip[0].weight.data.copy_(kv[index][0])
            processor.to_v_ip[0].weight.data.copy_(kv[index][1])
            reference_attention.set_processor(processor)
            rows = []
            for row, image in enumerate((positive, negative)):
                processor.scale = [row_weights[row] * scales[index][row]]
                with torch.no_grad():
                    rows.append(
                        reference_attention(
                            x[row : row + 1],
                            encoder_hidden_states=(text[row : row + 1], [image[None, None]]),
                        )
                    )
            expected = torch.cat(rows)
            worst_relative = max(
                worst_relative, worst(got, expected) / max(expected.abs().max().item(), 1.0)
            )
            plain = holder.attn2(x, context=text)
            for row in range(2):
                if scales[index][row]:
                    assert worst(got[row], plain[row]) > 1e-3 * got.abs().max().item()
                else:
                    assert torch.equal(got[row], plain[row])
            checked += 1
            del reference_attention, processor
    finally:
        hijack.remove()
    assert checked == 20
    assert worst_relative < 1e-5


@pytest.mark.parametrize("factor", [1.5, 2.5, 3.0])
@pytest.mark.parametrize("size", [(32, 8), (27, 19), (24, 40), (72, 64)])
def test_layer_grid_under_deep_shrink(
    factor: float, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deep Shrink (Kohya HRFix) scales the hidden states down by a factor of its own inside
    the UNet, so the deeper grids are no halving of the latent: the grid is then the pair of
    factors of the query count nearest the latent's aspect. A guess of the wrong count made a
    masked call fail inside the UNet; a wrong layout moved the mask."""
    from ldm.modules.diffusionmodules import openaimodel

    monkeypatch.setattr(openaimodel, "th", _A1111Cat())  # the skips resized to fit, as A1111
    unet = ldm_unet("sd15")

    def shrink(module, args):
        return (F.interpolate(args[0], scale_factor=1 / factor, mode="bicubic"), *args[1:])

    handle = unet.input_blocks[1].register_forward_pre_hook(shrink)
    try:
        grids = grids_of(unet, size)
    finally:
        handle.remove()  # the UNet is shared by the module's tests
    assert any(grid != layer_grid(size, 10**9) for grid in grids)
    assert [layer_grid(size, h * w) for h, w in grids] == grids
