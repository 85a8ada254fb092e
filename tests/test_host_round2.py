"""Round 2 through the A1111 stand-in (tests/webui_stub): block weights and masks in every CFG
branch, noise negatives, model "auto", stored image prompts, hosts the extension cannot drive,
and the UI's wording of a refusal.

Every denoiser call's UNet output is compared with a direct computation, as in
tests/test_host.py: each cond row run alone with its text plus the POSITIVE image tokens, each
uncond row with the NEGATIVE ones, through an :class:`AttentionHijack` given the layer scales
(from the block tables, not from the session) and the masks (decoded from the request's PNGs).
"""

from __future__ import annotations

import base64
import io
import re
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_host import (
    BRANCHES,
    crossattn,
    default_fields,
    expected_tokens,
    generation,
    pos_window_weight,
    shared_models_path,
)
from test_images import png_header
from test_reliability import SD2, residue
from tiny_unets import CHUNK, SD15, SDXL, make_ldm_unet
from webui_harness import (
    World,
    b64,
    conditioning,
    loaded_model,
    picture,
    processing,
    script_callbacks,
    shared,
)

from lib_negip.adapter import load_adapter
from lib_negip.blocks import block_weights, layer_scales, parse_layers
from lib_negip.conditioning import TokenLayout, make_block, pad_text_to_same_length
from lib_negip.errors import NegIPError, UnreachedError
from lib_negip.hijack import AttentionHijack
from lib_negip.prompt import StepWindow
from lib_negip.session import pass_progress
from lib_negip.store import format_references, reference_of
from lib_negip.unet_layers import block_indices, cross_attention_layers, transformer_blocks
from lib_negip.webui import generation as generation_module
from lib_negip.webui.failures import UI_NAME
from lib_negip.webui.generation import Generation
from lib_negip.webui.settings import DEFAULT_STORE_FOLDER, OPT_STORE_IMAGES
from lib_negip.wording import UI_FORBIDDEN

TOLERANCE = 2e-5


POSITIVE, NEGATIVE = picture(1), picture(2)


