"""The extension in a real AUTOMATIC1111 1.10.1, through its HTTP API, with the tiny models.

Skipped unless ``NEGIP_WEBUI_URL`` names a running A1111 (``--api``) with this extension and the
models of ``make_tiny_models.py --sdxl`` installed. ``NEGIP_WEBUI_LOG`` names the server's log:
A1111 only logs exceptions raised in extension hooks, so every test also checks that its
requests added no "Error"/"Traceback" line there, except the one ERROR line (no traceback) that
a refused request (HTTP 422) logs.

Each request names its checkpoint (``override_settings``, restored afterwards); images are
compared as decoded pixels.
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


def call(method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        URL + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
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
    status, answer = call("POST", f"/sdapi/v1/{mode}", body)
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
    assert_same(pixels(plain_batch, 0), plain)
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


def xyz_args(x_label: str, values: str = "", dropdown: list | None = None) -> list:
    """X/Y/Z plot's script_args (A1111 1.10): an X axis only, cells returned as images too."""
    status, scripts = call("GET", "/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_type = xyz["args"][0]["choices"].index(x_label)
    nothing = [0, "", []]
    flags = [True, True, False, False, False, False, False]  # legend, lone images, ...
    return [x_type, values, dropdown or [], *nothing, *nothing, *flags, 0, False]


def test_xyz_plot_weight_axis(with_images: dict) -> None:
    answer = generate(
        fields(), script_name="x/y/z plot", script_args=xyz_args("[NegIP] Negative weight", "0, 1")
    )
    assert len(answer["images"]) == 3  # the grid, then each cell
    weights = [negip_params(infotext(answer, i))["NegIP negative weight"] for i in (1, 2)]
    assert weights == ["0.0", "1.0"]
    assert_same(pixels(answer, 2), pixels(with_images))
    assert_same(pixels(answer, 1), pixels(generate(fields(negative_weight=0.0))))


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


def test_img2img_dict_and_positional_forms() -> None:
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


def test_second_hires_pass_without_hires_fix_is_refused(server_log: ServerLog) -> None:
    expect_refused(server_log, fields(hires_pass="second"), "hires_pass")


def test_the_server_still_works_after_refusals(with_images: dict) -> None:
    assert_same(pixels(generate(fields())), pixels(with_images))
