"""The extension in a real AUTOMATIC1111 1.10.1, through its HTTP API, with the tiny models.

Skipped unless ``NEGIP_WEBUI_URL`` names a running A1111 (``--api``) with this extension and the
models of ``make_tiny_models.py --sdxl`` installed. ``NEGIP_WEBUI_LOG`` names the server's log:
A1111 only logs exceptions raised in extension hooks, so every test also checks that its
requests added no "Error"/"Traceback" line there, except the one ERROR line (no traceback) that
a refused request (HTTP 422) logs.

Each request names its checkpoint (``override_settings``, restored afterwards); images are
compared as decoded pixels.

With ``NEGIP_WEBUI_API_AUTH`` ("user:password") every request authenticates, for a server started
with ``--api-auth``; ``test_api_auth_guards_our_route_as_a1111s`` runs only then.

``NEGIP_WEBUI_SDXL_URL`` / ``NEGIP_WEBUI_SDXL_LOG`` optionally name a second A1111 started with
the tiny SDXL checkpoint only (the harness's port 7861) and the SDXL adapter, the SD1.5 base
adapter and the tiny encoder in its models folder: model "auto" is checked there too. The test
of a deleted stored image needs the server's data folder on this machine (found through
``GET /sdapi/v1/cmd-flags``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

URL = os.environ.get("NEGIP_WEBUI_URL", "").rstrip("/")
LOG = os.environ.get("NEGIP_WEBUI_LOG", "")
SDXL_URL = os.environ.get("NEGIP_WEBUI_SDXL_URL", "").rstrip("/")
SDXL_LOG = os.environ.get("NEGIP_WEBUI_SDXL_LOG", "")
# "user:password" when the main server runs with --api-auth (every request sends it then).
API_AUTH = os.environ.get("NEGIP_WEBUI_API_AUTH", "")

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="NEGIP_WEBUI_URL is not set (no running A1111)"),
]

SCRIPT = "negative image prompt"  # A1111 matches the title case-insensitively
SD15, SDXL = "negip-tiny-sd15", "negip-tiny-sdxl"
BASE = "negip-tiny-ip-adapter_sd15"
PLUS = "negip-tiny-ip-adapter-plus_sd15"
PICKLE = "negip-tiny-ip-adapter_sd15-pickle"
BASE_XL = "negip-tiny-ip-adapter_sdxl"
ENCODER = "negip-tiny-vit"
# The positional API order, written out rather than imported from lib_negip.args: API clients
# depend on it, so a reordering there must fail here.
FIELD_ORDER = (
    "enabled",
    "model",
    "image_encoder",
    "positive_images",
    "negative_images",
    "positive_weight",
    "negative_weight",
    "positive_start",
    "positive_end",
    "negative_start",
    "negative_end",
    "hires_pass",
    "combine",
    "positive_layers",
    "negative_layers",
    "positive_mask",
    "negative_mask",
    "negative_noise",
    "negative_noise_type",
    "infotext_images",
)
OUR_ERROR_LINE = "ERROR:negip:Negative Image Prompt: "


# ---------------------------------------------------------------------------------------------
# Helpers


def picture(seed: int, size: int = 96) -> str:
    """A random RGB picture as base64 PNG (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


POSITIVE, NEGATIVE, OTHER = picture(1), picture(2), picture(3)


def call(
    method: str,
    path: str,
    body: dict | None = None,
    *,
    url: str | None = None,
    auth: str | None = None,
) -> tuple[int, Any]:
    """``auth``: "user:password" for HTTP basic authentication; by default ``API_AUTH``."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    auth = API_AUTH if auth is None else auth
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request((url or URL) + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text.decode(errors="replace")


def generate(
    args: list | None = None,
    *,
    mode: str = "txt2img",
    checkpoint: str = SD15,
    expect: int = 200,
    url: str | None = None,
    **request: Any,
) -> dict:
    """One generation; ``args`` None means no NegIP entry at all (the extension stays off)."""
    body: dict[str, Any] = {
        "prompt": "",
        "negative_prompt": "",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 1234,
        "cfg_scale": 7,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "override_settings": {"sd_model_checkpoint": checkpoint},
        "override_settings_restore_afterwards": True,
    }
    if mode == "img2img":
        body.update(init_images=[OTHER], denoising_strength=0.6)
    body.update(request)
    if args is not None:
        body["alwayson_scripts"] = {SCRIPT: {"args": args}}
    status, answer = call("POST", f"/sdapi/v1/{mode}", body, url=url)
    assert status == expect, answer
    return answer


def pixels(answer: dict, index: int = 0) -> np.ndarray:
    data = base64.b64decode(answer["images"][index])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def infotext(answer: dict, index: int = 0) -> str:
    return json.loads(answer["info"])["infotexts"][index]


def negip_params(text: str) -> dict[str, str]:
    """The "NegIP ..." entries of an infotext's parameter line."""
    line = text.strip().split("\n")[-1]
    found = re.findall(r'\s*(NegIP[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)
    return {key: value.strip() for key, value in found}


def stored_counts(params: dict[str, str]) -> str:
    """ "<n> positive / <m> negative": how many stored image prompts an infotext names."""
    counts = []
    for side in ("positive", "negative"):
        references = params.get(f"NegIP {side} images", "").split()
        assert all(re.fullmatch(r"[0-9a-f]{16}", ref) for ref in references), references
        counts.append(f"{len(references)} {side}")
    return " / ".join(counts)


def fields(**values: Any) -> list[dict]:
    """The dict form: a list holding one dict of named fields."""
    return [{"model": BASE, "positive_images": [POSITIVE], "negative_images": [NEGATIVE], **values}]


def positional(**values: Any) -> list:
    """The UI's positional form, every field given."""
    named = {
        "enabled": True,
        "model": BASE,
        "image_encoder": "auto",
        "positive_images": [POSITIVE],
        "negative_images": [NEGATIVE],
        "positive_weight": 1.0,
        "negative_weight": 1.0,
        "positive_start": 0.0,
        "positive_end": 1.0,
        "negative_start": 0.0,
        "negative_end": 1.0,
        "hires_pass": "both",
        "combine": "average",
        "positive_layers": "all",
        "negative_layers": "all",
        "positive_mask": None,
        "negative_mask": None,
        "negative_noise": 0.0,
        "negative_noise_type": "fade",
        "infotext_images": "",
        **values,
    }
    return [named[name] for name in FIELD_ORDER]


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a, b), f"max difference {np.abs(a - b).max()}/255"


def assert_differs(a: np.ndarray, b: np.ndarray, at_least: float = 0.5) -> None:
    """The mean absolute pixel difference is at least ``at_least``/255."""
    assert a.shape == b.shape
    difference = float(np.abs(a - b).mean())
    assert difference >= at_least, f"mean difference only {difference:.3f}/255"


# ---------------------------------------------------------------------------------------------
# The server log


class ServerLog:
    """New lines of the server log since the last look."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self.offset = self._size()

    def _size(self) -> int:
        return self.path.stat().st_size if self.path else 0

    def new_lines(self) -> list[str]:
        if self.path is None:
            return []
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        self.offset += len(data)
        return data.decode(errors="replace").splitlines()

    @staticmethod
    def problems(lines: list[str]) -> list[str]:
        return [line for line in lines if re.search(r"error|traceback", line, re.IGNORECASE)]


@pytest.fixture(scope="module", autouse=True)
def module_log() -> ServerLog:
    """The log from the start of this module on (module fixtures log too)."""
    return ServerLog(LOG)


@pytest.fixture(autouse=True)
def server_log(module_log: ServerLog):
    """Fails a test whose requests (and the shared baselines it made) logged an error or a
    traceback, beyond the lines it consumed itself."""
    yield module_log
    assert ServerLog.problems(module_log.new_lines()) == []


def expect_refused(log: ServerLog, args: list, *names: str, **request: Any) -> str:
    """The request is answered with HTTP 422 whose detail contains each of ``names``, and the
    log got exactly our one ERROR line for it, without a traceback."""
    log.new_lines()
    answer = generate(args, expect=422, **request)
    detail = answer["detail"]
    assert isinstance(detail, str)
    for name in names:
        assert name in detail, detail
    assert "/work/" not in detail, "an absolute path leaked"
    assert "\\" not in detail, "a Windows path leaked"
    if log.path is not None:
        problems = ServerLog.problems(log.new_lines())
        assert len(problems) == 1, problems
        assert problems[0].startswith(OUR_ERROR_LINE), problems
        assert detail.splitlines()[0] in problems[0]
    return detail


# ---------------------------------------------------------------------------------------------
# Baselines shared by several tests (images without the extension)


@pytest.fixture(scope="module")
def plain() -> np.ndarray:
    return pixels(generate())


@pytest.fixture(scope="module")
def with_images() -> dict:
    """Positive + negative images, dict form, default weights."""
    return generate(fields())


# ---------------------------------------------------------------------------------------------
# Models endpoint


def test_models_endpoint_lists_the_tiny_models_without_paths() -> None:
    status, listing = call("GET", "/negip/v1/models")
    assert status == 200
    adapters = {entry["name"]: entry for entry in listing["adapters"]}
    assert {BASE, PLUS, PICKLE, BASE_XL} <= set(adapters)
    assert adapters[BASE]["variant"] == "base"
    assert adapters[PLUS]["variant"] == "plus"
    assert adapters[PLUS]["tokens"] == 16
    assert adapters[PICKLE]["file_name"] == f"{PICKLE}.bin"
    assert adapters[PICKLE]["error"] is None  # read with weights_only, past A1111's checker
    assert ENCODER in {entry["name"] for entry in listing["encoders"]}
    text = json.dumps(listing)
    assert "/work/" not in text, "absolute paths in the listing"
    assert '"/' not in text, "absolute paths in the listing"


def test_script_is_listed_with_the_ui_arguments_in_field_order() -> None:
    status, scripts = call("GET", "/sdapi/v1/script-info")
    assert status == 200
    ours = [s for s in scripts if s["name"] == SCRIPT]
    assert {s["is_img2img"] for s in ours} == {False, True}
    for script in ours:
        args = script["args"]
        assert len(args) == len(FIELD_ORDER)
        assert args[0]["value"] is False  # the switch, off by default
        assert args[1]["choices"][0] == "auto"
        assert args[1]["value"] == "auto"
        assert BASE in args[1]["choices"]
        assert [a["value"] for a in args[5:11]] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        assert [a["value"] for a in args[13:15]] == ["all", "all"]
        assert "style" in args[13]["choices"]
        assert args[17]["value"] == 0.0  # negative_noise
        assert args[18]["value"] == "fade"


# ---------------------------------------------------------------------------------------------
# txt2img


def test_txt2img_dict_form_writes_the_infotext(with_images: dict, plain: np.ndarray) -> None:
    assert_differs(pixels(with_images), plain)
    params = negip_params(infotext(with_images))
    assert re.fullmatch(rf"{BASE} \[[0-9a-f]{{10}}\]", params["NegIP model"])
    assert re.fullmatch(rf"{ENCODER} \[[0-9a-f]{{10}}\]", params["NegIP encoder"])
    assert stored_counts(params) == "1 positive / 1 negative"
    assert params["NegIP positive weight"] == "1.0"
    assert params["NegIP hires pass"] == "both"
    assert params["NegIP combine"] == "average"
    extra = json.loads(with_images["info"])["extra_generation_params"]
    assert extra["NegIP negative end"] == 1.0


def test_txt2img_positional_form_equals_the_dict_form(with_images: dict) -> None:
    assert_same(pixels(generate(positional())), pixels(with_images))


def test_same_seed_gives_the_same_image(with_images: dict) -> None:
    assert_same(pixels(generate(fields())), pixels(with_images))


def test_weight_zero_equals_no_extension_bit_for_bit(plain: np.ndarray) -> None:
    assert_same(pixels(generate(fields(positive_weight=0.0, negative_weight=0.0))), plain)
    assert_same(pixels(generate(positional(positive_weight=0.0, negative_weight=0.0))), plain)


def test_args_sent_as_a_text_are_refused_as_such(server_log: ServerLog) -> None:
    """A double-encoded dict ("args": "{...}"): A1111 puts the text's characters where our values
    go, which answered "enabled must be true or false; got '{' (str)"."""
    text = json.dumps({"model": BASE})
    # A1111 puts the first characters, one per value the script takes (20).
    expect_refused(server_log, text, "must be a list, not a text", text[:20])  # type: ignore[arg-type]


def test_disabled_dict_and_disabled_positional_equal_no_extension(plain: np.ndarray) -> None:
    assert_same(pixels(generate([{"enabled": False}])), plain)
    answer = generate(positional(enabled=False))
    assert_same(pixels(answer), plain)
    assert "NegIP" not in infotext(answer)


def test_negative_image_changes_the_image(with_images: dict, plain: np.ndarray) -> None:
    positive_only = pixels(generate(fields(negative_images=[])))
    assert_differs(positive_only, plain)
    assert_differs(pixels(with_images), positive_only)
    other_negative = pixels(generate(fields(negative_images=[OTHER])))
    assert_differs(other_negative, pixels(with_images))


def test_negative_only(plain: np.ndarray) -> None:
    answer = generate(fields(positive_images=[]))
    assert_differs(pixels(answer), plain)
    assert stored_counts(negip_params(infotext(answer))) == "0 positive / 1 negative"


def test_several_images_per_side_average_and_concat(with_images: dict) -> None:
    average = generate(fields(positive_images=[POSITIVE, OTHER]))
    concat = generate(fields(positive_images=[POSITIVE, OTHER], combine="concat"))
    assert_differs(pixels(average), pixels(with_images))
    assert_differs(pixels(concat), pixels(average), at_least=0.05)
    params = negip_params(infotext(concat))
    assert params["NegIP combine"] == "concat"
    assert stored_counts(params) == "2 positive / 1 negative"


def test_step_windows_change_the_image(with_images: dict) -> None:
    windowed = generate(fields(positive_start=0.5, negative_end=0.5))
    assert_differs(pixels(windowed), pixels(with_images), at_least=0.05)
    params = negip_params(infotext(windowed))
    assert params["NegIP positive start"] == "0.5"
    assert params["NegIP negative end"] == "0.5"


def test_hires_fix() -> None:
    hires = {
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.5,
    }
    plain_hires = pixels(generate(**hires))
    both = generate(fields(), **hires)
    assert pixels(both).shape == (128, 128, 3)
    assert_differs(pixels(both), plain_hires)
    second = generate(fields(hires_pass="second"), **hires)
    first = generate(fields(hires_pass="first"), **hires)
    assert_differs(pixels(second), pixels(both), at_least=0.05)
    assert_differs(pixels(first), pixels(both), at_least=0.05)
    assert negip_params(infotext(second))["NegIP hires pass"] == "second"
    zero = generate(fields(positive_weight=0.0, negative_weight=0.0), **hires)
    assert_same(pixels(zero), plain_hires)


def test_batch_of_two(plain: np.ndarray) -> None:
    plain_batch = generate(batch_size=2)
    answer = generate(fields(), batch_size=2)
    assert len(answer["images"]) == 2
    # The host's own premise: batch index 0 is the single image of the same seed, up to the
    # CPU's rounding (a batch of two runs other GEMM shapes: on an AMD EPYC 1/255 in 1 of 12288
    # values; on the Intel Xeon none). Our checks below compare like with like, exactly.
    difference = np.abs(pixels(plain_batch, 0) - plain)
    assert difference.max() <= 1
    assert np.mean(difference > 0) < 0.01
    for index in range(2):
        assert_differs(pixels(answer, index), pixels(plain_batch, index))
        assert "NegIP model" in infotext(answer, index)
    zero = generate(fields(positive_weight=0.0, negative_weight=0.0), batch_size=2)
    for index in range(2):
        assert_same(pixels(zero, index), pixels(plain_batch, index))


def test_and_prompt() -> None:
    prompt = {"prompt": "a red house AND a snowy field :0.7"}
    plain_and = pixels(generate(**prompt))
    assert_differs(pixels(generate(fields(), **prompt)), plain_and)
    zero = generate(fields(positive_weight=0.0, negative_weight=0.0), **prompt)
    assert_same(pixels(zero), plain_and)


def test_plus_adapter(with_images: dict, plain: np.ndarray) -> None:
    answer = generate(fields(model=PLUS))
    assert_differs(pixels(answer), plain)
    assert_differs(pixels(answer), pixels(with_images))
    assert negip_params(infotext(answer))["NegIP model"].startswith(f"{PLUS} [")


def test_pickle_adapter_equals_its_safetensors_twin(with_images: dict) -> None:
    # The tool writes the same tensors into both files.
    answer = generate(fields(model=PICKLE))
    assert_same(pixels(answer), pixels(with_images))
    assert negip_params(infotext(answer))["NegIP model"].startswith(f"{PICKLE} [")


def test_encoder_by_name_equals_auto(with_images: dict) -> None:
    assert_same(pixels(generate(fields(image_encoder=ENCODER))), pixels(with_images))


def test_model_label_with_hash_is_accepted(with_images: dict) -> None:
    label = negip_params(infotext(with_images))["NegIP model"]
    assert_same(pixels(generate(fields(model=label))), pixels(with_images))


def server_models_folder(kind: str) -> Path:
    """The server's models/<kind> folder, when this machine can see it."""
    status, flags = call("GET", "/sdapi/v1/cmd-flags")
    assert status == 200
    folder = Path(flags.get("data_dir") or ".") / "models" / kind
    if not folder.is_dir():
        pytest.skip(f"the server's {kind} folder {folder} is not on this machine")
    return folder


def test_adapter_replaced_by_an_older_file_is_named_as_the_new_file(with_images: dict) -> None:
    """``mv`` of an earlier download puts a file older than the one it replaces: A1111's hash
    cache hashes again only newer files, and kept naming the replaced file in the infotext."""
    import hashlib
    import os

    folder = server_models_folder("ipadapter")
    target = folder / "negip-probe-replaced.safetensors"
    older = folder / "negip-probe-older.tmp"
    try:
        target.write_bytes((folder / f"{BASE}.safetensors").read_bytes())
        first = negip_params(infotext(generate(fields(model="negip-probe-replaced"))))
        short = hashlib.sha256(target.read_bytes()).hexdigest()[:10]
        assert first["NegIP model"] == f"negip-probe-replaced [{short}]"
        older.write_bytes((folder / f"{PLUS}.safetensors").read_bytes())
        stat = target.stat()
        os.utime(older, ns=(stat.st_atime_ns - 10**12, stat.st_mtime_ns - 10**12))
        os.replace(older, target)
        after = generate(fields(model="negip-probe-replaced"))
        short = hashlib.sha256(target.read_bytes()).hexdigest()[:10]
        assert negip_params(infotext(after))["NegIP model"] == f"negip-probe-replaced [{short}]"
        assert_same(pixels(after), pixels(generate(fields(model=PLUS))))
    finally:
        target.unlink(missing_ok=True)
        older.unlink(missing_ok=True)


def with_metadata(data: bytes, note: str) -> bytes:
    """A safetensors file's bytes with ``note`` in its metadata: the same tensors, another hash."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = {**header.get("__metadata__", {}), "negip-test": note}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def test_an_infotext_restores_an_adapter_renamed_since_by_its_hash() -> None:
    """A1111 finds a renamed checkpoint by its hash; an adapter renamed after the picture was
    made was refused ("there is no IP-Adapter named ..."), with advice that could not help."""
    import hashlib

    folder = server_models_folder("ipadapter")
    before = folder / "negip-probe-renamed-a.safetensors"
    after = folder / "negip-probe-renamed-b.safetensors"
    try:
        before.write_bytes(with_metadata((folder / f"{BASE}.safetensors").read_bytes(), "a"))
        made = generate(fields(model="negip-probe-renamed-a"))
        text = infotext(made)
        short = hashlib.sha256(before.read_bytes()).hexdigest()[:10]
        assert negip_params(text)["NegIP model"] == f"negip-probe-renamed-a [{short}]"
        before.rename(after)
        restored = generate([], infotext=text)
        assert negip_params(infotext(restored))["NegIP model"] == f"negip-probe-renamed-b [{short}]"
        assert_same(pixels(restored), pixels(made))
    finally:
        before.unlink(missing_ok=True)
        after.unlink(missing_ok=True)


def write_tiny_lora(path: Path, projections: tuple[str, ...], seed: int = 11) -> None:
    """A LoRA for the harness's tiny SD1.5 on the given projections of every attn2 layer, in
    kohya's key names (``lora_unet_<compvis module path>``), which A1111's Lora loads."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, flags = call("GET", "/sdapi/v1/cmd-flags")
    checkpoints = Path(
        flags.get("ckpt_dir") or Path(flags["data_dir"]) / "models" / "Stable-diffusion"
    )
    checkpoint = checkpoints / f"{SD15}.safetensors"
    if not checkpoint.is_file():
        pytest.skip(f"the tiny SD1.5 checkpoint {checkpoint} is not on this machine")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(checkpoint), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (a safetensors file, not a dict)
            module = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            if ".attn2." not in key or not key.endswith(".weight"):
                continue
            if module.rsplit(".attn2.", 1)[1] not in projections:
                continue
            out_features, in_features = weights.get_slice(key).get_shape()
            name = "lora_unet_" + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_features, generator=generator)
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator)
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
    assert tensors, "no attn2 projection found in the checkpoint"
    save_file(tensors, str(path))


