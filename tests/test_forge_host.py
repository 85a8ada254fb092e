"""The extension under Forge's sampling (tests/forge_stub.py) against the A1111 stand-in.

The same generation, the same weights: sampled the way A1111 samples and the way Forge does
(uncond rows first in one UNet call, or cond and uncond in separate calls, or only the cond rows
at CFG 1, contexts of different lengths), the images must agree to float32 tolerance: the
positive image prompt always reaches the cond rows and the negative one the uncond rows, whatever
the batching. Weight 0 is bit-exact with Forge without the extension, and nothing stays hooked.
"""

from __future__ import annotations

import pytest
import torch
from forge_stub import ForgeProcessing, forge_model
from test_hijack import hook_state
from tiny_unets import SD15
from webui_harness import (
    World,
    b64,
    conditioning,
    picture,
    processing,
    shared,
)

TOLERANCE = 1e-5


def fields(**overrides) -> dict:
    values = {
        "model": "tiny-base_sd15",
        "positive_images": [b64(picture(1))],
        "negative_images": [b64(picture(2))],
        "positive_weight": 0.9,
        "negative_weight": 0.7,
        "negative_start": 0.25,
    }
    values.update(overrides)
    return values


def generation(world: World, args: list, *, forge: bool, uncond_chunks: int = 1, **kwargs):
    cond = ([[(0, 1.0)]], conditioning(1, SD15, seed=3))
    uncond = conditioning(1, SD15, chunks=uncond_chunks, seed=4)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    split = kwargs.pop("split", False)
    if forge:
        shared.sd_model = forge_model(world.sd15)
        p = ForgeProcessing(cond=cond, uncond=uncond, latent=latent, steps=4, **kwargs)
        p.split = split
    else:
        world.use("sd15")
        p = processing.Processing(cond=cond, uncond=uncond, latent=latent, steps=4, **kwargs)
    p.scripts = [(world.script, args)]
    p.result = processing.process_images(p)
    world.use("sd15")
    return p


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOLERANCE * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize(
    ("forge_kwargs", "expected_calls"),
    [
        ({}, [[1, 0]]),  # batched, uncond rows first
        ({"split": True}, [[1], [0]]),  # not enough free memory
        ({"uncond_chunks": 2}, [[1], [0]]),  # contexts of different lengths
        ({"cfg_scale": 1.0}, [[0]]),  # CFG 1: the cond rows only
    ],
    ids=["batched", "split", "different-lengths", "cfg-1"],
)
def test_forge_batching_gives_the_a1111_result(
    world: World, forge_kwargs: dict, expected_calls: list
) -> None:
    if forge_kwargs.get("split"):  # A1111 the same way: one UNet call per side
        shared.opts.batch_cond_uncond = False
    plain_forge = generation(world, [{"enabled": False}], forge=True, **forge_kwargs).result
    plain_a1111 = generation(world, [{"enabled": False}], forge=False, **forge_kwargs).result
    if "uncond_chunks" in forge_kwargs:
        # Without our block Forge batches 77 and 154 tokens by repeating the cond context
        # (the same attention, other float rounding); with it, the lengths differ too much
        # and Forge runs them apart, as A1111 does.
        assert (plain_forge - plain_a1111).abs().max().item() < 1e-3
    else:
        assert close(plain_forge, plain_a1111)  # the stand-ins agree without the extension

    forge = generation(world, [fields()], forge=True, **forge_kwargs)
    a1111 = generation(world, [fields()], forge=False, **forge_kwargs)
    assert forge.denoisers[0].calls[: len(expected_calls)] == expected_calls
    assert close(forge.result, a1111.result), (forge.result - a1111.result).abs().max()
    assert not close(forge.result, plain_forge)  # the image prompts acted
    assert forge.extra_generation_params["NegIP model"].startswith("tiny-base_sd15")


def test_weight_zero_is_bit_exact_under_forge(world: World) -> None:
    clean = hook_state(world.sd15)
    plain = generation(world, [{"enabled": False}], forge=True).result
    zero = generation(world, [fields(positive_weight=0.0, negative_weight=0.0)], forge=True)
    assert torch.equal(zero.result, plain)
    assert hook_state(world.sd15) == clean


def test_swapped_sides_differ_under_forge(world: World) -> None:
    """The sides follow their rows: swapping the images changes the image, and equals the
    A1111 result of the swapped request."""
    swapped = fields(
        positive_images=[b64(picture(2))],
        negative_images=[b64(picture(1))],
    )
    forge = generation(world, [swapped], forge=True).result
    a1111 = generation(world, [swapped], forge=False).result
    original = generation(world, [fields()], forge=True).result
    assert close(forge, a1111)
    assert not close(forge, original)


