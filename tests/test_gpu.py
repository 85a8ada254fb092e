"""GPU checks (CUDA or MPS): half precision, bit-exact weight 0, no synchronisation per layer.

Skipped where no GPU is present (CI); on a machine with CUDA or MPS run `pytest -m gpu tests`.
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch
from test_hijack import adapter_layers, sdp_attention_forward, tokens
from tiny_unets import SD15, make_ldm_unet, text_context
from torch import nn

from lib_negip.conditioning import TokenLayout, append_blocks, make_block
from lib_negip.hijack import AttentionHijack, KeyValueWeights

pytestmark = pytest.mark.gpu


def gpu_device() -> torch.device | None:
    if os.environ.get("NEGIP_TEST_DEVICE"):  # e.g. "cpu", to try these tests' own code here
        return torch.device(os.environ["NEGIP_TEST_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return None


DEVICE = gpu_device()
if DEVICE is None:
    pytest.skip("no CUDA or MPS device", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def sdp_attention():
    """A1111 installs an SDPA cross-attention on CUDA; ldm's stock one upcasts by itself."""
    from ldm.modules.attention import CrossAttention

    original = CrossAttention.forward
    CrossAttention.forward = sdp_attention_forward
    yield
    CrossAttention.forward = original


@functools.cache
def unet_on(dtype: torch.dtype) -> nn.Module:
    unet = make_ldm_unet(SD15).to(DEVICE, dtype)
    unet.dtype = dtype
    unet.time_embed.register_forward_pre_hook(lambda module, args: (args[0].to(dtype),))
    if DEVICE.type == "cpu":  # ldm's GroupNorm32 computes in float32; the GPU uses autocast
        for module in unet.modules():
            if isinstance(module, nn.GroupNorm):
                module.float()
    return unet


def sampling(dtype: torch.dtype):
    """Half precision on a GPU runs under autocast, as A1111 samples (its GroupNorms get
    float32 inputs from ldm's GroupNorm32 and need autocast to take half weights)."""
    half = dtype != torch.float32 and DEVICE.type != "cpu"
    return torch.autocast(DEVICE.type, dtype=dtype, enabled=half)


def run(unet, layers, dtype, weights=(1.0, 0.8), upcast=False):
    width = SD15.context_dim
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    text = text_context(2, width, seed=2)
    layout = TokenLayout.for_tokens(4)
    cond, uncond = append_blocks(
        text[:1],
        text[1:],
        make_block(tokens(4, width, 3), weights[0], layout),
        make_block(tokens(4, width, 4), weights[1], layout),
    )
    context = torch.cat([cond, uncond]).to(DEVICE, dtype)
    hijack = AttentionHijack(unet, layers, layout, upcast=upcast)
    hijack.install()
    try:
        t = torch.tensor([600.0, 600.0], device=DEVICE)
        with sampling(dtype):
            return unet(x.to(DEVICE, dtype), t, context=context), (x, text)
    finally:
        hijack.remove()


