"""Encoding cache, image prompt building, step progress and the per-generation session."""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch
from PIL import Image
from test_hijack import hook_state
from tiny_adapters import make_adapter_state_dict
from tiny_encoders import hf_vision_config, hf_vision_state_dict
from tiny_unets import SD15, SDXL, latents, make_ldm_unet, text_context

from lib_negip.adapter import adapter_from_state_dict, family_of
from lib_negip.blocks import parse_layers
from lib_negip.encoder import encoder_from_state_dict
from lib_negip.errors import ArgumentError, IncompatibleModelError
from lib_negip.hijack import KeyValueWeights
from lib_negip.prompt import ImagePrompt, StepWindow
from lib_negip.session import (
    FeatureCache,
    ImagePromptSession,
    SideImages,
    build_image_prompt,
    pass_progress,
)
from lib_negip.unet_layers import cross_attention_layers

ENCODER_SHAPE = {"width": 48, "layers": 2, "heads": 4, "mlp_width": 96, "projection_dim": 40}


@functools.cache
def unet(family: str = "sd15"):
    return make_ldm_unet(SD15 if family == "sd15" else SDXL)


@functools.cache
def encoder():
    state = hf_vision_state_dict(**ENCODER_SHAPE, seed=5)
    return encoder_from_state_dict(state, hf_vision_config(**ENCODER_SHAPE))


@functools.cache
def adapter(variant: str):
    inner = [layer.inner_dim for layer in cross_attention_layers(unet())]
    encoder_dim = ENCODER_SHAPE["projection_dim"] if variant == "base" else ENCODER_SHAPE["width"]
    state = make_adapter_state_dict(
        variant,
        cross_dim=SD15.context_dim,
        layer_inner_dims=inner,
        encoder_dim=encoder_dim,
        num_tokens=4,
        resampler_dim=32,
        heads=1,
        generator=torch.Generator().manual_seed(9),
    )
    return adapter_from_state_dict(state)