@pytest.mark.parametrize("functional", [False, True], ids=["lora-patches-weights", "functional"])
def test_a_lora_on_the_projections_our_term_reads_still_acts(functional: bool) -> None:
    """A1111's Lora patches nn.Linear's forward; the image term is computed from the outputs of
    attn2's to_q and to_out.0, whose forward we wrap per instance: a LoRA on exactly those must
    still act with image prompts on (both of A1111's modes: weights patched in place, or the
    LoRA computed at each call), and weight 0 must equal the LoRA alone bit for bit."""
    folder = server_models_folder("Lora")
    name = "negip-probe-lora"
    path = folder / f"{name}.safetensors"
    settings = {"sd_model_checkpoint": SD15, "lora_functional": functional}
    try:
        write_tiny_lora(path, ("to_q", "to_out.0"))
        status, _ = call("POST", "/sdapi/v1/refresh-loras")
        assert status == 200
        prompt = f"a house <lora:{name}:1>"
        lora_only = pixels(generate(None, prompt=prompt, override_settings=settings))
        plain = pixels(generate(None, prompt="a house", override_settings=settings))
        assert_differs(lora_only, plain)  # the LoRA acts
        both = pixels(generate(fields(), prompt=prompt, override_settings=settings))
        images_only = pixels(generate(fields(), prompt="a house", override_settings=settings))
        assert_differs(both, lora_only)  # the image prompts act with the LoRA
        assert_differs(both, images_only)  # ... and the LoRA with them
        again = pixels(generate(fields(), prompt=prompt, override_settings=settings))
        assert_same(again, both)
        zero = fields(positive_weight=0.0, negative_weight=0.0)
        assert_same(pixels(generate(zero, prompt=prompt, override_settings=settings)), lora_only)
        # the LoRA off again: the image prompts' own image, bit for bit
        assert_same(
            pixels(generate(fields(), prompt="a house", override_settings=settings)), images_only
        )
    finally:
        path.unlink(missing_ok=True)
        call("POST", "/sdapi/v1/refresh-loras")