def mask_image(kind: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """An "L" mask (width, height): ``a``/``b`` are two different soft-and-sharp patterns."""
    w, h = size
    if kind == "white":
        return Image.new("L", size, 255)
    if kind == "black":
        return Image.new("L", size, 0)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "a":
        values = np.where(xx < w * 0.6, 255, 40) * (0.5 + 0.5 * yy / (h - 1))
    else:
        values = np.where(yy > h * 0.3, 230, 0) + 25 * (xx / (w - 1))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")


def as_tensor(mask: Image.Image | None) -> torch.Tensor | None:
    """The mask as the host decodes it: values 0..1 [h, w]."""
    if mask is None:
        return None
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def fields_for(model: str = "tiny-base_sd15", **overrides) -> dict:
    fields = {
        "model": model,
        "positive_images": [b64(POSITIVE)],
        "negative_images": [b64(NEGATIVE)],
        "positive_weight": 0.9,
        "negative_weight": 0.6,
        "positive_start": 0.0,
        "positive_end": 0.5,
        "negative_start": 0.25,
        "negative_end": 1.0,
    }
    fields.update(overrides)
    return fields


def make_p(
    fields: dict | None,
    *,
    rows: int = 1,
    batch: int = 1,
    sdxl: bool = False,
    cond_chunks: int = 1,
    uncond_chunks: int = 1,
    seed: int | None = None,
    is_api: bool = True,
    world: World,
    **kwargs,
) -> processing.Processing:
    """A generation's ``p`` (cond ``rows`` per image for AND prompts, ``batch`` images); with
    ``fields`` None the extension is off."""
    config = SDXL if sdxl else SD15
    conds_list = [[(i * rows + r, 1.0 / rows) for r in range(rows)] for i in range(batch)]
    cond = (conds_list, conditioning(rows * batch, config, cond_chunks, seed=3, sdxl=sdxl))
    uncond = conditioning(batch, config, uncond_chunks, seed=4, sdxl=sdxl)
    latent = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    p = processing.Processing(cond=cond, uncond=uncond, latent=latent, **kwargs)
    p.is_api = is_api
    if seed is not None:
        p.all_seeds = [seed]
    p.scripts = [(world.script, [fields] if fields is not None else [False])]
    return p


def run(world: World, fields: dict | None, **kwargs) -> processing.Processing:
    p = make_p(fields, world=world, **kwargs)
    p.result = processing.process_images(p)
    return p


def refused(world: World, fields: dict | None, match: str, **kwargs):
    """The generation fails with HTTP 422 matching ``match``; returns (error, p, traceback)."""
    p = make_p(fields, world=world, **kwargs)
    with pytest.raises(NegIPError) as raised:
        processing.process_images(p)
    error = raised.value
    assert getattr(error, "status_code", None) == 422, repr(error)
    assert re.search(match, str(error), flags=re.DOTALL), str(error)
    return error, p, raised.tb


def negip_keys(p: processing.Processing) -> list[str]:
    return [key for key in p.extra_generation_params if key.startswith("NegIP")]


def nothing_left(*unets: torch.nn.Module) -> None:
    for unet in unets:
        assert residue(unet) == []
    assert Generation.current is None
    assert Generation.failure is None
    assert Generation.trap is None
    assert Generation.sample_trap is None


# --------------------------------------------------------------------------------------------
# Every call's UNet output against the direct computation, with block weights and masks


def scales_of(unet: torch.nn.Module, positive: str, negative: str) -> list[tuple[float, float]]:
    """Per-layer block weights from the block tables (not through the session)."""
    layers = cross_attention_layers(unet)
    n_blocks = len(transformer_blocks(layers))
    return layer_scales(
        block_weights("positive_layers", parse_layers("positive_layers", positive), n_blocks),
        block_weights("negative_layers", parse_layers("negative_layers", negative), n_blocks),
        block_indices(layers),
    )


def check_calls(
    world: World,
    fields: dict,
    *,
    masks: tuple[Image.Image | None, Image.Image | None] = (None, None),
    pad: str | None = None,
) -> int:
    """Compare each denoiser call's UNet outputs with the direct computation; returns how many
    calls had image tokens appended."""
    models = shared_models_path()
    model = fields["model"]
    pos = expected_tokens(models, model, (1,))
    neg = expected_tokens(models, model, (2,))
    pos_weight, neg_weight = pos_window_weight(fields)
    layout = TokenLayout.for_tokens(max(len(pos), len(neg)))
    adapter = load_adapter(Path(models) / "ipadapter" / f"{model}.safetensors")
    mask_tensors = [as_tensor(m) for m in masks]
    appended_calls = 0
    assert world.calls, "no denoiser call was recorded"
    for call in world.calls:
        denoiser = call.denoiser
        progress = pass_progress(call.step, denoiser.steps, denoiser.total_steps)
        weights = (pos_weight(progress), neg_weight(progress))
        active = weights != (0.0, 0.0)
        appended_calls += active
        text_c, text_u = crossattn(call.cond), crossattn(call.uncond)
        if active and pad is not None:
            empty = shared.sd_model.cond_stage_model_empty_prompt
            text_c, text_u = pad_text_to_same_length(text_c, text_u, pad, empty)
        rows_c = [text_c[r] for r in range(text_c.shape[0])]
        rows_u = [text_u[r] for r in range(text_u.shape[0])]
        if active:
            block_c = make_block(pos, weights[0], layout, side=0)[0]
            block_u = make_block(neg, weights[1], layout, side=1)[0]
            rows_c = [torch.cat([row, block_c]) for row in rows_c]
            rows_u = [torch.cat([row, block_u]) for row in rows_u]
        contexts = rows_c + rows_u
        computed = len(rows_c) if denoiser.skipped[call.index] else len(contexts)
        hijack = AttentionHijack(
            call.unet,
            adapter.layer_weights(),
            layout,
            side_tokens=[pos, neg],
            layer_scales=scales_of(
                call.unet,
                fields.get("positive_layers", "all"),
                fields.get("negative_layers", "all"),
            ),
            masks=mask_tensors,
        )
        hijack.install()
        try:
            for row in range(computed):
                t = (call.sigma[row : row + 1] * 50).clamp(0, 999)
                expected = call.unet(call.x[row : row + 1], t, context=contexts[row][None])
                got = denoiser.outputs[call.index][row : row + 1]
                difference = (got - expected).abs().max().item()
                assert difference < TOLERANCE, (call.index, row, difference)
        finally:
            hijack.remove()
    return appended_calls


ROUTES = {
    name: BRANCHES[name]
    for name in (
        "batched",
        "split calls (batch_cond_uncond off)",
        "pad with empty chunks",
        "pad v0 (repeat last)",
        "skip early CFG",
        "AND prompt, batch of two, split",
        "second-order sampler",
    )
}
ROUTES["hires fix"] = ({}, {"enable_hr": True})


@pytest.mark.parametrize("branch", list(ROUTES))
def test_block_weights_and_masks_route_in_every_cfg_branch(world: World, branch: str) -> None:
    opts, kwargs = ROUTES[branch]
    for key, value in opts.items():
        setattr(shared.opts, key, value)
    masks = (mask_image("a"), mask_image("b", (40, 56)))
    fields = fields_for(
        positive_layers="style",
        negative_layers="composition",
        positive_mask=b64(masks[0]),
        negative_mask=b64(masks[1]),
    )
    p = run(world, fields, **kwargs)
    pad = (
        "repeat_last"
        if opts.get("pad_cond_uncond_v0")
        else "empty_chunks"
        if opts.get("pad_cond_uncond")
        else None
    )
    appended = check_calls(world, fields, masks=masks, pad=pad)
    assert 0 < appended <= len(world.calls)
    if branch == "hires fix":
        assert any(call.hires for call in world.calls)
    assert script_callbacks.errors == []
    assert residue(world.unet) == []
    params = p.extra_generation_params
    assert params["NegIP positive layers"] == "style"
    assert params["NegIP negative layers"] == "composition"
    if branch == "batched":  # the blocks and masks matter: without them, another image
        plain_prompt = run(world, fields_for(), **kwargs).result
        assert not torch.allclose(p.result, plain_prompt, atol=1e-4)


def test_sdxl_presets_explicit_pairs_and_masks(world: World) -> None:
    world.use("sdxl")
    masks = (mask_image("b"), None)
    fields = fields_for(
        model="tiny-base_sdxl",
        positive_layers="3:1, 6:0.8",
        negative_layers="strong style",
        positive_mask=b64(masks[0]),
        positive_end=1.0,
    )
    run(world, fields, sdxl=True)
    assert check_calls(world, fields, masks=masks) > 0
    assert residue(world.sdxl) == []


def plain_result(world: World, **kwargs) -> torch.Tensor:
    return run(world, None, **kwargs).result


@pytest.mark.parametrize("branch", ["batched", "split calls (batch_cond_uncond off)"])
def test_exact_cases_through_the_host(world: World, branch: str) -> None:
    """Bit for bit: blocks at 0 on both sides = the extension off (nothing appended, no hook);
    white masks = no masks; black masks on both sides = off; a black mask on one side = that
    side at weight 0."""
    for key, value in BRANCHES[branch][0].items():
        setattr(shared.opts, key, value)
    white, black = b64(mask_image("white")), b64(mask_image("black"))
    plain = plain_result(world)

    world.calls.clear()
    zero_blocks = run(world, fields_for(positive_layers="0:0", negative_layers="3:0, 6:0"))
    assert torch.equal(zero_blocks.result, plain)
    assert all(length == CHUNK for c in world.calls for _, length in c.denoiser.calls)

    prompt = run(world, fields_for()).result
    assert not torch.equal(prompt, plain)
    whites = run(world, fields_for(positive_mask=white, negative_mask=white)).result
    assert torch.equal(whites, prompt)

    blacks = run(world, fields_for(positive_mask=black, negative_mask=black)).result
    assert torch.equal(blacks, plain)

    for side, other in (("positive", "negative"), ("negative", "positive")):
        masked = run(world, fields_for(**{f"{side}_mask": black})).result
        zero = run(world, fields_for(**{f"{side}_weight": 0.0})).result
        assert torch.equal(masked, zero), side
        assert not torch.equal(masked, prompt)
        assert not torch.equal(masked, plain), other
    assert residue(world.unet) == []


# --------------------------------------------------------------------------------------------
# Noise negatives


def noise_fields(**overrides) -> dict:
    return fields_for(negative_images=[], negative_noise_type="dissolve", **overrides)


def test_negative_noise(world: World) -> None:
    without = run(world, noise_fields(), seed=11).result
    zero = run(world, noise_fields(negative_noise=0.0), seed=11).result
    assert torch.equal(zero, without)
    noisy = run(world, noise_fields(negative_noise=0.5), seed=11)
    assert not torch.allclose(noisy.result, without, atol=1e-4)
    assert noisy.extra_generation_params["NegIP negative noise"] == 0.5
    again = run(world, noise_fields(negative_noise=0.5), seed=11).result
    assert torch.equal(again, noisy.result)
    other_seed = run(world, noise_fields(negative_noise=0.5), seed=12).result
    assert not torch.allclose(other_seed, noisy.result, atol=1e-5)
    # The seed only moves the noise: without noise it changes nothing here (fixed latent).
    assert torch.equal(run(world, noise_fields(), seed=12).result, without)


def test_negative_noise_with_negative_images_is_refused(world: World) -> None:
    clean = residue(world.unet)
    error, p, _ = refused(world, fields_for(negative_noise=0.3), r"negative_noise.*negative_images")
    assert "negative_noise" in str(error)
    assert "negative_images" in str(error)
    assert negip_keys(p) == []
    assert residue(world.unet) == clean
    nothing_left(world.unet)


# --------------------------------------------------------------------------------------------
# Model "auto"

LABEL = r"{name} \[[0-9a-f]{{10}}\]"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_auto_picks_the_adapter_of_the_loaded_family(world: World, family: str) -> None:
    sdxl = family == "sdxl"
    name = "tiny-base_sdxl" if sdxl else "tiny-base_sd15"
    world.use(family)
    auto = run(world, fields_for(model="auto", positive_end=1.0), sdxl=sdxl)
    label = auto.extra_generation_params["NegIP model"]
    assert re.fullmatch(LABEL.format(name=name), label), label
    assert "auto" not in label
    named = run(world, fields_for(model=name, positive_end=1.0), sdxl=sdxl)
    assert torch.equal(auto.result, named.result)
    assert named.extra_generation_params["NegIP model"] == label
    # the plus adapter of the same family gives another image: "auto" really chose
    if not sdxl:
        plus = run(world, fields_for(model="tiny-plus_sd15", positive_end=1.0))
        assert not torch.equal(plus.result, auto.result)


def test_auto_without_a_fitting_adapter_names_the_family_and_the_adapters(world: World) -> None:
    unet = make_ldm_unet(SD2)
    shared.sd_model = loaded_model(unet, SD2)
    cond = ([[(0, 1.0)]], conditioning(1, SD2, seed=3))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    p = processing.Processing(cond=cond, uncond=conditioning(1, SD2, seed=4), latent=latent)
    p.scripts = [(world.script, [fields_for(model="auto")])]
    with pytest.raises(NegIPError) as raised:
        processing.process_images(p)
    message = str(raised.value)
    assert raised.value.status_code == 422
    assert "context width 80" in message
    for name in ("tiny-base_sd15", "tiny-plus_sd15", "tiny-base_sdxl"):
        assert name in message
    assert negip_keys(p) == []
    nothing_left(unet, world.sd15)


# --------------------------------------------------------------------------------------------
# Stored image prompts


def store_folder() -> Path:
    from modules import paths

    return Path(paths.data_path) / DEFAULT_STORE_FOLDER


OMIT = object()  # a field left out of the request's dict


def stored_request(**overrides) -> dict:
    """The request with images and masks on both sides; a field given as OMIT is left out
    (an API request that takes it from the infotext's stored images)."""
    fields = {
        "positive_mask": b64(mask_image("a")),
        "negative_mask": b64(mask_image("b")),
        "positive_layers": "style",
    }
    merged = fields_for(**{**fields, **overrides})
    return {name: value for name, value in merged.items() if value is not OMIT}


def test_image_prompts_are_stored_once_and_restore_the_result(world: World) -> None:
    p = run(world, stored_request())
    folder = store_folder()
    expected = {
        "positive_images": reference_of(POSITIVE),
        "negative_images": reference_of(NEGATIVE),
        "positive_mask": reference_of(mask_image("a")),
        "negative_mask": reference_of(mask_image("b")),
    }
    assert sorted(f.name for f in folder.iterdir()) == sorted(
        f"{ref}.png" for ref in expected.values()
    )
    params = p.extra_generation_params
    assert params["NegIP positive images"] == expected["positive_images"]
    assert params["NegIP negative images"] == expected["negative_images"]
    assert params["NegIP positive mask"] == expected["positive_mask"]
    assert params["NegIP negative mask"] == expected["negative_mask"]
    assert "NegIP images" not in params

    stamps = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    again = run(world, stored_request())
    assert torch.equal(again.result, p.result)
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == stamps  # written once

    # An API request restored from the infotext: the references, no images.
    references = format_references({field: [ref] for field, ref in expected.items()})
    restored = run(
        world,
        stored_request(
            positive_images=OMIT,
            negative_images=OMIT,
            positive_mask=OMIT,
            negative_mask=OMIT,
            infotext_images=references,
        ),
    )
    assert torch.equal(restored.result, p.result)
    # Without the masks' references the result differs: the masks really came from the store.
    unmasked = run(
        world,
        stored_request(
            positive_images=OMIT,
            negative_images=OMIT,
            positive_mask=OMIT,
            negative_mask=OMIT,
            infotext_images=format_references(
                {f: [expected[f]] for f in ("positive_images", "negative_images")}
            ),
        ),
    )
    assert not torch.equal(unmasked.result, p.result)

    # A stored file that is gone: 422 naming the reference.
    (folder / f"{expected['negative_mask']}.png").unlink()
    error, failed, _ = refused(
        world,
        stored_request(
            positive_images=OMIT,
            negative_images=OMIT,
            positive_mask=OMIT,
            negative_mask=OMIT,
            infotext_images=references,
        ),
        expected["negative_mask"],
    )
    assert str(tmp_root(folder)) not in str(error)  # no server path in the answer
    assert negip_keys(failed) == []
    nothing_left(world.unet)


def tmp_root(folder: Path) -> Path:
    return folder.parent.parent


class _ResetInterrupt:
    """A script after ours that takes the Interrupt back, as a host that samples anyway."""

    @staticmethod
    def process(p, *args) -> None:
        shared.state.interrupted = False

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def test_interrupt_while_preparing_stops_between_images(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Interrupt pressed while many large image prompts are stored and encoded (a probe waited
    15 s for 20 of 1536x1536): the next image or side is not started, nothing is drawn and no
    error is shown (A1111's loop stops before sampling); a host that samples anyway is refused."""
    from lib_negip.store import ImageStore

    saved: list[str] = []
    real_save = ImageStore.save

    def save_then_interrupt(self, image, *args, **kwargs):
        saved.append(real_save(self, image, *args, **kwargs))
        shared.state.interrupted = True  # pressed while the first image was written
        return saved[-1]

    monkeypatch.setattr(ImageStore, "save", save_then_interrupt)
    request = stored_request(positive_images=[b64(POSITIVE), b64(NEGATIVE)])
    try:
        with caplog.at_level("INFO", logger="negip"):
            p = run(world, request)
    finally:
        shared.state.interrupted = False
    assert p.result is None  # no image
    assert len(saved) == 1
    assert [r.levelname for r in caplog.records if "Interrupted" in r.getMessage()] == ["INFO"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert negip_keys(p) == []
    nothing_left(world.unet)
    # Between the sides' encodings; then a host whose loop does not stop is refused.
    monkeypatch.setattr(ImageStore, "save", real_save)
    encoded: list[int] = []
    features = type(generation_module.MODELS.features).features

    def encode_then_interrupt(self, *args, **kwargs):
        encoded.append(1)
        shared.state.interrupted = True
        return features(self, *args, **kwargs)

    monkeypatch.setattr(type(generation_module.MODELS.features), "features", encode_then_interrupt)
    p = make_p(request, world=world)
    p.scripts.append((_ResetInterrupt(), []))
    try:
        with pytest.raises(NegIPError, match=r"^Interrupted while the image prompts were being"):
            processing.process_images(p)
    finally:
        shared.state.interrupted = False
    assert encoded == [1]  # the negative side was not encoded
    nothing_left(world.unet)
    monkeypatch.undo()
    assert torch.equal(run(world, request).result, run(world, request).result)


def test_an_interrupt_earlier_in_the_job_is_noted_once_per_job(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD upscale calls process_images once per tile and goes on through its tiles after an
    Interrupt: the console said "Interrupted while the image prompts were being prepared:
    nothing was drawn" once per remaining tile, although the interrupt came while a tile was
    sampled and a picture was returned (probe R, real A1111 1.10.1)."""
    request = stored_request()
    monkeypatch.setattr(shared.state, "time_start", 1.0, raising=False)
    monkeypatch.setattr(shared.state, "job_timestamp", "20261207230000", raising=False)
    shared.state.interrupted = True
    try:
        with caplog.at_level("INFO", logger="negip"):
            tiles = [run(world, request) for _ in range(3)]
            monkeypatch.setattr(shared.state, "time_start", 2.0)  # the next request
            run(world, request)
    finally:
        shared.state.interrupted = False
    assert all(p.result is None for p in tiles)
    notes = [r.getMessage() for r in caplog.records if "Interrupted" in r.getMessage()]
    assert len(notes) == 2, notes  # once per job
    assert "not prepared for the rest of this job" in notes[0]
    assert "nothing was drawn" not in notes[0]
    nothing_left(world.unet)


@pytest.mark.parametrize(
    "fields",
    [stored_request(positive_layers="3:1, 16:1"), stored_request(negative_layers="99:1")],
    ids=["positive block out of range", "negative block out of range"],
)
def test_a_request_refused_for_its_blocks_stores_nothing(world: World, fields: dict) -> None:
    # The blocks are checked against the UNet once the images are encoded; the images were
    # stored before that, so every refused request left files behind.
    refused(world, fields, r"_layers")
    assert not store_folder().exists() or not any(store_folder().iterdir())
    run(world, stored_request())  # the same images in a request that is honoured
    assert len(list(store_folder().iterdir())) == 4


def test_with_storing_off_nothing_is_written(world: World) -> None:
    setattr(shared.opts, OPT_STORE_IMAGES, False)
    p = run(world, stored_request())
    assert not store_folder().exists() or not any(store_folder().iterdir())
    params = p.extra_generation_params
    assert params["NegIP images"] == "1 positive / 1 negative"
    assert not any(key in params for key in ("NegIP positive images", "NegIP positive mask"))
    setattr(shared.opts, OPT_STORE_IMAGES, True)
    stored = run(world, stored_request())
    assert torch.equal(stored.result, p.result)  # storing never changes the image
    assert len(list(store_folder().iterdir())) == 4


@pytest.mark.parametrize(
    ("value", "stores"),
    [
        (0, False),
        (0.0, False),
        ("false", False),
        (" OFF ", False),
        ("no", False),
        ("0", False),
        (1, True),
        ("True", True),
        ("on", True),
        ("yes", True),
    ],
)
def test_storing_set_through_the_api_as_a_number_or_a_text_means_what_it_says(
    world: World, value: Any, stores: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A1111 takes any value for a setting through the API, and its Settings tab and GET
    /sdapi/v1/options show 0 or "off" as unticked: storing went on (anything but a real bool
    was the default, True) while the user saw it off."""
    setattr(shared.opts, OPT_STORE_IMAGES, value)
    try:
        with caplog.at_level("WARNING", logger="negip"):
            p = run(world, stored_request())
    finally:
        setattr(shared.opts, OPT_STORE_IMAGES, True)
    assert ("NegIP positive images" in p.extra_generation_params) is stores
    assert ("NegIP images" in p.extra_generation_params) is not stores
    assert (store_folder().exists() and any(store_folder().iterdir())) is stores
    assert "neither true nor false" not in caplog.text


def test_a_checkbox_setting_of_another_value_takes_its_default_with_a_warning(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    setattr(shared.opts, OPT_STORE_IMAGES, "maybe")
    try:
        with caplog.at_level("WARNING", logger="negip"):
            p = run(world, stored_request())
    finally:
        setattr(shared.opts, OPT_STORE_IMAGES, True)
    assert "NegIP positive images" in p.extra_generation_params  # the default: on
    assert "Setting negip_store_images is 'maybe', neither true nor false: using True" in (
        caplog.text
    )


def test_an_infotext_made_with_storing_off_needs_its_images_sent_again(world: World) -> None:
    """The API's restore of such an infotext: a side it counted images for, sent without them,
    is refused (it answered 200 with that side missing); sent again, the result comes back."""
    from lib_negip.args import infotext_hidden_text

    setattr(shared.opts, OPT_STORE_IMAGES, False)
    try:
        made = run(world, stored_request())
    finally:
        setattr(shared.opts, OPT_STORE_IMAGES, True)
    hidden = infotext_hidden_text(made.extra_generation_params)
    assert hidden == "not stored: 1 positive / 1 negative"
    _, failed, _ = refused(
        world,
        stored_request(negative_images=[], infotext_images=hidden),
        r"made with 1 negative image prompt\(s\), which were not stored .* send them in "
        r"negative_images, or set negative_weight to 0\.",
    )
    assert negip_keys(failed) == []
    nothing_left(world.unet)
    refused(
        world,
        stored_request(positive_images=[], negative_images=[], infotext_images=hidden),
        r"made with 1 positive and 1 negative image prompt\(s\).* positive_images and "
        r"negative_images, or set positive_weight and negative_weight to 0\.",
    )
    again = run(world, stored_request(infotext_images=hidden))
    assert torch.equal(again.result, made.result)
    # A side turned off by its weight needs no image; the other side's images still act.
    positive_only = run(
        world, stored_request(negative_images=[], negative_weight=0.0, infotext_images=hidden)
    )
    assert not torch.equal(positive_only.result, made.result)
    params = positive_only.extra_generation_params
    assert "NegIP positive images" in params
    assert "NegIP negative images" not in params
    # The UI refuses the same (its paste said to add the images again; Generate drew without
    # them), in its own words, and draws what the API draws once the side is off or given.
    from lib_negip.args import DEFAULTS, FIELD_ORDER

    def ui_values(**overrides) -> list:
        values = [DEFAULTS[name] for name in FIELD_ORDER]
        for name, value in {"enabled": True, **stored_request(**overrides)}.items():
            values[FIELD_ORDER.index(name)] = value
        return values

    def from_the_ui(values: list) -> processing.Processing:
        p = make_p(None, world=world, is_api=False)
        p.scripts = [(world.script, values)]
        p.result = processing.process_images(p)
        return p

    with pytest.raises(NegIPError) as raised:
        from_the_ui(ui_values(negative_images=[], infotext_images=hidden))
    assert str(raised.value) == (
        "The infotext was made with 1 negative image prompt(s), which were not stored (storing "
        "was off in Settings > Negative Image Prompt), so it cannot give them back: add them to "
        "'Negative images', or set 'Negative weight' to 0."
    )
    assert UI_FORBIDDEN.search(str(raised.value)) is None
    nothing_left(world.unet)
    weight_0 = ui_values(negative_images=[], negative_weight=0.0, infotext_images=hidden)
    assert torch.equal(from_the_ui(weight_0).result, positive_only.result)
    assert torch.equal(from_the_ui(ui_values(infotext_images=hidden)).result, made.result)


# --------------------------------------------------------------------------------------------
# Never silent where the image prompts cannot act


class ForgeLikeWrapper:
    """The stand-in's UNet call on a Forge-shaped model (no ``sd_model.model``)."""

    def __init__(self, denoiser=None):
        self.denoiser = denoiser

    def __call__(self, x, sigma, cond):
        context = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        unet = shared.sd_model.forge_objects.unet.model.diffusion_model
        return unet(x, (sigma * 50).clamp(0, 999), context=context)


class HiddenWrapper:
    """A host whose UNet sits where the extension does not look."""

    def __init__(self, denoiser=None):
        self.denoiser = denoiser

    def __call__(self, x, sigma, cond):
        context = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        unet = shared.sd_model.elsewhere.unet
        return unet(x, (sigma * 50).clamp(0, 999), context=context)


def without_recorder(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The world's recording callback reads ``sd_model.model``: off for other model shapes."""
    entries = script_callbacks.callbacks["cfg_denoiser"]
    kept = [e for e in entries if e.callback != world._record_before]
    monkeypatch.setitem(script_callbacks.callbacks, "cfg_denoiser", kept)


def hide_the_unet(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose model keeps its UNet where the extension does not look (see HiddenWrapper)."""
    without_recorder(world, monkeypatch)
    empty = shared.sd_model.cond_stage_model_empty_prompt
    shared.sd_model = SimpleNamespace(
        elsewhere=SimpleNamespace(unet=world.sd15),
        cond_stage_key="txt",
        cond_stage_model_empty_prompt=empty,
    )
    monkeypatch.setattr(processing, "UNetWrapper", HiddenWrapper)


def use_a1111(world: World) -> None:
    world.use("sd15")


def reference_result(world: World) -> torch.Tensor:
    return run(world, fields_for()).result


def test_a_unet_call_of_another_job_after_a_generation_failed_before_sampling_passes(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A1111 ended a generation with an error after our process (a Hires. fix upscaler that
    does not exist) and called no postprocess: the watch stayed on the UNet and refused the
    next UNet call of another job (training an embedding runs the UNet outside a generation)."""
    reference = reference_result(world)
    real_sample = processing.Processing.sample

    def upscaler_missing(p: Any, x: torch.Tensor) -> torch.Tensor:
        msg = "could not find upscaler named NoSuchUpscaler"
        raise RuntimeError(msg)

    monkeypatch.setattr(shared.state, "time_start", 1.0, raising=False)
    monkeypatch.setattr(shared.state, "job_timestamp", "20261207220000", raising=False)
    monkeypatch.setattr(processing.Processing, "sample", upscaler_missing)
    with pytest.raises(RuntimeError, match="NoSuchUpscaler"):
        run(world, fields_for())
    assert Generation.current is not None  # no postprocess: left until the next generation
    monkeypatch.setattr(shared.state, "time_start", 2.0)  # the training job begins
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = conditioning(1, SD15, seed=2)
    with torch.no_grad():
        out = world.sd15(x, torch.full((1,), 500.0), context=context)
        plain = make_ldm_unet(SD15)(x, torch.full((1,), 500.0), context=context)
    assert torch.equal(out, plain)  # let through, and nothing of ours acted on it
    monkeypatch.setattr(processing.Processing, "sample", real_sample)
    monkeypatch.setattr(shared.state, "time_start", 3.0)  # the next generation ends it
    assert torch.equal(reference_result(world), reference)
    nothing_left(world.sd15)


def test_forge_shaped_model_is_driven(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = reference_result(world)
    plain = plain_result(world)
    without_recorder(world, monkeypatch)
    empty = shared.sd_model.cond_stage_model_empty_prompt
    shared.sd_model = SimpleNamespace(
        forge_objects=SimpleNamespace(
            unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=world.sd15))
        ),
        cond_stage_key="txt",
        cond_stage_model_empty_prompt=empty,
    )
    monkeypatch.setattr(processing, "UNetWrapper", ForgeLikeWrapper)
    forge = run(world, fields_for())
    assert script_callbacks.errors == []
    assert torch.equal(forge.result, reference)
    assert not torch.equal(forge.result, plain)
    assert negip_keys(forge)
    assert all(length > CHUNK for d in forge.denoisers for _, length in d.calls[:1])
    nothing_left(world.sd15)


def test_unet_at_an_unknown_place_fails_from_p_sample(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = reference_result(world)
    hide_the_unet(world, monkeypatch)
    error, p, tb = refused(
        world, fields_for(), r"cannot reach the UNet.*Switch Negative Image Prompt off"
    )
    assert isinstance(error, UnreachedError)
    frames = traceback.extract_tb(tb)
    assert any(f.name == "sample" and f.filename.endswith("generation.py") for f in frames)
    assert p.denoisers == []  # raised from p.sample: no step ran, no image
    assert "sample" not in vars(p)  # p.sample restored
    assert negip_keys(p) == []
    nothing_left(world.sd15)
    # The extension off on that host: the host's own image, untouched.
    assert run(world, None).denoisers
    use_a1111(world)
    monkeypatch.undo()
    assert torch.equal(reference_result(world), reference)


def drop_block_after_ours(world: World, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another extension's callbacks: one after ours replaces the conditioning with copies
    without our block, or a pair that restores what the denoiser had before ours (a denoiser
    that ignores ``params.text_cond``)."""
    entries = list(script_callbacks.callbacks["cfg_denoiser"])
    ours = next(i for i, e in enumerate(entries) if e.name == "negip")
    saved = {}

    def before(params):
        saved["cond"], saved["uncond"] = params.text_cond, params.text_uncond

    def after(params):
        if how == "copies without the block":
            params.text_cond = params.text_cond[:, :CHUNK].clone()
            params.text_uncond = params.text_uncond[:, :CHUNK].clone()
        else:
            params.text_cond, params.text_uncond = saved["cond"], saved["uncond"]

    entries.insert(ours + 1, SimpleNamespace(callback=after, name="other-after"))
    entries.insert(ours, SimpleNamespace(callback=before, name="other-before"))
    monkeypatch.setitem(script_callbacks.callbacks, "cfg_denoiser", entries)


@pytest.mark.parametrize("how", ["copies without the block", "denoiser ignores params"])
def test_unet_that_never_sees_the_tokens_fails(
    world: World, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = reference_result(world)
    drop_block_after_ours(world, how, monkeypatch)
    error, p, _ = refused(world, fields_for(), r"called with a conditioning without them")
    assert isinstance(error, UnreachedError)
    assert negip_keys(p) == []
    # The second UNet call fails (one call without the block is tolerated: another
    # extension's own pass before the sampler's), at the latest in the second step.
    assert len(p.denoisers[0].calls) == 2
    assert len(p.denoisers[0].outputs) <= 1
    nothing_left(world.sd15, world.sdxl)
    monkeypatch.undo()
    assert torch.equal(reference_result(world), reference)


def test_host_that_never_calls_the_denoiser_callback_fails(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = reference_result(world)
    entries = script_callbacks.callbacks["cfg_denoiser"]
    monkeypatch.setitem(
        script_callbacks.callbacks, "cfg_denoiser", [e for e in entries if e.name != "negip"]
    )
    error, p, _ = refused(world, fields_for(), r"on_cfg_denoiser")
    assert isinstance(error, UnreachedError)
    assert negip_keys(p) == []
    nothing_left(world.sd15)
    monkeypatch.undo()
    assert torch.equal(reference_result(world), reference)


# --------------------------------------------------------------------------------------------
# The UI's wording


@pytest.mark.parametrize(
    ("fields", "api_words"),
    [
        (fields_for(negative_noise=0.3), "negative_noise"),
        (fields_for(positive_layers="3:1, 16:1"), "positive_layers"),
        (fields_for(model="no-such-adapter"), "GET /negip/v1/models"),
    ],
    ids=["noise and negative images", "block out of range", "unknown model"],
)
def test_ui_requests_get_the_ui_wording(world: World, fields: dict, api_words: str) -> None:
    error, p, _ = refused(world, fields, r".", is_api=False)
    assert type(error).__name__ == UI_NAME == "Negative Image Prompt"
    assert str(error) == error.ui_message == error.detail
    assert UI_FORBIDDEN.search(str(error)) is None, str(error)
    assert api_words in error.api_message
    assert error.api_message != error.ui_message
    assert negip_keys(p) == []
    # The same request from the API: the API's words, the error's own class name.
    api_error, _, _ = refused(world, fields, re.escape(api_words))
    assert type(api_error).__name__ != UI_NAME
    assert str(api_error) == api_error.api_message == error.api_message
    nothing_left(world.sd15)


def test_ui_wording_of_a_host_that_cannot_be_driven(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide_the_unet(world, monkeypatch)
    error, _, _ = refused(world, fields_for(), r"cannot reach the UNet", is_api=False)
    assert type(error).__name__ == "Negative Image Prompt"
    assert isinstance(error, UnreachedError)
    assert str(error) == error.ui_message == error.detail
    assert UI_FORBIDDEN.search(str(error)) is None
    assert "Switch Negative Image Prompt off" in error.api_message
    nothing_left(world.sd15)


def test_ui_ignores_the_hidden_references_of_a_pasted_infotext(world: World) -> None:
    """After a paste, the UI's file boxes hold the stored images and the hidden field their
    references (for the API); the user then empties the boxes: the UI generation is refused
    for having no image, in the UI's words, instead of using the hidden references (which a
    UI request never loads)."""
    from lib_negip.args import DEFAULTS, FIELD_ORDER

    values = [DEFAULTS[name] for name in FIELD_ORDER]
    named = {
        "enabled": True,
        "model": "tiny-base_sd15",
        "image_encoder": "auto",
        "positive_images": [],
        "negative_images": [],
        "infotext_images": "positive images: 0123456789abcdef",
    }
    for name, value in named.items():
        values[FIELD_ORDER.index(name)] = value
    p = make_p(None, world=world, is_api=False)
    p.scripts = [(world.script, values)]
    with pytest.raises(NegIPError) as raised:
        processing.process_images(p)
    assert type(raised.value).__name__ == UI_NAME
    assert "has no image" in str(raised.value)
    nothing_left(world.sd15)


def test_auto_order_prefers_official_then_general_adapters() -> None:
    """'auto' ranks the family's official base adapter first, then base before plus before
    full-face, adapters for faces after the general ones, then names; other families and
    unreadable files never."""
    from lib_negip.webui.models import auto_adapter_order

    def entry(name: str, variant: str, width: int = 768, layers: int = 16) -> SimpleNamespace:
        spec = SimpleNamespace(variant=variant, cross_attention_dim=width, num_layers=layers)
        return SimpleNamespace(name=name, spec=spec)

    entries = [
        entry("ip-adapter-full-face_sd15", "full_face"),
        entry("ip-adapter-plus-face_sd15", "plus"),
        entry("ip-adapter-plus_sd15", "plus"),
        entry("my-light", "base"),
        entry("ip-adapter_sd15", "base"),
        entry("ip-adapter_sdxl", "base", width=2048, layers=70),
        SimpleNamespace(name="broken", spec=None),
    ]
    order = [e.name for e in auto_adapter_order(entries, 768, 16)]
    assert order == [
        "ip-adapter_sd15",
        "my-light",
        "ip-adapter-plus_sd15",
        "ip-adapter-plus-face_sd15",
        "ip-adapter-full-face_sd15",
    ]
    sdxl = [e.name for e in auto_adapter_order(entries, 2048, 70)]
    assert sdxl == ["ip-adapter_sdxl"]


@pytest.mark.parametrize(
    ("width", "download_on", "offered"),
    [(768, False, True), (768, True, False), (64, False, False), (64, True, False)],
)
def test_auto_refusal_offers_a_download_only_where_one_can_help(
    monkeypatch: pytest.MonkeyPatch, width: int, download_on: bool, offered: bool
) -> None:
    """ "No installed IP-Adapter fits" told the user to switch the download setting on when it
    was on already, and for a family with no official adapter, where no download can help."""
    from lib_negip import unet_layers
    from lib_negip.errors import IncompatibleModelError
    from lib_negip.webui import models as webui_models

    layers = [SimpleNamespace(context_dim=width)] * 16
    monkeypatch.setattr(unet_layers, "cross_attention_layers", lambda unet: layers)
    monkeypatch.setattr(webui_models, "setting_bool", lambda key: download_on)
    monkeypatch.setattr(webui_models, "_download_official", lambda name: False)
    spec = SimpleNamespace(family="SDXL", cross_attention_dim=2048, num_layers=70, variant="base")
    registry = SimpleNamespace(
        adapters=lambda: [SimpleNamespace(name="ip-adapter_sdxl", spec=spec)],
        refresh=lambda: None,
    )
    with pytest.raises(IncompatibleModelError, match="no installed IP-Adapter fits") as raised:
        webui_models.resolve_auto_adapter(registry, object(), "auto")
    api, ui = str(raised.value), raised.value.ui
    assert "ip-adapter_sdxl (SDXL)" in api
    assert ("switch 'Download missing official" in api) is (offered and not download_on)
    assert ("'Download official models'" in ui) is (width == 768)
    assert "put" in ui.lower()
    assert "refresh button" in ui


def test_another_extensions_own_unet_pass_before_the_samplers_is_tolerated(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extension that runs the UNet once on its own (a conditioning without our block)
    before the sampler's first call does not fail the generation: the image prompts still
    act in the sampler's calls."""
    reference = reference_result(world)
    passes = []

    def own_pass(params) -> None:
        if not passes:  # once, in the first denoiser call, after our callback
            text = params.text_uncond[:, :77] if params.text_uncond.shape[1] > 77 else None
            if text is not None:
                world.unet(params.x[:1], torch.full((1,), 500.0), context=text[:1])
                passes.append(True)

    script_callbacks.callbacks["cfg_denoiser"].append(SimpleNamespace(callback=own_pass, name="x"))
    result = run(world, fields_for()).result
    assert passes == [True]
    assert torch.equal(result, reference)


def test_png_info_buttons_are_wired_when_the_png_info_picture_is_made(world: World) -> None:
    """The PNG Info tab is made after both generation tabs, outside their scripts' reach: the
    entry script registers an after-component callback that connects each tab's waiting
    "PNG Info image" buttons to that picture once, and ignores every other component."""
    from modules import script_callbacks

    from lib_negip.webui import ui

    callbacks = [entry.callback for entry in script_callbacks.callbacks["after_component"]]
    assert callbacks == [ui.on_after_component]

    wired: list[tuple[str, object]] = []
    ui.PENDING_PNG_INFO.clear()
    ui.PENDING_PNG_INFO["txt2img"] = lambda component: wired.append(("txt2img", component))
    ui.PENDING_PNG_INFO["img2img"] = lambda component: wired.append(("img2img", component))
    other = SimpleNamespace(elem_id="txt2img_gallery")
    picture = SimpleNamespace(elem_id=ui.PNG_INFO_IMAGE)
    script_callbacks.run("after_component", other)
    assert wired == []
    script_callbacks.run("after_component", picture)
    assert wired == [("txt2img", picture), ("img2img", picture)]
    assert ui.PENDING_PNG_INFO == {}
    script_callbacks.run("after_component", picture)  # a second picture: nothing left to wire
    assert len(wired) == 2

    # a wiring that fails is logged; the other tab's buttons are still connected
    def broken(component: object) -> None:
        raise ValueError("no such event")

    ui.PENDING_PNG_INFO["txt2img"] = broken
    ui.PENDING_PNG_INFO["img2img"] = lambda component: wired.append(("img2img", component))
    script_callbacks.run("after_component", picture)
    assert wired[-1] == ("img2img", picture)
    assert script_callbacks.errors == []


def test_added_pictures_are_read_like_uploads() -> None:
    """The "➕" buttons' pictures (a result, img2img's input, the PNG Info tab's RGBA picture)
    become PNG files the way an uploaded file is read: transparency over white; the side's
    files already there keep their order; no picture adds nothing."""
    from lib_negip.webui import ui

    picture = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    picture.putpixel((0, 0), (0, 0, 0, 0))  # transparent
    existing = b"bytes of a file the side already holds"
    paths = ui.add_input_image(picture, [existing])
    assert len(paths) == 2
    assert Path(paths[0]).read_bytes() == existing
    added = Image.open(paths[1])
    assert added.mode == "RGB"
    assert added.getpixel((0, 0)) == (255, 255, 255)
    assert added.getpixel((1, 1)) == (10, 20, 30)
    assert Path(paths[1]).name == f"{reference_of(added)}.png"
    # the inpaint editor's {"image": ..., "mask": ...}; nothing to add leaves the side as it is
    # (an empty list took away gradio's upload area, seen in a real A1111)
    assert ui.add_input_image({"image": picture, "mask": None}, None) == [paths[1]]
    assert ui.add_input_image(None, [existing]) == {"__type__": "update"}
    assert ui.add_input_image(None, None) == {"__type__": "update"}
    assert ui.add_image(None, None) == {"__type__": "update"}


def test_files_in_a_box_keep_their_names_through_a_plus_and_print_short() -> None:
    """The file boxes hand over bytes (``type="binary"``), so ➕ gave the files already there
    back under 16 hex digits of their content, which looked like stored references. They now
    come as :class:`ui.Upload` with their names, which ➕ keeps (two files of one name stay
    apart); and their ``repr`` is short: A1111 prints a failed UI request's arguments, 128 KB
    of escaped image bytes per failure."""
    from lib_negip.webui import ui

    class Box:  # gradio 3's File: a list of dicts in, a list of bytes out
        def preprocess(self, payload):
            return None if payload is None else [entry["data"] for entry in payload]

    box = Box()
    ui._name_uploads(box)
    one, two = b"first picture", b"second picture"
    uploads = box.preprocess(
        [
            {"name": "/tmp/gradio/1a/house.png", "orig_name": "house.png", "data": one},
            {"name": "/tmp/gradio/2b/house.png", "data": two},  # no orig_name: the path's
        ]
    )
    assert uploads == [one, two]
    assert all(isinstance(upload, ui.Upload) for upload in uploads)
    assert [upload.file_name for upload in uploads] == ["house.png", "house.png"]
    assert repr(uploads[0]) == "<upload 'house.png', 13 bytes>"
    assert box.preprocess(None) is None
    # gradio 4 (Forge): a ListFiles-like payload whose root holds FileData objects
    payload = SimpleNamespace(root=[SimpleNamespace(orig_name="lawn.webp", path="/tmp/x/lawn")])

    class Box4:
        def preprocess(self, payload):
            return [b"a lawn"]

    box4 = Box4()
    ui._name_uploads(box4)
    (lawn,) = box4.preprocess(payload)
    assert lawn.file_name == "lawn.webp"

    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    odd = ui._upload(b"third", {"orig_name": "..\\a:b*?.png"})
    dots = ui._upload(b"fourth", {"orig_name": ".."})
    paths = [Path(path) for path in ui.add_input_image(picture, [*uploads, odd, dots])]
    assert [path.name for path in paths[:2]] == ["house.png", "house.png"]
    assert paths[0] != paths[1]
    assert [path.read_bytes() for path in paths[:2]] == [one, two]
    assert paths[2].name == ".._a_b__.png"
    assert paths[2].parent.parent == paths[0].parent.parent  # inside the ➕ folder
    assert re.fullmatch(r"[0-9a-f]{16}\.png", paths[3].name)  # no name left: its content's
    assert paths[4].name == f"{reference_of(picture)}.png"


def test_added_pictures_go_to_a_folder_of_this_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a fixed name under the shared temporary folder, which another user of the machine
    could make first, with a link under the name ➕ writes to (or a picture of theirs under the
    name it reuses): a new folder with mode 0700, made again if it was removed."""
    import os
    import stat

    from lib_negip.webui import ui

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ui, "_FOLDER", [])
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    planted = tmp_path / "negip-ui" / f"{reference_of(picture)}.png"  # the old fixed place
    planted.parent.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted.symlink_to(victim)
    (path,) = ui.add_input_image(picture, None)
    folder = Path(path).parent
    assert folder.parent == tmp_path
    assert folder.name.startswith("negip-ui-")
    assert folder != planted.parent
    assert victim.read_text() == "keep me"
    if os.name == "posix":
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert Image.open(path).getpixel((0, 0)) == (10, 20, 30)
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()  # removed under the running server (a temp cleaner): made anew
    (again,) = ui.add_input_image(picture, None)
    assert Path(again).is_file()


def test_folders_of_stopped_servers_are_removed_at_the_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A1111 leaves on Ctrl+C with ``os._exit``, which skips the exit handler that removes the
    folder: each start left one under the temporary folder. The first ➕ removes those whose
    process is gone, and nothing of a running process, of an older version or behind a link."""
    import os
    import subprocess
    import sys

    from lib_negip.webui import ui

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ui, "_FOLDER", [])
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    gone = int(ended.stdout)
    assert ui._process_runs(gone) is False
    assert ui._process_runs(os.getppid()) is True

    def planted(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "picture.png").write_bytes(b"x")
        return folder

    abandoned = planted(f"negip-ui-{gone}-abc123")
    reused_pid = planted(f"negip-ui-{os.getpid()}-old")  # a restart gave this process its id
    running = planted(f"negip-ui-{os.getppid()}-def456")
    older_version = planted("negip-ui-1r3zz0b1")
    unrelated = planted(f"other-{gone}-x")
    victim = planted("victim")
    (tmp_path / f"negip-ui-{gone}-link").symlink_to(victim, target_is_directory=True)
    (path,) = ui.add_input_image(Image.new("RGB", (8, 8), (1, 2, 3)), None)
    assert not abandoned.exists()
    assert not reused_pid.exists()
    for kept in (running, older_version, unrelated, victim):
        assert (kept / "picture.png").is_file(), kept
    folder = Path(path).parent
    assert folder.name.startswith(f"negip-ui-{os.getpid()}-")
    # Later uses do not look again; a folder made for this process is never taken for another's.
    planted(f"negip-ui-{gone}-later")
    ui.add_input_image(Image.new("RGB", (8, 8), (4, 5, 6)), None)
    assert (tmp_path / f"negip-ui-{gone}-later").is_dir()
    assert len(list(folder.iterdir())) == 2


def test_img2img_input_is_the_picture_of_the_sub_tab_in_view() -> None:
    """ "➕ img2img input" takes the picture of the img2img sub-tab the browser says is in view
    (img2img, Sketch, Inpaint's {"image", "mask"}, Inpaint sketch, Inpaint upload), nothing on
    the Batch sub-tab, and the first picture there is when the browser could not tell."""
    from lib_negip.webui import ui

    pictures = [Image.new("RGB", (8, 8), (40 * i, 10, 10)) for i in range(5)]
    editors: list = [*pictures]
    editors[2] = {"image": pictures[2], "mask": Image.new("RGBA", (8, 8))}
    assert len(editors) == len(ui.IMG2IMG_EDITORS)

    def added(tab, editors=editors):
        paths = ui.add_editor_image(*editors, None, tab)
        if paths == {"__type__": "update"}:  # no change: nothing to add
            return None
        return Path(paths[0]).name

    for index, shown in enumerate(pictures):
        assert added(index) == f"{reference_of(shown)}.png"
        assert added(float(index)) == added(index)  # gradio's Number sends a float
    assert added(5) is None  # Batch
    assert added(-1) == f"{reference_of(pictures[0])}.png"
    assert added(None) == added(-1)
    only_inpaint = [None, None, editors[2], None, None]
    assert added(-1, only_inpaint) == f"{reference_of(pictures[2])}.png"
    assert added(0, only_inpaint) is None  # the img2img sub-tab in view holds nothing


def test_mask_input_asks_for_the_sketch_tool_on_gradio_3_only() -> None:
    """gradio 3 (A1111) gets the sketch tool; gradio 4 (Forge) only warns about ``source`` and
    ``tool``, so they are not passed there; a gradio that refuses them gets an upload box."""
    from lib_negip.webui import ui

    def fake_gradio(version: str, refuses: bool = False) -> SimpleNamespace:
        made: list[dict] = []

        def image(**kwargs):
            if refuses and "tool" in kwargs:
                raise TypeError("unexpected keyword argument 'tool'")
            made.append(kwargs)
            return kwargs

        return SimpleNamespace(__version__=version, Image=image, made=made)

    gradio3, gradio4, strict = (
        fake_gradio("3.41.2"),
        fake_gradio("4.40.0"),
        fake_gradio("3.9", True),
    )
    for gr in (gradio3, gradio4, strict):
        ui._mask_input(gr, "Positive mask", "negip_txt2img_positive_mask")
        assert len(gr.made) == 1
        assert gr.made[0]["elem_id"] == "negip_txt2img_positive_mask"
        assert gr.made[0]["image_mode"] == "RGBA"
    assert gradio3.made[0]["tool"] == "sketch"
    assert "tool" not in gradio4.made[0]
    assert "source" not in gradio4.made[0]
    assert "tool" not in strict.made[0]


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"NegIP enabled": "maybe"}, "'NegIP enabled'"),
        ({"NegIP positive weight": "abc"}, "'NegIP positive weight'"),
        ({"NegIP negative start": "x"}, "'NegIP negative start'"),
        ({"NegIP negative noise": "x"}, "'NegIP negative noise'"),
        ({"NegIP positive images": "12345"}, "12345"),
    ],
    ids=["switch", "weight", "start", "noise", "reference"],
)
def test_a_malformed_infotext_value_is_refused_where_a1111_reads_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, entry: dict, named: str
) -> None:
    """A1111 reads the switch first of our infotext fields, for the API's ``infotext`` and for a
    paste. A malformed NegIP value is answered there with 422 naming it (one log line), before
    A1111's own float() of a number fails with HTTP 500; after a paste in the UI the accordion
    says which value was not restored, in the UI's words."""
    import gradio

    from lib_negip.webui import ui

    monkeypatch.setattr(gradio, "update", lambda **kwargs: kwargs, raising=False)
    params = {"Steps": "4", "NegIP model": "tiny-base_sd15", **entry}
    with caplog.at_level("ERROR", logger="negip"), pytest.raises(NegIPError) as raised:
        ui.infotext_switch(params)
    assert raised.value.status_code == 422
    assert named in raised.value.detail
    assert "JSON" not in raised.value.detail  # an infotext is all text: no "send JSON numbers"
    assert [r.getMessage() for r in caplog.records] == [
        f"Negative Image Prompt: {raised.value.api_message}"
    ]
    status = ui.restore_message(params)["value"]
    assert "were not restored" in status
    assert named.replace("'", "&#x27;") in status
    assert UI_FORBIDDEN.search(status) is None
    # Well-formed infotexts: the switch as written (on wherever a NegIP key is present).
    assert ui.infotext_switch({"NegIP model": "m"}) is True
    assert ui.infotext_switch({"NegIP model": "m", "NegIP enabled": "False"}) is False
    assert ui.infotext_switch({"Steps": "4"}) is False
    assert ui.restore_message({"NegIP model": "m"}) == {"value": ""}
    # A paste in the UI: none of ours is restored (A1111 would convert the well-formed values
    # on their own), the switch goes off, the images stay, the accordion says why.
    pasted = {**params, "NegIP negative weight": "0.35"}
    caplog.clear()
    with caplog.at_level("ERROR", logger="negip"):
        ui.on_infotext_pasted("", pasted)
    assert len(caplog.records) == 1
    assert [key for key in pasted if key.startswith("NegIP")] == []
    assert ui.RESTORE_ERROR in pasted
    assert ui.infotext_switch(pasted) is False
    assert ui.restore_images("positive_images", pasted) is None
    assert ui._infotext_images(pasted) == ""  # nothing an earlier paste left there
    status = ui.restore_message(pasted)["value"]
    assert "were not restored, and Negative Image Prompt was switched off" in status
    assert named.replace("'", "&#x27;") in status
    well_formed = {"NegIP model": "m", "NegIP negative weight": "0.35"}
    ui.on_infotext_pasted("", well_formed)
    assert well_formed["NegIP model"] == "m"
    assert well_formed["NegIP negative weight"] == "0.35"
    assert well_formed[ui.UI_PASTE] == "yes"
    assert well_formed["NegIP positive layers"] == "all"  # an absent key: the default


def test_a_paste_that_restores_a_mask_or_a_window_opens_their_accordion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The masks, step windows, Hires. fix pass and combine mode sit in the closed "Masks and
    step windows" accordion: a paste that restored a mask there left it closed, so the user did
    not see that the next Generate uses one. The API's restore passes over the accordion (it is
    no script input)."""
    import gradio

    from lib_negip.webui import ui

    monkeypatch.setattr(gradio, "update", lambda **kwargs: kwargs, raising=False)
    base = {"NegIP model": "m", "NegIP positive weight": "0.8"}
    opened = {"open": True}
    assert ui.open_more({**base, "NegIP negative mask": "00112233445566ff"}) == opened
    assert ui.open_more({**base, "NegIP positive start": "0.25"}) == opened
    assert ui.open_more({**base, "NegIP negative end": "0.5"}) == opened
    assert ui.open_more({**base, "NegIP combine": "concat"}) == opened
    assert ui.open_more({**base, "NegIP hires pass": "second"}) == opened
    # img2img has no Hires. fix: its pass is not restored there
    assert ui.open_more({**base, "NegIP hires pass": "second"}, is_img2img=True) is None
    # defaults written out, no NegIP values, or a paste refused: left as it is
    defaults = {
        **base,
        "NegIP positive start": "0",
        "NegIP positive end": "1",
        "NegIP combine": "average",
    }
    assert ui.open_more(defaults) is None
    assert ui.open_more({"Steps": "4"}) is None
    assert ui.open_more({ui.RESTORE_ERROR: "bad", "Steps": "4"}) is None
    assert ui.open_more({**base, "NegIP positive start": "abc"}) is None
    # the status line of a paste is cleared once the user switches the extension on again
    off = (
        "... are not in outputs/negip-image-prompts ..., and switch Negative Image Prompt on again."
    )
    error = "... were not restored, and Negative Image Prompt was switched off: ..."
    unstored = "... were not stored when it was made ...: add them to the sides again ..."
    assert ui._clear_status_when_on(True, off) == {"value": ""}
    assert ui._clear_status_when_on(True, error) == {"value": ""}
    assert ui._clear_status_when_on(False, off) == {}  # the paste itself switching it off
    assert ui._clear_status_when_on(True, unstored) == {}  # that paste leaves it on: it stays
    assert ui._clear_status_when_on(True, None) == {}
    # a value of the accordion's changed while it was closed (Send to img2img copies them)
    assert ui._open_if_not_default("positive_start", 0.5) == opened
    assert ui._open_if_not_default("positive_start", 0) == {}
    assert ui._open_if_not_default("negative_end", 1.0) == {}
    assert ui._open_if_not_default("combine", "concat") == opened
    assert ui._open_if_not_default("combine", "average") == {}
    assert ui._open_if_not_default("negative_end", "junk") == opened
    # the accordion is the last pair of the fields, after the status line
    accordion = object()
    from lib_negip.args import FIELD_ORDER

    components = {name: object() for name in ("enabled", *FIELD_ORDER)}
    fields = ui.infotext_fields(components, False, object(), accordion)
    assert fields[-1][0] is accordion
    assert fields[-1][1]({**base, "NegIP positive mask": "00112233445566ff"}) == opened


def test_a_paste_of_an_infotext_made_with_storing_off_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storing off, the infotext only counts the images: after a paste the accordion says they
    were not stored, instead of leaving empty boxes for a generic refusal at Generate."""
    import gradio

    from lib_negip.webui import ui

    monkeypatch.setattr(gradio, "update", lambda **kwargs: kwargs, raising=False)
    params = {"NegIP model": "m", "NegIP images": "1 positive / 2 negative"}
    status = ui.restore_message(params)["value"]
    assert "(1 positive, 2 negative) were not stored" in status
    assert "add them to the sides again" in status
    assert UI_FORBIDDEN.search(status) is None
    assert ui.restore_message({"NegIP model": "m", "NegIP images": "0 positive / 0 negative"}) == {
        "value": ""
    }
    # A later paste without NegIP keys clears what an earlier paste said (it stayed), and the
    # hidden field's counts, which would refuse a generation the user switched on again; the
    # API's restore (no paste callback) leaves the request's own value.
    assert ui.restore_message({"Steps": "4", "Seed": "3"}) == {"value": ""}
    plain = {"Steps": "4", "Seed": "3"}
    assert ui._infotext_images(plain) is None
    ui.on_infotext_pasted("", plain)
    assert ui._infotext_images(plain) == ""
    unstored = {"NegIP model": "m", "NegIP images": "1 positive / 2 negative"}
    ui.on_infotext_pasted("", unstored)
    assert ui._infotext_images(unstored) == "not stored: 1 positive / 2 negative"


def test_a_paste_with_missing_stored_images_switches_the_extension_off(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UI paste whose stored images are partly gone restores the rest but switches the
    extension off, so that Generate does not make the image without them (the API answers 422
    for the same infotext)."""
    import gradio

    from lib_negip.store import ImageStore
    from lib_negip.webui import ui

    monkeypatch.setattr(gradio, "update", lambda **kwargs: kwargs, raising=False)
    present = ImageStore(store_folder()).save(POSITIVE)
    gone = reference_of(NEGATIVE)
    assert not (store_folder() / f"{gone}.png").exists()
    params = {
        "NegIP model": "tiny-base_sd15",
        "NegIP positive images": present,
        "NegIP negative images": gone,
        "NegIP negative weight": "0.35",
    }
    ui.on_infotext_pasted("", params)
    assert params["NegIP negative weight"] == "0.35"  # the rest is restored
    assert ui.infotext_switch(params) is False
    assert ui.restore_images("positive_images", params)["value"] == [
        str(store_folder() / f"{present}.png")
    ]
    status = ui.restore_message(params)["value"]
    assert gone in status
    assert "switch Negative Image Prompt on again" in status
    complete = {"NegIP model": "tiny-base_sd15", "NegIP positive images": present}
    ui.on_infotext_pasted("", complete)
    assert ui.infotext_switch(complete) is True


@pytest.mark.parametrize("damage", ["garbage", "other picture", "too large"])
def test_a_paste_with_a_damaged_stored_file_switches_the_extension_off(
    world: World, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """A stored image or mask whose file no longer gives its image back (unreadable, another
    picture, more pixels than accepted) is not put into its box: the paste had raised from
    ``restore_images`` (A1111 logged it, left the box as it was, and the API's restore answered
    500 with the server's path) or put the other picture in under the restored reference."""
    import gradio

    from lib_negip.store import ImageStore
    from lib_negip.webui import ui

    monkeypatch.setattr(gradio, "update", lambda **kwargs: kwargs, raising=False)
    store = ImageStore(store_folder())
    image = store.save(POSITIVE)
    mask = store.save(mask_image("a").convert("L"))
    params = {
        "NegIP model": "tiny-base_sd15",
        "NegIP positive images": image,
        "NegIP positive mask": mask,
    }
    for reference in (image, mask):
        path = store_folder() / f"{reference}.png"
        if damage == "garbage":
            path.write_bytes(b"garbage, not a png")
        elif damage == "other picture":
            Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
        else:
            path.write_bytes(png_header(9000, 9000))  # 81 M pixels, no data
    ui.on_infotext_pasted("", params)
    assert ui.infotext_switch(params) is False
    assert ui.restore_images("positive_images", params) == {"value": None}
    assert ui.restore_images("positive_mask", params) == {"value": None}
    status = ui.restore_message(params)["value"]
    assert "2 image prompt(s) of this infotext cannot be restored" in status, status
    if damage == "too large":
        assert "81,000,000 pixels; at most 67,108,864" in status, status
    assert image in status, status
    assert mask in status, status
    assert str(store_folder()) not in status  # the folder as the data folder names it
    assert "switch Negative Image Prompt on again" in status, status
    assert UI_FORBIDDEN.search(status) is None, status
    # The API's restore of the same infotext: 422 naming the reference, no server path.
    error, _, _ = refused(
        world,
        stored_request(
            positive_images=OMIT,
            positive_mask=OMIT,
            infotext_images=format_references(
                {"positive_images": [image], "positive_mask": [mask]}
            ),
        ),
        rf"stored (image prompt )?{image}",
    )
    assert str(store_folder()) not in str(error)
    # Stored again by a generation with the images: the paste restores them.
    run(world, stored_request(positive_mask=b64(mask_image("a"))))
    again = {key: value for key, value in params.items() if key.startswith("NegIP")}
    ui.on_infotext_pasted("", again)
    assert ui.infotext_switch(again) is True
    assert ui.restore_message(again) == {"value": ""}


def test_a_mask_box_hands_over_what_its_decoding_could_not_read(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradio decodes a mask upload before our code runs; a file it cannot decode failed the
    request inside gradio (no reason in the page, later Generates hung). The mask boxes hand
    the failure over, and the generation refuses it by the mask's name."""
    import gradio
    from PIL import UnidentifiedImageError

    from lib_negip.images import UnreadableUpload
    from lib_negip.webui import ui

    class Box:
        def preprocess(self, value):
            if value == "broken":
                raise UnidentifiedImageError("cannot identify image file <_io.BytesIO>")
            return value

    monkeypatch.setattr(gradio, "__version__", "3.41.2", raising=False)
    monkeypatch.setattr(gradio, "Image", lambda **kwargs: Box(), raising=False)
    box = ui._mask_input(gradio, "Positive mask", "negip_txt2img_positive_mask")
    assert box.preprocess("fine") == "fine"
    handed = box.preprocess("broken")
    assert isinstance(handed, UnreadableUpload)
    from lib_negip.args import DEFAULTS, FIELD_ORDER

    values = [DEFAULTS[name] for name in FIELD_ORDER]  # the UI's components at Generate
    for name, value in {"enabled": True, **fields_for(), "positive_mask": handed}.items():
        values[FIELD_ORDER.index(name)] = value
    p = make_p(None, world=world, is_api=False)
    p.scripts = [(world.script, values)]
    with pytest.raises(NegIPError) as raised:
        processing.process_images(p)
    assert "'Positive mask': The uploaded file is not an image file" in raised.value.ui_message
    nothing_left(world.unet)


def test_a_sketch_mask_box_sending_its_picture_alone_gives_that_mask(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradio 3's sketch box sends a bare data URL, not its tool's {"image", "mask"}, after a
    paste restored the mask it already held (PNG Info's Send to twice, probe AE in a real A1111
    1.10.1): gradio's decoding asserted the dict, and every Generate of the page was refused as
    a damaged upload. The picture is the mask: the same image as the API's."""
    import gradio

    from lib_negip.args import DEFAULTS, FIELD_ORDER
    from lib_negip.webui import ui

    class SketchBox:  # gradio 3.41's Image(tool="sketch") as far as decoding goes
        tool = "sketch"

        def preprocess(self, value):
            assert isinstance(value, dict)
            return value

    monkeypatch.setattr(gradio, "__version__", "3.41.2", raising=False)
    monkeypatch.setattr(gradio, "Image", lambda **kwargs: SketchBox(), raising=False)
    box = ui._mask_input(gradio, "Positive mask", "negip_txt2img_positive_mask")
    handed = box.preprocess("data:image/png;base64," + b64(mask_image("a")))
    values = [DEFAULTS[name] for name in FIELD_ORDER]  # the UI's components at Generate
    for name, value in {"enabled": True, **fields_for(), "positive_mask": handed}.items():
        values[FIELD_ORDER.index(name)] = value
    p = make_p(None, world=world, is_api=False)
    p.scripts = [(world.script, values)]
    from_ui = processing.process_images(p)
    api = run(world, fields_for(positive_mask=b64(mask_image("a"))))
    assert torch.equal(from_ui, api.result)
    unmasked = run(world, fields_for())
    assert not torch.equal(from_ui, unmasked.result)


def test_a_16_bit_mask_upload_is_decoded_by_the_extension_not_clipped_by_gradio(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gradio converts a mask upload to the box's RGBA, which clips a 16-bit grey mask to white:
    in the UI the mask was all white (no mask), through the API it scaled (probe AG). The
    picture of a deep upload is decoded by the extension; an 8-bit one stays gradio's."""
    import gradio

    from lib_negip.args import _parse_mask
    from lib_negip.webui import ui

    class ClippingBox:  # gradio's decoding as far as depth goes: convert("RGBA") clips
        def __init__(self, sketch: bool) -> None:
            self.tool = "sketch" if sketch else None

        def preprocess(self, value):
            def read(part):
                if isinstance(part, dict):
                    part = Path(part["path"]).read_bytes()
                else:
                    part = base64.b64decode(part.split(",", 1)[1])
                return Image.open(io.BytesIO(part)).convert("RGBA")

            if self.tool == "sketch":
                return {"image": read(value["image"]), "mask": read(value["mask"])}
            return read(value)

    values = np.zeros((8, 8), dtype="<u2")
    values[:, :4], values[:, 4:] = 16384, 32768  # 25 % and 50 % grey, in 16 bits
    deep = tmp_path / "deep.png"
    Image.frombytes("I;16", (8, 8), values.tobytes()).save(deep)
    shallow = tmp_path / "shallow.png"
    mask_image("a", (8, 8)).save(shallow)
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(blank)

    def url(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    monkeypatch.setattr(gradio, "__version__", "3.41.2", raising=False)
    monkeypatch.setattr(gradio, "Image", lambda **kwargs: ClippingBox(True), raising=False)
    box = ui._mask_input(gradio, "Positive mask", "negip_txt2img_positive_mask")
    api = np.asarray(_parse_mask("positive_mask", url(deep)))
    assert sorted(set(api.ravel().tolist())) == [64, 128]
    handed = box.preprocess({"image": url(deep), "mask": url(blank)})
    assert np.array_equal(np.asarray(_parse_mask("positive_mask", handed)), api)
    handed = box.preprocess({"image": url(shallow), "mask": url(blank)})
    assert isinstance(handed["image"], Image.Image)  # gradio's, as before
    # gradio 4 (Forge): a file
    monkeypatch.setattr(gradio, "__version__", "4.40.0", raising=False)
    monkeypatch.setattr(gradio, "Image", lambda **kwargs: ClippingBox(False), raising=False)
    box = ui._mask_input(gradio, "Positive mask", "negip_txt2img_positive_mask")
    handed = box.preprocess({"path": str(deep)})
    assert np.array_equal(np.asarray(_parse_mask("positive_mask", handed)), api)


def test_a_mask_upload_of_a_format_not_read_here_never_reaches_gradios_decoding(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gradio decodes a mask upload with Pillow before our code runs, and Pillow hands an EPS
    to Ghostscript: the box refuses it from its header first, in gradio 3's forms (a data URL,
    the sketch tool's dict of them) and gradio 4's (a file with a path)."""
    import gradio

    from lib_negip.images import UnreadableUpload
    from lib_negip.webui import ui

    decoded: list[Any] = []

    class Box:
        def preprocess(self, value):
            decoded.append(value)
            return value

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    eps_url = "data:application/postscript;base64," + base64.b64encode(eps).decode()
    eps_file = tmp_path / "mask.eps"
    eps_file.write_bytes(eps)
    png_url = "data:image/png;base64," + b64(mask_image("a"))
    png_file = tmp_path / "mask.png"
    mask_image("a").save(png_file)
    monkeypatch.setattr(gradio, "Image", lambda **kwargs: Box(), raising=False)
    for version in ("3.41.2", "4.40.0"):
        monkeypatch.setattr(gradio, "__version__", version, raising=False)
        box = ui._mask_input(gradio, "Positive mask", "negip_txt2img_positive_mask")
        for refused in (
            eps_url,
            {"image": eps_url, "mask": png_url},
            {"path": str(eps_file)},
            SimpleNamespace(path=str(eps_file)),
        ):
            handed = box.preprocess(refused)
            assert isinstance(handed, UnreadableUpload), refused
            assert "not an image file that can be read" in handed.reason
        assert decoded == []
        for accepted in (png_url, {"image": png_url, "mask": png_url}, {"path": str(png_file)}):
            assert box.preprocess(accepted) == accepted
        assert box.preprocess(None) is None  # an empty box
        decoded.clear()


def test_stored_images_are_counted_and_budgeted_before_any_is_read(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An infotext can name one stored image many times: the references are counted, and the
    pixels the files' headers declare are budgeted, before any file is decoded."""
    from lib_negip.store import ImageStore

    big = Image.new("RGB", (4096, 4096), (200, 30, 30))  # 16 Mi pixels
    ref = ImageStore(store_folder()).save(big)
    loads = []
    real_load = ImageStore.load
    monkeypatch.setattr(
        ImageStore, "load", lambda self, *a, **k: loads.append(a) or real_load(self, *a, **k)
    )
    restore = {
        "positive_images": OMIT,
        "negative_images": [],
        "positive_mask": None,
        "negative_mask": None,
    }
    refused(
        world,
        stored_request(
            **restore, infotext_images=format_references({"positive_images": [ref] * 17})
        ),
        r"names 17 stored images for positive_images; at most 16 per side are accepted",
    )
    refused(
        world,
        stored_request(
            **restore, infotext_images=format_references({"positive_images": [ref] * 4})
        ),
        r"positive_images \(stored [0-9a-f]{16}\): the image prompts of this generation hold "
        r"[\d,]+ pixels together; at most 50,331,648 are accepted",
    )
    assert loads == []
    nothing_left(world.unet)


@pytest.mark.parametrize("first", [1000, -5])
def test_a_noise_negative_restores_for_every_image_of_a_batch(world: World, first: int) -> None:
    """The noise is seeded with the generation's first seed, which the infotext names: image 2
    of a batch (its own seed 1001) restored from its infotext gets the batch's noise back, by
    the API and in the UI; a seed changed after the restore makes new noise, as always. A1111
    keeps a negative seed other than -1 ("Seed: -4"): its restore was refused ("'Seed' must be
    a whole number of at least 0")."""
    from lib_negip.args import DEFAULTS, FIELD_ORDER, parse_infotext

    negatives: list[torch.Tensor] = []

    def negative_tokens(params) -> None:
        if Generation.current is not None and len(negatives) < runs:
            negatives.append(Generation.current.session.prompt.negative.tokens.clone())

    script_callbacks.on_cfg_denoiser(negative_tokens)
    fields = noise_fields(negative_noise=0.5)
    runs = 1
    p = make_p(fields, world=world, batch=2)
    p.all_seeds = [first, first + 1]
    processing.process_images(p)
    batch_noise = negatives[-1]
    bits = 0xFFFF_FFFF_FFFF_FFFF
    assert p.extra_generation_params["NegIP noise seed"] == first & bits
    # Image 2's infotext: the batch's settings, its own seed.
    params = {key: str(value) for key, value in p.extra_generation_params.items()}
    hidden = parse_infotext({**params, "Seed": str(first + 1)})["infotext_images"]
    assert hidden.endswith(f"noise seed: {first & bits} for seed {(first + 1) & bits}")
    restored = {**fields, "infotext_images": hidden}

    def noise_of(seed: int, request: dict | list, *, is_api: bool = True) -> torch.Tensor:
        nonlocal runs
        runs += 1
        p = make_p(None, world=world, seed=seed, is_api=is_api)
        p.scripts = [(world.script, request if isinstance(request, list) else [request])]
        processing.process_images(p)
        assert len(negatives) == runs
        return negatives[-1]

    assert torch.equal(noise_of(first + 1, restored), batch_noise)  # the API's infotext field
    values = [DEFAULTS[name] for name in FIELD_ORDER]  # the UI's components after a paste
    for name, value in {"enabled": True, **restored}.items():
        values[FIELD_ORDER.index(name)] = value
    assert torch.equal(noise_of(first + 1, values, is_api=False), batch_noise)
    # Another seed than the restored image's: the noise of that seed, as without the restore.
    other = noise_of(first + 2, restored)
    assert not torch.equal(other, batch_noise)
    assert torch.equal(other, noise_of(first + 2, fields))
    # Without a noise negative the infotext names no noise seed.
    assert "NegIP noise seed" not in run(world, fields_for(), seed=7).extra_generation_params


def test_upscale_of_a_later_image_of_a_batch_uses_the_batch_noise(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A1111's ✨ runs Hires. fix on a result with that result's seed, and gives scripts
    nothing else of its infotext: image 2 of a noise-negative batch (seed 1001, made with the
    noise of seed 1000) was upscaled with the noise of seed 1001, and the upscale's infotext
    said so. The noise seed now comes from the picture's own infotext."""
    negatives: list[torch.Tensor] = []

    def negative_tokens(params) -> None:
        if Generation.current is not None:
            negatives.append(Generation.current.session.prompt.negative.tokens.clone())

    script_callbacks.on_cfg_denoiser(negative_tokens)
    fields = noise_fields(negative_noise=0.5)
    p = make_p(fields, world=world, batch=2)
    p.all_seeds = [1000, 1001]
    processing.process_images(p)
    batch_noise = negatives[-1]
    line = ", ".join(f"{key}: {value}" for key, value in p.extra_generation_params.items())
    picture = Image.new("RGB", (8, 8))
    picture.info["parameters"] = f"a house\nSteps: 4, Seed: 1001, {line}"

    def upscale(image: Image.Image, *, from_upscale: bool = True) -> processing.Processing:
        p = make_p(fields, world=world, seed=1001, enable_hr=True, firstpass_image=image)
        if from_upscale:
            p.txt2img_upscale = True  # what A1111's txt2img_upscale sets
        processing.process_images(p)
        return p

    with caplog.at_level("WARNING", logger="negip"):
        upscaled = upscale(picture)
    assert torch.equal(negatives[-1], batch_noise)
    assert upscaled.extra_generation_params["NegIP noise seed"] == 1000
    assert "noise seed" not in caplog.text
    # A picture without its infotext (saved without it): its own seed, and a warning.
    with caplog.at_level("WARNING", logger="negip"):
        bare = upscale(Image.new("RGB", (8, 8)))
    assert bare.extra_generation_params["NegIP noise seed"] == 1001
    assert not torch.equal(negatives[-1], batch_noise)
    assert "the picture to upscale names no noise seed in its infotext" in caplog.text
    # Only ✨ reads the picture: another generation given a first pass keeps its own seed.
    assert upscale(picture, from_upscale=False).extra_generation_params["NegIP noise seed"] == 1001


def _timestep_denoiser(function: str, reported: int, *, img2img: bool) -> Any:
    """A denoiser as A1111's timestep samplers have it: ``steps`` as launch_sampling set it,
    the sampler's function, ``init_latent`` set by sample_img2img."""

    def sampler_function() -> None: ...

    sampler_function.__name__ = function
    denoiser = type("CFGDenoiserTimesteps", (), {})()
    denoiser.steps = denoiser.total_steps = reported
    denoiser.init_latent = torch.zeros(1) if img2img else None
    denoiser.sampler = SimpleNamespace(
        funcname=sampler_function, config=SimpleNamespace(options={})
    )
    return denoiser


@pytest.mark.parametrize(
    ("function", "reported", "img2img", "expected"),
    [
        # Counted with A1111 1.10.1's sampler functions (txt2img: n steps reported; img2img at
        # denoising 0.5: t_enc + 1 reported).
        ("ddim", 20, False, (19, 19)),
        ("ddim", 25, False, (24, 24)),
        ("ddim", 30, False, (30, 30)),
        ("ddim", 11, True, (9, 9)),
        ("ddim", 16, True, (14, 14)),
        ("ddim_cfgpp", 20, False, (19, 19)),
        ("plms", 20, False, (19, 20)),
        ("plms", 30, False, (30, 31)),
        ("plms", 13, True, (11, 12)),
        ("unipc", 25, False, (24, 25)),
        ("unipc", 16, True, (14, 15)),
        ("ddim", 2, True, (1, 1)),
    ],
)
def test_pass_length_of_the_timestep_samplers(
    function: str, reported: int, img2img: bool, expected: tuple[int, int]
) -> None:
    from lib_negip.webui.generation import pass_length

    assert pass_length(_timestep_denoiser(function, reported, img2img=img2img)) == expected


def test_pass_length_elsewhere_is_what_the_host_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_negip.webui.generation import pass_length

    k_diffusion = SimpleNamespace(steps=20, total_steps=40, init_latent=None)  # Heun
    assert pass_length(k_diffusion) == (20, 40)
    unknown = _timestep_denoiser("some_new_sampler", 20, img2img=False)
    assert pass_length(unknown) == (20, 20)
    # "Always discard next-to-last sigma": DDIM's schedule is made for one step more.
    monkeypatch.setattr(shared.opts, "always_discard_next_to_last_sigma", True, raising=False)
    assert pass_length(_timestep_denoiser("ddim", 20, img2img=False)) == (21, 21)


def test_a_late_window_opens_with_ddim_in_img2img() -> None:
    """img2img with DDIM, 20 steps at denoising 0.5: 9 calls where A1111 reports 11. A window
    [0.75, 1) holds the last quarter of those calls, as with Euler's 11."""
    from lib_negip.webui.generation import pass_length

    denoiser = _timestep_denoiser("ddim", 11, img2img=True)
    window = StepWindow(0.75, 1.0)
    active = [i for i in range(9) if window.contains(pass_progress(i, *pass_length(denoiser)))]
    assert active == [7, 8]
    euler = [i for i in range(11) if window.contains(pass_progress(i, 11, 11))]
    assert euler == [9, 10]


def test_a_generation_nested_in_an_image_hook_does_not_end_the_outer_one(world: World) -> None:
    """An extension that runs its own generation from ``postprocess_image`` with this script
    let through (ADetailer, when the user lists it): the nested generation starts and ends its
    own image prompts, and the outer generation's next batch still has the outer's, instead of
    sampling without them under an infotext that names them."""
    from modules import scripts

    inner_fields = fields_for(positive_weight=0.5)
    nested: list[processing.Processing] = []

    class Detailer(scripts.Script):
        def postprocess_image(self, p, pp, *args) -> None:
            inner = make_p(inner_fields, world=world)
            nested.append(inner)
            processing.process_images(inner)

    outer = make_p(fields_for(), world=world, n_iter=2)
    outer.scripts.append((Detailer(), []))
    processing.process_images(outer)
    assert len(outer.denoisers) == 2
    assert len(nested) == 2
    for denoiser in [*outer.denoisers, *(p.denoisers[0] for p in nested)]:
        lengths = [length for _, length in denoiser.calls]
        assert lengths
        assert all(length > CHUNK for length in lengths), lengths
    assert script_callbacks.errors == []
    nothing_left(world.sd15)


def _device_copies() -> int:
    from lib_negip.webui.models import MODELS

    keys = MODELS.adapters.keys()
    adapters = [MODELS.adapters.get(key) for key in keys]
    return sum(len(kv._cast) for adapter in adapters if adapter for kv in adapter.weights)


def test_lowvram_drops_the_adapters_device_copies_when_a_generation_ends(world: World) -> None:
    """A1111 with --lowvram / --medvram keeps the GPU nearly empty between uses: the adapter's
    weights cast for the UNet (650 MiB in fp16 for an SDXL adapter) must not stay there. Without
    those flags they are kept, so a cached adapter moves to the GPU once."""
    generation(world, default_fields())
    assert _device_copies() > 0
    shared.sd_model.lowvram = True  # what A1111's lowvram.setup_for_low_vram marks
    try:
        result = generation(world, default_fields()).result
        assert _device_copies() == 0
    finally:
        del shared.sd_model.lowvram
    assert torch.equal(result, generation(world, default_fields()).result)  # same image


def test_lowvram_drops_the_device_copies_also_when_the_generation_ends_on_another_model(
    world: World,
) -> None:
    """--medvram-sdxl marks only the SDXL model: a generation that began on it and ends on a
    refiner without the mark kept the adapter's GPU copies (the mark was read at the end)."""
    from modules import scripts

    class Refiner(scripts.Script):
        def post_sample(self, p, ps, *args) -> None:
            shared.sd_model.lowvram = False  # the model it ends on is not marked

    shared.sd_model.lowvram = True
    try:
        p = make_p(default_fields(), world=world)
        p.scripts.append((Refiner(), []))
        processing.process_images(p)
        assert _device_copies() == 0
    finally:
        vars(shared.sd_model).pop("lowvram", None)


def test_lowvram_frees_the_gpu_before_the_encoder_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --lowvram / --medvram the model part A1111 holds on the GPU goes to the CPU before
    the image encoder moves there (ViT-bigG is 3.7 GB in fp16), and the encoder goes back to the
    CPU afterwards whatever 'Keep the image encoder on the GPU' says."""
    from modules import lowvram

    from lib_negip.webui import generation as host_generation

    moves = []

    class Encoder:
        device = torch.device("cpu")

        def to(self, device, dtype):
            moves.append((str(device), lowvram.sent_to_cpu))
            self.device = torch.device(device)

        def encode(self, pixel_values, output):
            return pixel_values

    gpu = torch.device("cuda")
    before = lowvram.sent_to_cpu
    low = host_generation._EncoderOnDevice(Encoder(), gpu, torch.float16, low_vram=True)
    low.encode(torch.zeros(1), "image_embeds")
    low.encode(torch.zeros(1), "image_embeds")  # already there: nothing more to free
    assert moves == [("cuda", before + 1), ("cuda", before + 1)]
    moves.clear()
    plain = host_generation._EncoderOnDevice(Encoder(), gpu, torch.float16)
    plain.encode(torch.zeros(1), "image_embeds")
    assert moves == [("cuda", before + 1)]  # without the flags A1111's model part stays
    # after encoding: back to the CPU under the flags, whatever the setting says
    monkeypatch.setattr(host_generation, "setting_bool", lambda key: True)
    assert host_generation.keep_encoder_on_gpu(low_vram=False)
    assert not host_generation.keep_encoder_on_gpu(low_vram=True)
    monkeypatch.setattr(host_generation, "setting_bool", lambda key: False)
    assert not host_generation.keep_encoder_on_gpu(low_vram=False)


def test_an_unexpected_os_error_is_answered_without_the_servers_folders() -> None:
    """A failure we did not foresee is answered as "Negative Image Prompt failed: ...": an
    OSError's text holds the full path of its file, which an answer must not show (a model
    name of 244 characters once gave ENAMETOOLONG with the models folder in the 422)."""
    from lib_negip.webui import failures

    name = "a" * 250 + ".safetensors"
    for folder in ("/srv/webui/models/ipadapter/", "C:\\sd\\webui\\models\\ipadapter\\"):
        error = OSError(36, "File name too long", folder + name)
        for for_ui in (False, True):
            raised = failures.request_error(error, for_ui=for_ui)
            for text in (str(raised), raised.api_message, raised.ui_message):
                assert "webui" not in text, text  # str() quotes a Windows path with \\
                assert "File name too long" in text, text
                assert name in text, text
    assert "is a directory" in str(failures.request_error(IsADirectoryError(21, "is a directory")))


@pytest.mark.parametrize(
    ("fields", "warned"),
    [
        pytest.param({"positive_start": 0.5, "positive_end": 0.5}, True, id="start-equals-end"),
        pytest.param(  # 2 steps sample at 0 and 1/2: none is in [0.75, 1)
            {"positive_start": 0.75, "positive_end": 1.0}, True, id="narrower-than-a-step"
        ),
        pytest.param({"positive_weight": 0.0, "negative_weight": 0.0}, False, id="weights-0"),
        pytest.param({"positive_layers": "0:0"}, False, id="blocks-0"),
        pytest.param({}, False, id="acting"),
    ],
)
def test_windows_that_hold_no_step_say_so_in_the_console(
    world: World, caplog: pytest.LogCaptureFixture, fields: dict, warned: bool
) -> None:
    """A window that holds none of the steps sampled gives the image prompts nothing to do, as
    weight 0 does (the request is valid: an X/Y/Z sweep of starts up to 1 has such cells), but
    unlike weight 0 it is rarely what the user meant: the console says so. Settings that give
    them nothing to do by themselves (weights or blocks 0) are not warned about."""
    request = default_fields(negative_images=[], **fields)  # the empty side follows the blocks
    with caplog.at_level("WARNING", logger="negip"):
        p = generation(world, request, steps=2)
    assert ("no step of this batch had the image prompts" in caplog.text) is warned, caplog.text
    if warned:
        plain = processing.Processing(cond=p.cond, uncond=p.uncond, latent=p.latent, steps=2)
        plain.result = processing.process_images(plain)
        assert torch.equal(p.result, plain.result)


def test_params_txt_holds_the_infotext_for_the_paste_button(world: World) -> None:
    """A1111 writes params.txt (what the ↙ paste button restores with an empty prompt) after
    the scripts' process_batch, before sampling; the infotext was added at post_sample only, so
    the paste switched the extension off and Generate made the image without it. A generation
    whose image prompts never reach the UNet takes its keys out again (see post_sample)."""
    p = make_p(default_fields(), world=world)
    processing.process_images(p)
    written = {key: value for key, value in p.extra_generation_params.items() if "NegIP" in key}
    assert "NegIP positive images" in written
    assert {k: v for k, v in p.params_txt.items() if "NegIP" in k} == written
    plain = make_p(None, world=world)
    processing.process_images(plain)
    assert not any("NegIP" in key for key in plain.params_txt)


@pytest.mark.parametrize(
    ("fields", "opts", "p_fields", "warned"),
    [
        pytest.param(
            {"negative_start": 0.5, "negative_end": 0.5},
            {},
            {},
            "the negative image prompts had no step of this batch, so the image is the one "
            "without them: its step window (negative_start to negative_end) holds none",
            id="negative-window-empty",
        ),
        pytest.param(
            {"positive_start": 0.8, "positive_end": 1.0},
            {},
            {},
            "the positive image prompts had no step of this batch",
            id="positive-window-narrower-than-a-step",
        ),
        pytest.param(
            {},
            {"s_min_uncond_all": True},
            {"s_min_uncond": 100.0},
            "the negative image prompts had no step of this batch, so the image is the one "
            "without them: the sampler skipped the unconditional pass",
            id="ngms-every-step",
        ),
        pytest.param(
            {}, {"skip_early_cond": 1.0}, {}, "the sampler skipped the unconditional", id="early"
        ),
        pytest.param({}, {}, {"s_min_uncond": 100.0}, None, id="ngms-odd-steps-only"),
        pytest.param(
            {"negative_weight": 0.0, "negative_start": 0.5, "negative_end": 0.5},
            {},
            {},
            None,
            id="weight-0",
        ),
        pytest.param({"negative_images": []}, {"skip_early_cond": 1.0}, {}, None, id="no-images"),
        pytest.param({}, {}, {}, None, id="both-act"),
    ],
)
def test_a_side_whose_images_did_nothing_in_a_batch_is_named_in_the_console(
    world: World,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict,
    opts: dict,
    p_fields: dict,
    warned: str | None,
) -> None:
    """The README promised a console note for a window that holds no step; it came only when
    neither side had a step. One side's window alone, or the negative side carried by the
    uncond rows that A1111 skips at every step (Negative Guidance minimum sigma on all steps,
    Ignore negative prompt during early sampling), gave the image without that side's images
    without a word. A side without images of its own follows the other one: no note."""
    for key, value in opts.items():
        monkeypatch.setattr(shared.opts, key, value, raising=False)
    windows = {
        "positive_start": 0.0,
        "positive_end": 1.0,
        "negative_start": 0.0,
        "negative_end": 1.0,
    }
    request = default_fields(**{**windows, **fields})
    with caplog.at_level("WARNING", logger="negip"):
        p = generation(world, request, steps=4, **p_fields)
    notes = [
        r.getMessage() for r in caplog.records if "had no step of this batch" in r.getMessage()
    ]
    if warned is None:
        assert notes == [], notes
    else:
        assert len(notes) == 1, notes
        assert warned in notes[0], notes[0]
    assert p.result is not None


@pytest.mark.parametrize("pressed", ["interrupted", "skipped"])
def test_an_interrupt_before_the_first_step_is_not_blamed_on_the_windows(
    world: World, caplog: pytest.LogCaptureFixture, pressed: str
) -> None:
    """Interrupt (or Skip) pressed before the first step: A1111 makes the image without a model
    call. The console said the step windows held no step, though they were 0 to 1."""

    class Pressed:
        def before_process_batch(self, p, *args, **kwargs) -> None:
            setattr(shared.state, pressed, True)

        def __getattr__(self, name: str):
            return lambda *args, **kwargs: None

    p = make_p(default_fields(), world=world)
    p.scripts.append((Pressed(), []))
    try:
        with caplog.at_level("INFO", logger="negip"):
            processing.process_images(p)
    finally:
        setattr(shared.state, pressed, False)
    assert not world.calls  # no model call
    assert "was interrupted (or skipped) before a step had the image prompts" in caplog.text
    assert "step windows hold none" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_a_torch_older_than_2_1_is_refused_with_what_to_do(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDPA's scale and load_state_dict(assign=True) came with torch 2.1: on an A1111 venv kept
    at torch 2.0.1 the first attention raised a TypeError ("Negative Image Prompt failed").
    Now the generation is refused before anything loads, saying how to update."""
    from lib_negip.webui import backend

    assert backend.old_torch_message("2.1.2+cu121") is None
    assert backend.old_torch_message("2.14.1") is None
    assert backend.old_torch_message("not a version") is None
    message = backend.old_torch_message("2.0.1+cu118")
    assert message is not None
    assert "torch 2.1 or newer" in message
    assert "2.0.1+cu118" in message
    assert "--reinstall-torch" in message
    monkeypatch.setattr(torch, "__version__", "2.0.1+cu118")
    clean = residue(world.unet)
    with pytest.raises(NegIPError, match=r"needs torch 2\.1 or newer") as raised:
        generation(world, default_fields())
    assert raised.value.status_code == 422
    assert residue(world.unet) == clean
    monkeypatch.setattr(backend, "_warned", False)
    assert backend.warn_if_unsupported() == message


def test_img2img_ignores_hires_pass_second(world: World) -> None:
    """img2img has no Hires. fix, so hires_pass does not apply there: its one pass gets the
    image prompts. A txt2img request's args reach an img2img of an extension's own (ADetailer's
    inpainting, when the user lets this script run there): "second" refused that pass, which
    ADetailer dropped without a word (seen in a real A1111 with ADetailer)."""
    fields = default_fields(hires_pass="second", positive_end=1.0, negative_start=0.0)
    p = generation(world, fields, init_images=[picture(3)])
    assert p.extra_generation_params["NegIP hires pass"] == "both"
    both = generation(world, {**fields, "hires_pass": "both"}, init_images=[picture(3)])
    assert torch.equal(p.result, both.result)
    weights_0 = {**fields, "positive_weight": 0.0, "negative_weight": 0.0}
    plain = generation(world, weights_0, init_images=[picture(3)])
    assert not torch.equal(p.result, plain.result)
    with pytest.raises(NegIPError, match=r"hires_pass is 'second' but Hires\. fix is off"):
        generation(world, fields)  # txt2img without Hires. fix: still refused


def test_a_refusal_pending_from_a_job_that_failed_before_sampling_spares_the_next_job(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our process refused the request and armed the UNet, then the web UI failed before
    sampling (an unknown Hires. fix upscaler fails in p.init, after the scripts' process): the
    trap stayed. A UNet call of another job without a process of ours (the Train tab) got that
    request's refusal; now the trap only goes. In the same job it still raises."""
    monkeypatch.setattr(shared.state, "time_start", 1.0, raising=False)
    monkeypatch.setattr(shared.state, "job_timestamp", "20261208020000", raising=False)
    x = torch.randn(1, 4, 8, 8)
    context = conditioning(1, SD15, seed=3)
    for next_job, refused_again in ((False, True), (True, False)):
        p = make_p(stored_request(model="no-such-adapter"), world=world)
        processing.run_scripts(p, "process")  # the scripts' process; p.sample never comes
        assert Generation.trap is not None
        if next_job:
            monkeypatch.setattr(shared.state, "time_start", shared.state.time_start + 1.0)
        if refused_again:
            with pytest.raises(Exception, match="no-such-adapter"):
                world.unet(x, torch.full((1,), 500.0), context=context)
        else:
            world.unet(x, torch.full((1,), 500.0), context=context)  # a training step, say
        nothing_left(world.unet)


def test_reuse_seed_on_a_later_picture_of_a_noise_batch_carries_its_noise_seed(
    world: World,
) -> None:
    """A1111's ♻️ copies the selected picture's seed only. Picture 2 of a noise-negative batch
    (seed 1235) was made with the batch's noise (seed 1234): Generate after ♻️ made other noise,
    up to 85/255 from the picture (probe AE). The hidden field now carries the noise seed with
    the picture's seed, as a paste of its infotext does, and the generation uses it."""
    import json

    from lib_negip.webui import ui

    texts = [f"Seed: {seed}, NegIP noise seed: 1234" for seed in (1234, 1235)]
    info = json.dumps({"infotexts": texts, "all_seeds": [1234, 1235]})
    hidden = ui.reused_noise_seed(info, "not stored: 1 positive / 0 negative", 1)
    assert hidden == "not stored: 1 positive / 0 negative; noise seed: 1234 for seed 1235"
    # the first picture's own seed made its noise: an earlier noise seed part goes
    assert ui.reused_noise_seed(info, "noise seed: 7 for seed 8", 0) == ""
    # no results yet: the field is left as it is
    assert ui.reused_noise_seed("", "noise seed: 7 for seed 8", 0) == {"__type__": "update"}

    noise = {"negative_images": [], "negative_noise": 0.5}
    carried = {**noise, "infotext_images": "noise seed: 1234 for seed 1235"}
    reused = run(world, fields_for(**carried), seed=1235)
    assert reused.extra_generation_params["NegIP noise seed"] == 1234
    # the stand-in's latent does not depend on the seed: the noise alone makes the difference
    assert torch.equal(reused.result, run(world, fields_for(**noise), seed=1234).result)
    fresh = run(world, fields_for(**noise), seed=1235)
    assert fresh.extra_generation_params["NegIP noise seed"] == 1235
    assert not torch.equal(reused.result, fresh.result)


def test_a_paste_of_a_first_release_infotext_resets_the_fields_it_lacks(world: World) -> None:
    """An infotext of the first release has no blocks or noise keys. A1111's paste leaves a
    control whose key is absent as it was: the user's 'style' blocks and noise 0.5 stayed, and
    Generate mixed them into the pasted settings (probe AG). Absent keys mean the defaults, as
    in the API's restore."""
    from test_args import a1111_parse

    from lib_negip import args as negip_args
    from lib_negip.webui import ui

    line = (
        "Steps: 20, Sampler: Euler a, NegIP model: ip-adapter_sd15 [a1b2c3d4], "
        "NegIP encoder: ViT-H-14, NegIP images: 1 positive / 0 negative, "
        "NegIP positive weight: 0.6, NegIP positive start: 0.0, NegIP positive end: 0.8, "
        "NegIP negative weight: 0.3, NegIP negative start: 0.0, NegIP negative end: 1.0, "
        "NegIP hires pass: first, NegIP combine: concat, Version: v1.10.1"
    )
    text = f"a house\nNegative prompt: \n{line}"
    before = {
        **negip_args.DEFAULTS,
        "positive_layers": "style",
        "negative_layers": "composition",
        "negative_noise": 0.5,
        "negative_noise_type": "shuffle",
    }
    components = {name: SimpleNamespace(name=name, value=value) for name, value in before.items()}
    params = a1111_parse(text)
    ui.on_infotext_pasted(text, params)
    after = dict(before)
    for output, key in ui.infotext_fields(components, is_img2img=False):
        if callable(key) or params.get(key) is None:
            continue  # the images' and the switch's own restore; an absent key: no change
        after[output.name] = type(output.value)(params[key])  # A1111 1.10.1's paste_func
    assert after["positive_weight"] == 0.6
    assert after["combine"] == "concat"
    assert after["positive_layers"] == after["negative_layers"] == "all"
    assert after["negative_noise"] == 0.0
    assert after["negative_noise_type"] == "fade"