def test_auto_model_and_leftovers_under_forge(world: World) -> None:
    clean = hook_state(world.sd15)
    p = generation(world, [fields(model="auto")], forge=True)
    assert p.extra_generation_params["NegIP model"].startswith("tiny-")
    assert "_sd15" in p.extra_generation_params["NegIP model"]
    assert hook_state(world.sd15) == clean


def test_no_uncond_conditioning_under_forge(world: World) -> None:
    """Forge passes no uncond conditioning at all where CFG is 1 (its hires pass' own scale):
    the positive side still acts on the cond rows, as at CFG 1 with an uncond."""
    cfg1 = generation(world, [fields()], forge=True, cfg_scale=1.0).result
    cond = ([[(0, 1.0)]], conditioning(1, SD15, seed=3))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    shared.sd_model = forge_model(world.sd15)
    p = ForgeProcessing(cond=cond, uncond=None, latent=latent, steps=4, cfg_scale=1.0)
    p.scripts = [(world.script, [fields()])]
    none = processing.process_images(p)
    world.use("sd15")
    assert p.denoisers[0].calls == [[0]] * 4
    assert torch.equal(none, cfg1)


def test_a_negative_side_left_out_at_cfg_1_is_explained_in_forge_words(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Forge leaves the uncond pass out at CFG 1 (its Hires. fix pass' own CFG scale is 1 by
    default): the console note blamed A1111's Negative Guidance minimum sigma and early CFG
    skipping, which the user had not set (probe Q, real Forge)."""
    cond = ([[(0, 1.0)]], conditioning(1, SD15, seed=3))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    shared.sd_model = forge_model(world.sd15)
    p = ForgeProcessing(cond=cond, uncond=None, latent=latent, steps=4, cfg_scale=1.0)
    p.scripts = [(world.script, [fields()])]
    with caplog.at_level("WARNING", logger="negip"):
        processing.process_images(p)
    world.use("sd15")
    (note,) = [r.getMessage() for r in caplog.records if "had no step" in r.getMessage()]
    assert "the negative image prompts had no step of this batch" in note
    assert "Forge leaves that pass out where the CFG scale is 1" in note
    assert "raise the CFG scale" in note
    assert "A1111's Negative Guidance" not in note


def forge_ip_adapter(unet: torch.nn.Module) -> callable:
    """A stand-in of Forge's built-in IP-Adapter: an attn2 "replace" patch, which Forge's
    transformer block calls instead of attn2's forward, between attn2.to_q/to_k/to_v and
    attn2.to_out (so forward hooks on attn2 itself never fire). It adds its own image term."""
    from lib_negip.unet_layers import cross_attention_layers

    saved = []
    for layer in cross_attention_layers(unet):
        module = layer.module
        generator = torch.Generator().manual_seed(len(saved))
        their_v = torch.randn(1, 3, module.to_v.out_features, generator=generator) * 0.5

        def replaced(x, context=None, mask=None, _m=module, _v=their_v, **kwargs):
            q, k, v = _m.to_q(x), _m.to_k(context), _m.to_v(context)
            heads = _m.heads
            b, n, inner = q.shape

            def split(t):
                return t.view(b, -1, heads, inner // heads).transpose(1, 2)

            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            out = out.transpose(1, 2).reshape(b, n, inner) + _v.mean(1, keepdim=True)
            return _m.to_out(out)

        saved.append(module)
        module.forward = replaced

    def remove() -> None:
        for module in saved:
            del module.forward

    return remove


def test_coexists_with_forges_own_ip_adapter(world: World) -> None:
    clean = hook_state(world.sd15)
    remove = forge_ip_adapter(world.sd15)
    try:
        theirs = generation(world, [{"enabled": False}], forge=True).result
        zero = generation(world, [fields(positive_weight=0.0, negative_weight=0.0)], forge=True)
        both = generation(world, [fields()], forge=True).result
    finally:
        remove()
    ours = generation(world, [fields()], forge=True).result
    plain = generation(world, [{"enabled": False}], forge=True).result
    assert torch.equal(zero.result, theirs)  # ours at weight 0 leaves theirs exactly as it is
    assert not close(both, theirs)
    assert not close(both, ours)
    assert not close(theirs, plain)
    assert hook_state(world.sd15) == clean