def xyz_args(
    x_label: str, values: str = "", dropdown: list | None = None, *, text_inputs: bool = False
) -> list:
    """X/Y/Z plot's script_args (A1111 1.10): an X axis only, cells returned as images too;
    ``text_inputs``: "Use text inputs instead of dropdowns" (``values`` for an axis with
    choices)."""
    status, scripts = call("GET", "/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_type = xyz["args"][0]["choices"].index(x_label)
    nothing = [0, "", []]
    flags = [True, True, False, False, False, False, False]  # legend, lone images, ...
    return [x_type, values, dropdown or [], *nothing, *nothing, *flags, 0, text_inputs]


def test_xyz_plot_weight_axis(with_images: dict) -> None:
    answer = generate(
        fields(), script_name="x/y/z plot", script_args=xyz_args("[NegIP] Negative weight", "0, 1")
    )
    assert len(answer["images"]) == 3  # the grid, then each cell
    weights = [negip_params(infotext(answer, i))["NegIP negative weight"] for i in (1, 2)]
    assert weights == ["0.0", "1.0"]
    assert_same(pixels(answer, 2), pixels(with_images))
    assert_same(pixels(answer, 1), pixels(generate(fields(negative_weight=0.0))))


def test_xyz_plot_float_range_cell_is_restored_by_its_infotext() -> None:
    """The plot makes "0-0.3 (+0.05)" with numpy: 0.15000000000000002 for 0.15. At 20 steps step
    3 is at exactly 0.15, inside the window its infotext restores ([0.15, 1)): the cell must
    have sampled it too."""
    args = xyz_args("[NegIP] Positive start", "0-0.3 (+0.05)")
    answer = generate(fields(), script_name="x/y/z plot", script_args=args, steps=20)
    assert len(answer["images"]) == 8  # the grid, then 7 cells
    cell = infotext(answer, 4)
    assert negip_params(cell)["NegIP positive start"] == "0.15"
    images_only = [{"positive_images": [POSITIVE], "negative_images": [NEGATIVE]}]
    assert_same(pixels(generate(images_only, infotext=cell, steps=20)), pixels(answer, 4))


def test_xyz_plot_model_axis(with_images: dict) -> None:
    args = xyz_args("[NegIP] Model", dropdown=[BASE, PLUS])
    answer = generate(fields(), script_name="x/y/z plot", script_args=args)
    assert len(answer["images"]) == 3
    models = [negip_params(infotext(answer, i))["NegIP model"] for i in (1, 2)]
    assert models[0].startswith(f"{BASE} [")
    assert models[1].startswith(f"{PLUS} [")
    assert_same(pixels(answer, 1), pixels(with_images))
    assert_same(pixels(answer, 2), pixels(generate(fields(model=PLUS))))


# ---------------------------------------------------------------------------------------------
# img2img


def test_img2img_batches_after_a_refiner_switch_get_the_image_prompts() -> None:
    """A1111 makes img2img's sampler once: after the refiner took over in batch 1, batches 2
    and 3 sample with the refiner it kept while the base is loaded again. The image prompts must
    act on that UNet (they were appended for the base's: the refiner read them as text, under an
    infotext naming them). ``tiny-sd15`` has the weights of ``negip-tiny-sd15``, so every image
    equals the request without a refiner; A1111's VAE encoding draws from the global random
    state, so the same txt2img runs before each img2img."""
    loaded_two = {"sd_model_checkpoint": SD15, "sd_checkpoints_limit": 2}  # a separate refiner
    batches = {"mode": "img2img", "n_iter": 3, "override_settings": loaded_two}
    try:
        generate(None, seed=5, override_settings=loaded_two)
        refined = generate(
            fields(), refiner_checkpoint="tiny-sd15", refiner_switch_at=0.5, **batches
        )
        generate(None, seed=5, override_settings=loaded_two)
        plain = generate(fields(), **batches)
    finally:  # A1111 keeps an overridden option that was at its default: put it back
        generate(
            None,
            override_settings={"sd_checkpoints_limit": 1},
            override_settings_restore_afterwards=False,
        )
        generate(None, checkpoint="tiny-sd15")  # the limit unloads the extra model
    for index in range(3):
        assert_same(pixels(refined, index), pixels(plain, index))
        assert "NegIP model" in negip_params(infotext(refined, index))


def test_img2img_dict_and_positional_forms() -> None:
    # A1111's first img2img after a checkpoint switch (the previous test ends on tiny-sd15)
    # can differ from the next by a level or two, both without the extension: its VAE
    # encoding samples from the global random state. A throwaway request first.
    generate(mode="img2img")
    plain = pixels(generate(mode="img2img"))
    by_dict = generate(fields(), mode="img2img")
    assert_differs(pixels(by_dict), plain)
    assert stored_counts(negip_params(infotext(by_dict))) == "1 positive / 1 negative"
    assert_same(pixels(generate(positional(), mode="img2img")), pixels(by_dict))
    positive_only = generate(fields(negative_images=[]), mode="img2img")
    assert_differs(pixels(positive_only), pixels(by_dict))
    zero = generate(fields(positive_weight=0.0, negative_weight=0.0), mode="img2img")
    assert_same(pixels(zero), plain)


def test_img2img_ignores_the_hires_pass_of_an_infotext() -> None:
    # img2img has no hires fix: a restored "second" would refuse every img2img generation.
    images_only = [{"positive_images": [POSITIVE], "negative_images": [NEGATIVE]}]
    text = f"Steps: 4, Sampler: Euler, NegIP model: {BASE}, NegIP hires pass: second"
    answer = generate(images_only, mode="img2img", infotext=text)
    assert negip_params(infotext(answer))["NegIP hires pass"] == "both"
    assert_same(pixels(answer), pixels(generate(fields(), mode="img2img")))


@pytest.mark.skipif(not API_AUTH, reason="NEGIP_WEBUI_API_AUTH is not set (no --api-auth)")
def test_api_auth_guards_our_route_as_a1111s() -> None:
    """With --api-auth our route answers as A1111's own (a route that could not be added once
    took the rest of our start-up callback with it: the image prompts changed no pixel)."""
    user, _, password = API_AUTH.partition(":")
    for path in ("/sdapi/v1/sd-models", "/negip/v1/models"):
        assert call("GET", path, auth=f"{user}:{password}x")[0] == 401, path
        assert call("GET", path, auth=f"{user}x:{password}")[0] == 401, path
        status, _ = call("GET", path)
        assert status == 200, path
    request = urllib.request.Request(URL + "/negip/v1/models")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 401
    assert_differs(pixels(generate(fields())), pixels(generate()))


# ---------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_with_the_sdxl_adapter() -> None:
    plain = pixels(generate(checkpoint=SDXL))
    answer = generate(fields(model=BASE_XL), checkpoint=SDXL)
    assert_differs(pixels(answer), plain)
    assert negip_params(infotext(answer))["NegIP model"].startswith(f"{BASE_XL} [")
    zero = generate(
        fields(model=BASE_XL, positive_weight=0.0, negative_weight=0.0), checkpoint=SDXL
    )
    assert_same(pixels(zero), plain)


def test_sd15_adapter_on_sdxl_is_refused(server_log: ServerLog) -> None:
    # The tiny models have tiny context widths (64, 80), so the answer names the widths, not
    # "SD1.x"/"SDXL" (which it does for 768/2048).
    detail = expect_refused(
        server_log, fields(model=BASE), BASE, "another model family", checkpoint=SDXL
    )
    assert "width 64" in detail
    assert "width 80" in detail


# ---------------------------------------------------------------------------------------------
# Infotext restore (the API's `infotext` field)


def test_infotext_field_restores_our_settings() -> None:
    text = (
        "Steps: 4, Sampler: Euler, "
        f"NegIP model: {BASE}, NegIP positive weight: 0.5, NegIP negative weight: 1.5, "
        "NegIP negative start: 0.25, NegIP combine: concat"
    )
    images_only = [{"positive_images": [POSITIVE], "negative_images": [NEGATIVE]}]
    restored = generate(images_only, infotext=text)
    params = negip_params(infotext(restored))
    assert params["NegIP model"].startswith(f"{BASE} [")
    assert params["NegIP positive weight"] == "0.5"
    assert params["NegIP negative weight"] == "1.5"
    assert params["NegIP negative start"] == "0.25"
    assert params["NegIP positive start"] == "0.0"  # absent keys keep the defaults
    assert params["NegIP combine"] == "concat"
    explicit = generate(
        fields(positive_weight=0.5, negative_weight=1.5, negative_start=0.25, combine="concat")
    )
    assert_same(pixels(restored), pixels(explicit))


def test_infotext_of_an_image_reproduces_it(with_images: dict) -> None:
    windowed = generate(fields(positive_weight=0.75, positive_end=0.75, hires_pass="first"))
    images_only = [{"positive_images": [POSITIVE], "negative_images": [NEGATIVE]}]
    again = generate(images_only, infotext=infotext(windowed))
    assert_same(pixels(again), pixels(windowed))
    assert negip_params(infotext(again)) == negip_params(infotext(windowed))


# ---------------------------------------------------------------------------------------------
# Refused requests: HTTP 422 with a detail that names the field, one log line, no traceback


def test_unknown_model_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(model="no-such-adapter"), "no-such-adapter", "IP-Adapter")


