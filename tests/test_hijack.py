"""The attention hijack against diffusers' IP-Adapter attention, and its invariants.

The same random weights run through an ldm UNet hijacked by us (positive tokens appended to the
cond rows, negative tokens to the uncond rows) and through diffusers' ``UNet2DConditionModel``
with ``IPAdapterAttnProcessor2_0`` and per-row image embeds.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_library
from tiny_unets import (
    SD15,
    SDXL,
    TinyUNetConfig,
    latents,
    make_diffusers_twin,
    make_ldm_unet,
    text_context,
)
from torch import nn

from lib_negip.conditioning import TokenLayout, append_blocks, make_block
from lib_negip.errors import ConditioningError, IncompatibleModelError
from lib_negip.hijack import AttentionHijack, FailureTrap, KeyValueWeights
from lib_negip.unet_layers import cross_attention_layers

TIMESTEPS = torch.tensor([700.0, 700.0])
FLOAT32_NOISE = 2e-5


@pytest.fixture(params=["never", "always"])
def term_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both forms of the image term: per head (GPUs, and the CPU's wide layers) and
    block-diagonal (the CPU's layers with few key columns); "auto" chooses per layer."""
    from lib_negip import hijack as hijack_module

    monkeypatch.setattr(hijack_module, "BLOCK_DIAGONAL", request.param)
    return request.param


@functools.cache
def ldm_unet(family: str) -> nn.Module:
    return make_ldm_unet(config_of(family))


@functools.cache
def _twin(family: str) -> nn.Module:
    return make_diffusers_twin(ldm_unet(family), config_of(family))


def unet_pair(family: str) -> tuple[nn.Module, nn.Module]:
    """The ldm UNet and its diffusers twin with the same weights."""
    reference_library("diffusers", "UNet2DConditionModel")
    return ldm_unet(family), _twin(family)


def config_of(family: str) -> TinyUNetConfig:
    return SD15 if family == "sd15" else SDXL


def adapter_layers(unet: nn.Module, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random ``(to_k_ip, to_v_ip)`` [inner, C] for every attn2, in adapter order."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for layer in cross_attention_layers(unet):
        shape = tuple(layer.module.to_k.weight.shape)
        scale = shape[1] ** -0.5
        layers.append(
            (
                torch.randn(shape, generator=generator) * scale,
                torch.randn(shape, generator=generator) * scale,
            )
        )
    return layers


def tokens(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


class Sd15Case(NamedTuple):
    unet: nn.Module
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    x: torch.Tensor  # one latent twice: the cond and the uncond row
    text: torch.Tensor  # [2, 77, C]
    positive: torch.Tensor  # [4, C]
    negative: torch.Tensor  # [4, C]


def sd15_case(layers: int, x: int, text: int, positive: int, negative: int) -> Sd15Case:
    """A tiny SD1.5 UNet, its adapter weights and inputs, each drawn from the seed named."""
    unet = ldm_unet("sd15")
    width = SD15.context_dim
    return Sd15Case(
        unet,
        adapter_layers(unet, seed=layers),
        latents(1, seed=x).repeat(2, 1, 1, 1),
        text_context(2, width, seed=text),
        tokens(4, width, positive),
        tokens(4, width, negative),
    )


def load_into_diffusers(twin: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give the diffusers twin the same adapter layers; its image projection is the identity,
    so both sides receive the same ready-made image tokens."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    width = layers[0][0].shape[1]
    ip_adapter = {}
    for index, (k, v) in enumerate(layers):
        ip_adapter[f"{2 * index + 1}.to_k_ip.weight"] = k
        ip_adapter[f"{2 * index + 1}.to_v_ip.weight"] = v
    image_proj = {
        "proj.weight": torch.zeros(4 * width, 8),
        "proj.bias": torch.zeros(4 * width),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    twin._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_adapter}])
    twin.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])


def set_diffusers_scale(twin: nn.Module, scale: float) -> None:
    for processor in twin.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]


def diffusers_rows(
    twin: nn.Module,
    x: torch.Tensor,
    text: torch.Tensor,
    images: list[torch.Tensor],
    scales: list[float],
) -> torch.Tensor:
    """diffusers, one row at a time (its IP scale is per processor, not per row).

    images[i]: [num_images, N, C] of row i; diffusers concatenates the images' tokens.
    """
    rows = []
    for row, (image, scale) in enumerate(zip(images, scales, strict=True)):
        set_diffusers_scale(twin, scale)
        out = twin(
            x[row : row + 1],
            TIMESTEPS[:1],
            encoder_hidden_states=text[row : row + 1],
            added_cond_kwargs={"image_embeds": [image[None]]},
        ).sample
        rows.append(out)
    return torch.cat(rows)


