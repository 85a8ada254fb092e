"""The A1111 glue in the stand-in host: every CFG branch routes the image tokens to their rows.

For every denoiser call of a generation the UNet's outputs are compared with a direct
computation: each cond row run alone with its text plus the POSITIVE image tokens, each uncond
row with its text plus the NEGATIVE image tokens, at the weights the step windows give at that
step. The image tokens of the direct computation come straight from the files (encoder ->
projection), not from the extension's session.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from test_hijack import hook_state
from tiny_unets import SD15, SDXL, make_ldm_unet
from webui_harness import (
    ENCODER_SHAPE,
    FakeApp,
    World,
    b64,
    conditioning,
    picture,
    processing,
    script_callbacks,
    shared,
)

from lib_negip.adapter import load_adapter
from lib_negip.conditioning import TokenLayout, make_block, pad_text_to_same_length
from lib_negip.encoder import load_image_encoder
from lib_negip.hijack import AttentionHijack
from lib_negip.prompt import StepWindow
from lib_negip.session import pass_progress
from lib_negip.webui import models, register, xyz

TOLERANCE = 2e-5


def api_args(**fields) -> list:
    """The API's form: a list holding one dict."""
    return [fields]


POSITIVE, NEGATIVE = picture(1), picture(2)


def default_fields(model: str = "tiny-base_sd15", **overrides) -> dict:
    fields = {
        "model": model,
        "positive_images": [b64(POSITIVE)],
        "negative_images": [b64(NEGATIVE, data_url=True)],
        "positive_weight": 0.9,
        "negative_weight": 0.6,
        "positive_start": 0.0,
        "positive_end": 0.5,
        "negative_start": 0.25,
        "negative_end": 1.0,
    }
    fields.update(overrides)
    return fields


@functools.cache
def expected_tokens(models: str, model: str, images: tuple[int, ...]) -> torch.Tensor:
    """[N, C] tokens of ``images`` straight from the files (average of the images' embeds)."""
    adapter = load_adapter(Path(models) / "ipadapter" / f"{model}.safetensors")
    encoder = load_image_encoder(Path(models) / "clip_vision" / "tiny-vit" / "model.safetensors")
    output = adapter.spec.encoder_output
    if not images:  # the reference's "no image" input
        if output == "image_embeds":
            features = torch.zeros(1, ENCODER_SHAPE["projection_dim"])
        else:
            size = ENCODER_SHAPE["image_size"]
            features = encoder.encode(torch.zeros(1, 3, size, size), output)
    else:
        features = encoder.encode(encoder.preprocess([picture(s) for s in images]), output)
    return adapter.project(features.mean(0, keepdim=True))[0].clone()


def crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def check_every_call(
    world: World,
    p: processing.Processing,
    fields: dict,
    *,
    positive: tuple[int, ...] = (1,),
    negative: tuple[int, ...] = (2,),
    pad: str | None = None,
    edit: bool = False,
) -> int:
    """Compare each denoiser call's UNet outputs with the direct computation; returns how many
    calls had image tokens appended."""
    models = shared_models_path()
    model = fields["model"]
    pos = expected_tokens(models, model, positive)
    neg = expected_tokens(models, model, negative)
    pos_weight, neg_weight = pos_window_weight(fields)
    layout = TokenLayout.for_tokens(max(len(pos), len(neg)))
    adapter = load_adapter(Path(models) / "ipadapter" / f"{model}.safetensors")
    appended_calls = 0
    assert world.calls, "no denoiser call was recorded"
    for call in world.calls:
        denoiser = call.denoiser
        progress = pass_progress(call.step, denoiser.steps, denoiser.total_steps)
        weights = (pos_weight(progress), neg_weight(progress))
        if not positive and negative:  # negative-only: cond rows take the uncond tokens
            weights = (neg_weight(progress), neg_weight(progress))
        active = weights != (0.0, 0.0)
        appended_calls += active
        text_c, text_u = crossattn(call.cond), crossattn(call.uncond)
        if active and pad is not None:
            empty = shared.sd_model.cond_stage_model_empty_prompt
            text_c, text_u = pad_text_to_same_length(text_c, text_u, pad, empty)
        rows_c = [text_c[r] for r in range(text_c.shape[0])]
        rows_u = [text_u[r] for r in range(text_u.shape[0])]
        if active:
            block_c = make_block(pos, weights[0], layout)[0]
            block_u = make_block(neg, weights[1], layout)[0]
            rows_c = [torch.cat([row, block_c]) for row in rows_c]
            rows_u = [torch.cat([row, block_u]) for row in rows_u]
        contexts = rows_c + rows_u + (rows_u if edit else [])
        skipped = denoiser.skipped[call.index]
        computed = len(rows_c) if skipped else len(contexts)
        hijack = AttentionHijack(call.unet, adapter.layer_weights(), layout)
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


def shared_models_path() -> str:
    from modules import paths

    return paths.models_path


def pos_window_weight(fields: dict):
    def side(prefix: str):
        window = StepWindow(fields[f"{prefix}_start"], fields[f"{prefix}_end"])
        weight = fields[f"{prefix}_weight"]
        return lambda progress: weight if window.contains(progress) else 0.0

    return side("positive"), side("negative")


def generation(world: World, fields: dict, *, rows: int = 1, batch: int = 1, **kwargs):
    """cond has ``rows`` rows per image (AND prompts), ``batch`` images."""
    sdxl = kwargs.pop("sdxl", False)
    config = SDXL if sdxl else SD15
    cond_chunks = kwargs.pop("cond_chunks", 1)
    uncond_chunks = kwargs.pop("uncond_chunks", 1)
    conds_list = [[(i * rows + r, 1.0 / rows) for r in range(rows)] for i in range(batch)]
    cond = (conds_list, conditioning(rows * batch, config, cond_chunks, seed=3, sdxl=sdxl))
    uncond = conditioning(batch, config, uncond_chunks, seed=4, sdxl=sdxl)
    latent = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return world.generate(api_args(**fields), cond=cond, uncond=uncond, latent=latent, **kwargs)