@pytest.mark.parametrize("form", ["never", "always"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_precision_on_the_gpu_matches_float32_on_the_cpu(
    dtype: torch.dtype, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both forms of the image term (per head, block-diagonal) on the device."""
    from lib_negip import hijack as hijack_module

    monkeypatch.setattr(hijack_module, "BLOCK_DIAGONAL", form)
    cpu_unet = make_ldm_unet(SD15)
    layers = adapter_layers(cpu_unet)
    from ldm.modules.attention import CrossAttention

    CrossAttention.forward = sdp_attention_forward
    expected, _ = run_cpu(cpu_unet, layers)
    got, _ = run(unet_on(dtype), [KeyValueWeights(k, v) for k, v in layers], dtype)
    assert got.dtype == dtype
    error = (got.float().cpu() - expected).abs().max().item() / expected.abs().max().item()
    # bfloat16 keeps 8 significant bits against float16's 11: about 8 times the error. With
    # NEGIP_TEST_DEVICE=cpu: float16 0.0026 (per head) / 0.0035 (block-diagonal), bfloat16
    # 0.027 / 0.032 of the output's largest value.
    tolerance = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 8e-2}[dtype]
    assert error < tolerance, error


def test_upcast_runs_the_image_term_in_float32_under_autocast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A1111's "upcast cross attention" under CUDA autocast in float16: the image term (its
    keys and values prepared, and each call's SDPA) runs with autocast off, in float32."""
    from lib_negip import hijack as hijack_module

    seen = []
    for owner, name in ((hijack_module._LayerHooks, "image_term"), (AttentionHijack, "entry")):
        original = getattr(owner, name)

        def recording(self, *args, _original=original, _name=name):
            seen.append((_name, hijack_module._autocast_on(DEVICE.type)))
            return _original(self, *args)

        monkeypatch.setattr(owner, name, recording)
    cpu_unet = make_ldm_unet(SD15)
    layers = adapter_layers(cpu_unet)
    got, _ = run(
        unet_on(torch.float16),
        [KeyValueWeights(k, v) for k, v in layers],
        torch.float16,
        upcast=True,
    )
    assert {name for name, _ in seen} == {"image_term", "entry"}, seen
    assert not any(on for _, on in seen), seen
    assert torch.isfinite(got).all()


def run_cpu(unet, layers):
    global DEVICE
    saved, DEVICE = DEVICE, torch.device("cpu")
    try:
        return run(unet, layers, torch.float32)
    finally:
        DEVICE = saved


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_zero_is_bit_exact_on_the_gpu(dtype: torch.dtype) -> None:
    unet = unet_on(dtype)
    layers = adapter_layers(make_ldm_unet(SD15))
    got, (x, text) = run(unet, layers, dtype, weights=(0.0, 0.0))
    t = torch.tensor([600.0, 600.0], device=DEVICE)
    with sampling(dtype):
        plain = unet(x.to(DEVICE, dtype), t, context=text.to(DEVICE, dtype))
    assert torch.equal(got, plain)


def count_synchronisations(call) -> int:
    """How many device synchronisations ``call`` makes (CUDA's sync debug mode warnings)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA's sync debug mode")
def test_no_synchronisation_per_layer() -> None:
    """Exactly one synchronisation per UNet call (the meta tokens read on the host), none per
    layer."""
    dtype = torch.float16
    unet = unet_on(dtype)
    layers = [KeyValueWeights(k, v) for k, v in adapter_layers(make_ldm_unet(SD15))]
    width = SD15.context_dim
    layout = TokenLayout.for_tokens(4)
    text = text_context(2, width, seed=2).to(DEVICE, dtype)
    cond, uncond = append_blocks(
        text[:1],
        text[1:],
        make_block(tokens(4, width, 3).to(DEVICE, dtype), 1.0, layout),
        make_block(tokens(4, width, 4).to(DEVICE, dtype), 1.0, layout),
    )
    context = torch.cat([cond, uncond])
    x = torch.randn(2, 4, 8, 8, device=DEVICE, dtype=dtype)
    t = torch.full((2,), 600.0, device=DEVICE)

    def call(context: torch.Tensor) -> None:
        with sampling(dtype):
            unet(x, t, context=context)

    baseline = count_synchronisations(lambda: call(text))
    hijack = AttentionHijack(unet, layers, layout)
    hijack.install()
    try:
        call(context)  # the weights' device copies and the layers' entries are made here
        count = count_synchronisations(lambda: call(context))
    finally:
        hijack.remove()
    assert count == baseline + 1, (baseline, count)


def test_weights_are_moved_to_the_device_once() -> None:
    layers = [KeyValueWeights(k, v) for k, v in adapter_layers(make_ldm_unet(SD15))]
    unet = unet_on(torch.float16)
    run(unet, layers, torch.float16)
    copies = [dict(kv._cast) for kv in layers]
    run(unet, layers, torch.float16)
    assert all(
        a.keys() == b.keys() and all(a[k] is b[k] for k in a)
        for a, b in zip(copies, [kv._cast for kv in layers], strict=True)
    )