def ours(
    unet: nn.Module,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    text_cond: torch.Tensor,
    text_uncond: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    weights: tuple[float, float],
    upcast: bool = False,
) -> torch.Tensor:
    layout = TokenLayout.for_tokens(max(positive.shape[0], negative.shape[0]))
    cond, uncond = append_blocks(
        text_cond,
        text_uncond,
        make_block(positive, weights[0], layout),
        make_block(negative, weights[1], layout),
    )
    hijack = AttentionHijack(unet, layers, layout, upcast=upcast)
    hijack.install()
    try:
        return unet(x, TIMESTEPS[: x.shape[0]], context=torch.cat([cond, uncond]))
    finally:
        hijack.remove()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("n_tokens", [4, 16])
def test_matches_diffusers_ip_adapter(family: str, n_tokens: int, term_form: str) -> None:
    unet, twin = unet_pair(family)
    width = config_of(family).context_dim
    layers = adapter_layers(unet)
    load_into_diffusers(twin, layers)
    x = latents(1).repeat(2, 1, 1, 1)
    text = text_context(2, width)
    positive, negative = tokens(n_tokens, width, 10), tokens(n_tokens, width, 11)

    got = ours(unet, layers, x, text[:1], text[1:], positive, negative, (0.8, 0.8))
    expected = diffusers_rows(twin, x, text, [positive[None], negative[None]], [0.8, 0.8])

    assert (got - expected).abs().max().item() < FLOAT32_NOISE
    # The image term is not negligible: the comparison would catch a missing or wrong one.
    plain = unet(x, TIMESTEPS, context=text)
    assert (got - plain).abs().max().item() > 100 * FLOAT32_NOISE


def test_per_side_weights_and_unequal_token_counts(term_form: str) -> None:
    """Cond rows at weight 1.3 with two concatenated images, uncond rows at -0.5 with one."""
    unet, twin = unet_pair("sd15")
    width = SD15.context_dim
    layers = adapter_layers(unet, seed=5)
    load_into_diffusers(twin, layers)
    x = latents(1).repeat(2, 1, 1, 1)
    text = text_context(2, width, seed=4)
    first, second, negative = (tokens(4, width, s) for s in (20, 21, 22))

    got = ours(
        unet, layers, x, text[:1], text[1:], torch.cat([first, second]), negative, (1.3, -0.5)
    )
    expected = diffusers_rows(
        twin, x, text, [torch.stack([first, second]), negative[None]], [1.3, -0.5]
    )
    assert (got - expected).abs().max().item() < FLOAT32_NOISE