BRANCHES = {
    "batched": ({}, {}),
    "split calls (batch_cond_uncond off)": ({"batch_cond_uncond": False}, {}),
    "different lengths, no padding": ({}, {"cond_chunks": 2}),
    "different lengths, split calls": ({"batch_cond_uncond": False}, {"uncond_chunks": 3}),
    "pad with empty chunks": ({"pad_cond_uncond": True}, {"cond_chunks": 2}),
    "pad v0 (repeat last)": ({"pad_cond_uncond_v0": True}, {"cond_chunks": 3}),
    "pad v0 (cut uncond)": ({"pad_cond_uncond_v0": True}, {"uncond_chunks": 2}),
    "skip early CFG": ({"skip_early_cond": 0.5}, {}),
    "NGMS": ({}, {"s_min_uncond": 100.0}),
    "AND prompt": ({}, {"rows": 2}),
    "batch of two": ({}, {"batch": 2}),
    "AND prompt, batch of two, split": ({"batch_cond_uncond": False}, {"rows": 2, "batch": 2}),
    "second-order sampler": ({}, {"sampler": "heun"}),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_every_cfg_branch_routes_positive_to_cond_and_negative_to_uncond(
    world: World, branch: str
) -> None:
    opts, kwargs = BRANCHES[branch]
    for key, value in opts.items():
        setattr(shared.opts, key, value)
    fields = default_fields()
    p = generation(world, fields, **kwargs)
    pad = (
        "repeat_last"
        if opts.get("pad_cond_uncond_v0")
        else "empty_chunks"
        if opts.get("pad_cond_uncond")
        else None
    )
    appended = check_every_call(world, p, fields, pad=pad)
    assert 0 < appended <= len(world.calls)
    assert script_callbacks.errors == []
    assert hook_state(world.unet) == hook_state(make_ldm_unet(SD15))  # nothing left behind
    if branch == "pad with empty chunks":
        assert p.extra_generation_params.get("Pad conds") is True


def test_edit_model_rows(world: World) -> None:
    world.use("sd15", edit=True)
    fields = default_fields()
    generation(world, fields, image_cfg_scale=1.5)
    check_every_call(world, None, fields, edit=True)


def test_sdxl_conditioning(world: World) -> None:
    world.use("sdxl")
    fields = default_fields(model="tiny-base_sdxl")
    generation(world, fields, sdxl=True)
    assert check_every_call(world, None, fields) > 0


def test_plus_adapter_negative_only(world: World) -> None:
    fields = default_fields(model="tiny-plus_sd15", positive_images=[])
    generation(world, fields)
    assert check_every_call(world, None, fields, positive=()) > 0


def test_hires_second_pass_only(world: World) -> None:
    fields = default_fields(hires_pass="second", positive_end=1.0, negative_start=0.0)
    p = generation(world, fields, enable_hr=True)
    first = [c for c in world.calls if not c.hires]
    second = [c for c in world.calls if c.hires]
    assert first
    assert second
    assert all(c.denoiser.calls[c.index][1] == 77 for c in first)  # nothing appended
    assert all(c.denoiser.calls[c.index][1] > 77 for c in second)
    assert p.extra_generation_params["NegIP hires pass"] == "second"


def test_upscale_of_a_result_with_the_first_pass_only_is_no_failure(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """txt2img's "upscale" of a result (✨) gives the result as the first pass and samples only
    Hires. fix's: image prompts set for the first pass have nothing to do there. It was logged
    as a warning that no step had them ("the pass they are set for ran no step")."""
    fields = default_fields(hires_pass="first", positive_end=1.0, negative_start=0.0)
    caplog.set_level("INFO", logger="negip")
    p = generation(world, fields, enable_hr=True, firstpass_image=object())
    assert world.calls
    assert all(c.hires for c in world.calls)
    assert all(c.denoiser.calls[c.index][1] == 77 for c in world.calls)  # nothing appended
    assert p.extra_generation_params["NegIP hires pass"] == "first"  # the result's first pass
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [], [r.getMessage() for r in warnings]
    assert "samples only the Hires. fix pass" in caplog.text
    plain = generation(
        world,
        {**fields, "positive_weight": 0.0, "negative_weight": 0.0},
        enable_hr=True,
        firstpass_image=object(),
    )
    assert torch.equal(p.result, plain.result)


def test_hires_second_without_hires_fix_fails_loudly(world: World) -> None:
    with pytest.raises(Exception, match=r"Hires\. fix is off") as raised:
        generation(world, default_fields(hires_pass="second"))
    assert raised.value.status_code == 422


def test_weight_zero_and_disabled_give_the_image_without_the_extension(world: World) -> None:
    def run(fields_or_none):
        args = api_args(**fields_or_none) if fields_or_none else [False]
        cond = ([[(0, 1.0)]], conditioning(1, SD15, seed=3))
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        return world.generate(
            args, cond=cond, uncond=conditioning(1, SD15, seed=4), latent=latent
        ).result

    plain = run(None)
    zero = run(default_fields(positive_weight=0.0, negative_weight=0.0))
    assert torch.equal(zero, plain)
    with_images = run(default_fields())
    assert not torch.allclose(with_images, plain, atol=1e-3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (default_fields(model="no-such-model"), "no-such-model"),
        (default_fields(model="../../etc/passwd"), "paths are not accepted"),
        (default_fields(positive_weight=float("nan")), "positive_weight"),
        (default_fields(positive_start=0.8, positive_end=0.2), "positive"),
        (default_fields(positive_images=["not base64!"], negative_images=[]), "positive_images"),
        (default_fields(model="tiny-base_sdxl"), "another model family|fit|SDXL"),
        (default_fields(unknown_field=1), "unknown_field"),
    ],
    ids=[
        "unknown model",
        "path",
        "nan weight",
        "start after end",
        "bad image",
        "wrong family",
        "unknown field",
    ],
)
def test_bad_requests_fail_the_generation_with_422_and_leave_nothing(
    world: World, fields: dict, message: str
) -> None:
    clean = hook_state(world.unet)
    with pytest.raises(Exception, match=message) as raised:
        generation(world, fields)
    assert raised.value.status_code == 422
    assert str(raised.value) == raised.value.detail  # the UI shows str(), the API the detail
    assert hook_state(world.unet) == clean
    # The next generation works and equals a fresh one.
    good = generation(world, default_fields())
    assert torch.isfinite(good.result).all()


def test_cached_models_and_images_are_not_read_again(world: World) -> None:
    generation(world, default_fields())
    reads, calls = models.MODELS.file_reads, models.MODELS.features.encoder_calls
    for _ in range(3):
        generation(world, default_fields())
    assert models.MODELS.file_reads == reads
    assert models.MODELS.features.encoder_calls == calls


def test_cached_images_do_not_move_the_encoder(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lib_negip.encoder import ImageEncoder

    generation(world, default_fields())
    moves = []
    original = ImageEncoder.to

    def counting(self, *args, **kwargs):
        moves.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageEncoder, "to", counting)
    generation(world, default_fields())
    assert moves == []  # no transfer, no dtype conversion of the encoder
    generation(world, default_fields(positive_images=[b64(picture(9))]))
    assert len(moves) == 1  # a new image: moved once, to the sampling device


def test_infotext_and_models_endpoint(world: World) -> None:
    p = generation(world, default_fields())
    params = p.extra_generation_params
    assert re.fullmatch(r"tiny-base_sd15 \[[0-9a-f]{10}\]", params["NegIP model"])
    assert re.fullmatch(r"tiny-vit \[[0-9a-f]{10}\]", params["NegIP encoder"])
    assert params["NegIP positive weight"] == 0.9
    listing = world.app.routes["/negip/v1/models"]()
    names = {a["name"] for a in listing["adapters"]}
    assert {"tiny-base_sd15", "tiny-plus_sd15", "tiny-base_sdxl"} <= names
    assert [e["name"] for e in listing["encoders"]] == ["tiny-vit"]
    assert shared_models_path() not in str(listing)  # no paths of this machine in the answer


def test_models_endpoint_only_with_the_api_and_behind_its_authentication(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As A1111's own /sdapi routes: registered with --api (or --nowebui) only, and with
    --api-auth given the same HTTP basic check (the check itself: the next test)."""

    def routes(**flags: Any) -> list[str]:
        monkeypatch.setattr(shared, "cmd_opts", SimpleNamespace(data_dir=".", **flags))
        app = FakeApp()
        register.add_routes(app)
        return list(app.routes)

    assert routes(api=False, api_auth=None) == []
    assert routes(api=False, nowebui=True, api_auth=None) == ["/negip/v1/models"]
    assert routes(api=True, api_auth=None) == ["/negip/v1/models"]
    assert register.credentials_match("ann:pw1,bob:p:w2", "ann", "pw1")
    assert register.credentials_match("ann:pw1,bob:p:w2", "bob", "p:w2")
    assert not register.credentials_match("ann:pw1,bob:p:w2", "ann", "pw2")
    assert not register.credentials_match("ann:pw1,bob:p:w2", "carl", "pw1")
    assert not register.credentials_match("ann:pw1", "", "")


def test_api_auth_answers_401_without_the_right_credentials_through_fastapi(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route added to a real FastAPI app, called over HTTP: the dependency must survive
    FastAPI's reading of its signature (a string annotation it could not resolve made the route
    fail to register in a real A1111 with --api-auth, taking the rest of the start-up callback
    with it), and answer like A1111's /sdapi routes: 401 without or with wrong credentials."""
    with _real_fastapi(monkeypatch) as fastapi:
        from fastapi.testclient import TestClient

        _check_api_auth(monkeypatch, fastapi, TestClient)


@contextlib.contextmanager
def _real_fastapi(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The installed fastapi instead of the glue tests' stand-in (tests/webui_stub), for the
    body of the ``with`` only."""
    stub = Path(__file__).parent / "webui_stub"

    def ours() -> list[str]:
        return [n for n in sys.modules if n == "fastapi" or n.startswith("fastapi.")]

    with monkeypatch.context() as patch:
        patch.setattr(sys, "path", [p for p in sys.path if Path(p) != stub])
        for name in ours():
            patch.delitem(sys.modules, name)
        try:
            fastapi = pytest.importorskip("fastapi")
            assert not Path(fastapi.__file__).is_relative_to(stub)
            yield fastapi
        finally:
            for name in ours():  # the real package's modules; the stand-in comes back below
                del sys.modules[name]


def _check_api_auth(monkeypatch: pytest.MonkeyPatch, fastapi: Any, TestClient: Any) -> None:
    def client(api_auth: str | None) -> Any:
        monkeypatch.setattr(
            shared, "cmd_opts", SimpleNamespace(data_dir=".", api=True, api_auth=api_auth)
        )
        app = fastapi.FastAPI()
        register.add_routes(app)
        for route in app.routes:
            for dependency in getattr(route, "dependencies", []):
                # What fastapi 0.94 (A1111 1.10's) does when the route is added: evaluate the
                # dependency's annotations in its module's globals (later versions let an
                # unresolvable one pass, so the HTTP calls below alone would not see it).
                typing.get_type_hints(dependency.dependency)
        return TestClient(app)

    guarded = client("ann:pw1,bob:p:w2")
    assert guarded.get("/negip/v1/models").status_code == 401
    assert guarded.get("/negip/v1/models", auth=("ann", "pw2")).status_code == 401
    assert guarded.get("/negip/v1/models", auth=("carl", "pw1")).status_code == 401
    answer = guarded.get("/negip/v1/models", auth=("bob", "p:w2"))
    assert answer.status_code == 200
    assert "tiny-base_sd15" in {a["name"] for a in answer.json()["adapters"]}
    assert client(None).get("/negip/v1/models").status_code == 200


def test_model_folders_that_cannot_be_used_are_warned_about_not_fatal(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """models/ipadapter as a broken link (an unmounted drive) answered every listing with
    HTTP 500 and a server path; an extra folder that is missing or a file was dropped without a
    word, and a relative one was read from the process's working folder."""
    from modules import paths

    from lib_negip.webui import settings

    data = tmp_path / "data"
    models_dir = data / "models"
    models_dir.mkdir(parents=True)
    (models_dir / "ipadapter").symlink_to(tmp_path / "unmounted" / "ipadapter")
    (data / "a file").write_text("x")
    (data / "extra").mkdir()
    monkeypatch.setattr(paths, "models_path", str(models_dir))
    monkeypatch.setattr(paths, "data_path", str(data))
    monkeypatch.setattr(models, "_WARNED", set())
    monkeypatch.setattr(
        shared.opts, settings.OPT_ADAPTER_DIRS, "extra; missing dir; a file", raising=False
    )
    with caplog.at_level("WARNING", logger="negip"):
        adapter_dirs, _ = models.MODELS.folders()
        models.MODELS.folders()  # warned once
    assert data / "extra" in adapter_dirs  # relative: inside the data folder
    assert all("missing dir" not in str(d) and "a file" not in str(d) for d in adapter_dirs)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert any("models/ipadapter cannot be used" in w for w in warnings)
    assert any("'missing dir' does not exist; it is skipped" in w for w in warnings)
    assert any("'a file' is a file; it is skipped" in w for w in warnings)


def _short_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_infotext_hash_of_each_encoder_folder_is_its_own(world: World) -> None:
    """Encoders in folders all keep their weights in model.safetensors; A1111's hash cache
    (keyed by title, any file not newer than the cached one reuses it) must not give the
    second one the first one's hash."""
    import json
    import os

    from safetensors.torch import save_file
    from tiny_encoders import hf_vision_config, hf_vision_state_dict

    clip = Path(shared_models_path()) / "clip_vision"
    older = clip / "tiny-vit-older"
    older.mkdir()
    save_file(hf_vision_state_dict(**ENCODER_SHAPE, seed=99), older / "model.safetensors")
    (older / "config.json").write_text(json.dumps(hf_vision_config(**ENCODER_SHAPE)))
    os.utime(older / "model.safetensors", (1_600_000_000, 1_600_000_000))  # downloaded earlier
    models.MODELS.registry(refresh=True)
    for name in ("tiny-vit", "tiny-vit-older"):
        p = generation(world, default_fields(image_encoder=name))
        own = _short_sha256(clip / name / "model.safetensors")
        assert p.extra_generation_params["NegIP encoder"] == f"{name} [{own}]"


def test_adapter_replaced_under_its_name_is_checked_loaded_and_named_as_the_new_file(
    world: World,
) -> None:
    """No refresh pressed: the generation notices the file changed, lists it again (its spec
    and hash are the new file's) and drops what it had loaded from the old one."""
    import shutil

    folder = Path(shared_models_path()) / "ipadapter"
    target = folder / "tiny-base_sd15.safetensors"
    before = generation(world, default_fields())
    shutil.copyfile(folder / "tiny-plus_sd15.safetensors", target)  # another variant
    after = generation(world, default_fields())
    assert after.extra_generation_params["NegIP model"] == (
        f"tiny-base_sd15 [{_short_sha256(target)}]"
    )
    plus = generation(world, default_fields(model="tiny-plus_sd15"))
    assert torch.equal(after.result, plus.result)  # the new file, as a plus adapter
    assert not torch.equal(before.result, after.result)
    loaded = [key for key in models.MODELS.adapters.keys() if key[0] == str(target)]  # noqa: SIM118
    assert len(loaded) == 1  # the old file's load is gone, not kept until evicted


def test_adapter_replaced_by_an_older_file_is_named_as_the_new_file(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """``mv`` of an earlier download (or ``cp -p``, ``rsync -t``, an unpacked archive) puts a
    file OLDER than the one it replaces: A1111's hash cache, which hashes again only newer
    files, kept the old file's hash, and the infotext named the old file."""
    import os

    folder = Path(shared_models_path()) / "ipadapter"
    target = folder / "tiny-base_sd15.safetensors"
    first = generation(world, default_fields())
    assert first.extra_generation_params["NegIP model"] == (
        f"tiny-base_sd15 [{_short_sha256(target)}]"
    )
    older = folder.parent / "older.safetensors"
    older.write_bytes((folder / "tiny-plus_sd15.safetensors").read_bytes())
    stat = target.stat()
    os.utime(older, ns=(stat.st_atime_ns - 10**12, stat.st_mtime_ns - 10**12))
    os.replace(older, target)
    after = generation(world, default_fields())
    assert after.extra_generation_params["NegIP model"] == (
        f"tiny-base_sd15 [{_short_sha256(target)}]"
    )
    assert _short_sha256(target) not in first.extra_generation_params["NegIP model"]
    # a restore naming the old file's hash gets the console's warning (docs/ui.md): the file
    # of that name now has another hash
    old_label = first.extra_generation_params["NegIP model"]
    caplog.clear()
    generation(world, default_fields(model=old_label))
    assert any("has the hash" in record.getMessage() for record in caplog.records), caplog.text


def test_adapter_replaced_by_one_of_the_same_size_and_mtime_is_used_and_named(
    world: World,
) -> None:
    """``cp -p``/``rsync -a`` of a file of the same size keeps the mtime: the old weights were
    used on, the infotext named the old hash, and after a restart A1111's hash cache (which
    checks the mtime only) still gave the old hash, so the infotext named a file not used."""
    import os

    folder = Path(shared_models_path()) / "ipadapter"
    target = folder / "tiny-base_sd15.safetensors"
    before = generation(world, default_fields())
    from safetensors.torch import load_file, save_file

    tensors = {key: value * 1.5 for key, value in load_file(str(target)).items()}
    stat = target.stat()
    copy = folder.parent / "copy.safetensors"
    save_file(tensors, str(copy))  # the same layout: the same size
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(copy, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = generation(world, default_fields())
    label = f"tiny-base_sd15 [{_short_sha256(target)}]"
    assert after.extra_generation_params["NegIP model"] == label
    assert label != before.extra_generation_params["NegIP model"]
    assert not torch.equal(after.result, before.result)
    models.MODELS.clear()  # a restart: A1111's hash cache is kept, ours is not
    models.MODELS._registry = None
    restarted = generation(world, default_fields())
    assert restarted.extra_generation_params["NegIP model"] == label
    assert torch.equal(restarted.result, after.result)


def test_auto_takes_the_adapter_it_prefers_once_it_is_back(world: World) -> None:
    """ "auto" rescans: with the preferred adapter moved away it took another, and with the
    file back it kept the other until someone pressed the refresh button."""
    folder = Path(shared_models_path()) / "ipadapter"
    base = folder / "tiny-base_sd15.safetensors"
    aside = folder.parent / "aside.safetensors"
    first = generation(world, default_fields(model="auto"))
    assert first.extra_generation_params["NegIP model"].startswith("tiny-base_sd15 [")
    base.rename(aside)
    other = generation(world, default_fields(model="auto"))
    assert not other.extra_generation_params["NegIP model"].startswith("tiny-base_sd15 [")
    aside.rename(base)
    again = generation(world, default_fields(model="auto"))
    assert (
        again.extra_generation_params["NegIP model"] == first.extra_generation_params["NegIP model"]
    )
    assert torch.equal(again.result, first.result)


def test_an_edited_encoder_config_makes_the_next_generation_load_it_again(world: World) -> None:
    """The config.json beside an encoder's weights decides its head and activation: edited
    with the weights untouched, the running server kept the encoder (and the features) it had
    loaded, so the same request gave another image after a restart."""
    import json
    import os

    config_path = Path(shared_models_path()) / "clip_vision" / "tiny-vit" / "config.json"
    config = json.loads(config_path.read_text())
    before = generation(world, default_fields())
    assert config["hidden_act"] == "gelu"
    edited = {**config, "hidden_act": "quick_gelu"}
    config_path.write_text(json.dumps(edited))
    stat = config_path.stat()
    os.utime(config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later write
    after = generation(world, default_fields())
    assert not torch.equal(after.result, before.result)
    models.MODELS.clear()  # what a restart would load
    models.MODELS.registry(refresh=True)
    fresh = generation(world, default_fields())
    assert torch.equal(after.result, fresh.result)


def test_a_model_file_put_in_after_a_refusal_is_found_without_a_refresh(world: World) -> None:
    """The refusal tells an API caller to put a file into models/ipadapter; the next request
    must find it without anything that rescans first (seen in a real A1111: the request kept
    answering "none installed" until GET /negip/v1/models was called)."""
    folder = Path(shared_models_path()) / "ipadapter"
    aside = folder.parent / "aside"
    aside.mkdir()
    sd15 = sorted(folder.glob("*_sd15*"))
    assert sd15
    reference = generation(world, default_fields()).result
    auto = generation(world, default_fields(model="auto")).result
    for path in sd15:
        path.rename(aside / path.name)
    with pytest.raises(Exception, match="no installed IP-Adapter fits") as raised:
        generation(world, default_fields(model="auto"))
    assert raised.value.status_code == 422
    with pytest.raises(Exception, match="tiny-base_sd15") as raised:
        generation(world, default_fields(model="tiny-base_sd15"))
    assert raised.value.status_code == 422
    for path in sd15:
        (aside / path.name).rename(path)
    assert torch.equal(generation(world, default_fields(model="auto")).result, auto)
    for path in sd15:
        path.rename(aside / path.name)
    with pytest.raises(Exception, match="tiny-base_sd15"):
        generation(world, default_fields(model="tiny-base_sd15"))
    (aside / "tiny-base_sd15.safetensors").rename(folder / "tiny-base_sd15.safetensors")
    named = generation(world, default_fields(model="tiny-base_sd15"))
    assert torch.equal(named.result, reference)


def test_exception_mid_sampling_leaves_nothing_and_next_generation_is_exact(world: World) -> None:
    reference = generation(world, default_fields()).result
    failing = {"n": 0}

    def explode(module, args):
        failing["n"] += 1
        if failing["n"] == 3:
            msg = "another extension failed inside the UNet"
            raise RuntimeError(msg)

    handle = world.unet.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="another extension failed"):
            generation(world, default_fields())
    finally:
        handle.remove()
    # postprocess did not run; the next process removes what was left.
    again = generation(world, default_fields()).result
    assert torch.equal(again, reference)
    assert hook_state(world.unet) == hook_state(make_ldm_unet(SD15))


def test_interrupt_runs_postprocess_and_cleans_up(world: World) -> None:
    def interrupt(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(interrupt)
    try:
        generation(world, default_fields())
    finally:
        shared.state.interrupted = False
    assert hook_state(world.unet) == hook_state(make_ldm_unet(SD15))


def test_refiner_with_another_context_width_is_left_alone(world: World) -> None:
    def switch(params):
        # As A1111's refiner switch from step 2 on: another model, conds remade for it.
        if params.denoiser.step >= 2:
            if world.unet is world.sd15:
                world.use("sdxl")
            params.text_cond = conditioning(params.text_cond.shape[0], SDXL, seed=8)
            params.text_uncond = conditioning(params.text_uncond.shape[0], SDXL, seed=9)

    world.calls.clear()
    script_callbacks.callbacks["cfg_denoiser"].insert(
        0, type("E", (), {"callback": staticmethod(switch), "name": "r"})()
    )
    generation(world, default_fields(positive_end=1.0))
    widths = [c.denoiser.calls[c.index][1] for c in world.calls]
    assert widths[:2] != [77, 77]  # image tokens on the SD1.5 steps
    assert widths[2:] == [77, 77]  # the SDXL-width refiner steps untouched
    assert hook_state(world.sdxl) == hook_state(make_ldm_unet(SDXL))


def _stale_refiner(world: World, refiner_unet: torch.nn.Module):
    """A1111 1.10.1's img2img with a refiner and batch count 2: the sampler is made once; the
    refiner takes over at step 2 of batch 1; before batch 2 the base is loaded again, but the
    sampler's model wrapper still holds the refiner, which samples all of batch 2. Returns the
    callback (insert it before ours) and the refiner model."""
    from types import SimpleNamespace

    from webui_harness import loaded_model

    base, refiner = shared.sd_model, loaded_model(refiner_unet, SD15)
    seen: list = []

    def switch(params) -> None:
        denoiser = params.denoiser
        if denoiser not in seen:
            seen.append(denoiser)
            if len(seen) == 2:  # batch 2: base reloaded, the kept wrapper holds the refiner
                shared.sd_model = base
                denoiser.model_wrap = SimpleNamespace(inner_model=refiner)
        elif len(seen) == 1 and denoiser.step >= 2 and shared.sd_model is base:
            shared.sd_model = refiner  # the switch; the wrapper is made again from it

    return switch, refiner


def test_img2img_batches_after_a_refiner_switch_get_the_image_prompts(world: World) -> None:
    """Batch 2 samples with the refiner the sampler kept, not the loaded checkpoint: the image
    prompts act on that UNet (they were appended to its conditioning while the base UNet was
    hooked: the refiner read the image tokens as text, under an infotext naming them). With a
    refiner of the base's own weights every batch equals the plain single batch."""
    import copy

    reference = generation(world, default_fields()).result
    switch, _refiner = _stale_refiner(world, copy.deepcopy(world.sd15))
    script_callbacks.callbacks["cfg_denoiser"].insert(
        0, type("E", (), {"callback": staticmethod(switch), "name": "refiner"})()
    )
    p = generation(world, default_fields(), n_iter=2)
    assert torch.equal(p.result, reference)  # batch 2, sampled by the kept refiner
    assert "NegIP model" in p.extra_generation_params
    assert hook_state(world.sd15) == hook_state(make_ldm_unet(SD15))


def test_a_batch_whose_image_prompts_did_not_act_is_not_named(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each batch of a batch count must carry the image prompts itself for its infotext to name
    them (an earlier batch's do not count): here the hooks are put on the loaded checkpoint
    while the kept refiner samples batch 2, as before the fix above."""
    import copy

    from lib_negip.webui import backend

    monkeypatch.setattr(backend, "sampling_unet", lambda _denoiser: backend.current_unet())
    switch, _refiner = _stale_refiner(world, copy.deepcopy(world.sd15))
    script_callbacks.callbacks["cfg_denoiser"].insert(
        0, type("E", (), {"callback": staticmethod(switch), "name": "refiner"})()
    )
    with caplog.at_level("WARNING", logger="negip"):
        p = generation(world, default_fields(), n_iter=2)
    assert not any(key.startswith("NegIP") for key in p.extra_generation_params)
    assert "did not reach the UNet in this batch" in caplog.text


def test_a_unet_pass_of_a_script_before_sampling_is_refused_in_its_own_words(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a known host a UNet call before the first conditioning callback is a script's own
    pass (the 'img2img alternative test' script inverts the noise with the UNet from p.sample):
    the refusal says so, not that the host cannot be driven, and is logged once."""
    from lib_negip.errors import UnreachedError
    from lib_negip.webui import backend

    monkeypatch.setattr(backend, "host_kind", lambda: backend.A1111)
    base = _xyz_base()
    p = processing.Processing(**base)
    p.scripts = [(world.script, api_args(**default_fields()))]
    sample = p.sample

    def inverting_first(x):
        world.unet(x, torch.full((1,), 500.0), context=base["uncond"])
        return sample(x)

    p.sample = inverting_first
    with caplog.at_level("ERROR", logger="negip"), pytest.raises(UnreachedError) as raised:
        processing.process_images(p)
    assert raised.value.status_code == 422
    assert "a script or extension runs the UNet on its own first" in str(raised.value)
    assert "web UI" not in str(raised.value)
    assert [r.getMessage() for r in caplog.records] == [f"Negative Image Prompt: {raised.value}"]
    assert hook_state(world.sd15) == hook_state(make_ldm_unet(SD15))


def test_hires_checkpoint_of_another_family_with_hires_pass_second_fails_loudly(
    world: World,
) -> None:
    """A1111's Hires. fix checkpoint (another family) runs the only pass the image prompts
    were asked for: no step could have them, so the generation fails with 422 instead of
    making the image without them (and an infotext that names them)."""

    def hires_checkpoint(params):
        # As sample_hr_pass with hr_checkpoint_name: the checkpoint reloaded, conds remade.
        if params.denoiser.p.is_hr_pass:
            if world.unet is world.sd15:
                world.use("sdxl")
            params.text_cond = conditioning(params.text_cond.shape[0], SDXL, seed=8)
            params.text_uncond = conditioning(params.text_uncond.shape[0], SDXL, seed=9)

    script_callbacks.callbacks["cfg_denoiser"].insert(
        0, type("E", (), {"callback": staticmethod(hires_checkpoint), "name": "h"})()
    )
    p = None
    with pytest.raises(
        Exception,
        match=r"Hires\. fix pass \(a Hires\. fix checkpoint or the refiner\) is a model family",
    ) as raised:
        p = generation(world, default_fields(hires_pass="second"), enable_hr=True)
    assert p is None
    assert raised.value.status_code == 422
    assert hook_state(world.sd15) == hook_state(make_ldm_unet(SD15))
    assert hook_state(world.sdxl) == hook_state(make_ldm_unet(SDXL))


def _write_checkpoint(path: Path, context_width: int) -> Path:
    """A web UI checkpoint as far as its header tells: one attn2.to_k weight in ldm's names."""
    from safetensors.torch import save_file

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(8, context_width)}, str(path))
    return path


@pytest.mark.parametrize(
    ("width", "hires_pass", "refused"),
    [
        (SDXL.context_dim, "second", True),
        (SD15.context_dim, "second", False),
        (SDXL.context_dim, "both", False),
    ],
    ids=["other family, second", "same family, second", "other family, both"],
)
def test_hires_checkpoint_of_another_family_is_refused_before_the_first_pass(
    world: World, tmp_path: Path, width: int, hires_pass: str, refused: bool
) -> None:
    """With hires_pass "second" a Hires. fix checkpoint of another family could never have the
    image prompts: refused before any step (its family is read from the file's header), not
    after the whole first pass. "both" still runs (its first pass has them)."""
    from modules import sd_models

    path = _write_checkpoint(tmp_path / "other.safetensors", width)
    sd_models.checkpoint_aliases["other [abc]"] = sd_models.CheckpointInfo(str(path), "other")
    try:
        fields = default_fields(hires_pass=hires_pass)
        if not refused:
            generation(world, fields, enable_hr=True, hr_checkpoint_name="other [abc]")
            assert world.calls  # it sampled
            return
        with pytest.raises(
            Exception, match=r"Hires\. fix checkpoint other is a model family of context width 96"
        ) as raised:
            generation(world, fields, enable_hr=True, hr_checkpoint_name="other [abc]")
    finally:
        sd_models.checkpoint_aliases.clear()
    assert raised.value.status_code == 422
    assert "hires_pass is 'second'" in str(raised.value)
    assert "set hires_pass to 'both' or 'first'" in str(raised.value)
    assert world.calls == []  # not one step was sampled
    assert hook_state(world.sd15) == hook_state(make_ldm_unet(SD15))


def test_checkpoint_context_width_reads_only_what_a_header_tells(tmp_path: Path) -> None:
    from lib_negip.files import checkpoint_context_width

    assert checkpoint_context_width(_write_checkpoint(tmp_path / "a.safetensors", 768)) == 768
    assert checkpoint_context_width(_write_checkpoint(tmp_path / "b.safetensors", 2048)) == 2048
    damaged = tmp_path / "c.safetensors"
    damaged.write_bytes(b"\xff" * 12)
    assert checkpoint_context_width(damaged) is None
    pickled = tmp_path / "d.ckpt"
    torch.save({"state_dict": {}}, pickled)
    assert checkpoint_context_width(pickled) is None
    assert checkpoint_context_width(tmp_path / "missing.safetensors") is None
    from safetensors.torch import save_file

    save_file({"first_stage_model.x": torch.zeros(2)}, str(tmp_path / "e.safetensors"))
    assert checkpoint_context_width(tmp_path / "e.safetensors") is None


def test_xyz_override_of_a_weight(world: World) -> None:
    cond = ([[(0, 1.0)]], conditioning(1, SD15, seed=3))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    base = {"cond": cond, "uncond": conditioning(1, SD15, seed=4), "latent": latent}
    zero = world.generate(
        api_args(**default_fields(positive_weight=0.0, negative_weight=0.0)), **base
    )
    p = processing.Processing(**base)
    xyz._override("positive_weight")(p, 0.0, None)
    xyz._override("negative_weight")(p, 0.0, None)
    p.scripts = [(world.script, api_args(**default_fields()))]
    assert torch.equal(processing.process_images(p), zero.result)


def _xyz_base() -> dict:
    cond = ([[(0, 1.0)]], conditioning(1, SD15, seed=3))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return {"cond": cond, "uncond": conditioning(1, SD15, seed=4), "latent": latent}


def test_an_xyz_value_with_binary_noise_samples_what_its_infotext_restores(world: World) -> None:
    """A1111's X/Y/Z plot makes "0-0.3 (+0.05)" with numpy: 0.15000000000000002. The infotext
    writes 0.15; at 20 steps step 3 is at exactly 0.15, so the cell sampled one step fewer with
    the image prompts than the picture restored from its infotext."""
    noisy = np.arange(0.0, 0.35, 0.05).tolist()[3]
    assert noisy != 0.15
    p = processing.Processing(**_xyz_base(), steps=20)
    xyz._override("positive_start")(p, noisy, None)
    p.scripts = [(world.script, api_args(**default_fields()))]
    cell = processing.process_images(p)
    assert p.extra_generation_params["NegIP positive start"] == 0.15
    restored = world.generate(
        api_args(**default_fields(positive_start=0.15)), **_xyz_base(), steps=20
    )
    assert torch.equal(cell, restored.result)
    later = world.generate(api_args(**default_fields(positive_start=0.16)), **_xyz_base(), steps=20)
    assert not torch.equal(cell, later.result)  # the step at 0.15 does count


def test_xyz_axis_with_the_extension_disabled_fails_loudly(world: World) -> None:
    """A [NegIP] axis while the accordion is off made every cell the same image without image
    prompts under the axis's labels: now the cell's generation is refused and says why."""
    p = processing.Processing(**_xyz_base())
    xyz._override("positive_weight")(p, 2.0, None)
    p.scripts = [(world.script, [False])]  # the UI's values with the accordion's switch off
    with pytest.raises(Exception, match="X/Y/Z plot sets Negative Image Prompt's") as raised:
        processing.process_images(p)
    assert raised.value.status_code == 422
    assert "positive_weight" in str(raised.value)
    assert "not enabled: enable it" in str(raised.value)
    # without an axis, the switch off is no error
    plain = processing.Processing(**_xyz_base())
    plain.scripts = [(world.script, [False])]
    processing.process_images(plain)


def test_xyz_axes_are_added_when_the_script_loads(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --nowebui, A1111 builds the scripts' UI while it makes the API, before the
    before_ui callbacks run: the X/Y/Z plot's axis list (which its API indexes) was made
    without ours, so an API plot could not use them. The plot's script loads before any
    extension's, so ours are added when our script loads; before_ui adds none twice."""
    from types import SimpleNamespace

    from modules import scripts
    from webui_harness import load_entry_script

    def axis_option(label, kind, apply, confirm=None, choices=None):
        return SimpleNamespace(label=label, type=kind, apply=apply, confirm=confirm)

    plot = SimpleNamespace(
        axis_options=[],
        AxisOption=axis_option,
        process_images=lambda p: p,
        draw_xyz_grid=lambda *args, **kwargs: None,
    )
    plot_class = type("Script", (), {"__module__": "xyz_grid.py"})
    monkeypatch.setattr(
        scripts, "scripts_data", [SimpleNamespace(script_class=plot_class, module=plot)]
    )
    try:
        load_entry_script()
        labels = [option.label for option in plot.axis_options]
        assert labels == [label for label, _kind, _field in xyz.XYZ_AXES]
        script_callbacks.run("before_ui")
        assert [option.label for option in plot.axis_options] == labels
    finally:
        xyz.CELL_REFUSALS.remove()


def test_xyz_axes_check_every_value_before_the_plot_starts(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each [NegIP] axis has a confirm (A1111 runs it before the first cell): a value no cell
    can take fails the plot at once, as a 422 naming the axis and the value."""
    from types import SimpleNamespace

    def axis_option(label, kind, apply, confirm=None, choices=None):
        return SimpleNamespace(label=label, type=kind, apply=apply, confirm=confirm)

    plot = SimpleNamespace(axis_options=[], AxisOption=axis_option)
    monkeypatch.setattr(xyz, "_xyz_module", lambda: plot)
    xyz.register_xyz_axes()
    axes = {option.label: option for option in plot.axis_options}
    assert set(axes) == {label for label, _kind, _field in xyz.XYZ_AXES}
    assert all(option.confirm is not None for option in axes.values())
    p = processing.Processing(**_xyz_base())
    good = {
        "[NegIP] Positive weight": [0.0, 1.0, 5.0],
        "[NegIP] Negative end": [0.5, 1.0],
        "[NegIP] Model": ["auto", "tiny-base_sd15", "tiny-plus_sd15"],
        "[NegIP] Positive blocks": ["all", "style", "3:1, 6:0.5"],
        "[NegIP] Negative noise": [0.0, 0.5],
    }
    for label, values in good.items():
        axes[label].confirm(p, values)
    bad = {
        "[NegIP] Positive weight": ([1.0, 7.0], "positive_weight must be from -1 to 5; got 7"),
        "[NegIP] Negative end": ([0.5, 1.5], "negative_end"),
        "[NegIP] Model": (["tiny-base_sd15", "no-such-adapter"], "no-such-adapter"),
        "[NegIP] Positive blocks": (["style", "3-1"], "'3-1' is neither a preset"),
        "[NegIP] Negative noise": ([0.5, 1.5], "negative_noise"),
    }
    for label, (values, expected) in bad.items():
        with pytest.raises(Exception, match=re.escape(f"X/Y/Z plot, axis {label}: ")) as raised:
            axes[label].confirm(p, values)
        assert raised.value.status_code == 422
        assert expected in str(raised.value), str(raised.value)

    # With the request's own args (found among A1111's always-on scripts): the switch, the
    # request itself and each value with it are checked before the plot starts.
    ours = SimpleNamespace(title=lambda: "Negative Image Prompt", args_from=2, args_to=4)
    other = SimpleNamespace(title=lambda: "Other", args_from=0, args_to=2)
    runner = SimpleNamespace(alwayson_scripts=[other, ours])

    def confirmed(label: str, values: list, first: object, second: object = None) -> str:
        """'' when the plot may start, else the refusal (a 422)."""
        request = SimpleNamespace(is_api=True, scripts=runner, script_args=(1, 2, first, second))
        try:
            axes[label].confirm(request, values)
        except Exception as error:  # the status is part of the answer
            status = getattr(error, "status_code", None)
            return str(error) if status == 422 else f"not a 422 ({type(error).__name__})"
        return ""

    off = "X/Y/Z plot sets Negative Image Prompt's positive_weight, but Negative Image Prompt"
    weight = "[NegIP] Positive weight"
    assert off in confirmed(weight, [1.0], False, "x")  # the UI's switch off
    assert off in confirmed(weight, [1.0], {"enabled": False})
    assert confirmed(weight, [1.0], default_fields()) == ""
    # a request the cells would all refuse is refused once, before the plot
    assert confirmed(weight, [1.0], "maybe").startswith("X/Y/Z plot: enabled must be")
    no_images = confirmed(weight, [1.0], {"model": "auto"})
    assert no_images.startswith("X/Y/Z plot: positive_images and negative_images are both empty")
    # a value checked with the request: a noise negative beside negative images
    noise = confirmed("[NegIP] Negative noise", [0.0, 0.5], default_fields())
    assert noise.startswith("X/Y/Z plot, axis [NegIP] Negative noise: "), noise
    assert "negative_images" in noise
    assert confirmed("[NegIP] Negative noise", [0.5], default_fields(negative_images=[])) == ""
    # windows: each value on its own (another axis may set the other end: a start x end sweep
    # whose every cell is valid was refused against the request's end); a cell's own window is
    # checked in the cell
    start = "[NegIP] Positive start"
    assert confirmed(start, [0.2, 0.8], default_fields(positive_end=0.5)) == ""
    assert confirmed("[NegIP] Positive end", [0.3, 1.0], default_fields(positive_start=0.5)) == ""
    outside = confirmed(start, [0.2, 1.5], default_fields())
    assert outside.startswith("X/Y/Z plot, axis [NegIP] Positive start: positive_start"), outside
    # a block no UNet has (SD1.x has 16, SDXL 11); 15 is SD1.x's last
    blocks = "[NegIP] Positive blocks"
    assert confirmed(blocks, ["15:1", "10:0.5"], default_fields()) == ""
    past = confirmed(blocks, ["3:1", "99:1"], default_fields())
    assert past.startswith("X/Y/Z plot, axis [NegIP] Positive blocks: positive_layers: block 99")


def test_a_start_by_end_xyz_plot_checks_each_cells_own_window(world: World) -> None:
    """X: positive start, Y: positive end. Every cell's window is valid, so the plot runs
    (each axis was checked against the request's other end and the plot refused, probe AG); a
    cell whose own start is after its own end stops the plot with that reason."""
    plot = _plot_module()
    assert xyz.CELL_REFUSALS.install(plot)
    try:

        def cell(window: tuple[float, float]) -> processing.Processing:
            p = processing.Processing(**_xyz_base())
            p.scripts = [(world.script, api_args(**default_fields(positive_start=0.5)))]
            xyz._override("positive_start")(p, window[0], None)
            xyz._override("positive_end")(p, window[1], None)
            return p

        drawn = plot.draw_xyz_grid(cell, [(0.0, 0.3), (0.2, 0.3), (0.0, 1.0), (0.2, 1.0)])
        assert all(isinstance(result, torch.Tensor) for result in drawn), drawn
        with pytest.raises(Exception, match="must not be greater than positive_end") as raised:
            plot.draw_xyz_grid(cell, [(0.0, 0.3), (0.5, 0.3)])
        assert raised.value.status_code == 422
    finally:
        xyz.CELL_REFUSALS.remove()


def test_a_noise_seed_of_an_earlier_xyz_cell_does_not_stay_in_the_next(world: World) -> None:
    """A1111's X/Y/Z plot gives its cells one extra_generation_params dict: the noise seed a
    cell with a noise negative wrote must not stay in a later cell without one."""
    fields = default_fields(negative_images=[], negative_noise=0.5)
    first = processing.Processing(**_xyz_base())
    first.scripts = [(world.script, api_args(**fields))]
    processing.process_images(first)
    shared_params = first.extra_generation_params
    assert "NegIP noise seed" in shared_params
    second = processing.Processing(**_xyz_base())
    second.extra_generation_params = shared_params
    second.scripts = [(world.script, api_args(**{**fields, "negative_noise": 0.0}))]
    processing.process_images(second)
    assert "NegIP noise seed" not in shared_params
    assert shared_params["NegIP negative noise"] == 0.0


def _plot_module():
    """A stand-in for A1111's xyz_grid module: ``draw_xyz_grid`` runs each cell as A1111's
    does (``try: process_images(pc) except Exception:`` prints the traceback and takes an
    empty ``Processed``; a cell after an interrupt is skipped), calling the module's
    ``process_images`` as its cells find it."""
    from types import SimpleNamespace

    def empty(p, images, seed, info):
        return SimpleNamespace(images=images)

    plot = SimpleNamespace(
        process_images=processing.process_images, Processed=empty, cells=[], tracebacks=0
    )

    def draw_xyz_grid(make_cell, values):
        drawn = []
        for value in values:
            if shared.state.interrupted:
                drawn.append("skipped")
                continue
            plot.cells.append(value)
            try:
                drawn.append(plot.process_images(make_cell(value)))
            except Exception:
                plot.tracebacks += 1
                drawn.append(plot.Processed(None, [], -1, ""))
        return drawn

    plot.draw_xyz_grid = draw_xyz_grid
    return plot


def test_a_cell_the_extension_refuses_fails_the_whole_xyz_plot(world: World) -> None:
    """A refusal only a cell's checkpoint shows (here an SDXL adapter in a plot of adapters
    on an SD1.x checkpoint) drew that cell black under HTTP 200: now the plot stops at that
    cell and the request fails with the cell's reason; the cells left are not made."""
    plot = _plot_module()
    host_process, host_draw = plot.process_images, plot.draw_xyz_grid
    assert xyz.CELL_REFUSALS.install(plot)
    try:
        assert xyz.CELL_REFUSALS.install(plot)  # once
        clean = hook_state(world.unet)

        def cell(model: str, *, is_api: bool = True) -> processing.Processing:
            p = processing.Processing(**_xyz_base())
            p.is_api = is_api
            p.scripts = [(world.script, api_args(**default_fields(model=model)))]
            return p

        models = ["tiny-base_sd15", "tiny-base_sdxl", "tiny-plus_sd15"]
        with pytest.raises(Exception, match=re.escape(xyz.CellRefusals.PREFIX)) as raised:
            plot.draw_xyz_grid(cell, models)
        assert raised.value.status_code == 422
        assert "the adapter is for another model family" in str(raised.value), str(raised.value)
        assert plot.cells == models[:2]  # stopped at the refused cell
        assert plot.tracebacks == 0  # the cell's refusal is logged once, by the cell
        assert hook_state(world.unet) == clean
        assert not shared.state.interrupted  # set to skip the cells left, reset at the end

        # The UI's words, under the extension's name (A1111 shows "<class name>: <message>").
        plot.cells.clear()
        with pytest.raises(Exception, match=re.escape(xyz.CellRefusals.PREFIX)) as raised:
            plot.draw_xyz_grid(functools.partial(cell, is_api=False), models[1:])
        assert type(raised.value).__name__ == "Negative Image Prompt"
        assert raised.value.ui_message == str(raised.value)

        # Cells the extension makes, and another cause of an empty cell, are the plot's.
        drawn = plot.draw_xyz_grid(cell, ["tiny-base_sd15", "tiny-plus_sd15"])
        assert all(isinstance(result, torch.Tensor) for result in drawn), drawn

        def broken(_value: str) -> processing.Processing:
            raise RuntimeError("not ours")

        (result,) = plot.draw_xyz_grid(broken, ["a"])
        assert result.images == []
        assert plot.tracebacks == 1
        assert not shared.state.interrupted
    finally:
        xyz.CELL_REFUSALS.remove()
    assert (plot.process_images, plot.draw_xyz_grid) == (host_process, host_draw)
    # A reloaded plot module gets the wrappers; the old one gets its functions back.
    newer = _plot_module()
    newer_draw = newer.draw_xyz_grid
    assert xyz.CELL_REFUSALS.install(plot)
    assert xyz.CELL_REFUSALS.install(newer)
    assert plot.draw_xyz_grid is host_draw
    assert newer.draw_xyz_grid is not newer_draw
    xyz.CELL_REFUSALS.remove()
    assert not xyz.CELL_REFUSALS.installed