def picture(seed: int, size: tuple[int, int] = (70, 50)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


class CountingEncoder:
    """Records how many images reach the real encoder."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.images_encoded = 0

    def preprocess(self, images):
        self.images_encoded += len(images)
        return self.inner.preprocess(images)

    def encode(self, pixels, output):
        return self.inner.encode(pixels, output)


def test_each_distinct_image_is_encoded_once() -> None:
    cache = FeatureCache(limit=8)
    counting = CountingEncoder(encoder())
    a, b = picture(1), picture(2)
    first = cache.features(counting, "enc", "image_embeds", [a, b])
    assert (cache.encoder_calls, counting.images_encoded) == (1, 2)
    again = cache.features(counting, "enc", "image_embeds", [picture(2), picture(1), a])
    assert (cache.encoder_calls, counting.images_encoded) == (1, 2)  # same content, new objects
    assert torch.equal(again[0], first[1])
    assert torch.equal(again[2], first[0])
    cache.features(counting, "enc", "image_embeds", [a, picture(3)])
    assert (cache.encoder_calls, counting.images_encoded) == (2, 3)  # only the new image
    cache.features(counting, "enc", "penultimate", [a])
    assert counting.images_encoded == 4  # another output kind is another entry
    direct = encoder().encode(encoder().preprocess([a, b]), "image_embeds")
    assert torch.allclose(first, direct, atol=1e-6)


def test_cache_smaller_than_the_request_still_answers_it() -> None:
    cache = FeatureCache(limit=1)
    images = [picture(s) for s in range(3)]
    features = cache.features(encoder(), "enc", "image_embeds", images)
    assert features.shape == (3, ENCODER_SHAPE["projection_dim"])


def build(variant: str, positive, negative, combine="average", weights=(1.0, 0.5)):
    cache = FeatureCache()
    output = adapter(variant).spec.encoder_output
    return build_image_prompt(
        adapter=adapter(variant),
        encoder_output=output,
        positive=SideImages(positive, weights[0], StepWindow(0.0, 0.5)),
        negative=SideImages(negative, weights[1], StepWindow(0.2, 1.0)),
        combine=combine,
        features=functools.partial(cache.features, encoder(), "enc", output),
        unconditional=(
            (lambda: torch.zeros(1, ENCODER_SHAPE["projection_dim"]))
            if output == "image_embeds"
            else functools.partial(cache.unconditional, encoder(), "enc", output, 56)
        ),
    )


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_missing_side_uses_the_references_unconditional_tokens(variant: str) -> None:
    prompt = build(variant, [picture(1)], [])
    ip = adapter(variant)
    if variant == "base":  # image_proj(zeros_like(image_embeds))
        expected = ip.project(torch.zeros(1, ENCODER_SHAPE["projection_dim"]))[0]
    else:  # image_proj(encoder(zeros_like(pixel_values)) penultimate)
        hidden = encoder().encode(torch.zeros(1, 3, 56, 56), "penultimate")
        expected = ip.project(hidden)[0]
    assert torch.allclose(prompt.negative.tokens, expected, atol=1e-6)
    # ... with the other side's weight and window
    assert prompt.negative.weight == 1.0
    assert prompt.negative.window == StepWindow(0.0, 0.5)
    positive = ip.project(
        encoder().encode(encoder().preprocess([picture(1)]), ip.spec.encoder_output)
    )
    assert torch.allclose(prompt.positive.tokens, positive[0], atol=1e-6)


def test_negative_only_prompt_puts_unconditional_tokens_on_cond_rows() -> None:
    prompt = build("base", [], [picture(4)], weights=(0.3, 0.8))
    expected = adapter("base").project(torch.zeros(1, ENCODER_SHAPE["projection_dim"]))[0]
    assert torch.allclose(prompt.positive.tokens, expected, atol=1e-6)
    assert prompt.positive.weight == 0.8
    assert prompt.positive.window == StepWindow(0.2, 1.0)


def test_combine_average_and_concat() -> None:
    images = [picture(5), picture(6)]
    ip = adapter("base")
    embeds = encoder().encode(encoder().preprocess(images), "image_embeds")
    average = build("base", images, [picture(7)], combine="average")
    assert torch.allclose(
        average.positive.tokens, ip.project(embeds.mean(0, keepdim=True))[0], atol=1e-6
    )
    concat = build("base", images, [picture(7)], combine="concat")
    assert concat.positive.tokens.shape == (8, SD15.context_dim)
    assert torch.allclose(concat.positive.tokens, ip.project(embeds).reshape(8, -1), atol=1e-6)
    assert concat.negative.tokens.shape[0] == 4  # the attention masks the 4 unused slots
    assert concat.layout.n_tokens == 8


@pytest.mark.parametrize(
    ("steps", "total", "calls", "expected"),
    [
        ("euler", 4, 4, [0, 0.25, 0.5, 0.75]),
        # Heun: A1111 estimates 2 * steps calls; it makes 2 * steps - 1 (no correction at the end).
        ("heun", 4, 8, [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75]),
        ("heun5", 5, 10, [0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8]),
        ("more calls than estimated", 2, 2, [0, 0.5, 0.5, 0.5]),
    ],
)
def test_pass_progress(steps, total, calls, expected) -> None:
    n = {"euler": 4, "heun": 4, "heun5": 5}.get(steps, 2)
    assert [pass_progress(c, n, calls) for c in range(len(expected))] == pytest.approx(expected)
    assert pass_progress(0, 0, 0) == 0.0


def test_windows_select_the_same_steps_for_first_and_second_order_samplers() -> None:
    window = StepWindow(0.8, 1.0)
    euler = [window.contains(pass_progress(c, 5, 5)) for c in range(5)]
    heun = [window.contains(pass_progress(c, 5, 10)) for c in range(9)]
    assert euler == [False] * 4 + [True]
    assert heun == [False] * 8 + [True]  # the last step (a single call) only


def session_for(prompt, hires_pass="both") -> ImagePromptSession:
    weights = [KeyValueWeights(k, v) for k, v in adapter("base").layer_weights()]
    return ImagePromptSession(prompt, weights, hires_pass=hires_pass)


def test_session_hijacks_lazily_follows_model_swaps_and_closes_clean() -> None:
    prompt = build("base", [picture(1)], [picture(2)])
    session = session_for(prompt)
    sd15, sdxl = unet("sd15"), unet("sdxl")
    clean_sd15, clean_sdxl = hook_state(sd15), hook_state(sdxl)
    text = text_context(1, SD15.context_dim)

    appended = session.conditioning(sd15, text, text, progress=0.0)
    assert appended.cond.shape == (1, 77 + prompt.layout.total, SD15.context_dim)
    assert hook_state(sd15) != clean_sd15
    sample(sd15, appended)
    assert session.acted
    sample(sd15, session.conditioning(sd15, text, text, progress=0.25))  # the negative window
    # The refiner: another context width. Left alone (the image prompts acted before it); the
    # first UNet is unhooked.
    wide = text_context(1, SDXL.context_dim)
    assert session.conditioning(sdxl, wide, wide, progress=0.5) is None
    assert hook_state(sd15) == clean_sd15
    assert hook_state(sdxl) == clean_sdxl
    assert session.conditioning(sd15, text, text, progress=0.5) is not None
    session.close()
    assert hook_state(sd15) == clean_sd15


def sample(model, appended) -> torch.Tensor:
    """One UNet call with an appended conditioning, cond rows then uncond rows."""
    context = torch.cat([appended.cond, appended.uncond])
    return model(latents(context.shape[0]), torch.full((context.shape[0],), 500), context=context)


@pytest.mark.parametrize("hires", [False, True])
def test_a_model_the_adapter_does_not_fit_is_refused_when_nothing_acted_before_it(
    hires: bool,
) -> None:
    """A Hires. fix checkpoint (hires_pass "second") or a refiner of another family taking over
    before any step had the image prompts: the image would come without them, so the session
    raises instead of leaving the model alone; nothing stays hooked."""
    session = session_for(build("base", [picture(1)], [picture(2)]), "second" if hires else "both")
    sd15, sdxl = unet("sd15"), unet("sdxl")
    clean_sd15, clean_sdxl = hook_state(sd15), hook_state(sdxl)
    text, wide = text_context(1, SD15.context_dim), text_context(1, SDXL.context_dim)
    if not hires:
        # The first model's conditioning was appended, but the refiner took over before the
        # UNet ran it: nothing acted.
        assert session.conditioning(sd15, text, text, progress=0.0) is not None
    with pytest.raises(IncompatibleModelError) as raised:
        session.conditioning(sdxl, wide, wide, progress=0.5, hires=hires)
    message = str(raised.value)
    assert f"for {family_of(SD15.context_dim)}, but" in message
    assert f"is {family_of(SDXL.context_dim)}, and" in message
    assert ("Hires. fix" in message.split(",")[1]) == hires
    assert hook_state(sd15) == clean_sd15
    assert hook_state(sdxl) == clean_sdxl
    # Asked again (a caller that kept going), the model is still refused, never left alone.
    with pytest.raises(IncompatibleModelError):
        session.conditioning(sdxl, wide, wide, progress=0.5, hires=hires)
    session.close()


@pytest.mark.parametrize("late", ["positive", "negative"])
def test_a_side_whose_window_opens_after_a_misfit_model_takes_over_is_refused(
    late: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refiner of another family took over before one side's window opened: that side did
    nothing, with only a console warning that blamed its window. The other side acted, so the
    rule "no step before it had the image prompts" did not see it."""
    prompt = build("base", [picture(1)], [picture(2)])
    side = getattr(prompt, late)
    late_side = dataclasses.replace(side, window=StepWindow(0.75, 1.0))
    prompt = dataclasses.replace(prompt, **{late: late_side})
    session = session_for(prompt)
    sd15, sdxl = unet("sd15"), unet("sdxl")
    text, wide = text_context(1, SD15.context_dim), text_context(1, SDXL.context_dim)
    session.begin_batch()
    for progress in (0.25, 0.375):
        sample(sd15, session.conditioning(sd15, text, text, progress=progress))
    assert session.acted_in_batch
    with pytest.raises(IncompatibleModelError) as raised:
        session.conditioning(sdxl, wide, wide, progress=0.5)
    message = str(raised.value)
    assert f"the {late} image prompts' step window holds no step before it" in message
    assert "switch to the refiner later" in message
    assert "hires_pass" not in message  # no Hires. fix here: its advice would not help
    assert hook_state(sd15) == hook_state(unet("sd15"))
    session.close()
    # A window that ended before the switch without a step (narrower than one: warned about
    # at the batch's end) and the other side acting: left alone, with a console line that does
    # not read like the refusal.
    early = dataclasses.replace(side, window=StepWindow(0.3, 0.35))
    session = session_for(
        dataclasses.replace(build("base", [picture(1)], [picture(2)]), **{late: early})
    )
    session.begin_batch()
    for progress in (0.25, 0.375):
        sample(sd15, session.conditioning(sd15, text, text, progress=progress))
    with caplog.at_level(logging.INFO, logger="negip"):
        assert session.conditioning(sdxl, wide, wide, progress=0.5) is None
    other = "negative" if late == "positive" else "positive"
    assert f"the {other} image prompts acted in the steps before it" in caplog.text
    assert "does not fit, so that model's steps run without image prompts" in caplog.text
    assert "no step before it had" not in caplog.text
    assert "Choose a" not in caplog.text
    session.close()


def test_a_model_without_the_blocks_asked_for_is_refused_when_nothing_acted() -> None:
    """Block weights for a block the model that takes over lacks (same context width, fewer
    transformer blocks) are an ArgumentError then, as at the start of a generation."""
    fewer = make_ldm_unet(SD15, seed=1)
    fewer.output_blocks = fewer.output_blocks[:3]  # the last transformer blocks gone
    prompt = build("base", [picture(1)], [picture(2)])
    positive = dataclasses.replace(prompt.positive, layers=parse_layers("positive_layers", "15:1"))
    session = session_for(ImagePrompt(positive=positive, negative=prompt.negative))
    text = text_context(1, SD15.context_dim)
    with pytest.raises(ArgumentError, match="positive_layers"):
        session.conditioning(fewer, text, text, progress=0.0)
    session.close()


def test_a_misfit_model_with_both_weights_zero_is_left_alone() -> None:
    session = session_for(build("base", [picture(1)], [picture(2)], weights=(0.0, 0.0)))
    wide = text_context(1, SDXL.context_dim)
    assert session.conditioning(unet("sdxl"), wide, wide, progress=0.0) is None
    session.close()


@pytest.mark.parametrize(
    ("hires_pass", "first", "second"),
    [("both", True, True), ("first", True, False), ("second", False, True)],
)
def test_hires_pass_choice(hires_pass: str, first: bool, second: bool) -> None:
    session = session_for(build("base", [picture(1)], []), hires_pass)
    text = text_context(1, SD15.context_dim)
    try:
        assert (session.conditioning(unet(), text, text, progress=0.0) is not None) == first
        assert (
            session.conditioning(unet(), text, text, progress=0.0, hires=True) is not None
        ) == second
    finally:
        session.close()


def test_outside_both_windows_nothing_is_appended() -> None:
    text = text_context(1, SD15.context_dim)
    session = session_for(build("base", [picture(1)], [picture(2)]))  # [0, .5) and [.2, 1)
    try:
        assert session.conditioning(unet(), text, text, progress=0.1) is not None
        assert session.conditioning(unet(), text, text, progress=0.6) is not None
    finally:
        session.close()
    session = session_for(build("base", [picture(1)], [], weights=(1.0, 1.0)))  # both [0, .5)
    try:
        assert session.conditioning(unet(), text, text, progress=0.5) is None
    finally:
        session.close()


def test_a_second_hijack_replaces_a_leftover_one() -> None:
    text = text_context(1, SD15.context_dim)
    clean = hook_state(unet())
    leftover = session_for(build("base", [picture(1)], []))
    leftover.conditioning(unet(), text, text, progress=0.0)  # never closed
    fresh = session_for(build("base", [picture(2)], []))
    fresh.conditioning(unet(), text, text, progress=0.0)
    to_out = cross_attention_layers(unet())[0].module.to_out[0]
    assert "forward" in vars(to_out)
    assert not to_out._forward_pre_hooks
    fresh.close()
    assert hook_state(unet()) == clean
    leftover.close()


def test_steps_outside_the_windows_run_without_our_hooks() -> None:
    """Where nothing is appended the UNet carries none of our hooks (exactly the unhijacked
    UNet); they come back when a window opens again, and closing leaves the UNet clean."""
    text = text_context(1, SD15.context_dim)
    clean = hook_state(unet())
    session = session_for(build("base", [picture(1)], [], weights=(1.0, 1.0)))  # both [0, .5)
    try:
        assert session.conditioning(unet(), text, text, progress=0.0) is not None
        assert hook_state(unet()) != clean
        assert session.conditioning(unet(), text, text, progress=0.5) is None
        assert hook_state(unet()) == clean
        assert session.conditioning(unet(), text, text, progress=0.0, hires=True) is not None
        assert hook_state(unet()) != clean
    finally:
        session.close()
    assert hook_state(unet()) == clean