def sdp_attention_forward(self: nn.Module, x, context=None, mask=None, **kwargs):
    """An SDPA cross-attention in the shape of A1111's "sdp" optimisation (our own code)."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    batch, _, inner = q.shape
    heads = self.heads

    def by_head(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, inner // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(by_head(q), by_head(k), by_head(v))
    return self.to_out(out.transpose(1, 2).reshape(batch, -1, inner))


def functional_attention_forward(self: nn.Module, x, context=None, mask=None, **kwargs):
    """An attention that uses the weights directly, never calling to_q / to_out as modules."""
    context = x if context is None else context
    q = F.linear(x, self.to_q.weight)
    k, v = F.linear(context, self.to_k.weight), F.linear(context, self.to_v.weight)
    batch, _, inner = q.shape
    heads = self.heads

    def by_head(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, inner // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(by_head(q), by_head(k), by_head(v))
    out = out.transpose(1, 2).reshape(batch, -1, inner)
    return F.linear(out, self.to_out[0].weight, self.to_out[0].bias)


@pytest.fixture(params=["ldm", "sdp", "functional"])
def attention_forward(request: pytest.FixtureRequest):
    """Swap ``CrossAttention.forward`` on the class, the way A1111 applies an optimisation."""
    from ldm.modules.attention import CrossAttention

    original = CrossAttention.forward
    if request.param == "sdp":
        CrossAttention.forward = sdp_attention_forward
    elif request.param == "functional":
        CrossAttention.forward = functional_attention_forward
    yield request.param
    CrossAttention.forward = original


def test_every_attention_implementation_matches_diffusers(
    attention_forward: str, term_form: str
) -> None:
    unet, twin = unet_pair("sd15")
    width = SD15.context_dim
    layers = adapter_layers(unet, seed=7)
    load_into_diffusers(twin, layers)
    x = latents(1, seed=8).repeat(2, 1, 1, 1)
    text = text_context(2, width, seed=9)
    positive, negative = tokens(16, width, 30), tokens(16, width, 31)
    got = ours(unet, layers, x, text[:1], text[1:], positive, negative, (0.6, 0.9))
    expected = diffusers_rows(twin, x, text, [positive[None], negative[None]], [0.6, 0.9])
    assert (got - expected).abs().max().item() < FLOAT32_NOISE


def test_weight_zero_is_bit_exact(attention_forward: str, term_form: str) -> None:
    unet = ldm_unet("sd15")
    width = SD15.context_dim
    x = latents(2, seed=12)
    text = text_context(2, width, seed=13)
    plain = unet(x, TIMESTEPS, context=text)
    got = ours(
        unet,
        adapter_layers(unet),
        x,
        text[:1],
        text[1:],
        tokens(4, width, 1),
        tokens(4, width, 2),
        (0.0, 0.0),
    )
    assert torch.equal(got, plain)


def hook_state(unet: nn.Module) -> list:
    """Everything a hijack could leave behind on the attn2 modules and the UNet."""
    state = [len(unet._forward_pre_hooks), len(unet._forward_hooks), "forward" in vars(unet)]
    for layer in cross_attention_layers(unet):
        module = layer.module
        for m in (module, module.to_q, module.to_out[0]):
            state += [
                len(m._forward_pre_hooks),
                len(m._forward_hooks),
                "forward" in vars(m),
            ]
    return state


def test_context_without_block_passes_through_and_remove_restores() -> None:
    unet = ldm_unet("sd15")
    width = SD15.context_dim
    x = latents(2, seed=14)
    text = text_context(2, width, seed=15)
    before_state = hook_state(unet)
    before = unet(x, TIMESTEPS, context=text)
    weights = [p.clone() for p in unet.parameters()]

    hijack = AttentionHijack(unet, adapter_layers(unet), TokenLayout.for_tokens(4))
    hijack.install()
    hijack.install()  # idempotent
    assert hook_state(unet) != before_state
    # Two calls per layer, set as the instance forward of to_q and to_out[0] (no hooks there),
    # and, until the first call carrying our block, the attn2 safety net (a hook).
    first = cross_attention_layers(unet)[0].module
    for sub in (first.to_q, first.to_out[0]):
        assert "forward" in vars(sub)
        assert not sub._forward_hooks
        assert not sub._forward_pre_hooks
    assert len(first._forward_hooks) == 1
    # A step outside both windows appends nothing: the hijacked UNet is exact.
    assert torch.equal(unet(x, TIMESTEPS, context=text), before)
    hijack.remove()
    hijack.remove()

    assert hook_state(unet) == before_state
    assert all(torch.equal(a, b) for a, b in zip(weights, unet.parameters(), strict=True))
    assert torch.equal(unet(x, TIMESTEPS, context=text), before)


def add_one_wrapper(module: nn.Module) -> callable:
    """Another extension's per-instance forward replacement (as the ControlNet extension's
    IP-Adapter does): keeps the previous forward and restores it later."""
    previous = module.forward

    def forward(*args, **kwargs):
        return previous(*args, **kwargs) + 1.0

    module.forward = forward

    def restore() -> None:
        if vars(module).get("forward") is forward:
            if previous == type(module).forward.__get__(module):
                del module.forward
            else:
                module.forward = previous

    return restore


def wrapped_modules(unet: nn.Module, where: str) -> list[nn.Module]:
    """The modules another extension wraps: the attn2 modules (as the ControlNet extension's
    IP-Adapter does), or the two projections whose instance forwards carry our calls."""
    modules = [layer.module for layer in cross_attention_layers(unet)]
    if where == "attn2":
        return modules
    return [sub for m in modules for sub in (m.to_q, m.to_out[0])]


@pytest.mark.parametrize("where", ["attn2", "projections"])
@pytest.mark.parametrize("order", ["ours_first", "theirs_first"])
@pytest.mark.parametrize("removal", ["ours_first", "theirs_first"])
def test_coexists_with_another_wrapper(order: str, removal: str, where: str) -> None:
    unet, layers, x, text, positive, negative = sd15_case(16, 17, 18, 40, 41)
    layout = TokenLayout.for_tokens(4)
    context = sided_context(text, positive, negative, (1.0, 1.0), layout, sides=(-1, -1))
    modules = wrapped_modules(unet, where)
    before_state = hook_state(unet)
    plain = unet(x, TIMESTEPS, context=text)

    hijack = AttentionHijack(unet, layers, layout)
    restores = []
    if order == "ours_first":
        hijack.install()
        restores = [add_one_wrapper(m) for m in modules]
    else:
        restores = [add_one_wrapper(m) for m in modules]
        hijack.install()
        if where == "projections":  # their forward is below: ours are hooks there
            assert all(len(m._forward_hooks) + len(m._forward_pre_hooks) == 1 for m in modules)
    both = unet(x, TIMESTEPS, context=context)
    if removal == "ours_first":
        hijack.remove()
        theirs_only = unet(x, TIMESTEPS, context=text)
        for restore in restores:
            restore()
    else:
        for restore in restores:
            restore()
        ours_only = unet(x, TIMESTEPS, context=context)
        hijack.remove()
    if where == "projections" and order == removal == "ours_first":
        # Theirs was set over ours, so ours stayed in their chain, a pass-through, and their
        # restore put it back: the plain UNet's result, and the next installation clears it.
        assert hook_state(unet) != before_state
        assert torch.equal(unet(x, TIMESTEPS, context=text), plain)
        next_one = AttentionHijack(unet, layers, layout)
        next_one.install()
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)
        next_one.remove()
    assert hook_state(unet) == before_state
    assert torch.equal(unet(x, TIMESTEPS, context=text), plain)

    # Both effects were present together.
    with_theirs = [add_one_wrapper(m) for m in modules]
    theirs_reference = unet(x, TIMESTEPS, context=text)
    for restore in with_theirs:
        restore()
    assert not torch.allclose(both, theirs_reference)
    if removal == "ours_first":
        assert torch.equal(theirs_only, theirs_reference)
    else:
        reference = ours(unet, layers, x, text[:1], text[1:], positive, negative, (1.0, 1.0))
        assert (ours_only - reference).abs().max().item() < FLOAT32_NOISE


def test_instance_forwards_follow_a_class_patch_made_after_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A1111's LoRA and manual-cast code replace ``nn.Linear.forward`` on the class, during a
    generation too: our instance forwards call the class's forward as it is at each call."""
    unet, layers, x, text, positive, negative = sd15_case(60, 61, 62, 63, 64)
    plain_linear = nn.Linear.forward

    def shifted(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        return plain_linear(self, input) + 0.25

    monkeypatch.setattr(nn.Linear, "forward", shifted)
    expected = ours(unet, layers, x, text[:1], text[1:], positive, negative, (1.0, 0.5))
    patched_plain = unet(x, TIMESTEPS, context=text)
    monkeypatch.setattr(nn.Linear, "forward", plain_linear)

    layout = TokenLayout.for_tokens(4)
    hijack = AttentionHijack(unet, layers, layout)
    hijack.install()
    try:
        first = cross_attention_layers(unet)[0].module
        assert "forward" in vars(first.to_q)
        assert "forward" in vars(first.to_out[0])
        monkeypatch.setattr(nn.Linear, "forward", shifted)  # after our installation
        context = sided_context(text, positive, negative, (1.0, 0.5), layout, sides=(-1, -1))
        got = unet(x, TIMESTEPS, context=context)
        assert torch.equal(unet(x, TIMESTEPS, context=text), patched_plain)
    finally:
        hijack.remove()
    assert (got - expected).abs().max().item() < FLOAT32_NOISE
    monkeypatch.setattr(nn.Linear, "forward", plain_linear)
    assert not torch.equal(unet(x, TIMESTEPS, context=text), patched_plain)


def strip_first_token(unet: nn.Module) -> callable:
    """A stand-in for the ControlNet extension: its UNet forward strips a one-token marker that
    it prepended to every conditioning row at process time."""
    original = unet.forward

    def forward(x, timesteps=None, context=None, **kwargs):
        return original(x, timesteps, context=context[:, 1:], **kwargs)

    unet.forward = forward
    return lambda: delattr(unet, "forward")


def test_recognises_block_after_controlnet_marker_is_stripped() -> None:
    unet, layers, x, text, positive, negative = sd15_case(19, 20, 21, 50, 51)
    width = SD15.context_dim
    expected = ours(unet, layers, x, text[:1], text[1:], positive, negative, (1.0, 0.7))

    marker = torch.full((1, 1, width), 1024.0)
    marked = torch.cat([marker.expand(2, -1, -1), text], dim=1)  # [2, 78, C]
    layout = TokenLayout.for_tokens(4)
    cond, uncond = append_blocks(
        marked[:1], marked[1:], make_block(positive, 1.0, layout), make_block(negative, 0.7, layout)
    )
    restore = strip_first_token(unet)
    hijack = AttentionHijack(unet, layers, layout)
    hijack.install()
    try:
        got = unet(x, TIMESTEPS, context=torch.cat([cond, uncond]))
    finally:
        hijack.remove()
        restore()
    assert torch.equal(got, expected)


def test_transformed_block_is_reported() -> None:
    unet = ldm_unet("sd15")
    width = SD15.context_dim
    layout = TokenLayout.for_tokens(4)
    cond, uncond = append_blocks(
        text_context(1, width),
        text_context(1, width, seed=3),
        make_block(tokens(4, width, 1), 1.0, layout),
        make_block(tokens(4, width, 2), 1.0, layout),
    )
    rescaled = torch.cat([cond, uncond]) * 1.1  # another callback rescaling the conditioning
    before_state = hook_state(unet)
    hijack = AttentionHijack(unet, adapter_layers(unet), layout)
    hijack.install()
    try:
        with pytest.raises(ConditioningError, match="changed before they reached the UNet"):
            unet(latents(2), TIMESTEPS, context=rescaled)
        assert not hijack.installed  # removed itself: A1111 skips postprocess after a raise
        assert hook_state(unet) == before_state
    finally:
        hijack.remove()


def test_failure_trap_raises_from_the_unet_once_and_cleans_up() -> None:
    unet = ldm_unet("sd15")
    cleaned = []
    error = IncompatibleModelError("adapter does not fit")
    trap = FailureTrap(unet, error, cleanup=lambda: cleaned.append(True))
    with pytest.raises(IncompatibleModelError, match="does not fit"):
        unet(latents(2), TIMESTEPS, context=text_context(2, SD15.context_dim))
    assert cleaned == [True]
    assert not trap.armed
    assert len(unet._forward_pre_hooks) == 0
    unet(latents(2), TIMESTEPS, context=text_context(2, SD15.context_dim))


def test_adapter_for_another_family_is_refused() -> None:
    sd15, sdxl = ldm_unet("sd15"), ldm_unet("sdxl")
    with pytest.raises(IncompatibleModelError, match=r"16 cross-attention layers but .* has 70"):
        AttentionHijack(sdxl, adapter_layers(sd15), TokenLayout.for_tokens(4))
    wrong_width = [(k[:, :-1], v[:, :-1]) for k, v in adapter_layers(sd15)]
    with pytest.raises(IncompatibleModelError, match=r"1.to_k_ip has shape \[32, 63\]"):
        AttentionHijack(sd15, wrong_width, TokenLayout.for_tokens(4))


def half_unet(dtype: torch.dtype) -> nn.Module:
    """The tiny SD1.5 UNet in ``dtype`` as A1111 runs a half-precision model: the timestep
    embedding cast (sd_hijack_unet), the latents cast by ldm, GroupNorm in float32 (ldm's
    GroupNorm32 hands it float32 inputs; a GPU's autocast casts its weights, the CPU's
    autocast does not, so the module is float32 here)."""
    half = make_ldm_unet(SD15).to(dtype)
    half.time_embed.register_forward_pre_hook(lambda module, args: (args[0].to(dtype),))
    half.dtype = dtype
    for module in half.modules():
        if isinstance(module, nn.GroupNorm):
            module.float()
    return half


@pytest.mark.parametrize("attention_forward", ["sdp"], indirect=True)
def test_half_precision_close_to_float32(attention_forward: str, term_form: str) -> None:
    """bfloat16 on the CPU (ldm's stock attention mixes dtypes there; A1111 replaces it)."""
    unet, layers, x, text, positive, negative = sd15_case(23, 24, 25, 60, 61)
    reference = ours(unet, layers, x, text[:1], text[1:], positive, negative, (1.0, 1.0))
    half = half_unet(torch.bfloat16)
    got = ours(
        half,
        layers,
        x.bfloat16(),
        text[:1].bfloat16(),
        text[1:].bfloat16(),
        positive.bfloat16(),
        negative.bfloat16(),
        (1.0, 1.0),
    )
    assert got.dtype == torch.bfloat16
    assert (got.float() - reference).abs().max().item() < 0.1 * reference.abs().max().item()


@pytest.mark.parametrize("upcast", [False, True], ids=["half", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("attention_forward", ["sdp"], indirect=True)
def test_under_autocast_as_a1111_samples_on_a_gpu(
    attention_forward: str, term_form: str, dtype: torch.dtype, upcast: bool
) -> None:
    """A1111 samples a half-precision model inside ``torch.autocast``: the projections' outputs
    are half whatever their inputs, and SDPA and the matrix products run in half precision
    even on float32 inputs, so with "upcast cross attention" the float32 query and keys are
    cast back. The image term must be right in that regime too (close to float32), and weight
    0 bit-exact against the same model under the same autocast. The CPU's autocast stands in
    for a GPU's: it runs SDPA, the projections and the matrix products in half precision as
    CUDA's does (CUDA's softmax returns float32, the CPU's half: only the block-diagonal form
    calls it, and "auto" does not choose that form on a GPU)."""
    unet, layers, x, text, positive, negative = sd15_case(23, 24, 25, 60, 61)
    reference = ours(unet, layers, x, text[:1], text[1:], positive, negative, (1.0, 0.7))
    half = half_unet(dtype)
    inputs = [t.to(dtype) for t in (x, text[:1], text[1:], positive, negative)]

    def run(weights: tuple[float, float]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype):
            return ours(half, layers, *inputs, weights, upcast=upcast)

    got = run((1.0, 0.7))
    assert got.dtype == dtype
    error = (got.float() - reference).abs().max().item() / reference.abs().max().item()
    # Seen: float16 0.002, bfloat16 0.019 (both forms). The term itself moves the output by
    # more than the tolerance, so a term left out or applied twice would fail.
    assert error < {torch.float16: 0.01, torch.bfloat16: 0.05}[dtype], error
    plain_reference = unet(x, TIMESTEPS, context=text)
    assert (reference - plain_reference).abs().max().item() > 0.2 * reference.abs().max().item()

    with torch.autocast("cpu", dtype=dtype):
        plain = half(inputs[0], TIMESTEPS, context=torch.cat(inputs[1:3]))
    assert torch.equal(run((0.0, 0.0)), plain)


@pytest.mark.parametrize("attention_forward", ["sdp"], indirect=True)
def test_upcast_computes_the_image_term_outside_autocast(
    attention_forward: str, term_form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With "upcast cross attention" the image attention (its keys and values prepared, and
    each call's term) runs in float32 with autocast off, as A1111's own upcast attentions do:
    under autocast the float32 projections and SDPA would run in half precision again. Without
    upcast it stays under the host's autocast."""
    from lib_negip import hijack as hijack_module

    seen: list[tuple[str, bool]] = []
    for name in ("image_term", "entry"):
        owner = hijack_module._LayerHooks if name == "image_term" else hijack_module.AttentionHijack
        original = getattr(owner, name)

        def recording(self, *args, _original=original, _name=name):
            seen.append((_name, hijack_module._autocast_on("cpu")))
            return _original(self, *args)

        monkeypatch.setattr(owner, name, recording)
    _unet, layers, x, text, positive, negative = sd15_case(23, 24, 25, 60, 61)
    half = half_unet(torch.bfloat16)
    inputs = [t.bfloat16() for t in (x, text[:1], text[1:], positive, negative)]
    for upcast in (True, False):
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(half, layers, *inputs, (1.0, 0.7), upcast=upcast)
        names = {name for name, _ in seen}
        # (block-diagonal without casts adds its term without image_term: one baddbmm)
        assert names == {"image_term", "entry"} if upcast else "entry" in names, seen
        assert {on for _, on in seen} == {not upcast}, seen


def test_image_term_goes_through_the_hosts_projections(
    attention_forward: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With attentions that call to_q / to_out[0] as modules the term is added before to_out[0]
    (no second projection); otherwise the post-hook fallback adds it."""
    from lib_negip import hijack as hijack_module

    added_before_out = []
    original = hijack_module._LayerHooks.add_image_term

    def counting(self, module, args):
        result = original(self, module, args)
        added_before_out.append(result is not None)
        return result

    monkeypatch.setattr(hijack_module._LayerHooks, "add_image_term", counting)
    unet = ldm_unet("sd15")
    width = SD15.context_dim
    x = latents(2, seed=26)
    text = text_context(2, width, seed=27)
    ours(
        unet,
        adapter_layers(unet),
        x,
        text[:1],
        text[1:],
        tokens(4, width, 1),
        tokens(4, width, 2),
        (1.0, 1.0),
    )
    expected = attention_forward != "functional"
    assert added_before_out == [expected] * (16 if expected else 0)


def test_side_tokens_project_keys_and_values_once_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, attention_forward: str
) -> None:
    """Blocks that name their side take keys and values projected once per generation from the
    hijack's side tokens (the rows' sides read on the host): the same output as projecting the
    context's tokens in every call, in any row order."""
    unet = ldm_unet("sd15")
    width = SD15.context_dim
    layers = [KeyValueWeights(k, v) for k, v in adapter_layers(unet, seed=30)]
    positive, negative = tokens(4, width, 31), tokens(2, width, 32)  # masked: 4 and 2 slots
    layout = TokenLayout.for_tokens(4)
    x = latents(2, seed=33)
    text = text_context(2, width, seed=34)
    projections = []
    original = KeyValueWeights.project

    def counting(self, image):
        projections.append(image.shape[0])
        return original(self, image)

    monkeypatch.setattr(KeyValueWeights, "project", counting)
    outputs, counts = {}, {}
    for named in (False, True):
        sides = (0, 1) if named else (-1, -1)
        cond, uncond = append_blocks(
            text[:1],
            text[1:],
            make_block(positive, 0.8, layout, side=sides[0]),
            make_block(negative, 0.6, layout, side=sides[1]),
        )
        hijack = AttentionHijack(
            unet, layers, layout, side_tokens=[positive, negative] if named else ()
        )
        hijack.install()
        try:
            projections.clear()
            outputs[named] = [
                unet(x, TIMESTEPS, context=torch.cat(rows))
                for rows in ((cond, uncond), (cond, uncond), (uncond, cond))
            ]
            counts[named] = len(projections)
        finally:
            hijack.remove()
    assert counts == {False: 3 * 16, True: 16}
    for projected, gathered in zip(outputs[False], outputs[True], strict=True):
        assert (projected - gathered).abs().max().item() < FLOAT32_NOISE


def sided_context(
    text: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    weights: tuple[float, float],
    layout: TokenLayout,
    sides: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """The batched context [2, T, C]: row 0 (cond) with the positive tokens, row 1 (uncond)
    with the negative ones, in blocks that name their side, as the session makes them
    (``sides`` (-1, -1): blocks that carry their own tokens)."""
    return torch.cat(
        append_blocks(
            text[:1],
            text[1:],
            make_block(positive, weights[0], layout, side=sides[0]),
            make_block(negative, weights[1], layout, side=sides[1]),
        )
    )


def _entries(hijack: AttentionHijack) -> list:
    return [e for plan in hijack._plans.values() for e in plan.entries if e is not None]


def _run_hijack(unet: nn.Module, n_tokens: int) -> tuple[torch.Tensor, AttentionHijack]:
    width = SD15.context_dim
    layers = adapter_layers(unet, seed=40)
    layout = TokenLayout.for_tokens(n_tokens)
    positive, negative = tokens(n_tokens, width, 41), tokens(n_tokens, width, 42)
    text = text_context(2, width, seed=43)
    context = sided_context(text, positive, negative, (0.7, 0.9), layout)
    hijack = AttentionHijack(unet, layers, layout, side_tokens=[positive, negative])
    hijack.install()
    try:
        out = unet(latents(2, seed=44), TIMESTEPS, context=context)
    finally:
        hijack.remove()
    return out, hijack


def test_auto_form_is_block_diagonal_on_the_cpu_only_where_a_layer_has_few_key_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lib_negip import hijack as hijack_module

    assert hijack_module.BLOCK_DIAGONAL == "auto"
    limit = hijack_module.CPU_BLOCK_DIAGONAL_COLUMNS
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert hijack_module.use_block_diagonal(cpu, limit)
    assert not hijack_module.use_block_diagonal(cpu, limit + 1)
    assert not hijack_module.use_block_diagonal(cuda, 4)  # GPUs: per head, fewest calls there
    assert not hijack_module.use_block_diagonal(torch.device("mps"), 4)

    unet = ldm_unet("sd15")  # 4 heads per layer
    heads = {int(layer.module.heads) for layer in cross_attention_layers(unet)}
    assert heads == {4}
    outputs = {}
    for n_tokens, expected in ((4, True), (16, True), (17, False)):  # 16, 64 and 68 columns
        outputs[n_tokens], hijack = _run_hijack(unet, n_tokens)
        forms = {entry.block_diagonal for entry in _entries(hijack)}
        assert forms == {expected}
    # and the per-head layers give what the block-diagonal form gives
    monkeypatch.setattr(hijack_module, "BLOCK_DIAGONAL", "always")
    forced, _ = _run_hijack(unet, 17)
    assert (forced - outputs[17]).abs().max().item() < FLOAT32_NOISE


def test_block_diagonal_falls_back_to_per_head_where_the_softmax_is_not_contiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The block-diagonal form reads the softmax's output through fixed strides; a torch that
    returned another layout would give wrong numbers, so each entry checks it and otherwise
    takes the per-head form (same result)."""
    from lib_negip import hijack as hijack_module

    # this torch: contiguous (the view of 2 rows, 8 heads, 4 slots and 64 queries)
    assert hijack_module._softmax_output_is_contiguous(
        ((2, 8, 4, 64), (64 * 32, 4, 1, 32)), torch.device("cpu"), torch.float32
    )
    unet = ldm_unet("sd15")
    monkeypatch.setattr(hijack_module, "BLOCK_DIAGONAL", "always")
    block_diagonal, hijack = _run_hijack(unet, 4)
    assert {entry.block_diagonal for entry in _entries(hijack)} == {True}
    monkeypatch.setattr(hijack_module, "_softmax_output_is_contiguous", lambda *args: False)
    fallback, hijack = _run_hijack(unet, 4)
    entries = _entries(hijack)
    assert entries
    assert {entry.block_diagonal for entry in entries} == {False}
    assert all(entry.scores_view is None and entry.probs_view is None for entry in entries)
    assert (fallback - block_diagonal).abs().max().item() < FLOAT32_NOISE


def test_on_mps_the_query_heads_are_copied_out_before_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """MPS takes the query's heads as a contiguous copy (A1111 copies q, k and v there before
    its own attentions; torch's MPS SDPA has had bugs with permuted inputs); elsewhere a strided
    view. Both give the same term (checked on the CPU with the MPS choice forced)."""
    from lib_negip import hijack as hijack_module

    assert not hijack_module.strided_query_ok(torch.device("mps"))
    assert hijack_module.strided_query_ok(torch.device("cuda", 0))
    assert hijack_module.strided_query_ok(torch.device("cpu"))
    unet = ldm_unet("sd15")
    monkeypatch.setattr(hijack_module, "BLOCK_DIAGONAL", "never")
    viewed, hijack = _run_hijack(unet, 4)
    assert all(entry.q_view is not None for entry in _entries(hijack))
    monkeypatch.setattr(hijack_module, "strided_query_ok", lambda device: False)
    copied, hijack = _run_hijack(unet, 4)
    entries = _entries(hijack)
    assert entries
    assert all(entry.q_view is None and entry.contiguous_heads for entry in entries)
    assert torch.equal(copied, viewed)


def test_autocast_state_is_read_on_torch_before_and_after_2_4(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch 2.4 added is_autocast_enabled(device_type); A1111 1.10 ships torch 2.1.2, whose
    is_autocast_enabled takes no argument (CUDA's) beside is_autocast_cpu_enabled."""
    from lib_negip import hijack as hijack_module

    assert hijack_module._autocast_on("cpu") is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert hijack_module._autocast_on("cpu") is True
    assert hijack_module._autocast_on("mps") is False

    def cuda_only() -> bool:  # torch 2.1's signature
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", cuda_only)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: True, raising=False)
    older = hijack_module._autocast_state_reader()
    assert older("cpu") is True
    assert older("cuda") is False


def _shrunk(transformer: nn.Module) -> list:
    """Deep Shrink on one transformer (as Kohya's HRFix does for some steps): its hidden states
    at half the size, brought back to the full size after it."""
    size: dict[str, torch.Size] = {}

    def before(module: nn.Module, args: tuple) -> tuple:
        size["hw"] = args[0].shape[-2:]
        return (F.interpolate(args[0], scale_factor=0.5, mode="bilinear"), *args[1:])

    def after(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.interpolate(output, size=size["hw"], mode="bilinear")

    return [transformer.register_forward_pre_hook(before), transformer.register_forward_hook(after)]


def test_a_layer_whose_query_count_changes_from_call_to_call(term_form: str) -> None:
    """Forge's "Kohya HRFix Integrated" (Deep Shrink) shrinks a block's hidden states for the
    first steps only: the layer's term, made at its first call for that many queries, met
    another count later, and every generation failed in torch.baddbmm (probe Q, real Forge).
    Each call must give what a hijack seeing only that call gives."""
    unet = make_ldm_unet(SD15)  # its own: hooks are put on it
    transformer = unet.input_blocks[1][1]
    width = SD15.context_dim
    layers = adapter_layers(unet, seed=40)
    layout = TokenLayout.for_tokens(4)
    positive, negative = tokens(4, width, 41), tokens(4, width, 42)
    context = sided_context(text_context(2, width, seed=43), positive, negative, (0.7, 0.9), layout)
    x = latents(2, seed=44)

    def run(shrink: bool) -> torch.Tensor:
        handles = _shrunk(transformer) if shrink else []
        try:
            return unet(x, TIMESTEPS, context=context)
        finally:
            for handle in handles:
                handle.remove()

    def hijacked(*shrinks: bool) -> list[torch.Tensor]:
        hijack = AttentionHijack(unet, layers, layout, side_tokens=[positive, negative])
        hijack.install()
        try:
            return [run(shrink) for shrink in shrinks]
        finally:
            hijack.remove()

    steps = (True, False, True)
    got = hijacked(*steps)
    for shrink, out in zip(steps, got, strict=True):
        assert torch.equal(out, hijacked(shrink)[0])
    assert not torch.equal(got[0], got[1])
    assert not torch.equal(got[0], run(True))  # the image term acted in the shrunk calls