def test_path_like_model_names_are_refused(server_log: ServerLog) -> None:
    for name in ("../ipadapter/negip-tiny-ip-adapter_sd15.safetensors", "/etc/passwd"):
        expect_refused(server_log, fields(model=name), "model", "path")


def test_bad_base64_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(negative_images=["not an image!"]), "negative_images[0]")


def test_path_as_image_is_refused_and_never_read(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(positive_images=["/etc/hostname"]), "positive_images[0]")


def test_postscript_is_refused_without_being_opened(server_log: ServerLog) -> None:
    """Pillow hands an EPS to Ghostscript: the extension refuses it from its header, in its own
    words (where Pillow read it, the answer named Ghostscript's missing "gs")."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    encoded = base64.b64encode(eps).decode()
    detail = expect_refused(server_log, fields(positive_images=[encoded]), "positive_images[0]")
    assert "not an image file of a kind read here" in detail, detail


def test_weight_out_of_range_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(positive_weight=7.5), "positive_weight", "7.5")


def test_weight_as_string_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(negative_weight="NaN"), "negative_weight")


def test_start_after_end_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(negative_start=0.8, negative_end=0.2), "negative_start")


def test_unknown_field_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(strength=1.0), "strength")


def test_no_images_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(positive_images=[], negative_images=[]), "positive_images")


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_a_window_over_the_last_steps_acts_with_the_timestep_samplers(
    mode: str, sampler: str
) -> None:
    """A1111's DDIM runs 19 steps where it says 20 (txt2img) and 2 fewer in img2img; a window
    over the last tenth of the pass still opens."""
    late = fields(positive_start=0.9, negative_weight=0.0)
    request = {"steps": 20, "sampler_name": sampler}
    plain = generate(None, mode=mode, **request)
    assert not np.array_equal(pixels(generate(late, mode=mode, **request)), pixels(plain))


HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.5}


@pytest.mark.parametrize(
    ("values", "request_values", "names"),
    [
        (
            {"hires_pass": "second"},
            {"refiner_checkpoint": SDXL, "refiner_switch_at": 0.5, **HIRES},
            ["Hires. fix pass", "no step before it had the image prompts"],
        ),
        (
            {"positive_start": 0.75, "negative_start": 0.75},
            {"refiner_checkpoint": SDXL, "refiner_switch_at": 0.5},
            ["took over sampling", "no step before it had the image prompts"],
        ),
        (
            {"negative_start": 0.75},
            {"refiner_checkpoint": SDXL, "refiner_switch_at": 0.5},
            ["took over sampling", "the negative image prompts' step window holds no step"],
        ),
    ],
    ids=["second pass on the refiner", "windows after the switch", "one window after the switch"],
)
def test_refiner_of_another_family_before_the_image_prompts_acted_is_refused(
    server_log: ServerLog, values: dict, request_values: dict, names: list[str]
) -> None:
    """An SDXL refiner after an SD1.5 base, taking over before any step had the image prompts:
    refused, not an image without them (whose infotext would name them)."""
    expect_refused(server_log, fields(**values), *names, **request_values)
    # With a window that opens before the switch, the refiner's steps just run without them.
    early = generate(fields(), refiner_checkpoint=SDXL, refiner_switch_at=0.5)
    assert "NegIP model" in negip_params(infotext(early))
    plain = generate(None, refiner_checkpoint=SDXL, refiner_switch_at=0.5)
    assert not np.array_equal(pixels(early), pixels(plain))


def test_hires_checkpoint_of_another_family_with_second_is_refused_before_sampling(
    server_log: ServerLog,
) -> None:
    """hires_pass 'second' with a Hires. fix checkpoint of another family: no step could have
    the image prompts. Refused before the first pass (read from the checkpoint's header), so
    A1111 loads no checkpoint for the Hires. fix pass (it did, and sampled the first pass)."""
    generate()  # the SD1.5 checkpoint loaded, so that the request below has none to load
    request = {"hr_checkpoint_name": SDXL, **HIRES}
    detail = expect_refused(
        server_log,
        fields(hires_pass="second"),
        f"Hires. fix checkpoint {SDXL}",
        "hires_pass is 'second'",
        **request,
    )
    assert "set hires_pass to 'both' or 'first'" in detail
    if server_log.path is not None:
        server_log.new_lines()
        generate(fields(hires_pass="second"), expect=422, **request)
        loads = re.compile(r"^(Loading weights|Reusing loaded model|Using already loaded model)")
        assert not [line for line in server_log.new_lines() if loads.match(line)]


def test_second_hires_pass_without_hires_fix_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(hires_pass="second"), "hires_pass")


def test_the_server_still_works_after_refusals(with_images: dict) -> None:
    assert_same(pixels(generate(fields())), pixels(with_images))


# ---------------------------------------------------------------------------------------------
# Round 2: block weights (presets and "index:weight" pairs)

#: SD1.x's "style" preset written out as pairs (lib_negip/blocks.py; docs/blocks.md).
SD15_STYLE_PAIRS = "0:1, 1:1, 2:1, 3:1, 9:1, 10:1, 11:1, 12:1, 13:1, 14:1, 15:1"


def test_models_endpoint_lists_the_blocks_of_each_adapter() -> None:
    status, listing = call("GET", "/negip/v1/models")
    assert status == 200
    blocks = {entry["name"]: entry["blocks"] for entry in listing["adapters"]}
    assert blocks[BASE] == 16
    assert blocks[PLUS] == 16
    assert blocks[PICKLE] == 16
    assert blocks[BASE_XL] == 11


def test_block_presets_change_the_image(with_images: dict, plain: np.ndarray) -> None:
    style = generate(fields(positive_layers="style", negative_layers="style"))
    composition = generate(fields(positive_layers="composition", negative_layers="composition"))
    assert_differs(pixels(style), pixels(with_images), at_least=0.05)
    assert_differs(pixels(composition), pixels(with_images), at_least=0.05)
    assert_differs(pixels(composition), pixels(style), at_least=0.05)
    assert_differs(pixels(style), plain)
    params = negip_params(infotext(style))
    assert params["NegIP positive layers"] == "style"
    assert params["NegIP negative layers"] == "style"
    # one side only: the other side keeps every block
    positive_style = generate(fields(positive_layers="style"))
    assert_differs(pixels(positive_style), pixels(style), at_least=0.05)
    assert negip_params(infotext(positive_style))["NegIP negative layers"] == "all"


def test_all_blocks_equals_omitting_the_field(with_images: dict) -> None:
    explicit = generate(fields(positive_layers="all", negative_layers="all"))
    assert_same(pixels(explicit), pixels(with_images))
    assert negip_params(infotext(with_images))["NegIP positive layers"] == "all"
    # an empty value or JSON null means "all" too
    assert_same(
        pixels(generate(fields(positive_layers="", negative_layers=None))), pixels(with_images)
    )


def test_preset_equals_its_pairs_written_out() -> None:
    preset = generate(fields(positive_layers="style"))
    pairs = generate(fields(positive_layers=SD15_STYLE_PAIRS))
    assert_same(pixels(pairs), pixels(preset))
    # the infotext keeps the canonical text of the pairs
    written = negip_params(infotext(pairs))["NegIP positive layers"]
    assert written.strip('"') == SD15_STYLE_PAIRS


def test_zero_block_weights_on_both_sides_equal_no_extension(plain: np.ndarray) -> None:
    for zero in ("0:0", "0:0, 7:0, 15:0"):
        answer = generate(fields(positive_layers=zero, negative_layers=zero))
        assert_same(pixels(answer), plain)


def test_pair_weights_scale_the_blocks(with_images: dict) -> None:
    half = generate(fields(positive_layers="6:0.5", negative_layers="6:0.5"))
    full = generate(fields(positive_layers="6:1", negative_layers="6:1"))
    assert_differs(pixels(half), pixels(full), at_least=0.05)
    assert_differs(pixels(full), pixels(with_images), at_least=0.05)


def test_block_out_of_range_is_refused(server_log: ServerLog) -> None:
    expect_refused(
        server_log, fields(positive_layers="99:1"), "positive_layers", "99", "0-15", '"3:1, 6:0.8"'
    )
    expect_refused(
        server_log,
        fields(model=BASE_XL, negative_layers="11:1"),
        "negative_layers",
        "0-10",
        '"3:1, 6:0.8"',
        checkpoint=SDXL,
    )


def test_blocks_or_a_mask_for_a_side_without_images_are_refused(server_log: ServerLog) -> None:
    """They would change nothing (the empty side follows the other one); accepted, they were
    written to the infotext and restored, and an out-of-range block failed only later."""
    expect_refused(
        server_log,
        fields(negative_images=[], negative_layers="16:1"),
        "negative_layers is '16:1', but the negative side has no images",
        "positive_layers",
    )
    expect_refused(
        server_log,
        fields(model=BASE_XL, negative_images=[], negative_layers="12:1"),
        "negative_layers is '12:1', but the negative side has no images",
        checkpoint=SDXL,
    )
    expect_refused(
        server_log,
        fields(negative_images=[], negative_mask=mask_png("black")),
        "negative_mask is given, but the negative side has no images",
        "positive_mask",
    )


def test_malformed_blocks_are_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(positive_layers="styles"), "positive_layers", "styles")
    expect_refused(server_log, fields(negative_layers="3:1, 3:0.5"), "negative_layers", "twice")
    expect_refused(server_log, fields(negative_layers="3:9"), "negative_layers", "-1 to 5")
    expect_refused(server_log, fields(positive_layers=3), "positive_layers")


# ---------------------------------------------------------------------------------------------
# Round 2: masks


def mask_png(kind: str, size: int = 64) -> str:
    """A mask as base64 PNG ("L"): "white", "black" or "left" (left half white)."""
    values = np.zeros((size, size), dtype=np.uint8)
    if kind == "white":
        values[:] = 255
    elif kind == "left":
        values[:, : size // 2] = 255
    else:
        assert kind == "black", kind
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_white_masks_equal_no_mask(with_images: dict) -> None:
    white = mask_png("white")
    answer = generate(fields(positive_mask=white, negative_mask=white))
    assert_same(pixels(answer), pixels(with_images))
    # a white mask of another size is scaled to the latent: still everywhere
    big = mask_png("white", 200)
    assert_same(pixels(generate(fields(positive_mask=big))), pixels(with_images))


def test_black_masks_on_both_sides_equal_no_extension(plain: np.ndarray) -> None:
    black = mask_png("black")
    assert_same(pixels(generate(fields(positive_mask=black, negative_mask=black))), plain)


def test_half_mask_differs_from_no_mask_and_from_no_extension(
    with_images: dict, plain: np.ndarray
) -> None:
    left = mask_png("left")
    answer = generate(fields(positive_mask=left, negative_mask=left))
    assert_differs(pixels(answer), pixels(with_images))
    assert_differs(pixels(answer), plain)
    params = negip_params(infotext(answer))
    for side in ("positive", "negative"):
        assert re.fullmatch(r"[0-9a-f]{16}", params[f"NegIP {side} mask"]), params
    # the mask is spatial: where it is white (the left half) the image is nearer to the
    # unmasked one than where it is black
    to_unmasked = np.abs(pixels(answer) - pixels(with_images)).mean(axis=(0, 2))
    assert to_unmasked[:32].mean() < to_unmasked[32:].mean()
    # deterministic, and one side's mask alone is another image again
    assert_same(pixels(generate(fields(positive_mask=left, negative_mask=left))), pixels(answer))
    positive_only = generate(fields(positive_mask=left))
    assert_differs(pixels(positive_only), pixels(answer), at_least=0.05)
    assert "NegIP negative mask" not in negip_params(infotext(positive_only))


def test_mask_that_is_not_an_image_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(positive_mask="not an image!"), "positive_mask")
    expect_refused(server_log, fields(negative_mask=[mask_png("white")]), "negative_mask", "list")
    expect_refused(server_log, fields(negative_mask="/etc/hostname"), "negative_mask")


# ---------------------------------------------------------------------------------------------
# Round 2: noise negatives


@pytest.fixture(scope="module")
def positive_only() -> dict:
    return generate(fields(negative_images=[]))


def test_noise_zero_equals_no_noise(positive_only: dict) -> None:
    for noise_type in ("fade", "shuffle"):
        zero = generate(
            fields(negative_images=[], negative_noise=0.0, negative_noise_type=noise_type)
        )
        assert_same(pixels(zero), pixels(positive_only))


def test_noise_fade_changes_the_image_and_is_deterministic(positive_only: dict) -> None:
    faded = generate(fields(negative_images=[], negative_noise=0.5))
    assert_differs(pixels(faded), pixels(positive_only))
    assert_same(pixels(generate(fields(negative_images=[], negative_noise=0.5))), pixels(faded))
    params = negip_params(infotext(faded))
    assert params["NegIP negative noise"] == "0.5"
    assert params["NegIP noise type"] == "fade"
    assert stored_counts(params) == "1 positive / 0 negative"  # the noise image is not stored
    stronger = generate(fields(negative_images=[], negative_noise=1.0))
    assert_differs(pixels(stronger), pixels(faded), at_least=0.05)


def test_noise_follows_the_seed(positive_only: dict) -> None:
    # The noise is drawn from the generation's seed: another seed, another noise image (the
    # plain image of that seed differs too, so compare the noise's effect on each seed).
    other_seed = {"seed": 99}
    faded = pixels(generate(fields(negative_images=[], negative_noise=0.5), **other_seed))
    again = pixels(generate(fields(negative_images=[], negative_noise=0.5), **other_seed))
    assert_same(again, faded)
    assert_differs(faded, pixels(generate(fields(negative_images=[]), **other_seed)))


def test_each_noise_type_works(positive_only: dict) -> None:
    results = {}
    for noise_type in ("fade", "dissolve", "gaussian", "shuffle"):
        answer = generate(
            fields(negative_images=[], negative_noise=0.5, negative_noise_type=noise_type)
        )
        assert_differs(pixels(answer), pixels(positive_only))
        assert negip_params(infotext(answer))["NegIP noise type"] == noise_type
        results[noise_type] = pixels(answer)
    kinds = list(results)
    for index, first in enumerate(kinds):
        for second in kinds[index + 1 :]:
            assert_differs(results[first], results[second], at_least=0.05)


def test_noise_with_negative_images_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(negative_noise=0.5), "negative_noise", "negative_images")


def test_noise_without_positive_images_is_refused(server_log: ServerLog) -> None:
    expect_refused(
        server_log,
        fields(positive_images=[], negative_images=[], negative_noise=0.5),
        "negative_noise",
        "positive_images",
    )


def test_bad_noise_values_are_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(negative_images=[], negative_noise=1.5), "negative_noise")
    expect_refused(
        server_log,
        fields(negative_images=[], negative_noise=0.5, negative_noise_type="blur"),
        "negative_noise_type",
        "fade",
    )


# ---------------------------------------------------------------------------------------------
# Round 2: model "auto"


def split_label(label: str) -> tuple[str, str]:
    match = re.fullmatch(r"(.+) \[([0-9a-f]{10})\]", label)
    assert match, f"not 'name [hash]': {label!r}"
    return match[1], match[2]


def test_model_auto_on_sd15_names_the_adapter_it_used() -> None:
    answer = generate(fields(model="auto"))
    label = negip_params(infotext(answer))["NegIP model"]
    name, _ = split_label(label)
    assert name in (BASE, PLUS, PICKLE), label  # the SD1.5 adapters, never the SDXL one
    # the label in the infotext is the adapter that acted
    assert_same(pixels(generate(fields(model=name))), pixels(answer))
    assert_same(pixels(generate(fields(model=label))), pixels(answer))
    # "auto" is the default of the dict form and of the UI's positional form
    images_only = [{"positive_images": [POSITIVE], "negative_images": [NEGATIVE]}]
    assert_same(pixels(generate(images_only)), pixels(answer))
    assert_same(pixels(generate(positional(model="auto"))), pixels(answer))
    assert negip_params(infotext(generate(images_only)))["NegIP model"] == label


def test_model_auto_on_an_sdxl_checkpoint_takes_the_sdxl_adapter() -> None:
    answer = generate(fields(model="auto"), checkpoint=SDXL)
    label = negip_params(infotext(answer))["NegIP model"]
    assert split_label(label)[0] == BASE_XL
    assert_same(pixels(generate(fields(model=BASE_XL), checkpoint=SDXL)), pixels(answer))


@pytest.mark.skipif(not SDXL_URL, reason="NEGIP_WEBUI_SDXL_URL is not set (no SDXL server)")
def test_model_auto_on_the_sdxl_server() -> None:
    log = ServerLog(SDXL_LOG)
    status, listing = call("GET", "/negip/v1/models", url=SDXL_URL)
    assert status == 200
    names = {entry["name"] for entry in listing["adapters"]}
    assert BASE_XL in names, f"install {BASE_XL} on the SDXL server: {sorted(names)}"
    plain_xl = pixels(generate(checkpoint=SDXL, url=SDXL_URL))
    answer = generate(fields(model="auto"), checkpoint=SDXL, url=SDXL_URL)
    label = negip_params(infotext(answer))["NegIP model"]
    assert split_label(label)[0] == BASE_XL
    assert "auto" not in label
    assert_differs(pixels(answer), plain_xl)
    named = generate(fields(model=BASE_XL), checkpoint=SDXL, url=SDXL_URL)
    assert_same(pixels(named), pixels(answer))
    # the infotext restores it on that server: same adapter, same image
    again = generate([], checkpoint=SDXL, url=SDXL_URL, infotext=infotext(answer))
    assert_same(pixels(again), pixels(answer))
    if BASE in names:  # an SD1.5 adapter named on the SDXL server is refused there too
        refused = generate(fields(model=BASE), checkpoint=SDXL, url=SDXL_URL, expect=422)
        assert BASE in refused["detail"]
        problems = ServerLog.problems(log.new_lines())
        assert len(problems) == 1, problems
        assert problems[0].startswith(OUR_ERROR_LINE), problems
    assert ServerLog.problems(log.new_lines()) == []


# ---------------------------------------------------------------------------------------------
# Round 2: the image prompts restored from the store by the API's `infotext` field


def infotext_only_refused(text: str, args: list) -> str:
    """The 422 detail of a request with nothing but the infotext and our ``args``."""
    body = {"infotext": text, "alwayson_scripts": {SCRIPT: {"args": args}}}
    status, answer = call("POST", "/sdapi/v1/txt2img", body)
    assert status == 422, answer
    return answer["detail"]


def infotext_only(text: str, args: list, mode: str = "txt2img", **request: Any) -> dict:
    """A request with nothing but the infotext (and our script's entry, with ``args``)."""
    body = {"infotext": text, "alwayson_scripts": {SCRIPT: {"args": args}}, **request}
    status, answer = call("POST", f"/sdapi/v1/{mode}", body)
    assert status == 200, answer
    return answer


def test_infotext_alone_restores_the_image_prompts_from_the_store() -> None:
    original = generate(
        fields(
            positive_images=[POSITIVE, OTHER],
            positive_weight=0.8,
            positive_layers="style",
            negative_layers="3:1, 6:0.5",
            positive_mask=mask_png("left"),
            combine="concat",
        ),
        seed=4321,
    )
    text = infotext(original)
    params = negip_params(text)
    assert stored_counts(params) == "2 positive / 1 negative"
    assert "NegIP positive mask" in params
    for args in ([], [{}]):
        again = infotext_only(text, args)
        assert_same(pixels(again), pixels(original))
        assert negip_params(infotext(again)) == params
        assert json.loads(again["info"])["seed"] == 4321


def test_infotext_with_an_empty_side_over_its_stored_images_is_refused(
    server_log: ServerLog,
) -> None:
    """The dict form naming a side (or mask) empty that the infotext has stored images for: the
    stored ones were used without a word (found by a probe: 200, the original image). Left out
    they are used; weight 0 draws without the side, as the same request without the infotext."""
    request = {"negative_weight": 0.7, "positive_mask": mask_png("left")}
    original = generate(fields(**request), seed=4322)
    text = infotext(original)
    for empty in ({"negative_images": []}, {"negative_images": None}, {"positive_mask": None}):
        (name,) = empty
        expect_refused(server_log, [empty], f"{name} is empty", "leave", infotext=text)
    assert_same(pixels(infotext_only(text, [{}])), pixels(original))
    # The positional form: the values sent replace the infotext's position by position (A1111);
    # without the last one (infotext_images), empty image and mask positions take the stored
    # images; with it sent as "", nothing is restored.
    sent = positional(
        negative_weight=0.7,
        positive_images=[],
        negative_images=[],
        positive_mask=None,
    )
    assert_same(pixels(infotext_only(text, sent[:-1])), pixels(original))
    detail = infotext_only_refused(text, sent)
    assert "both empty" in detail, detail
    server_log.new_lines()
    without = infotext_only(text, [{"negative_weight": 0.0}])
    direct = generate(fields(**{**request, "negative_weight": 0.0}), seed=4322)
    assert_same(pixels(without), pixels(direct))
    assert_differs(pixels(without), pixels(original))


def test_infotext_with_a_negip_key_this_version_does_not_know_is_refused(
    server_log: ServerLog,
) -> None:
    """A newer version's setting was passed over: the image came back without it."""
    text = infotext(generate(fields(negative_weight=0.7), seed=4323))
    expect_refused(
        server_log,
        [],
        "'NegIP style strength': not a Negative Image Prompt value this version knows",
        infotext=text + ", NegIP style strength: 0.5",
    )


def test_infotext_alone_restores_a_noise_negative() -> None:
    original = generate(
        fields(negative_images=[], negative_noise=0.75, negative_noise_type="dissolve")
    )
    again = infotext_only(infotext(original), [])
    assert_same(pixels(again), pixels(original))
    assert negip_params(infotext(again))["NegIP noise type"] == "dissolve"


def test_infotext_of_the_second_image_of_a_batch_restores_its_noise_negative() -> None:
    """The noise is seeded with the batch's first seed, which every image's infotext names:
    image 2, restored with its own seed, gets the same noise and comes out the same (within
    the 1/255 by which A1111 itself makes image 2 of a batch and the same seed alone differ:
    measured 1/255 on a few pixels, with or without the extension)."""
    noise = fields(negative_images=[], negative_noise=0.75, negative_noise_type="dissolve")
    original = generate(noise, seed=5150, batch_size=2)
    second = infotext(original, 1)
    assert negip_params(second)["NegIP noise seed"] == "5150"
    again = infotext_only(second, [])
    assert json.loads(again["info"])["seed"] == 5151
    difference = np.abs(pixels(again) - pixels(original, 1))
    assert difference.max() <= 1
    assert difference.mean() < 0.01
    # The noise of the image's own seed (what a restore made before) is another image.
    own_seed = generate(noise, seed=5151)
    assert np.abs(pixels(own_seed) - pixels(original, 1)).max() > 8


def test_infotext_with_a_negative_seed_restores_its_noise_negative() -> None:
    """A1111 keeps a negative seed other than -1 and writes it ("Seed: -5"); the noise seed
    is its 64-bit two's complement. The restore was refused ("'Seed' must be a whole number of
    at least 0"), in the UI too (the paste switched the extension off)."""
    noise = fields(negative_images=[], negative_noise=0.5)
    original = generate(noise, seed=-5)
    text = infotext(original)
    assert "Seed: -5," in text
    assert negip_params(text)["NegIP noise seed"] == str(2**64 - 5)
    again = infotext_only(text, [])
    assert_same(pixels(again), pixels(original))


def test_infotext_alone_restores_in_img2img() -> None:
    # The first img2img after A1111 loads a checkpoint differs (by up to 32/255, also without
    # extensions): one request first, in case an earlier test left another checkpoint loaded.
    generate(fields(negative_mask=mask_png("left")), mode="img2img")
    original = generate(fields(negative_mask=mask_png("left")), mode="img2img")
    # (A1111 takes no size from the infotext in img2img: give it as the original had it. The
    # checkpoint too: the infotext's "Model hash" is also that of the harness's tiny-sd15.)
    img2img = {
        "init_images": [OTHER],
        "denoising_strength": 0.6,
        "width": 64,
        "height": 64,
        "override_settings": {"sd_model_checkpoint": SD15},
    }
    again = infotext_only(infotext(original), [{}], mode="img2img", **img2img)
    assert_same(pixels(again), pixels(original))


def store_folder() -> Path:
    """The server's folder of stored image prompts, when this machine can see it."""
    status, flags = call("GET", "/sdapi/v1/cmd-flags")
    assert status == 200
    status, options = call("GET", "/sdapi/v1/options")
    assert status == 200
    folder = Path(options.get("negip_store_folder") or "outputs/negip-image-prompts").expanduser()
    if not folder.is_absolute():
        folder = Path(flags.get("data_dir") or ".") / folder
    if not folder.is_dir():
        pytest.skip(f"the server's image prompt folder {folder} is not on this machine")
    return folder


def test_infotext_naming_a_deleted_stored_image_is_refused(server_log: ServerLog) -> None:
    folder = store_folder()
    unique = picture(7001)  # only this test uses it
    original = generate(fields(positive_images=[unique], negative_images=[]))
    text = infotext(original)
    reference = negip_params(text)["NegIP positive images"]
    stored = folder / f"{reference}.png"
    assert stored.is_file()
    stored.unlink()
    detail = expect_refused(server_log, [], reference, "deleted", infotext=text)
    assert str(folder) not in detail  # the folder is named relative to the data folder
    # the images the request gives itself win over the infotext's references
    given = generate([{"positive_images": [unique]}], infotext=text)
    assert_same(pixels(given), pixels(original))
    assert stored.is_file()  # ... and are stored again: the infotext works again
    assert_same(pixels(infotext_only(text, [])), pixels(original))


@pytest.mark.parametrize("damage", ["garbage", "another picture"])
def test_infotext_naming_a_damaged_stored_mask_is_refused(
    server_log: ServerLog, damage: str
) -> None:
    """A stored mask whose file no longer holds it: 422 naming the reference (an unreadable
    one answered HTTP 500 with the server's path, raised from the UI's restore function that
    A1111 also runs for the API's infotext)."""
    folder = store_folder()
    mask = mask_png("left", size=48)  # only this test uses it
    original = generate(fields(positive_mask=mask))
    text = infotext(original)
    reference = negip_params(text)["NegIP positive mask"]
    stored = folder / f"{reference}.png"
    assert stored.is_file()
    if damage == "garbage":
        stored.write_bytes(b"garbage, not a png")
    else:
        Image.new("L", (48, 48), 200).save(stored)
    detail = expect_refused(server_log, [], reference, infotext=text)
    assert str(folder) not in detail
    # the mask given again is stored again: the infotext works again
    given = generate([{"positive_mask": mask}], infotext=text)
    assert_same(pixels(given), pixels(original))
    assert_same(pixels(infotext_only(text, [])), pixels(original))


def test_infotext_made_with_storing_off_needs_its_images_sent_again(
    server_log: ServerLog,
) -> None:
    """It counts its image prompts but cannot give them back: a restore that sends none for a
    counted side is refused (it answered 200, drawn without that side), one that sends them
    makes the same image."""
    storing_off = {"sd_model_checkpoint": SD15, "negip_store_images": False}
    original = generate(fields(), seed=4242, override_settings=storing_off)
    text = infotext(original)
    params = negip_params(text)
    assert params["NegIP images"] == "1 positive / 1 negative"
    assert stored_counts(params) == "0 positive / 0 negative"
    expect_refused(
        server_log,
        [{"positive_images": [POSITIVE]}],
        "made with 1 negative image prompt(s), which were not stored",
        "send them in negative_images, or set negative_weight to 0",
        infotext=text,
    )
    again = infotext_only(text, [{"positive_images": [POSITIVE], "negative_images": [NEGATIVE]}])
    assert_same(pixels(again), pixels(original))
    # A side set to weight 0 needs no image.
    infotext_only(text, [{"positive_images": [POSITIVE], "negative_weight": 0}])


def test_infotext_naming_a_malformed_reference_is_refused(server_log: ServerLog) -> None:
    text = f"Steps: 4, NegIP model: {BASE}, NegIP positive images: 12345"
    server_log.new_lines()
    detail = generate([], expect=422, infotext=text)["detail"]
    problems = ServerLog.problems(server_log.new_lines())  # consumed even when the test fails
    assert len(problems) == 1, problems
    assert problems[0].startswith(OUR_ERROR_LINE), problems
    assert "12345" in detail, detail


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("NegIP enabled: maybe", "NegIP enabled"),
        ("NegIP positive weight: abc", "NegIP positive weight"),
        ("NegIP negative noise: x", "NegIP negative noise"),
        ("NegIP images: one positive / one negative", "NegIP images"),
        ("NegIP positive weight: 0x1", "NegIP positive weight"),
    ],
)
def test_infotext_with_a_malformed_value_is_refused(
    server_log: ServerLog, entry: str, named: str
) -> None:
    """Answered with 422 naming the value (A1111's own float() of it would answer 500)."""
    text = f"Steps: 4, NegIP model: {BASE}, {entry}"
    server_log.new_lines()
    detail = generate([], expect=422, infotext=text)["detail"]
    problems = ServerLog.problems(server_log.new_lines())
    assert len(problems) == 1, problems
    assert problems[0].startswith(OUR_ERROR_LINE), problems
    assert named in detail, detail


# ---------------------------------------------------------------------------------------------
# Round 2: X/Y/Z plot axes


def test_xyz_plot_has_the_round_2_axes() -> None:
    status, scripts = call("GET", "/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = set(xyz["args"][0]["choices"])
    for label in ("Positive blocks", "Negative blocks", "Negative noise"):
        assert f"[NegIP] {label}" in labels


def test_xyz_plot_positive_blocks_axis(with_images: dict) -> None:
    args = xyz_args("[NegIP] Positive blocks", dropdown=["all", "style"])
    answer = generate(fields(), script_name="x/y/z plot", script_args=args)
    assert len(answer["images"]) == 3
    layers = [negip_params(infotext(answer, i))["NegIP positive layers"] for i in (1, 2)]
    assert layers == ["all", "style"]
    assert_same(pixels(answer, 1), pixels(with_images))
    assert_same(pixels(answer, 2), pixels(generate(fields(positive_layers="style"))))


def test_xyz_plot_negative_noise_axis(positive_only: dict) -> None:
    args = xyz_args("[NegIP] Negative noise", "0, 0.5")
    answer = generate(fields(negative_images=[]), script_name="x/y/z plot", script_args=args)
    assert len(answer["images"]) == 3
    noise = [negip_params(infotext(answer, i))["NegIP negative noise"] for i in (1, 2)]
    assert noise == ["0.0", "0.5"]
    assert_same(pixels(answer, 1), pixels(positive_only))
    faded = generate(fields(negative_images=[], negative_noise=0.5))
    assert_same(pixels(answer, 2), pixels(faded))


def test_xyz_plot_value_no_cell_can_take_is_refused_before_the_plot(
    server_log: ServerLog,
) -> None:
    """Each [NegIP] axis checks its values before the first cell (the plot draws a cell that
    fails as an empty image and goes on)."""
    expect_refused(
        server_log,
        fields(),
        "X/Y/Z plot, axis [NegIP] Positive weight: positive_weight must be from -1 to 5; got 7.0",
        script_name="x/y/z plot",
        script_args=xyz_args("[NegIP] Positive weight", "1, 7"),
    )
    expect_refused(
        server_log,
        fields(),
        "X/Y/Z plot, axis [NegIP] Model:",
        "no-such-adapter",
        script_name="x/y/z plot",
        script_args=xyz_args("[NegIP] Model", dropdown=[BASE, "no-such-adapter"]),
    )
    expect_refused(  # checked with the request's own args: it has negative images
        server_log,
        fields(),
        "X/Y/Z plot, axis [NegIP] Negative noise:",
        "negative_images",
        script_name="x/y/z plot",
        script_args=xyz_args("[NegIP] Negative noise", "0, 0.5"),
    )
    expect_refused(  # typed as text: a block no UNet has
        server_log,
        fields(),
        "X/Y/Z plot, axis [NegIP] Positive blocks: positive_layers: block 99",
        script_name="x/y/z plot",
        script_args=xyz_args("[NegIP] Positive blocks", '"3:1", "99:1"', text_inputs=True),
    )


def test_xyz_plot_axis_of_ours_with_the_extension_off_is_refused(server_log: ServerLog) -> None:
    """Before: every cell the same image without image prompts, under the axis's labels."""
    expect_refused(
        server_log,
        [{"enabled": False}],
        "the X/Y/Z plot sets Negative Image Prompt's negative_weight, but Negative Image Prompt "
        "is not enabled",
        script_name="x/y/z plot",
        script_args=xyz_args("[NegIP] Negative weight", "0, 1"),
    )


def test_xyz_plot_cell_the_extension_refuses_stops_the_plot_with_its_reason(
    server_log: ServerLog, plain: np.ndarray
) -> None:
    """A refusal only one cell's checkpoint shows (the SD1.5 adapter in the SDXL cell of a
    Checkpoint axis) was drawn as a black cell under HTTP 200, with A1111's traceback in the
    log: now the plot stops at that cell and the request is answered 422 with its reason."""
    server_log.new_lines()
    answer = generate(
        fields(),
        script_name="x/y/z plot",
        script_args=xyz_args("Checkpoint name", dropdown=[SD15, SDXL, SD15]),
        expect=422,
    )
    detail = answer["detail"]
    assert detail.startswith("X/Y/Z plot: a cell cannot be made, so the plot was stopped: ")
    assert BASE in detail
    assert "another model family" in detail
    problems = ServerLog.problems(server_log.new_lines())
    assert len(problems) == 1, problems  # the cell's one line, and no traceback
    assert problems[0].startswith(OUR_ERROR_LINE), problems
    assert_same(pixels(generate()), plain)  # nothing left patched, the checkpoint restored


# ---------------------------------------------------------------------------------------------
# Round 2: the pixel budget of one generation's image prompts


def solid_png(width: int, height: int) -> str:
    """A large one-colour PNG: small as a file, ``width * height`` pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_prompts_over_the_pixel_budget_are_refused(server_log: ServerLog) -> None:
    big = solid_png(6000, 6000)  # 36 M pixels each; 48 Mi pixels per generation
    expect_refused(
        server_log,
        fields(positive_images=[big], negative_images=[big]),
        "negative_images[0]",
        "50,331,648",
    )
    # masks count too
    expect_refused(
        server_log,
        fields(positive_images=[big], negative_images=[], positive_mask=big),
        "positive_mask",
        "50,331,648",
    )


def test_the_server_still_works_after_the_round_2_refusals(with_images: dict) -> None:
    assert_same(pixels(generate(fields())), pixels(with_images))
