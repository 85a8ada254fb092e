"""lib_negip.args: every way arguments arrive, every way they can be wrong, and the infotext.

The A1111 side is simulated from its documented behaviour (modules/api/api.py init_script_args
and apply_infotext, modules/infotext_utils.py, processing.create_infotext): request args placed
position by position over the UI defaults or over values restored from the request's infotext;
infotext values quoted when they hold a comma, colon or newline and split by a key/value regex.
With NEGIP_A1111_DIR pointing at an A1111 checkout, the helpers are also checked against its code.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lib_negip import args as negip_args
from lib_negip.args import (
    DEFAULTS,
    FIELD_ORDER,
    INFOTEXT_ENABLED,
    INFOTEXT_FIELDS,
    INFOTEXT_IMAGES,
    MAX_IMAGES_PER_SIDE,
    NegIPArgs,
    infotext_enabled,
    infotext_hidden_text,
    infotext_image_counts,
    infotext_references,
    parse_api_dict,
    parse_infotext,
    parse_script_args,
    restore_model_label,
    split_model_label,
    to_infotext,
)
from lib_negip.errors import ArgumentError, ImageError, NegIPError
from lib_negip.prompt import StepWindow
from lib_negip.wording import UI_FORBIDDEN

RED = (200, 30, 40)
BLUE = (20, 40, 220)


# --- image fixtures ---------------------------------------------------------------------------


def solid(
    color: tuple[int, ...] = RED, size: tuple[int, int] = (6, 4), mode: str = "RGB"
) -> Image.Image:
    return Image.new(mode, size, color)


def file_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(image: Image.Image | None = None, fmt: str = "PNG") -> str:
    return base64.b64encode(file_bytes(image or solid(), fmt)).decode("ascii")


def data_url(image: Image.Image | None = None) -> str:
    return "data:image/png;base64," + b64(image)


class Upload:
    """What gradio 3.41's File component hands over besides tempfile wrappers: an object with .name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.orig_name = os.path.basename(name)


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    """A valid PNG that exists: reading it would succeed, so an error proves it was not read."""
    path = tmp_path / "secret.png"
    path.write_bytes(file_bytes(solid(BLUE)))
    return path


def full_positional(**overrides: Any) -> list[Any]:
    values = {
        "enabled": True,
        "model": "ip-adapter_sd15",
        "image_encoder": "auto",
        "positive_images": [b64()],
        "negative_images": None,
        "positive_weight": 1.0,
        "negative_weight": 1.0,
        "positive_start": 0.0,
        "positive_end": 1.0,
        "negative_start": 0.0,
        "negative_end": 1.0,
        "hires_pass": "both",
        "combine": "average",
        # Round 2's fields, at their UI defaults.
        "positive_layers": "all",
        "negative_layers": "all",
        "positive_mask": None,
        "negative_mask": None,
        "negative_noise": 0.0,
        "negative_noise_type": "fade",
        "infotext_images": "",
    }
    values.update(overrides)
    return [values[name] for name in FIELD_ORDER]


#: Round 1's positional order (13 fields): lists of this length must keep their meaning.
ROUND1_ORDER = (
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
)
#: Round 2's fields, appended in this order.
ROUND2_ORDER = (
    "positive_layers",
    "negative_layers",
    "positive_mask",
    "negative_mask",
    "negative_noise",
    "negative_noise_type",
    "infotext_images",
)
PICTURE_FIELDS = (*negip_args.IMAGE_FIELDS, *negip_args.MASK_FIELDS)


def scalars(args: NegIPArgs) -> dict[str, Any]:
    """Every field but the images and masks (PIL objects compare by identity of pixels)."""
    return {k: v for k, v in args.as_fields().items() if k not in PICTURE_FIELDS}


def colors(images: Sequence[Image.Image]) -> list[tuple[int, ...]]:
    return [tuple(image.getpixel((0, 0))) for image in images]


# --- A1111 simulation (written from its behaviour; never imported) ------------------------------

# key: a word character, then word characters, spaces, '-' or '/'; value: a JSON string in double
# quotes (backslash escapes allowed) or anything up to the next comma.
A1111_PARAM = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')
A1111_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_quote(value: Any) -> Any:
    """create_infotext's quoting: JSON-quote values holding a comma, newline or colon."""
    text = str(value)
    if "," in text or "\n" in text or ":" in text:
        return json.dumps(value, ensure_ascii=False)
    return value


def a1111_infotext(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    line = ", ".join(
        key if key == value else f"{key}: {a1111_quote(value)}"
        for key, value in params.items()
        if value is not None
    )
    return f"{prompt}\nNegative prompt: {negative}\n{line}"


def a1111_parse(infotext: str, param: re.Pattern[str] = A1111_PARAM) -> dict[str, str]:
    """The key/value part of parse_generation_parameters (prompt handling left out)."""
    *_, last = infotext.strip().split("\n")
    if len(param.findall(last)) < 3:
        last = ""
    params: dict[str, str] = {}
    for key, value in param.findall(last):
        if not value:
            continue  # A1111 fails on value[0] and skips the pair
        if value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        size = A1111_IMAGE_SIZE.match(value)
        if size is not None:
            params[f"{key}-1"], params[f"{key}-2"] = size.groups()
        else:
            params[key] = value
    return params


def ui_defaults() -> list[Any]:
    """default_script_args: the UI components' values (gradio File and Image components start as
    None)."""
    return [None if name in PICTURE_FIELDS else DEFAULTS[name] for name in FIELD_ORDER]


def a1111_script_args(request_args: Sequence[Any], infotext: str | None = None) -> list[Any]:
    """init_script_args after apply_infotext, for this script's slice of script_args."""
    script_args = ui_defaults()
    if infotext is not None:
        params = a1111_parse(infotext)
        # The UI module's infotext_fields: string keys converted with type(component.value) ...
        for key, name in INFOTEXT_FIELDS:
            if params.get(key) is not None:
                index = FIELD_ORDER.index(name)
                script_args[index] = type(script_args[index])(params[key])
        # ... the enabled checkbox with a callable target, and the stored images' references
        # (one hidden field for several keys) with another.
        script_args[0] = infotext_enabled(params)
        script_args[FIELD_ORDER.index("infotext_images")] = infotext_hidden_text(params)
    for index, value in enumerate(request_args[: len(FIELD_ORDER)]):
        script_args[index] = value
    return script_args


# --- valid forms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([], {"enabled": False}, id="empty-args-disabled"),
        pytest.param(ui_defaults(), {"enabled": False}, id="ui-defaults-disabled"),
        pytest.param(
            full_positional(
                image_encoder="ViT-H-14 [1234abcd]",
                positive_weight=0.8,
                negative_weight=-0.5,
                positive_start=0.1,
                positive_end=0.9,
                negative_start=0.2,
                negative_end=0.7,
                hires_pass="first",
                combine="concat",
            ),
            {
                "enabled": True,
                "model": "ip-adapter_sd15",
                "image_encoder": "ViT-H-14 [1234abcd]",
                "positive_weight": 0.8,
                "negative_weight": -0.5,
                "positive_start": 0.1,
                "positive_end": 0.9,
                "negative_start": 0.2,
                "negative_end": 0.7,
                "hires_pass": "first",
                "combine": "concat",
            },
            id="positional-full",
        ),
        pytest.param(
            [True, "ip-adapter_sd15", "auto", [b64()]],
            {"enabled": True, "model": "ip-adapter_sd15", "positive_weight": 1.0},
            id="positional-short-rest-default",
        ),
        pytest.param(
            full_positional(positive_weight=2, positive_end=1, negative_start=0),
            {"positive_weight": 2.0, "positive_end": 1.0, "negative_start": 0.0},
            id="positional-ints-for-floats",
        ),
        pytest.param(
            full_positional(model=" ip-adapter_sd15 ", image_encoder="Auto"),
            {"model": "ip-adapter_sd15", "image_encoder": "auto"},
            id="positional-names-stripped",
        ),
        pytest.param(
            full_positional(image_encoder=None),
            {"image_encoder": "auto"},
            id="positional-cleared-encoder-dropdown-is-auto",
        ),
        pytest.param(
            [{"model": "ip-adapter_sd15", "positive_images": [b64()]}],
            {
                "enabled": True,
                "model": "ip-adapter_sd15",
                "negative_weight": 1.0,
                "combine": "average",
            },
            id="dict-enabled-by-default",
        ),
        pytest.param(
            [
                {
                    "enabled": True,
                    "model": "ip-adapter_sd15 [0a1b2c3d]",
                    "negative_images": [b64()],
                    "negative_weight": 1.5,
                    "negative_start": 0.25,
                    "hires_pass": "second",
                }
            ],
            {"model": "ip-adapter_sd15 [0a1b2c3d]", "negative_weight": 1.5, "negative_start": 0.25},
            id="dict-negative-only",
        ),
        pytest.param(
            [{"model": "m", "positive_images": [b64()]}, *ui_defaults()[1:]],
            {"enabled": True, "model": "m"},
            id="dict-over-full-ui-defaults",
        ),
        pytest.param(
            [{"positive_images": [b64()]}, "m [abcd1234]", "auto", None, None, 0.3],
            {"enabled": True, "model": "m [abcd1234]", "positive_weight": 0.3},
            id="dict-merged-over-positional-values",
        ),
        pytest.param(
            [{"positive_images": [b64()], "positive_weight": 0.9}, "m", "auto", None, None, 0.3],
            {"positive_weight": 0.9},
            id="dict-wins-over-positional-values",
        ),
        pytest.param(
            [{"enabled": False, "model": "m", "positive_weight": 2.0}],
            {"enabled": False, "positive_weight": 1.0, "positive_layers": "all"},
            id="dict-disabled-gives-defaults",
        ),
        pytest.param(
            full_positional()[: len(ROUND1_ORDER)],
            {
                "enabled": True,
                "model": "ip-adapter_sd15",
                "combine": "average",
                "positive_layers": "all",
                "negative_layers": "all",
                "negative_noise": 0.0,
                "negative_noise_type": "fade",
                "infotext_images": "",
            },
            id="round1-positional-list-new-fields-default",
        ),
        pytest.param(
            [True, "m", "auto", [b64()], None, 0.7, 1.0, 0.0, 1.0, 0.0, 1.0, "second", "concat"],
            {"positive_weight": 0.7, "hires_pass": "second", "combine": "concat"},
            id="round1-positional-list-keeps-its-meaning",
        ),
        pytest.param(
            full_positional(
                positive_layers=" Style  ",
                negative_layers="6:0.8,3:1",
                negative_noise=0.25,
                negative_noise_type="shuffle",
            ),
            {
                "positive_layers": "style",
                "negative_layers": "3:1, 6:0.8",
                "negative_noise": 0.25,
                "negative_noise_type": "shuffle",
            },
            id="positional-full-round2",
        ),
        pytest.param(
            [{"positive_images": [b64()]}],
            {"enabled": True, "model": "auto", "image_encoder": "auto"},
            id="dict-without-model-is-auto",
        ),
    ],
)
def test_valid_script_args(values: list[Any], expected: dict[str, Any]) -> None:
    args = parse_script_args(values)
    fields = scalars(args)
    for name, value in expected.items():
        assert fields[name] == value, name
        assert type(fields[name]) is type(value), name
    assert set(fields) | set(PICTURE_FIELDS) == set(FIELD_ORDER)


def test_defaults_follow_field_order() -> None:
    assert tuple(DEFAULTS) == FIELD_ORDER
    assert len(FIELD_ORDER) == 20
    # Round 2 appended its fields: round 1's positional lists keep their meaning.
    assert FIELD_ORDER == ROUND1_ORDER + ROUND2_ORDER
    assert DEFAULTS["model"] == "auto"
    assert {name: DEFAULTS[name] for name in ROUND2_ORDER} == {
        "positive_layers": "all",
        "negative_layers": "all",
        "positive_mask": None,
        "negative_mask": None,
        "negative_noise": 0.0,
        "negative_noise_type": "fade",
        "infotext_images": "",
    }
    assert all(
        type(DEFAULTS[name]) is float
        for name in FIELD_ORDER
        if name.endswith(("weight", "start", "end", "noise"))
    )


@pytest.mark.parametrize("written", ["Auto", " AUTO "])
def test_model_auto_is_case_insensitive_like_the_encoder(written: str) -> None:
    args = parse_script_args(full_positional(model=written, image_encoder=written))
    assert args.image_encoder == "auto"
    assert args.model == "auto"


def test_args_object_defaults_are_the_defaults() -> None:
    assert scalars(NegIPArgs()) == {k: v for k, v in DEFAULTS.items() if k not in PICTURE_FIELDS}


# --- image forms ----------------------------------------------------------------------------------


def _temp_wrapper(directory: Path) -> Any:
    """A closed tempfile._TemporaryFileWrapper holding a PNG, as gradio 3.41's File returns."""
    wrapper = tempfile.NamedTemporaryFile(suffix=".png", delete=False, dir=directory)  # noqa: SIM115
    wrapper.write(file_bytes(solid(RED)))
    wrapper.close()
    return wrapper


@pytest.mark.parametrize(
    ("make_side", "expected"),
    [
        pytest.param(lambda tmp: [b64()], [RED], id="base64-png"),
        pytest.param(lambda tmp: [b64(fmt="JPEG")], ["jpeg-red"], id="base64-jpeg"),
        pytest.param(lambda tmp: [data_url()], [RED], id="data-url"),
        pytest.param(lambda tmp: [file_bytes(solid())], [RED], id="raw-bytes"),
        pytest.param(lambda tmp: [solid()], [RED], id="pil-rgb"),
        pytest.param(
            lambda tmp: [solid((0, 0, 0, 0), mode="RGBA")],
            [(255, 255, 255)],
            id="pil-rgba-transparent-on-white",
        ),
        pytest.param(lambda tmp: [solid(77, mode="L")], [(77, 77, 77)], id="pil-grey"),
        pytest.param(lambda tmp: [np.full((4, 6), 90, np.uint8)], [(90, 90, 90)], id="numpy-hw"),
        pytest.param(lambda tmp: [np.full((4, 6, 3), RED, np.uint8)], [RED], id="numpy-hwc3"),
        pytest.param(
            lambda tmp: [np.full((4, 6, 4), (*RED, 255), np.uint8)], [RED], id="numpy-hwc4"
        ),
        pytest.param(
            lambda tmp: [np.full((6, 4, 3), RED, np.uint8).transpose(1, 0, 2)],
            [RED],
            id="numpy-non-contiguous",
        ),
        pytest.param(
            lambda tmp: [{"image": solid(), "mask": solid((0, 0, 0))}],
            [RED],
            id="gradio-sketch-dict-pil",
        ),
        pytest.param(
            lambda tmp: [{"image": np.full((4, 6, 3), RED, np.uint8), "mask": None}],
            [RED],
            id="gradio-dict-numpy",
        ),
        pytest.param(lambda tmp: [{"image": b64()}], [RED], id="gradio-dict-base64"),
        pytest.param(lambda tmp: [_temp_wrapper(tmp)], [RED], id="gradio-tempfile-wrapper"),
        pytest.param(
            lambda tmp: [Upload(_temp_wrapper(tmp).name)],
            [RED],
            id="gradio-upload-object",
        ),
        pytest.param(lambda tmp: b64(), [RED], id="single-base64-not-in-list"),
        pytest.param(lambda tmp: solid(), [RED], id="single-pil-not-in-list"),
        pytest.param(
            lambda tmp: np.full((4, 6, 3), RED, np.uint8), [RED], id="single-numpy-not-in-list"
        ),
        pytest.param(lambda tmp: {"image": solid(), "mask": None}, [RED], id="single-gradio-dict"),
        pytest.param(lambda tmp: _temp_wrapper(tmp), [RED], id="single-tempfile-wrapper"),
        pytest.param(
            lambda tmp: (b64(), data_url(solid(BLUE))), [RED, BLUE], id="tuple-order-kept"
        ),
        pytest.param(
            lambda tmp: [None, b64(), None, solid(BLUE)], [RED, BLUE], id="none-entries-skipped"
        ),
        pytest.param(
            lambda tmp: [{"image": None, "mask": None}, b64()],
            [RED],
            id="empty-gradio-dict-skipped",
        ),
        pytest.param(lambda tmp: None, [], id="none-side-empty"),
        pytest.param(lambda tmp: [], [], id="empty-list"),
    ],
)
@pytest.mark.parametrize("form", ["dict", "positional"])
def test_image_forms(tmp_path: Path, make_side: Any, expected: list[Any], form: str) -> None:
    side = make_side(tmp_path)
    if form == "dict" and isinstance(side, list) and any(item is None for item in side):
        # A client's null in the API's list is refused; the UI's lists (positional) may hold
        # empty slots.
        with pytest.raises(ArgumentError, match=r"^negative_images\[0\] is null"):
            parse_script_args([{"model": "m", "negative_images": side, "positive_images": [b64()]}])
        return
    # The other side always has an image, so an empty side is valid.
    if form == "dict":
        args = parse_script_args(
            [{"model": "m", "negative_images": side, "positive_images": [solid((1, 2, 3))]}]
        )
    else:
        args = parse_script_args(
            full_positional(negative_images=side, positive_images=[solid((1, 2, 3))])
        )
    assert isinstance(args.negative_images, tuple)
    assert all(
        isinstance(image, Image.Image) and image.mode == "RGB" for image in args.negative_images
    )
    got = colors(args.negative_images)
    assert len(got) == len(expected)
    for color, want in zip(got, expected, strict=True):
        if want == "jpeg-red":
            assert max(abs(a - b) for a, b in zip(color, RED, strict=True)) <= 8
        else:
            assert color == want
    assert args.sides_present == (("positive", "negative") if expected else ("positive",))
    assert args.image_counts == (1, len(expected))


def test_image_size_is_kept() -> None:
    args = parse_api_dict({"model": "m", "positive_images": [b64(solid(size=(9, 5)))]})
    assert args.positive_images[0].size == (9, 5)


# --- invalid forms --------------------------------------------------------------------------------


def _dict(**fields: Any) -> list[Any]:
    base = {"model": "ip-adapter_sd15", "positive_images": [b64()]}
    base.update(fields)
    return [base]


INVALID = [
    # enabled
    pytest.param(
        full_positional(enabled="true"), ArgumentError, [r"enabled", r"'true'"], id="enabled-string"
    ),
    pytest.param(
        full_positional(enabled=1), ArgumentError, [r"enabled", r"true or false"], id="enabled-int"
    ),
    pytest.param(_dict(enabled=None), ArgumentError, [r"enabled"], id="dict-enabled-null"),
    # shape of the args
    pytest.param(
        [*full_positional(), "extra"],
        ArgumentError,
        [r"21 values", r"at most 20"],
        id="too-many-positional",
    ),
    pytest.param(
        [{"model": "m", "positive_weigth": 0.5, "positive_images": [b64()]}],
        ArgumentError,
        [r"'positive_weigth'", r"positive_weight"],
        id="dict-unknown-field",
    ),
    pytest.param([{1: True}], ArgumentError, [r"Unknown field", r"1"], id="dict-non-string-key"),
    # bools and strings where numbers belong
    pytest.param(
        _dict(positive_weight=True),
        ArgumentError,
        [r"positive_weight", r"True \(bool\)", r"-1 to 5"],
        id="bool-for-weight",
    ),
    pytest.param(
        full_positional(negative_start=False),
        ArgumentError,
        [r"negative_start", r"bool"],
        id="bool-for-start-positional",
    ),
    pytest.param(
        _dict(negative_weight="0.5"),
        ArgumentError,
        [r"negative_weight", r"'0.5' \(str\)", r"not strings"],
        id="string-number-in-dict",
    ),
    pytest.param(
        full_positional(positive_end="1"),
        ArgumentError,
        [r"positive_end", r"'1'"],
        id="string-number-positional",
    ),
    pytest.param(
        _dict(positive_weight=None),
        ArgumentError,
        [r"positive_weight", r"got null\."],
        id="null-weight",
    ),
    # non-finite and out of range
    pytest.param(
        _dict(positive_weight=math.nan),
        ArgumentError,
        [r"positive_weight", r"finite", r"nan"],
        id="nan-weight",
    ),
    pytest.param(
        _dict(negative_weight=math.inf),
        ArgumentError,
        [r"negative_weight", r"finite", r"inf"],
        id="inf-weight",
    ),
    pytest.param(
        _dict(positive_start=-math.inf),
        ArgumentError,
        [r"positive_start", r"finite"],
        id="minus-inf-start",
    ),
    pytest.param(
        _dict(negative_weight=-(10**400)),
        ArgumentError,
        [r"negative_weight", r"finite", r"-inf"],
        id="int-beyond-float-range",
    ),
    pytest.param(
        _dict(positive_weight=5.5),
        ArgumentError,
        [r"positive_weight", r"-1 to 5", r"5\.5"],
        id="weight-above-5",
    ),
    pytest.param(
        _dict(negative_weight=-1.01),
        ArgumentError,
        [r"negative_weight", r"-1 to 5"],
        id="weight-below-minus-1",
    ),
    pytest.param(
        _dict(positive_start=-0.1),
        ArgumentError,
        [r"positive_start", r"0 to 1"],
        id="start-below-0",
    ),
    pytest.param(
        _dict(negative_end=1.5),
        ArgumentError,
        [r"negative_end", r"0 to 1", r"1\.5"],
        id="end-above-1",
    ),
    pytest.param(
        _dict(positive_start=0.8, positive_end=0.2),
        ArgumentError,
        [r"positive_start \(0\.8\)", r"positive_end \(0\.2\)"],
        id="positive-start-after-end",
    ),
    pytest.param(
        full_positional(negative_start=0.6, negative_end=0.5),
        ArgumentError,
        [r"negative_start", r"negative_end"],
        id="negative-start-after-end",
    ),
    # choices
    pytest.param(
        _dict(hires_pass="Both"),
        ArgumentError,
        [r"hires_pass", r"'both', 'first', 'second'", r"'Both'"],
        id="hires-pass-case",
    ),
    pytest.param(
        _dict(hires_pass=2), ArgumentError, [r"hires_pass", r"2 \(int\)"], id="hires-pass-int"
    ),
    pytest.param(
        _dict(combine="sum"),
        ArgumentError,
        [r"combine", r"'average', 'concat'", r"'sum'"],
        id="combine-unknown",
    ),
    # model and encoder
    pytest.param(_dict(model=5), ArgumentError, [r"model", r"5 \(int\)"], id="model-int"),
    pytest.param(  # not echoed back whole (a 10 MB name made a 20 MB answer)
        _dict(model="a" * 10_000_000),
        ArgumentError,
        [r"^model is 10,000,000 characters long \('a{30,60}\.\.\. \(str\)\); a model name has "],
        id="model-name-too-long",
    ),
    pytest.param(
        _dict(image_encoder="b" * 301),
        ArgumentError,
        [r"^image_encoder is 301 characters long"],
        id="encoder-name-too-long",
    ),
    pytest.param(
        _dict(positive_layers="1:1," * 300),
        ArgumentError,
        [r"^positive_layers is 1,200 characters long \('1:1,1:1,", r"at most 1000 characters"],
        id="layers-too-long",
    ),
    pytest.param(
        _dict(model="None"),
        ArgumentError,
        [r"model", r"no IP-Adapter model"],
        id="enabled-model-None",
    ),
    pytest.param(
        _dict(model=""), ArgumentError, [r"model", r"no IP-Adapter model"], id="enabled-model-empty"
    ),
    pytest.param(
        _dict(model=None),
        ArgumentError,
        [r"model", r"GET /negip/v1/models"],
        id="enabled-model-null",
    ),
    pytest.param(
        full_positional(model="None"), ArgumentError, [r"model"], id="positional-enabled-model-None"
    ),
    pytest.param(
        _dict(image_encoder=["auto"]), ArgumentError, [r"image_encoder", r"list"], id="encoder-list"
    ),
    pytest.param(
        _dict(image_encoder=" "), ArgumentError, [r"image_encoder is empty"], id="encoder-empty"
    ),
    # images
    pytest.param(
        _dict(positive_images=[]),
        ArgumentError,
        [r"positive_images and negative_images are both empty"],
        id="enabled-without-images",
    ),
    pytest.param(
        full_positional(positive_images=None, negative_images=[None, {"image": None}]),
        ArgumentError,
        [r"positive_images", r"negative_images"],
        id="enabled-positional-only-empty-images",
    ),
    pytest.param(
        _dict(negative_images=[b64()] * (MAX_IMAGES_PER_SIDE + 1)),
        ArgumentError,
        [r"negative_images has 17 images", r"at most 16"],
        id="too-many-images",
    ),
    pytest.param(
        _dict(positive_images=["not base64 !"] * 40),
        ArgumentError,
        [r"positive_images has 40 images"],
        id="too-many-counted-before-decoding",
    ),
    pytest.param(
        _dict(negative_images=[b64(), b64(), "bm90IGFuIGltYWdl"]),
        ImageError,
        [r"^negative_images\[2\]: ", r"not an image file"],
        id="bad-image-named-with-index",
    ),
    pytest.param(
        _dict(negative_images=[b64(), None, b64()]),
        ArgumentError,
        [r"^negative_images\[1\] is null: each entry must be an image", r"Leave the entry out"],
        id="null-entry-of-an-api-list",
    ),
    pytest.param(
        _dict(positive_images=["%%%"]),
        ImageError,
        [r"positive_images\[0\]", r"not valid base64"],
        id="invalid-base64",
    ),
    pytest.param(
        _dict(positive_images=[""]),
        ImageError,
        [r"positive_images\[0\]", r"empty string"],
        id="empty-string-image",
    ),
    pytest.param(
        _dict(positive_images=["https://example.com/cat.png"]),
        ImageError,
        [r"positive_images\[0\]", r"not downloaded", r"^(?!.*file paths)"],
        id="http-url",
    ),
    pytest.param(
        _dict(negative_images=[b64(), b64(Image.new("RGB", (1, 5000)))]),
        ImageError,
        [r"^negative_images\[1\]: The image is 1x5000, a strip too thin for CLIP"],
        id="thin-strip",
    ),
    pytest.param(
        _dict(positive_images=["data:image/png," + b64()]),
        ImageError,
        [r"positive_images\[0\]", r"not base64-encoded"],
        id="data-url-not-base64",
    ),
    pytest.param(
        _dict(positive_images=[5]),
        ArgumentError,
        [r"positive_images\[0\]", r"5 \(int\)", r"base64"],
        id="int-image",
    ),
    pytest.param(
        _dict(positive_images=5.0),
        ArgumentError,
        [r"positive_images\[0\]", r"float"],
        id="float-side",
    ),
    pytest.param(
        _dict(positive_images=[np.zeros((4, 4, 3), np.float32)]),
        ArgumentError,
        [r"positive_images\[0\]", r"uint8", r"float32"],
        id="numpy-float",
    ),
    pytest.param(
        _dict(positive_images=[np.zeros((4, 4, 2), np.uint8)]),
        ArgumentError,
        [r"positive_images\[0\]", r"4x4x2", r"HxWx3"],
        id="numpy-two-channels",
    ),
    pytest.param(
        _dict(positive_images=[np.zeros((0, 4, 3), np.uint8)]),
        ArgumentError,
        [r"positive_images\[0\]", r"at least one pixel"],
        id="numpy-empty",
    ),
    pytest.param(
        _dict(positive_images=[{"image": {"image": b64()}}]),
        ArgumentError,
        [r"positive_images\[0\]", r"not a dict"],
        id="nested-gradio-dict",
    ),
    pytest.param(
        _dict(positive_images=[Path("cat.png")]),
        ArgumentError,
        [r"positive_images\[0\]", r"PosixPath|WindowsPath"],
        id="pathlib-path-object",
    ),
    pytest.param(
        _dict(positive_images=[Upload("/nonexistent/negip/upload.png")]),
        ImageError,
        [r"positive_images\[0\]", r"'upload.png' cannot be read"],
        id="upload-missing-file",
    ),
    pytest.param(
        [*_dict(positive_images=[b64()]), {"enabled": False}],
        ArgumentError,
        [r"more than one dict: send one dict of named fields"],
        id="second-dict-after-the-fields",
    ),
]


@pytest.mark.parametrize(("values", "error", "patterns"), INVALID)
def test_invalid_script_args(
    values: list[Any], error: type[NegIPError], patterns: list[str]
) -> None:
    with pytest.raises(error) as caught:
        parse_script_args(values)
    for pattern in patterns:
        assert re.search(pattern, str(caught.value)), (pattern, str(caught.value))


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"model": "m"}, id="bare-dict"),
        pytest.param("[true]", id="string"),
        pytest.param(None, id="none"),
    ],
)
def test_args_must_be_a_list(values: Any) -> None:
    with pytest.raises(ArgumentError, match=r"must be a list"):
        parse_script_args(values)


def test_parse_api_dict_needs_a_mapping() -> None:
    with pytest.raises(ArgumentError, match=r"JSON object of named fields"):
        parse_api_dict(["model"])  # type: ignore[arg-type]


# --- files are read only from in-process upload objects -------------------------------------------


@pytest.mark.parametrize(
    "make_item",
    [
        pytest.param(lambda path: {"name": str(path)}, id="name-dict"),
        pytest.param(
            lambda path: {"name": str(path), "data": None, "is_file": True}, id="gradio-file-json"
        ),
        pytest.param(lambda path: {"path": str(path)}, id="path-dict"),
    ],
)
def test_file_reference_dicts_are_refused(png_file: Path, make_item: Any) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_script_args(_dict(positive_images=[b64(), make_item(png_file)]))
    message = str(caught.value)
    assert message.startswith("positive_images[1]: ")
    assert "never read" in message
    assert "base64" in message


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda path: str(path), id="absolute"),
        pytest.param(lambda path: os.path.relpath(path), id="relative"),
        pytest.param(lambda path: "file://" + str(path), id="file-url"),
        pytest.param(lambda path: path.name, id="bare-file-name"),
    ],
)
def test_path_strings_are_base64_never_paths(
    png_file: Path, make_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(png_file.parent)  # so that even the bare name would resolve
    with pytest.raises(ImageError) as caught:
        parse_script_args(_dict(negative_images=[make_path(png_file)]))
    message = str(caught.value)
    assert message.startswith("negative_images[0]: ")
    assert "file paths are never opened" in message


def test_upload_object_is_read(tmp_path: Path) -> None:
    wrapper = _temp_wrapper(tmp_path)
    args = parse_api_dict({"model": "m", "positive_images": [wrapper, Upload(wrapper.name)]})
    assert colors(args.positive_images) == [RED, RED]


# --- disabled args never fail a generation ------------------------------------------------------

GARBAGE_POSITIONAL = [
    False,
    12,
    ["auto"],
    "not an image",
    [{"name": "/etc/passwd"}],
    "heavy",
    True,
    math.nan,
    2.0,
    "x",
    None,
    "third",
    # round 2's fields
    "no such preset",
    ["3:1"],
    "not a mask",
    {"image": "garbage", "mask": "garbage"},
    math.inf,
    "perlin",
    "positive images: not-a-reference",
]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(GARBAGE_POSITIONAL, id="positional-disabled-garbage"),
        pytest.param([False, "None", "auto", [b64()] * 100], id="positional-disabled-many-images"),
        pytest.param(
            [
                {
                    "enabled": False,
                    "positive_images": "garbage",
                    "negative_images": [{"name": "/etc/passwd"}],
                    "positive_mask": "garbage",
                    "negative_mask": {"image": b64(), "mask": "garbage"},
                }
            ],
            id="dict-disabled-garbage-images",
        ),
        pytest.param(
            [{"enabled": False}, *GARBAGE_POSITIONAL[1:]],
            id="dict-disabled-over-garbage-positional",
        ),
    ],
)
def test_disabled_with_garbage_passes(values: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*_: Any, **__: Any) -> None:
        raise AssertionError("a disabled request decoded an image")

    monkeypatch.setattr(negip_args.image_io, "decode_image", no_decoding)
    assert parse_script_args(values) == NegIPArgs()


def test_disabled_dict_still_reports_its_own_mistakes() -> None:
    # A client that sends a dict addresses us explicitly: its typos and bad values are answered.
    with pytest.raises(ArgumentError, match=r"positive_weight"):
        parse_script_args([{"enabled": False, "positive_weight": "high"}])
    with pytest.raises(ArgumentError, match=r"'weight'"):
        parse_script_args([{"enabled": False, "weight": 1.0}])
    with pytest.raises(ArgumentError, match=r"^negative_layers"):
        parse_script_args([{"enabled": False, "negative_layers": "no such preset"}])
    with pytest.raises(ArgumentError, match=r"^negative_noise must be from 0 to 1"):
        parse_script_args([{"enabled": False, "negative_noise": 2.0}])
    with pytest.raises(ArgumentError, match=r"^negative_noise_type must be one of"):
        parse_script_args([{"enabled": False, "negative_noise_type": "perlin"}])
    with pytest.raises(ArgumentError, match=r"^infotext_images: "):
        parse_script_args([{"enabled": False, "infotext_images": "positive images: 12"}])


# --- A1111's request flow: infotext-restored positional values under a dict ----------------------


PREVIOUS = NegIPArgs(
    enabled=True,
    model="ip-adapter, plus [0a1b2c3d]",
    image_encoder="ViT-H-14",
    positive_images=(solid(),),
    negative_images=(solid(BLUE), solid(BLUE)),
    positive_weight=0.6,
    negative_weight=0.3,
    positive_end=0.8,
    hires_pass="first",
    combine="concat",
)


def previous_infotext() -> str:
    params = {"Steps": 20, "Sampler": "Euler a", "Size": "512x768"}
    params.update(to_infotext(PREVIOUS, PREVIOUS.model, "ViT-H-14 [6ca9667d]"))
    params["Version"] = "v1.10.1"
    return a1111_infotext("a house", "", params)


def test_dict_over_infotext_restored_values() -> None:
    values = a1111_script_args(
        [{"positive_images": [b64()], "negative_images": [b64()], "negative_weight": 1.25}],
        previous_infotext(),
    )
    args = parse_script_args(values)
    assert args.enabled
    assert args.model == "ip-adapter, plus [0a1b2c3d]"
    assert args.image_encoder == "ViT-H-14 [6ca9667d]"
    assert (args.positive_weight, args.positive_end) == (0.6, 0.8)  # restored
    assert args.negative_weight == 1.25  # the dict wins
    assert (args.hires_pass, args.combine) == ("first", "concat")
    # Made with storing off: no image comes back; the request's own count, not the infotext's.
    assert args.image_counts == (1, 1)
    assert args.unstored_counts == (1, 2)


def test_an_unstored_side_must_be_sent_again_or_weighted_0() -> None:
    """The infotext counts 2 negative images it cannot give back: a request that sends none for
    that side would make another picture under the same settings."""
    infotext = previous_infotext()
    with pytest.raises(
        ArgumentError,
        match=r"made with 2 negative image prompt\(s\), which "
        r"were not stored .* send them in negative_images, or set negative_weight "
        r"to 0\.$",
    ):
        parse_script_args(a1111_script_args([{"positive_images": [b64()]}], infotext))
    with pytest.raises(ArgumentError, match=r"made with 1 positive and 2 negative image"):
        parse_script_args(a1111_script_args([{}], infotext))
    args = parse_script_args(
        a1111_script_args([{"positive_images": [b64()], "negative_weight": 0}], infotext)
    )
    assert (args.image_counts, args.negative_weight) == ((1, 0), 0.0)


def test_positional_request_overrides_infotext() -> None:
    request = [True, "ip-adapter_sd15", "auto", [b64()], [b64()], 0.5]
    args = parse_script_args(a1111_script_args(request, previous_infotext()))
    assert (args.model, args.image_encoder, args.positive_weight) == (
        "ip-adapter_sd15",
        "auto",
        0.5,
    )
    assert args.negative_weight == 0.3  # position 6 not sent: restored from the infotext


def test_infotext_without_negip_leaves_disabled() -> None:
    infotext = a1111_infotext("a house", "", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7})
    assert parse_script_args(a1111_script_args([], infotext)) == NegIPArgs()


def test_parse_api_dict_over_base() -> None:
    base = NegIPArgs(enabled=True, model="m", positive_images=(solid(),), positive_weight=0.5)
    args = parse_api_dict({"negative_images": [b64(solid(BLUE))]}, base)
    assert args.positive_weight == 0.5
    assert colors(args.positive_images) == [RED]
    assert colors(args.negative_images) == [BLUE]
    assert parse_api_dict(
        {"positive_images": None, "negative_images": [b64()]}, base
    ).image_counts == (0, 1)


# --- the arguments object --------------------------------------------------------------------------


def test_args_object_is_frozen_and_valid_by_construction() -> None:
    args = NegIPArgs(
        enabled=True,
        model="m",
        negative_images=[solid((0, 0, 0, 0), mode="RGBA")],
        positive_weight=2,
    )
    assert isinstance(args.negative_images, tuple)
    assert colors(args.negative_images) == [(255, 255, 255)]
    assert type(args.positive_weight) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.model = "other"  # type: ignore[misc]
    with pytest.raises(ArgumentError, match=r"negative_images"):
        dataclasses.replace(args, negative_images=())
    with pytest.raises(ArgumentError, match=r"positive_start"):
        dataclasses.replace(args, positive_start=0.9, positive_end=0.1)
    with pytest.raises(ArgumentError, match=r"positive_images\[0\] must be a PIL image"):
        NegIPArgs(positive_images=(b64(),))
    assert hash(args) == hash(dataclasses.replace(args))
    assert "negative_images=1" in repr(args)
    assert b64()[:20] not in repr(args)


def test_windows_and_sides() -> None:
    args = parse_api_dict(
        {
            "model": "m",
            "negative_images": [b64()],
            "positive_start": 0.2,
            "positive_end": 0.7,
            "negative_end": 0.5,
        }
    )
    assert args.positive_window == StepWindow(0.2, 0.7)
    assert args.negative_window == StepWindow(0.0, 0.5)
    assert args.sides_present == ("negative",)
    assert NegIPArgs().sides_present == ()


# --- infotext ----------------------------------------------------------------------------------------

EXPECTED_KEYS = [
    "NegIP model",
    "NegIP encoder",
    "NegIP images",
    "NegIP positive weight",
    "NegIP positive start",
    "NegIP positive end",
    "NegIP negative weight",
    "NegIP negative start",
    "NegIP negative end",
    "NegIP hires pass",
    "NegIP combine",
    "NegIP positive layers",
    "NegIP negative layers",
    "NegIP negative noise",
    "NegIP noise type",
]


def test_infotext_keys_and_values() -> None:
    params = to_infotext(PREVIOUS, "ip-adapter, plus [0a1b2c3d]", "ViT-H-14 [6ca9667d]")
    assert list(params) == EXPECTED_KEYS
    assert params["NegIP images"] == "1 positive / 2 negative"
    assert params["NegIP positive weight"] == 0.6
    assert params["NegIP hires pass"] == "first"
    # Round 2's keys are always written, at their defaults too.
    assert params["NegIP positive layers"] == "all"
    assert params["NegIP negative layers"] == "all"
    assert params["NegIP negative noise"] == 0.0
    assert type(params["NegIP negative noise"]) is float
    assert params["NegIP noise type"] == "fade"
    assert [key for key, _ in INFOTEXT_FIELDS] == [k for k in EXPECTED_KEYS if k != INFOTEXT_IMAGES]
    # Every field has a key, except enabled (implied), the images and masks (stored, named by
    # reference) and infotext_images (restored from the reference keys).
    assert {name for _, name in INFOTEXT_FIELDS} == set(FIELD_ORDER) - {
        "enabled",
        *PICTURE_FIELDS,
        "infotext_images",
    }
    for key, value in params.items():
        assert re.fullmatch(r"\w[\w /-]+", key), key  # A1111's key pattern
        assert not A1111_IMAGE_SIZE.match(str(value)), key  # would be split into key-1/key-2
        assert str(value).strip(), key  # an empty value makes A1111 skip the pair
    assert to_infotext(NegIPArgs(), "m", "e") == {}
    # Slider noise is not written (0.15000000000000002 -> 0.15), nor a negative zero.
    noisy = dataclasses.replace(PREVIOUS, negative_start=0.1 + 0.05, positive_weight=-0.0)
    written = to_infotext(noisy, "m", "e")
    assert str(written["NegIP negative start"]) == "0.15"
    assert str(written["NegIP positive weight"]) == "0.0"


@pytest.mark.parametrize("label", ["", "  ", None])
def test_infotext_needs_labels(label: Any) -> None:
    with pytest.raises(ArgumentError, match=r"model_label"):
        to_infotext(PREVIOUS, label, "ViT-H-14")


@pytest.mark.parametrize(
    ("args", "model_label", "encoder_label"),
    [
        pytest.param(
            NegIPArgs(enabled=True, model="m", positive_images=(solid(),)),
            "ip-adapter_sd15 [a1b2c3d4]",
            "ViT-H-14 [6ca9667d]",
            id="defaults",
        ),
        pytest.param(
            PREVIOUS, "ip-adapter, plus [0a1b2c3d]", "ViT-H-14", id="label-with-comma-and-brackets"
        ),
        pytest.param(
            PREVIOUS,
            "models:ip-adapter [abcd]",
            "clip: vit-h, laion [ffff0000]",
            id="labels-with-colons",
        ),
        pytest.param(
            PREVIOUS, 'say "hi", [x] [beef1234]', 'a\\b "c"', id="labels-with-quotes-and-backslash"
        ),
        pytest.param(PREVIOUS, "ip-adapter [0a1b]\nSteps: 99", "ViT-H-14", id="label-with-newline"),
        pytest.param(PREVIOUS, "画像 adapter, 試 [00ff]", "ViT-bigG-14", id="non-ascii-label"),
        pytest.param(
            NegIPArgs(
                enabled=True,
                model="m",
                negative_images=(solid(),),
                positive_weight=-1,
                negative_weight=4.999,
                positive_start=0.05,
                positive_end=0.05,
                negative_start=0.15000000000000002,
                negative_end=1,
                hires_pass="second",
                combine="average",
            ),
            "m",
            "auto-picked",
            id="edge-values",
        ),
        pytest.param(
            NegIPArgs(
                enabled=True,
                model="m",
                positive_images=(solid(),),
                positive_layers="3:1, 6:0.8",
                negative_layers="strong style",
                negative_noise=0.35,
                negative_noise_type="gaussian",
            ),
            "m",
            "e",
            id="layer-pairs-with-comma-and-colon-and-noise",
        ),
        pytest.param(
            NegIPArgs(
                enabled=True,
                model="m",
                positive_images=(solid(),),
                negative_images=(solid(),),
                positive_layers="0:-1, 15:5, 7:0.125",
                negative_layers="style and composition",
                negative_noise_type="dissolve",
            ),
            "m",
            "e",
            id="layer-pairs-edge-weights",
        ),
    ],
)
def test_infotext_round_trip(args: NegIPArgs, model_label: str, encoder_label: str) -> None:
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7, "Size": "512x512"}
    params.update(to_infotext(args, model_label, encoder_label))
    params["Model hash"] = "45dee52b"
    restored = a1111_parse(a1111_infotext("a house, snow", "lawn", params))
    assert restored["Steps"] == "20"  # the neighbours are intact
    assert restored["Model hash"] == "45dee52b"

    fields = parse_infotext(restored)
    expected = scalars(args)
    expected["model"] = model_label.strip()
    expected["image_encoder"] = encoder_label.strip()
    # Written without references (storing off): the hidden field counts the images to send.
    expected["infotext_images"] = "not stored: {} positive / {} negative".format(*args.image_counts)
    assert fields.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, float):
            assert fields[name] == pytest.approx(value, abs=1e-10), name
            assert type(fields[name]) is float, name
        else:
            assert fields[name] == value, name
    assert infotext_enabled(restored) is True
    assert infotext_image_counts(restored) == args.image_counts

    # A1111's own restore with the string keys (type(component.value)(text)) agrees.
    for key, name in INFOTEXT_FIELDS:
        assert type(DEFAULTS[name])(restored[key]) == fields[name], key

    # The restored fields are accepted as they are by the dict form (the images come anew).
    positive, negative = args.image_counts
    again = parse_api_dict(
        {**fields, "positive_images": [b64()] * positive, "negative_images": [b64()] * negative}
    )
    assert scalars(again) == {**fields, "enabled": True}


def test_parse_infotext_refuses_a_name_no_file_has_without_echoing_it() -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_infotext({"NegIP model": "a" * 400_000})
    message = str(caught.value)
    assert message.startswith("Infotext 'NegIP model' is 400,000 characters long"), message
    assert len(message) < 300


def test_parse_infotext_ignores_other_keys() -> None:
    assert parse_infotext({"Steps": "20", "Negative prompt": "NegIP model: x", "NegIPx": "1"}) == {}
    fields = parse_infotext({"Steps": "20", "NegIP combine": "concat", "NegIPx": "7"})
    # infotext_images is always there (empty without references): a pasted infotext replaces
    # the references of an earlier paste.
    assert fields == {"enabled": True, "combine": "concat", "infotext_images": ""}


def test_parse_infotext_refuses_a_negip_key_it_does_not_know() -> None:
    """A newer version's value (or a typo) was passed over, so the restored image differed
    without a word; every key this version writes or reads is known."""
    with pytest.raises(ArgumentError) as raised:
        parse_infotext({"Steps": "20", "NegIP combine": "concat", "NegIP future key": "7"})
    assert str(raised.value) == (
        "Infotext 'NegIP future key': not a Negative Image Prompt value this version knows (a "
        "newer version's, or a typo), so the image it describes cannot be made again here. "
        "Update the extension, or take the value out of the infotext."
    )
    # Spelled in another letter case or with two spaces (a hand edit A1111 passes over; with
    # no exact key the extension was switched off without a word): refused, naming the key.
    for typo, key in (("negip model", "NegIP model"), ("NegIP  combine", "NegIP combine")):
        with pytest.raises(ArgumentError, match=rf"typo: the key is '{key}'\)"):
            parse_infotext({typo: "concat", "Steps": "4"})
    with pytest.raises(ArgumentError, match=r"^Infotext 'Negip thing': "):
        parse_infotext({"NegIP model": "m", "Negip thing": "1"})
    written = to_infotext(ROUND2, "m", "e", {"positive_images": [REF_A]}, noise_seed=5)
    everything = {**written, "NegIP images": "1 positive / 0 negative", "NegIP enabled": "True"}
    assert parse_infotext({key: str(value) for key, value in everything.items()})["enabled"]


@pytest.mark.parametrize(
    ("params", "enabled"),
    [
        pytest.param({"NegIP model": "m", INFOTEXT_ENABLED: "False"}, False, id="False"),
        pytest.param({"NegIP model": "m", INFOTEXT_ENABLED: "false"}, False, id="false"),
        pytest.param({"NegIP model": "m", INFOTEXT_ENABLED: " True "}, True, id="True"),
        pytest.param({INFOTEXT_ENABLED: "0"}, False, id="zero"),
        pytest.param({"NegIP model": "m"}, True, id="implied-by-any-key"),
        pytest.param({"Steps": "20"}, False, id="no-negip-key"),
    ],
)
def test_infotext_bool_parsing(params: dict[str, str], enabled: bool) -> None:
    assert bool("False") is True  # why A1111's type(component.value)(text) cannot be used
    assert infotext_enabled(params) is enabled
    assert parse_infotext(params).get("enabled", False) is enabled


@pytest.mark.parametrize(
    ("params", "patterns"),
    [
        pytest.param(
            {"NegIP positive weight": "heavy"},
            ["'NegIP positive weight'", "positive_weight", "-1 to 5"],
            id="not-a-number",
        ),
        pytest.param(
            {"NegIP negative weight": "7"},
            ["'NegIP negative weight'", "-1 to 5", "7"],
            id="out-of-range",
        ),
        pytest.param(
            {"NegIP positive start": "nan"}, ["'NegIP positive start'", "finite"], id="nan"
        ),
        pytest.param(
            {"NegIP hires pass": "third"},
            ["'NegIP hires pass'", "hires_pass", "'both'"],
            id="bad-choice",
        ),
        pytest.param(
            {INFOTEXT_ENABLED: "maybe"}, ["'NegIP enabled'", "True or False"], id="bad-bool"
        ),
    ],
)
def test_parse_infotext_errors_name_the_key(params: dict[str, str], patterns: list[str]) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_infotext(params)
    for pattern in patterns:
        assert pattern in str(caught.value), (pattern, str(caught.value))


def test_a_value_a1111_split_in_two_is_named_by_its_own_key() -> None:
    # "NegIP positive weight: 0x1" reaches us as "NegIP positive weight-1" and "-2"; the
    # message said the keys were a newer version's and told the user to update.
    params = {"NegIP positive weight-1": "0", "NegIP positive weight-2": "1"}
    with pytest.raises(ArgumentError) as raised:
        parse_infotext({"NegIP model": "auto", **params})
    assert str(raised.value).startswith(
        "Infotext 'NegIP positive weight' holds a value of the form '<number>x<number>'"
    )
    assert "Update" not in str(raised.value)


def test_image_counts_from_infotext() -> None:
    assert infotext_image_counts({INFOTEXT_IMAGES: "2 positive / 0 negative"}) == (2, 0)
    assert infotext_image_counts({}) is None


@pytest.mark.parametrize(
    "value", ["two", "1 positive, 1 negative", "one positive / one negative", "1 positive / 1"]
)
def test_a_malformed_image_count_is_refused_not_read_as_absent(value: str) -> None:
    # Read as absent, a restore of an infotext made with storing off would drop the sides it
    # counts without a word.
    with pytest.raises(ArgumentError, match=r"'NegIP images' must read '<n> positive / <m> "):
        infotext_image_counts({INFOTEXT_IMAGES: value})
    with pytest.raises(ArgumentError, match="'NegIP images'"):
        parse_infotext({"NegIP positive weight": "0.5", INFOTEXT_IMAGES: value})


@pytest.mark.parametrize(
    ("label", "restored", "split"),
    [
        pytest.param(
            "ip-adapter_sd15 [a1B2c3d4]",
            "ip-adapter_sd15 [a1B2c3d4]",
            ("ip-adapter_sd15", "a1b2c3d4"),
            id="name-hash",
        ),
        pytest.param(
            "  ip-adapter, plus [0a1b]  ",
            "ip-adapter, plus [0a1b]",
            ("ip-adapter, plus", "0a1b"),
            id="comma-stripped",
        ),
        pytest.param(
            "ip-adapter_sd15", "ip-adapter_sd15", ("ip-adapter_sd15", None), id="plain-name"
        ),
        pytest.param("face [v2]", "face [v2]", ("face [v2]", None), id="brackets-not-a-hash"),
        pytest.param("[abcd]", "[abcd]", ("[abcd]", None), id="hash-only"),
        pytest.param("", "None", ("", None), id="empty"),
    ],
)
def test_model_labels(label: str, restored: str, split: tuple[str, str | None]) -> None:
    assert restore_model_label(label) == restored
    assert split_model_label(label) == split


# --- the simulation's helpers against a real A1111 checkout (optional) ---------------------------


def _a1111_source() -> ast.Module:
    directory = os.environ.get("NEGIP_A1111_DIR")
    if not directory:
        pytest.skip(
            "set NEGIP_A1111_DIR to an A1111 checkout to check the infotext helpers against it"
        )
    path = Path(directory) / "modules" / "infotext_utils.py"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its regex strings are not raw
        return ast.parse(path.read_text(encoding="utf-8"))


def test_helpers_match_a1111_checkout() -> None:
    tree = _a1111_source()
    names: dict[str, Any] = {"json": json}
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "re_param_code"
        ]:
            names["re_param"] = re.compile(ast.literal_eval(node.value))
        if isinstance(node, ast.FunctionDef) and node.name in ("quote", "unquote"):
            exec(compile(ast.Module(body=[node], type_ignores=[]), "infotext_utils", "exec"), names)
    params = {"Steps": 20, "Sampler": "Euler a", **to_infotext(PREVIOUS, 'a, "b": [0a1b]', "c\nd")}
    ours = a1111_infotext("p", "n", params)
    line = ", ".join(f"{key}: {names['quote'](value)}" for key, value in params.items())
    assert ours.split("\n")[-1] == line
    theirs = {k: names["unquote"](v) for k, v in names["re_param"].findall(line)}
    assert a1111_parse(ours) == a1111_parse(ours, names["re_param"]) == theirs


# =================================================================================================
# Round 2: block weights, masks, negative noise, stored image references, the pixel budget
# =================================================================================================

REF_A = "0123456789abcdef"
REF_B = "fedcba9876543210"
REF_M = "00112233445566ff"
REF_N = "0f1e2d3c4b5a6978"


OMIT = object()  # a field left out of the dict


def _enabled(**fields: Any) -> NegIPArgs:
    """The API dict form with a model and (unless given, or OMIT) one positive image."""
    merged = {"model": "m", "positive_images": [b64()], **fields}
    return parse_api_dict({name: value for name, value in merged.items() if value is not OMIT})


# --- positive_layers / negative_layers ------------------------------------------------------------

LAYER_TEXTS = [
    pytest.param(None, "all", id="none-is-all"),
    pytest.param("", "all", id="empty-is-all"),
    pytest.param("   ", "all", id="blank-is-all"),
    pytest.param("all", "all", id="all"),
    pytest.param(" ALL ", "all", id="all-upper-spaced"),
    pytest.param("style", "style", id="style"),
    pytest.param("Style", "style", id="style-capital"),
    pytest.param("composition", "composition", id="composition"),
    pytest.param("COMPOSITION", "composition", id="composition-upper"),
    pytest.param("style and composition", "style and composition", id="style-and-composition"),
    pytest.param(
        "  Style   AND\tcomposition ", "style and composition", id="style-and-composition-spaces"
    ),
    pytest.param("strong style", "strong style", id="strong-style"),
    pytest.param("Strong  Style", "strong style", id="strong-style-case-spaces"),
    pytest.param("3:1, 6:0.8", "3:1, 6:0.8", id="pairs-canonical"),
    pytest.param("6:0.8,3:1", "3:1, 6:0.8", id="pairs-sorted-by-index"),
    pytest.param(" 3 : 1 ,  6:.8 ", "3:1, 6:0.8", id="pairs-spaces-and-leading-dot"),
    pytest.param("3:1.50", "3:1.5", id="trailing-zero-dropped"),
    pytest.param("3:+2", "3:2", id="explicit-plus"),
    pytest.param("3:-0", "3:0", id="negative-zero"),
    pytest.param("03:1", "3:1", id="leading-zero-index"),
    pytest.param("0:-1, 15:5", "0:-1, 15:5", id="weight-range-ends"),
    pytest.param("4:2.5e-1", "4:0.25", id="exponent"),
    pytest.param("99:1", "99:1", id="index-range-needs-the-model"),
]


@pytest.mark.parametrize(("written", "canonical"), LAYER_TEXTS)
@pytest.mark.parametrize("field", ["positive_layers", "negative_layers"])
def test_layers_canonical_text(field: str, written: Any, canonical: str) -> None:
    both = {"negative_images": [b64()]}  # blocks for a side without images are refused
    assert getattr(_enabled(**both, **{field: written}), field) == canonical
    # The positional form (the UI) and the arguments object agree.
    positional = parse_script_args(full_positional(**both, **{field: written}))
    assert getattr(positional, field) == canonical
    direct = NegIPArgs(
        enabled=True,
        model="m",
        positive_images=(solid(),),
        negative_images=(solid(),),
        **{field: written},
    )
    assert getattr(direct, field) == canonical
    other = "negative_layers" if field == "positive_layers" else "positive_layers"
    assert getattr(direct, other) == "all"


def test_layer_specs_of_the_args() -> None:
    args = _enabled(
        negative_images=[b64()], positive_layers="6:0.8, 3:1", negative_layers="Strong Style"
    )
    assert args.positive_layer_spec.preset is None
    assert args.positive_layer_spec.pairs == ((3, 1.0), (6, 0.8))
    assert args.negative_layer_spec.preset == "strong style"
    assert NegIPArgs().positive_layer_spec.is_all


LAYER_ERRORS = [
    pytest.param(
        "styles",
        ["'styles'", "'strong style'", "0-15", "0-10", '"3:1, 6:0.8"'],
        id="unknown-preset",
    ),
    pytest.param("style, composition", ["'style'", '"3:1, 6:0.8"'], id="two-presets"),
    pytest.param("3", ["'3'", '"3:1, 6:0.8"', "0-15"], id="index-without-weight"),
    pytest.param("3:", ["'3:'", '"3:1, 6:0.8"'], id="colon-without-weight"),
    pytest.param(":1", ["':1'", '"3:1, 6:0.8"'], id="weight-without-index"),
    pytest.param("3:1:2", ["'3:1:2'", '"3:1, 6:0.8"'], id="two-colons"),
    pytest.param("a:1", ["'a:1'", '"3:1, 6:0.8"'], id="letter-index"),
    pytest.param("-3:1", ["'-3:1'", '"3:1, 6:0.8"'], id="negative-index"),
    pytest.param("3.5:1", ["'3.5:1'", '"3:1, 6:0.8"'], id="fractional-index"),
    pytest.param("3:1; 6:1", ["'3:1; 6:1'", '"3:1, 6:0.8"'], id="semicolon"),
    pytest.param("3:1,", ["an empty entry between commas", '"3:1, 6:0.8"'], id="trailing-comma"),
    pytest.param("3:nan", ["finite number from -1 to 5; got nan", '"3:1, 6:0.8"'], id="nan-weight"),
    pytest.param("3:inf", ["finite number from -1 to 5; got inf", '"3:1, 6:0.8"'], id="inf-weight"),
    pytest.param(
        "3:1e400",
        ["block 3", "finite", "-1 to 5", "1e400", '"3:1, 6:0.8"'],
        id="overflowing-weight",
    ),
    pytest.param("3:5.5", ["block 3", "-1 to 5", "5.5", '"3:1, 6:0.8"'], id="weight-above-5"),
    pytest.param(
        "6:-1.01", ["block 6", "-1 to 5", "-1.01", '"3:1, 6:0.8"'], id="weight-below-minus-1"
    ),
    pytest.param(
        "3:1, 6:1, 3:0.5", ["block 3 is listed twice", '"3:1, 6:0.8"'], id="duplicate-index"
    ),
    pytest.param("3:1, 03:1", ["block 3 is listed twice"], id="duplicate-index-leading-zero"),
    pytest.param(5, ["5 (int)", "'style'", '"3:1, 6:0.8"'], id="int"),
    pytest.param(["3:1"], ["(list)"], id="list"),
    pytest.param(True, ["True (bool)"], id="bool"),
]


@pytest.mark.parametrize(("value", "patterns"), LAYER_ERRORS)
@pytest.mark.parametrize("field", ["positive_layers", "negative_layers"])
def test_layers_errors_name_the_field(field: str, value: Any, patterns: list[str]) -> None:
    other = "negative_layers" if field == "positive_layers" else "positive_layers"
    for attempt in (
        lambda: _enabled(**{field: value}),
        lambda: parse_script_args(full_positional(**{field: value})),
        lambda: dataclasses.replace(_enabled(), **{field: value}),
    ):
        with pytest.raises(ArgumentError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(field), message
        assert other not in message, message
        for pattern in patterns:
            assert pattern in message, (pattern, message)


# --- negative_noise / negative_noise_type -------------------------------------------------------


@pytest.mark.parametrize(
    ("noise", "expected"),
    [
        pytest.param(0, 0.0, id="int-zero"),
        pytest.param(0.5, 0.5, id="half"),
        pytest.param(1, 1.0, id="int-one"),
        pytest.param(-0.0, 0.0, id="negative-zero"),
    ],
)
@pytest.mark.parametrize("noise_type", ["fade", "dissolve", "gaussian", "shuffle"])
def test_noise_values(noise: Any, expected: float, noise_type: str) -> None:
    args = _enabled(negative_noise=noise, negative_noise_type=noise_type)
    assert args.negative_noise == expected
    assert type(args.negative_noise) is float
    assert str(args.negative_noise) != "-0.0"
    assert args.negative_noise_type == noise_type
    positional = parse_script_args(
        full_positional(negative_noise=noise, negative_noise_type=noise_type)
    )
    assert (positional.negative_noise, positional.negative_noise_type) == (expected, noise_type)


@pytest.mark.parametrize(
    ("fields", "patterns"),
    [
        pytest.param(
            {"negative_noise": -0.1}, [r"^negative_noise ", r"0 to 1", r"-0\.1"], id="below-0"
        ),
        pytest.param(
            {"negative_noise": 1.5}, [r"^negative_noise ", r"0 to 1", r"1\.5"], id="above-1"
        ),
        pytest.param({"negative_noise": math.nan}, [r"^negative_noise ", r"finite"], id="nan"),
        pytest.param({"negative_noise": math.inf}, [r"^negative_noise ", r"finite"], id="inf"),
        pytest.param(
            {"negative_noise": "0.5"}, [r"^negative_noise ", r"'0\.5' \(str\)"], id="string"
        ),
        pytest.param({"negative_noise": True}, [r"^negative_noise ", r"bool"], id="bool"),
        pytest.param({"negative_noise": None}, [r"^negative_noise ", r"got null"], id="null"),
        pytest.param(
            {"negative_noise_type": "perlin"},
            [r"^negative_noise_type ", r"'fade', 'dissolve', 'gaussian', 'shuffle'", r"'perlin'"],
            id="unknown-type",
        ),
        pytest.param(
            {"negative_noise_type": "Fade"}, [r"^negative_noise_type ", r"'Fade'"], id="type-case"
        ),
        pytest.param(
            {"negative_noise_type": None}, [r"^negative_noise_type ", r"null"], id="type-null"
        ),
        pytest.param(
            {"negative_noise_type": 1}, [r"^negative_noise_type ", r"1 \(int\)"], id="type-int"
        ),
    ],
)
def test_noise_errors_name_the_field(fields: dict[str, Any], patterns: list[str]) -> None:
    with pytest.raises(ArgumentError) as caught:
        _enabled(**fields)
    for pattern in patterns:
        assert re.search(pattern, str(caught.value)), (pattern, str(caught.value))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"negative_images": [b64()]}, id="negative-images"),
        pytest.param({"negative_images": [b64(solid(BLUE)), b64()]}, id="two-negative-images"),
        pytest.param({"infotext_images": f"negative images: {REF_A}"}, id="negative-references"),
        pytest.param(
            {"positive_images": [], "negative_images": [b64()]}, id="negative-images-only"
        ),
        pytest.param(
            {"positive_images": [], "infotext_images": f"negative images: {REF_A}"},
            id="negative-references-only",
        ),
    ],
)
def test_noise_and_negative_images_conflict(fields: dict[str, Any]) -> None:
    with pytest.raises(ArgumentError) as caught:
        _enabled(negative_noise=0.4, **fields)
    message = str(caught.value)
    assert "negative_noise" in message
    assert re.search(r"negative.image", message), message
    # Without noise the same request is valid.
    _enabled(negative_noise=0.0, **fields)


def test_noise_conflict_in_every_form() -> None:
    with pytest.raises(ArgumentError, match=r"negative_noise.*negative_images"):
        parse_script_args(full_positional(negative_images=[b64()], negative_noise=0.1))
    with pytest.raises(ArgumentError, match=r"negative_noise.*negative_images"):
        NegIPArgs(
            enabled=True,
            model="m",
            positive_images=(solid(),),
            negative_images=(solid(),),
            negative_noise=1.0,
        )
    valid = _enabled(negative_noise=0.5)
    with pytest.raises(ArgumentError, match=r"negative_noise.*negative_images"):
        dataclasses.replace(valid, negative_images=(solid(),))
    # A disabled positional list never fails; a disabled dict checks fields one by one only.
    assert (
        parse_script_args(
            full_positional(enabled=False, negative_images=[b64()], negative_noise=0.5)
        )
        == NegIPArgs()
    )
    assert (
        parse_script_args([{"enabled": False, "negative_images": [b64()], "negative_noise": 0.5}])
        == NegIPArgs()
    )


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="positive-images"),
        pytest.param(
            {"positive_images": OMIT, "infotext_images": f"positive images: {REF_A} {REF_B}"},
            id="positive-references-only",
        ),
        pytest.param(
            {"infotext_images": f"positive mask: {REF_M}", "negative_mask": b64()},
            id="masks-are-not-negative-images",
        ),
    ],
)
def test_noise_with_positive_images_is_valid(fields: dict[str, Any]) -> None:
    args = _enabled(negative_noise=0.7, negative_noise_type="dissolve", **fields)
    assert (args.negative_noise, args.negative_noise_type) == (0.7, "dissolve")
    assert args.negative_images == ()


@pytest.mark.parametrize("negative", [[], None, OMIT], ids=["empty", "null", "left-out"])
def test_noise_over_an_infotexts_stored_negative_images_says_where_they_come_from(
    negative: Any,
) -> None:
    """The client gave no negative image: the message blamed the negative images it 'gave'."""
    stored = f"positive images: {REF_A} {REF_B}; negative images: {REF_N}; negative mask: {REF_M}"
    fields = {"model": "m", "infotext_images": stored, "negative_noise": 0.5}
    if negative is not OMIT:
        fields["negative_images"] = negative
    with pytest.raises(ArgumentError) as raised:
        parse_api_dict(fields)
    kept = f"positive images: {REF_A} {REF_B}; negative mask: {REF_M}"
    assert str(raised.value) == (
        f"negative_noise is given, but the request's infotext names stored negative image(s) "
        f"({REF_N}), and the noise is the negative side only when it has no images. To use the "
        f"noise, send infotext_images with the infotext's other stored images and masks "
        f"({kept!r}) or take 'NegIP negative images' out of the infotext; or set "
        "negative_noise to 0."
    )
    fields["infotext_images"] = kept  # what the message says to send: the masks stay
    args = parse_api_dict(fields)
    assert args.negative_noise == 0.5
    assert args.references == {"positive_images": (REF_A, REF_B), "negative_mask": (REF_M,)}


@pytest.mark.parametrize(
    "text", ['{"positive_images": ["abc"]}', ' [{"model": "m"}]'], ids=["dict", "list"]
)
def test_args_holding_a_json_text_where_the_dict_belongs_are_refused_as_such(text: str) -> None:
    """["{...}"] (the dict double-encoded inside the list) said "enabled must be true or false"."""
    with pytest.raises(ArgumentError) as raised:
        parse_script_args([text])
    assert str(raised.value).startswith(
        "The script's args hold a text where the dict of named fields belongs ("
    )
    assert "send the dict itself, not its JSON text" in str(raised.value)
    with pytest.raises(ArgumentError, match=r"^The script's args must be a list, not a text"):
        parse_script_args(list(text))


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        pytest.param(
            {"positive_images": []},
            r"^positive_images is empty, but the request's infotext names stored positive "
            rf"image\(s\) \({REF_A}, {REF_B}\): leave positive_images out to use them, send "
            r"the images to use instead, or set positive_weight to 0 to draw without that side\.$",
            id="empty-side",
        ),
        pytest.param({"positive_images": None}, r"^positive_images is empty", id="null-side"),
        pytest.param(
            {"negative_mask": None},
            rf"^negative_mask is empty, but the request's infotext names a stored negative mask "
            rf"\({REF_M}\): leave negative_mask out to use it, send the mask to use instead, or "
            r"take 'NegIP negative mask' out of the infotext to draw without one\.$",
            id="null-mask",
        ),
        pytest.param({"negative_mask": ""}, r"^negative_mask is empty", id="empty-text-mask"),
    ],
)
def test_an_empty_field_over_stored_images_is_refused(fields: dict[str, Any], pattern: str) -> None:
    """API dict + infotext: an empty side or mask the dict names explicitly would have been
    replaced by the infotext's stored images without a word (the client's value changed
    nothing). Left out, the stored ones are used; a side at weight 0 needs none; images the
    request sends win; the positional form (a value at every position) restores."""
    stored = f"positive images: {REF_A} {REF_B}; negative images: {REF_N}; negative mask: {REF_M}"
    base = {"model": "m", "infotext_images": stored}
    with pytest.raises(ArgumentError, match=pattern):
        parse_api_dict({**base, **fields})
    args = parse_api_dict(base)
    assert args.references == {
        "positive_images": (REF_A, REF_B),
        "negative_images": (REF_N,),
        "negative_mask": (REF_M,),
    }
    side = next(iter(fields)).split("_")[0]
    assert parse_api_dict({**base, **fields, f"{side}_weight": 0.0}).references == args.references
    given = [b64()] if next(iter(fields)).endswith("images") else b64()
    assert parse_api_dict({**base, next(iter(fields)): given}).references == args.references
    values = [DEFAULTS[name] for name in FIELD_ORDER]
    values[0], values[FIELD_ORDER.index("model")] = True, "m"
    values[FIELD_ORDER.index("infotext_images")] = stored
    values[FIELD_ORDER.index(next(iter(fields)))] = next(iter(fields.values()))
    assert parse_script_args(values).references == args.references


def test_noise_without_positive_images_is_refused() -> None:
    with pytest.raises(ArgumentError) as caught:
        _enabled(positive_images=[], negative_noise=0.5)
    assert "positive_images" in str(caught.value)


def test_noise_without_positive_images_names_the_noise() -> None:
    with pytest.raises(ArgumentError, match=r"negative_noise"):
        _enabled(positive_images=[], negative_noise=0.5)


@pytest.mark.parametrize(
    ("fields", "api", "ui"),
    [
        pytest.param(
            {"negative_layers": "16:1"},
            r"^negative_layers is '16:1', but the negative side has no images, so it would change "
            r"nothing \(a side without images follows the positive side's blocks and mask\)\. "
            r"Give negative images, set the blocks in positive_layers, or leave negative_layers "
            r'out \("all"\)\.$',
            r"^'Negative blocks' is '16:1', but there are no negative images, .* choose the "
            r"blocks in 'Positive blocks', or set 'Negative blocks' to all\.$",
            id="blocks-on-the-empty-negative-side",
        ),
        pytest.param(
            {"negative_layers": " Style "},
            r"^negative_layers is 'style', but",
            r"^'Negative blocks' is 'style'",
            id="a-preset",
        ),
        pytest.param(
            {"negative_mask": "BLACK"},
            r"^negative_mask is given, but the negative side has no images, so it would change "
            r"nothing .* Give negative images, put the mask in positive_mask, or leave "
            r"negative_mask out\.$",
            r"^'Negative mask' is set, but there are no negative images, .* put the mask in "
            r"'Positive mask', or remove it\.$",
            id="mask-on-the-empty-negative-side",
        ),
        pytest.param(
            {"positive_images": [], "negative_images": ["IMAGE"], "positive_mask": "BLACK"},
            r"^positive_mask is given, but the positive side has no images, .* follows the "
            r"negative side's blocks and mask\)\. Give positive images, put the mask in "
            r"negative_mask",
            r"^'Positive mask' is set, but there are no positive images",
            id="mask-on-the-empty-positive-side",
        ),
        pytest.param(
            {"infotext_images": f"positive images: {REF_A}; negative mask: {REF_M}"},
            r"^negative_mask is given, but the negative side has no images",
            r"^'Negative mask' is set",
            id="a-stored-mask-on-the-empty-side",
        ),
    ],
)
def test_blocks_or_a_mask_for_a_side_without_images_are_refused(
    fields: dict[str, Any], api: str, ui: str
) -> None:
    """A side without images follows the other side's blocks and mask (plain IP-Adapter's "no
    image" side): its own were accepted, written to the infotext and restored, while changing
    no pixel (an out-of-range block too, which then failed the restore with images)."""
    given = {
        name: [b64()]
        if value == ["IMAGE"]
        else b64(solid(0, mode="L"))
        if value == "BLACK"
        else value
        for name, value in fields.items()
    }
    for parse in (
        lambda: _enabled(**given),
        lambda: parse_script_args(full_positional(**given)),
    ):
        with pytest.raises(ArgumentError) as caught:
            parse()
        assert re.search(api, str(caught.value)), str(caught.value)
        assert re.search(ui, caught.value.ui), caught.value.ui
    # Where the side holds something, is off, or is the noise, the same values are accepted.
    side = api[1:].split("_")[0]
    _enabled(**{**given, f"{side}_images": [b64()]})
    _enabled(**{**given, f"{side}_weight": 0.0})
    if side == "negative":
        _enabled(**{**given, "negative_noise": 0.5})
    assert _enabled(negative_layers="all").negative_layers == "all"


# --- infotext_images (stored image references) ----------------------------------------------------


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        pytest.param(None, "", id="none"),
        pytest.param("", "", id="empty"),
        pytest.param("  ;  ", "", id="only-separators"),
        pytest.param(
            f"positive images: {REF_A} {REF_B}; negative mask: {REF_M}",
            f"positive images: {REF_A} {REF_B}; negative mask: {REF_M}",
            id="canonical",
        ),
        pytest.param(
            f" Negative  Mask :{REF_M.upper()} ;Positive Images:  {REF_A.upper()}   {REF_B} ",
            f"positive images: {REF_A} {REF_B}; negative mask: {REF_M}",
            id="case-spaces-and-order-normalised",
        ),
        pytest.param(
            f"negative images: {REF_B}; positive mask: {REF_M}; positive images: {REF_A}",
            f"positive images: {REF_A}; negative images: {REF_B}; positive mask: {REF_M}",
            id="parts-in-field-order",
        ),
    ],
)
def test_infotext_images_canonical(written: Any, canonical: str) -> None:
    both = {"negative_images": [b64()]}  # the stored masks need images on their side
    assert _enabled(**both, infotext_images=written).infotext_images == canonical
    positional = parse_script_args(full_positional(**both, infotext_images=written))
    assert positional.infotext_images == canonical


@pytest.mark.parametrize(
    ("written", "canonical", "seeds"),
    [
        pytest.param("noise seed: 5 for seed 6", "noise seed: 5 for seed 6", (5, 6), id="alone"),
        pytest.param(
            f" Noise  Seed :5  for seed 6 ; positive images: {REF_A}",
            f"positive images: {REF_A}; noise seed: 5 for seed 6",
            (5, 6),
            id="written-loosely-and-first",
        ),
        pytest.param(f"positive images: {REF_A}", f"positive images: {REF_A}", None, id="none"),
    ],
)
def test_infotext_images_carries_a_restored_noise_seed(
    written: str, canonical: str, seeds: tuple[int, int] | None
) -> None:
    args = _enabled(infotext_images=written)
    assert args.infotext_images == canonical
    assert args.restored_noise_seed == seeds
    assert args.references == ({"positive_images": (REF_A,)} if REF_A in written else {})


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("noise seed: 5", "is not 'noise seed: <seed> for seed <seed>'"),
        ("noise seed: -5 for seed 6", "is not 'noise seed"),
        ("noise seed: 5 for seed 6; noise seed: 5 for seed 6", "named twice"),
    ],
)
def test_infotext_images_noise_seed_errors(value: str, pattern: str) -> None:
    with pytest.raises(ArgumentError, match=f"^infotext_images: .*{re.escape(pattern)}"):
        _enabled(infotext_images=value)


def test_infotext_restores_the_noise_seed_with_the_images_own_seed() -> None:
    params = {"NegIP model": "m", "NegIP noise seed": "1000", "Seed": "1001"}
    assert parse_infotext(params)["infotext_images"] == "noise seed: 1000 for seed 1001"
    assert infotext_hidden_text(params) == "noise seed: 1000 for seed 1001"
    # Without the image's seed there is nothing to tie the noise seed to.
    assert parse_infotext({"NegIP model": "m", "NegIP noise seed": "1000"})["infotext_images"] == ""
    with pytest.raises(ArgumentError, match=r"^Infotext 'NegIP noise seed' must be a whole"):
        parse_infotext({"NegIP model": "m", "NegIP noise seed": "x", "Seed": "1"})
    # A1111 keeps a negative seed other than -1 and writes it so; the noise seed is its 64-bit
    # two's complement, as the generation's seed is taken.
    negative = parse_infotext({"NegIP model": "m", "NegIP noise seed": "1", "Seed": " -4 "})
    assert negative["infotext_images"] == f"noise seed: 1 for seed {2**64 - 4}"
    for seed in ("x", "1.5", "--4", "-", ""):
        with pytest.raises(ArgumentError, match=r"^Infotext 'Seed' must be a whole number; got"):
            parse_infotext({"NegIP model": "m", "NegIP noise seed": "1", "Seed": seed})
    with pytest.raises(
        ArgumentError, match=r"^Infotext 'NegIP noise seed' must be a whole number of at least 0"
    ):
        parse_infotext({"NegIP model": "m", "NegIP noise seed": "-1", "Seed": "1"})


def test_the_infotext_names_the_noise_seed_only_with_a_noise_negative() -> None:
    noisy = _enabled(negative_images=[], negative_noise=0.5)
    assert to_infotext(noisy, "m", "e", noise_seed=1000)["NegIP noise seed"] == 1000
    assert "NegIP noise seed" not in to_infotext(noisy, "m", "e")
    assert "NegIP noise seed" not in to_infotext(_enabled(), "m", "e", noise_seed=1000)


def test_references_by_field() -> None:
    args = _enabled(infotext_images=f"negative images: {REF_B} {REF_A}; positive mask: {REF_M}")
    assert args.references == {"negative_images": (REF_B, REF_A), "positive_mask": (REF_M,)}
    assert NegIPArgs().references == {}


@pytest.mark.parametrize(
    ("value", "patterns"),
    [
        pytest.param("junk", ["'junk'", "'positive images'"], id="no-part"),
        pytest.param(
            f"side images: {REF_A}", ["'side images", "'negative mask'"], id="unknown-part"
        ),
        pytest.param(
            "positive images: 0123456789abcdeg", ["'0123456789abcdeg'", "16 hex"], id="not-hex"
        ),
        pytest.param(
            "positive images: 0123456789abcde", ["'0123456789abcde'", "16 hex"], id="too-short"
        ),
        pytest.param(f"positive images: {REF_A}0", [f"'{REF_A}0'", "16 hex"], id="too-long"),
        pytest.param(
            f"negative mask: {REF_A} {REF_B}",
            ["negative mask names 2 images", "one image"],
            id="mask-with-two",
        ),
        pytest.param(5, ["5 (int)"], id="int"),
        pytest.param([REF_A], ["(list)"], id="list"),
    ],
)
def test_infotext_images_errors(value: Any, patterns: list[str]) -> None:
    with pytest.raises(ArgumentError) as caught:
        _enabled(infotext_images=value)
    message = str(caught.value)
    assert message.startswith("infotext_images"), message
    for pattern in patterns:
        assert pattern in message, (pattern, message)


@pytest.mark.parametrize(
    "references",
    [
        pytest.param(f"positive images: {REF_A}", id="positive"),
        pytest.param(f"negative images: {REF_A} {REF_B}", id="negative"),
    ],
)
def test_references_count_as_images(references: str) -> None:
    args = parse_api_dict({"model": "m", "infotext_images": references})
    assert args.enabled
    assert args.image_counts == (0, 0)
    assert args.infotext_images == references
    positional = parse_script_args(
        full_positional(positive_images=None, infotext_images=references)
    )
    assert positional.enabled
    assert positional.image_counts == (0, 0)


def test_mask_references_alone_are_no_images() -> None:
    with pytest.raises(ArgumentError, match=r"positive_images and negative_images are both empty"):
        parse_api_dict({"model": "m", "infotext_images": f"positive mask: {REF_M}"})


# --- positive_mask / negative_mask ----------------------------------------------------------------


def rgba(pixels: list[tuple[int, int, int, int]]) -> Image.Image:
    """A one-row RGBA image of the given pixels."""
    return Image.fromarray(np.array([pixels], np.uint8))


def halves(size: tuple[int, int] = (4, 2)) -> Image.Image:
    """An RGB image: left half white, right half grey 100."""
    image = Image.new("RGB", size, (100, 100, 100))
    image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))
    return image


HALVES = [[255, 255, 100, 100], [255, 255, 100, 100]]
STROKES = rgba([(255, 255, 255, 255), (0, 0, 0, 0), (0, 0, 0, 0), (255, 255, 255, 255)])


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 255, 255, 100, 100, 100] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # index 0 (white) is transparent
    return image


MASK_FORMS = [
    pytest.param(lambda: b64(halves()), HALVES, id="base64-png"),
    pytest.param(lambda: data_url(halves()), HALVES, id="data-url"),
    pytest.param(lambda: file_bytes(halves()), HALVES, id="raw-bytes"),
    pytest.param(lambda: halves(), HALVES, id="pil-rgb"),
    pytest.param(lambda: solid(77, mode="L"), [[77] * 6] * 4, id="pil-l"),
    pytest.param(lambda: b64(solid(77, mode="L")), [[77] * 6] * 4, id="base64-l"),
    pytest.param(
        lambda: rgba(
            [(255, 255, 255, 255), (255, 255, 255, 0), (0, 0, 0, 0), (255, 255, 255, 128)]
        ),
        [[255, 0, 0, 128]],
        id="pil-rgba-transparent-is-black",
    ),
    pytest.param(
        lambda: b64(rgba([(200, 200, 200, 255), (255, 255, 255, 0)])),
        [[200, 0]],
        id="base64-rgba-transparent-is-black",
    ),
    pytest.param(
        lambda: Image.fromarray(np.array([[[200, 0], [200, 255]]], np.uint8), mode="LA"),
        [[0, 200]],
        id="pil-la",
    ),
    pytest.param(_palette_with_transparency, [[0, 100]], id="palette-with-transparent-index"),
    pytest.param(lambda: np.array([[0, 255, 30]], np.uint8), [[0, 255, 30]], id="numpy-hw"),
    pytest.param(lambda: np.full((2, 3, 3), 120, np.uint8), [[120] * 3] * 2, id="numpy-hwc3"),
    pytest.param(
        lambda: np.array([[[255, 255, 255, 0], [90, 90, 90, 255]]], np.uint8),
        [[0, 90]],
        id="numpy-hwc4-transparent-is-black",
    ),
    pytest.param(
        lambda: {"image": halves(), "mask": Image.new("RGB", (4, 2))},
        HALVES,
        id="sketch-black-drawing-keeps-image",
    ),
    pytest.param(
        lambda: {"image": halves(), "mask": rgba([(0, 0, 0, 0)] * 4)},
        HALVES,
        id="sketch-transparent-black-drawing-keeps-image",
    ),
    pytest.param(
        lambda: {"image": halves((4, 1)), "mask": STROKES},
        [[255, 0, 0, 255]],
        id="sketch-drawing-wins",
    ),
    pytest.param(
        lambda: {"image": b64(halves((4, 1))), "mask": b64(STROKES)},
        [[255, 0, 0, 255]],
        id="sketch-base64-drawing-wins",
    ),
    pytest.param(
        lambda: {"image": None, "mask": STROKES}, [[255, 0, 0, 255]], id="sketch-drawing-only"
    ),
    pytest.param(
        lambda: {"image": halves(), "mask": np.zeros((2, 4), np.uint8)},
        HALVES,
        id="sketch-numpy-black-drawing-keeps-image",
    ),
    pytest.param(
        lambda: {"image": np.full((1, 2, 3), 60, np.uint8), "mask": None},
        [[60, 60]],
        id="sketch-no-drawing",
    ),
    pytest.param(lambda: {"image": halves()}, HALVES, id="image-dict-without-mask"),
    pytest.param(lambda: None, None, id="none"),
    pytest.param(lambda: "", None, id="empty-string"),
    pytest.param(lambda: "  ", None, id="blank-string"),
    pytest.param(lambda: {"image": None, "mask": None}, None, id="empty-sketch"),
    pytest.param(
        lambda: {"image": None, "mask": Image.new("L", (4, 2))},
        None,
        id="sketch-black-drawing-only",
    ),
]


@pytest.mark.parametrize(("make_mask", "expected"), MASK_FORMS)
@pytest.mark.parametrize("field", ["positive_mask", "negative_mask"])
@pytest.mark.parametrize("form", ["dict", "positional"])
def test_mask_forms(form: str, field: str, make_mask: Any, expected: Any) -> None:
    # Images on both sides: a mask on a side without images is refused (it would do nothing).
    if form == "dict":
        args = _enabled(negative_images=[b64()], **{field: make_mask()})
    else:
        args = parse_script_args(full_positional(negative_images=[b64()], **{field: make_mask()}))
    mask = getattr(args, field)
    other = "negative_mask" if field == "positive_mask" else "positive_mask"
    assert getattr(args, other) is None
    if expected is None:
        assert mask is None
        return
    assert isinstance(mask, Image.Image)
    assert mask.mode == "L"
    assert np.asarray(mask).tolist() == expected


def _encoded(image: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def test_high_bit_depth_masks_are_scaled_not_clipped() -> None:
    """A 16-bit PNG and a float TIFF mask mean what a viewer shows: 25 % grey is 25 %, not
    white (Pillow's own conversion to 8 bits clips 16-bit values and truncates floats)."""
    grey16 = Image.fromarray(np.array([[0, 16384, 65535]], np.uint16))
    assert grey16.mode.startswith("I")
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32))
    assert floats.mode == "F"
    for mask in (_encoded(grey16), _encoded(floats, "TIFF"), grey16, floats):
        for form in ("dict", "positional"):
            fields = {"positive_mask": mask}
            args = (
                _enabled(**fields)
                if form == "dict"
                else parse_script_args(full_positional(**fields))
            )
            assert np.asarray(args.positive_mask).tolist() == [[0, 64, 255]], (form, type(mask))


def test_a_mask_is_turned_as_its_exif_orientation_says() -> None:
    """Like an image prompt, a mask saved by a camera or an editor with an EXIF orientation
    covers the part of the picture a viewer shows it covering."""
    stored = Image.fromarray(np.array([[255, 0], [0, 0]], np.uint8))  # white at the top left
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise: white at the top right
    args = _enabled(
        negative_images=[b64()], negative_mask=_encoded(stored, "JPEG", exif=exif, quality=100)
    )
    shown = np.asarray(args.negative_mask)
    assert shown[0, 1] > 200
    assert shown[0, 0] < 50
    assert shown[1].max() < 50


def test_sketch_transparent_white_drawing_keeps_image() -> None:
    args = _enabled(positive_mask={"image": halves(), "mask": rgba([(255, 255, 255, 0)] * 4)})
    assert np.asarray(args.positive_mask).tolist() == HALVES


def test_mask_size_is_kept_and_shown_in_repr() -> None:
    args = _enabled(
        negative_images=[b64()], negative_mask=b64(solid(size=(9, 5))), negative_noise=0.0
    )
    assert args.negative_mask.size == (9, 5)
    assert "masks=['negative_mask']" in repr(args)
    assert "masks=[]" in repr(_enabled())


def test_mask_of_the_args_object() -> None:
    args = NegIPArgs(
        enabled=True,
        model="m",
        positive_images=(solid(),),
        negative_images=(solid(),),
        positive_mask=rgba([(255, 255, 255, 0), (255, 255, 255, 255)]),
        negative_mask=solid(33, mode="L"),
    )
    assert args.positive_mask.mode == "L"
    assert np.asarray(args.positive_mask).tolist() == [[0, 255]]
    assert np.asarray(args.negative_mask).tolist() == [[33] * 6] * 4
    with pytest.raises(
        ArgumentError, match=r"^positive_mask must be a PIL image or None; got 'abc'"
    ):
        dataclasses.replace(args, positive_mask="abc")
    with pytest.raises(ArgumentError, match=r"^negative_mask must be a PIL image or None"):
        dataclasses.replace(args, negative_mask=np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize(
    ("value", "error", "patterns"),
    [
        pytest.param(
            [b64()], ArgumentError, [r"^{field} must be one image", r"not a list"], id="list"
        ),
        pytest.param((b64(),), ArgumentError, [r"^{field} must be one image"], id="tuple"),
        pytest.param("%%%", ImageError, [r"^{field}: ", r"not valid base64"], id="bad-base64"),
        pytest.param(
            "bm90IGFuIGltYWdl", ImageError, [r"^{field}: ", r"not an image file"], id="not-an-image"
        ),
        pytest.param(5, ArgumentError, [r"^{field}: ", r"5 \(int\)"], id="int"),
        pytest.param(
            np.zeros((2, 2), np.float32), ArgumentError, [r"^{field}: ", r"uint8"], id="numpy-float"
        ),
        pytest.param(
            {"path": "/etc/passwd"}, ArgumentError, [r"^{field}: ", r"never read"], id="file-dict"
        ),
        pytest.param(
            {"image": b64(), "mask": "%%%"},
            ImageError,
            [r"^{field} \(drawn\): ", r"not valid base64"],
            id="bad-drawing",
        ),
        pytest.param(
            {"image": "%%%", "mask": None},
            ImageError,
            [r"^{field}: ", r"base64"],
            id="bad-sketch-image",
        ),
    ],
)
@pytest.mark.parametrize("field", ["positive_mask", "negative_mask"])
def test_mask_errors_name_the_field(
    field: str, value: Any, error: type[NegIPError], patterns: list[str]
) -> None:
    with pytest.raises(error) as caught:
        _enabled(**{field: value})
    message = str(caught.value)
    for pattern in patterns:
        assert re.search(pattern.format(field=field), message), (pattern, message)


# --- the pixel budget of one generation -------------------------------------------------------------


@pytest.fixture
def budget_100(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most 100 decoded pixels per generation (solid() is 6x4 = 24 pixels)."""
    monkeypatch.setattr(negip_args, "MAX_PIXELS_PER_GENERATION", 100)
    # Also where the constant is bound as a default argument (see the xfail test below).
    init = negip_args._PixelBudget.__init__
    if init.__defaults__:
        monkeypatch.setattr(init, "__defaults__", (100,))


EMPTY_SLOT = {"image": None, "mask": None}  # gradio's empty image


@pytest.mark.usefixtures("budget_100")
@pytest.mark.parametrize(
    ("fields", "label"),
    [
        pytest.param({"positive_images": [b64()] * 5}, r"positive_images\[4\]", id="one-side"),
        pytest.param(
            {"positive_images": [EMPTY_SLOT, b64(), EMPTY_SLOT, b64(), b64(), b64(), b64()]},
            r"positive_images\[6\]",
            id="index-counts-empty-entries",
        ),
        pytest.param(
            {"positive_images": [b64()] * 3, "negative_images": [solid(), solid()]},
            r"negative_images\[1\]",
            id="both-sides-together",
        ),
        pytest.param(
            {"positive_images": [b64()] * 4, "positive_mask": solid(size=(3, 2))},
            r"positive_mask",
            id="masks-count",
        ),
        pytest.param(
            {
                "positive_images": [b64()] * 4,
                "positive_mask": solid(size=(2, 2)),  # 100: exactly the limit
                "negative_mask": {"image": None, "mask": STROKES},
            },
            r"negative_mask \(drawn\)",
            id="drawn-mask-counts",
        ),
        pytest.param(
            {"positive_images": [b64(solid(size=(11, 10)))]},
            r"positive_images\[0\]",
            id="one-large",
        ),
        pytest.param(  # an empty drawn layer counts while it is decoded
            {
                "positive_images": [b64()] * 4,
                "negative_mask": {"image": solid(size=(2, 2)), "mask": solid((0, 0, 0), (5, 1))},
            },
            r"negative_mask \(drawn\)",
            id="empty-drawn-layer-counts-while-decoded",
        ),
    ],
)
def test_pixel_budget(fields: dict[str, Any], label: str) -> None:
    with pytest.raises(ImageError) as caught:
        parse_api_dict({"model": "m", **fields})
    message = str(caught.value)
    assert re.match(label + ": ", message), message
    assert re.search(r"at most 100 ", message), message
    ui = caught.value.ui
    assert UI_FORBIDDEN.search(ui) is None, ui


@pytest.mark.usefixtures("budget_100")
def test_an_empty_drawn_layer_is_not_counted_twice() -> None:
    """The UI's mask is gradio's sketch value: the picture and a blank layer of its size. The
    layer, let go before the picture is decoded, is given back: the picture alone counts (a
    mask of more than half the budget was refused in the UI, accepted by the API)."""
    blank = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    args = parse_api_dict(
        {
            "model": "m",
            "positive_images": [b64()] * 4,  # 96
            "positive_mask": {"image": solid(size=(2, 2)), "mask": blank},  # 4 (+4 given back)
        }
    )
    assert args.positive_mask is not None
    assert args.positive_mask.size == (2, 2)


@pytest.mark.usefixtures("budget_100")
def test_pixel_budget_at_the_limit_is_accepted() -> None:
    args = parse_api_dict(
        {
            "model": "m",
            "positive_images": [b64()] * 3,  # 72
            "negative_images": [solid(size=(6, 4))],  # 96
            "negative_mask": solid(size=(2, 2)),  # 100
        }
    )
    assert args.image_counts == (3, 1)
    # Each generation has its own budget.
    assert parse_api_dict({"model": "m", "positive_images": [b64()] * 4}).image_counts == (4, 0)


@pytest.mark.usefixtures("budget_100")
def test_disabled_positional_has_no_budget() -> None:
    assert parse_script_args(full_positional(enabled=False, positive_images=[b64()] * 16)) == (
        NegIPArgs()
    )


def test_pixel_budget_follows_the_module_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(negip_args, "MAX_PIXELS_PER_GENERATION", 100)
    with pytest.raises(ImageError, match=r"positive_images\[4\]"):
        parse_api_dict({"model": "m", "positive_images": [b64()] * 5})


def test_pixel_budget_real_limit() -> None:
    """48 Mi pixels: three 4096x4096 images are accepted, one more pixel (a mask) is not."""
    assert negip_args.MAX_PIXELS_PER_GENERATION == 48 * 1024 * 1024
    big = [Image.new("RGB", (4096, 4096), RED) for _ in range(3)]
    args = parse_api_dict({"model": "m", "positive_images": big[:2], "negative_images": big[2:]})
    assert args.image_counts == (2, 1)
    with pytest.raises(ImageError, match=r"^positive_mask: .*50,331,649 pixels"):
        parse_api_dict(
            {
                "model": "m",
                "positive_images": big[:2],
                "negative_images": big[2:],
                "positive_mask": Image.new("L", (1, 1)),
            }
        )


# --- infotext, round 2 -------------------------------------------------------------------------------

ROUND2 = NegIPArgs(
    enabled=True,
    model="m",
    positive_images=(solid(), solid(BLUE)),
    positive_weight=0.75,
    positive_layers="6:0.8, 3:1",
    negative_layers="Style",
    negative_noise=0.3,
    negative_noise_type="shuffle",
    positive_mask=solid(255, mode="L"),
)


def test_infotext_with_references_keys() -> None:
    references = {
        "positive_images": [REF_A, REF_B],
        "negative_images": [],
        "positive_mask": [REF_M],
    }
    params = to_infotext(ROUND2, "ip-adapter_sd15 [a1b2c3d4]", "ViT-H-14", references)
    assert list(params) == [
        "NegIP model",
        "NegIP encoder",
        "NegIP positive images",
        "NegIP positive mask",
        *EXPECTED_KEYS[3:],
    ]
    assert INFOTEXT_IMAGES not in params  # the references replace the counts
    assert params["NegIP positive images"] == f"{REF_A} {REF_B}"
    assert params["NegIP positive mask"] == REF_M
    assert params["NegIP positive layers"] == "3:1, 6:0.8"
    assert params["NegIP negative layers"] == "style"
    assert params["NegIP negative noise"] == 0.3
    assert params["NegIP noise type"] == "shuffle"
    for key, value in params.items():
        assert re.fullmatch(r"\w[\w /-]+", key), key
        assert not A1111_IMAGE_SIZE.match(str(value)), key
        assert str(value).strip(), key


@pytest.mark.parametrize(
    ("references", "combined", "by_field"),
    [
        pytest.param(
            {"positive_images": [REF_A, REF_B], "positive_mask": [REF_M]},
            f"positive images: {REF_A} {REF_B}; positive mask: {REF_M}",
            {"positive_images": (REF_A, REF_B), "positive_mask": (REF_M,)},
            id="positive-images-and-mask",
        ),
        pytest.param(
            {"negative_mask": [REF_M], "positive_images": [REF_B], "negative_images": [REF_A]},
            f"positive images: {REF_B}; negative images: {REF_A}; negative mask: {REF_M}",
            {
                "positive_images": (REF_B,),
                "negative_images": (REF_A,),
                "negative_mask": (REF_M,),
            },
            id="all-but-positive-mask",
        ),
        pytest.param(
            {"positive_images": ["1234567890123456"]},
            "positive images: 1234567890123456",
            {"positive_images": ("1234567890123456",)},
            id="all-digit-reference",
        ),
        pytest.param({}, "", {}, id="none-stored"),
    ],
)
def test_infotext_round_trip_with_references(
    references: dict[str, list[str]], combined: str, by_field: dict[str, tuple[str, ...]]
) -> None:
    params = {"Steps": 20, "Sampler": "Euler a", "Size": "512x512"}
    params.update(to_infotext(ROUND2, "ip-adapter, plus [0a1b2c3d]", "ViT-H-14", references))
    params["Version"] = "v1.10.1"
    restored = a1111_parse(a1111_infotext("a house", "", params))
    assert restored["Version"] == "v1.10.1"
    assert infotext_references(restored) == by_field
    assert infotext_image_counts(restored) is None
    fields = parse_infotext(restored)
    assert fields["infotext_images"] == combined
    expected = {**scalars(ROUND2), "infotext_images": combined}
    expected["model"] = "ip-adapter, plus [0a1b2c3d]"
    expected["image_encoder"] = "ViT-H-14"
    assert fields == expected
    assert fields["positive_layers"] == "3:1, 6:0.8"
    assert fields["negative_noise"] == 0.3
    # The restored fields are accepted by the dict form; positive references count as images.
    overrides: dict[str, Any] = {} if references else {"positive_images": [b64()]}
    if "negative_images" in by_field:
        # ROUND2's noise and stored negative images exclude each other.
        with pytest.raises(ArgumentError, match=r"negative_noise.*negative.image"):
            parse_api_dict({**fields, **overrides})
        overrides["negative_noise"] = 0.0
    again = parse_api_dict({**fields, **overrides})
    expected_again = {**fields, "enabled": True}
    expected_again["negative_noise"] = overrides.get("negative_noise", fields["negative_noise"])
    assert scalars(again) == expected_again
    assert again.references == by_field


def test_round1_infotext_still_parses() -> None:
    """An infotext written before round 2: no layers, noise or reference keys."""
    line = (
        "Steps: 20, Sampler: Euler a, NegIP model: ip-adapter_sd15 [a1b2c3d4], "
        "NegIP encoder: ViT-H-14, NegIP images: 1 positive / 2 negative, NegIP positive weight: 0.6, "
        "NegIP positive start: 0.0, NegIP positive end: 0.8, NegIP negative weight: 0.3, "
        "NegIP negative start: 0.0, NegIP negative end: 1.0, NegIP hires pass: first, "
        "NegIP combine: concat, Version: v1.10.1"
    )
    restored = a1111_parse(f"a house\nNegative prompt: \n{line}")
    fields = parse_infotext(restored)
    assert fields == {
        "enabled": True,
        "model": "ip-adapter_sd15 [a1b2c3d4]",
        "image_encoder": "ViT-H-14",
        "positive_weight": 0.6,
        "positive_start": 0.0,
        "positive_end": 0.8,
        "negative_weight": 0.3,
        "negative_start": 0.0,
        "negative_end": 1.0,
        "hires_pass": "first",
        "combine": "concat",
        "infotext_images": "not stored: 1 positive / 2 negative",
    }
    assert infotext_image_counts(restored) == (1, 2)
    assert infotext_references(restored) == {}
    # A1111's restore leaves round 2's components at their defaults; the request gives images.
    request = {"positive_images": [b64()], "negative_images": [b64()]}
    args = parse_script_args(a1111_script_args([request], f"p\n{line}"))
    assert (args.positive_weight, args.hires_pass, args.combine) == (0.6, "first", "concat")
    assert (args.positive_layers, args.negative_layers) == ("all", "all")
    assert (args.negative_noise, args.negative_noise_type) == (0.0, "fade")
    assert args.infotext_images == "not stored: 1 positive / 2 negative"


def round2_infotext(references: dict[str, list[str]]) -> str:
    params = {"Steps": 20, "Sampler": "Euler a", "Size": "512x768"}
    params.update(to_infotext(ROUND2, "ip-adapter_sd15", "ViT-H-14 [6ca9667d]", references))
    return a1111_infotext("a house", "", params)


def test_request_over_infotext_with_references() -> None:
    infotext = round2_infotext({"positive_images": [REF_A, REF_B], "positive_mask": [REF_M]})
    # An empty dict: everything, the stored images included, comes from the infotext.
    args = parse_script_args(a1111_script_args([{}], infotext))
    assert args.enabled
    assert args.model == "ip-adapter_sd15"
    assert args.image_counts == (0, 0)
    assert args.references == {"positive_images": (REF_A, REF_B), "positive_mask": (REF_M,)}
    assert (args.positive_layers, args.negative_layers) == ("3:1, 6:0.8", "style")
    assert (args.negative_noise, args.negative_noise_type) == (0.3, "shuffle")
    # The request can clear the references (the infotext's noise then has no positive images).
    with pytest.raises(ArgumentError, match=r"negative_noise makes the negative side"):
        parse_script_args(a1111_script_args([{"infotext_images": ""}], infotext))


def test_noise_over_infotext_with_negative_references_conflicts() -> None:
    infotext = round2_infotext({"positive_images": [REF_A], "negative_images": [REF_B]})
    with pytest.raises(ArgumentError, match=r"negative_noise.*negative.image"):
        parse_script_args(a1111_script_args([{}], infotext))
    args = parse_script_args(a1111_script_args([{"negative_noise": 0}], infotext))
    assert args.references["negative_images"] == (REF_B,)


@pytest.mark.parametrize(
    ("params", "patterns"),
    [
        pytest.param(
            {"NegIP positive layers": "bogus"},
            ["'NegIP positive layers'", "positive_layers", "'bogus'"],
            id="bad-layers",
        ),
        pytest.param(
            {"NegIP negative layers": "3:9"},
            ["'NegIP negative layers'", "negative_layers", "-1 to 5"],
            id="bad-layer-weight",
        ),
        pytest.param(
            {"NegIP negative noise": "2"},
            ["'NegIP negative noise'", "negative_noise", "0 to 1"],
            id="noise-out-of-range",
        ),
        pytest.param(
            {"NegIP negative noise": "loud"},
            ["'NegIP negative noise'", "negative_noise"],
            id="noise-not-a-number",
        ),
        pytest.param(
            {"NegIP noise type": "perlin"},
            ["'NegIP noise type'", "negative_noise_type", "'fade'"],
            id="bad-noise-type",
        ),
        pytest.param(
            {"NegIP positive images": "xyz"},
            ["NegIP positive images", "'xyz'", "16 hex"],
            id="bad-reference",
        ),
        pytest.param(
            {"NegIP negative mask": f"{REF_A} {REF_B}"},
            ["NegIP negative mask", "one image"],
            id="mask-with-two-references",
        ),
    ],
)
def test_parse_infotext_round2_errors_name_the_key(
    params: dict[str, str], patterns: list[str]
) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_infotext(params)
    for pattern in patterns:
        assert pattern in str(caught.value), (pattern, str(caught.value))


def test_infotext_layers_and_type_are_normalised() -> None:
    fields = parse_infotext(
        {"NegIP positive layers": " Strong  STYLE ", "NegIP negative layers": "6:0.5,  3:1"}
    )
    assert (fields["positive_layers"], fields["negative_layers"]) == ("strong style", "3:1, 6:0.5")


# --- the UI's wording of the main refusals ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "api_words", "ui_words"),
    [
        pytest.param(
            full_positional(model="None"),
            ["model", "GET /negip/v1/models", "enabled"],
            ["IP-Adapter"],
            id="no-model",
        ),
        pytest.param(
            full_positional(model=None),
            ["model", "GET /negip/v1/models"],
            ["IP-Adapter"],
            id="no-model-cleared-dropdown",
        ),
        pytest.param(
            full_positional(positive_images=None),
            ["positive_images", "negative_images", "enabled"],
            ["image"],
            id="no-images",
        ),
        pytest.param(
            full_positional(negative_images=[b64()], negative_noise=0.5),
            ["negative_noise", "negative_images"],
            ["Negative noise", "negative images"],
            id="noise-conflict",
        ),
        pytest.param(
            full_positional(positive_layers="bogus"),
            ["positive_layers"],
            ["Positive blocks"],
            id="layers-derived",
        ),
        pytest.param(
            full_positional(negative_noise_type="perlin"),
            ["negative_noise_type"],
            ["Noise type"],
            id="noise-type-derived",
        ),
        pytest.param(
            full_positional(negative_mask="%%%"),
            ["negative_mask"],
            ["Negative mask"],
            id="mask-derived",
        ),
        pytest.param(
            full_positional(positive_images=[b64(), "%%%"]),
            ["positive_images[1]"],
            ["positive image 2"],
            id="image-index-derived",
        ),
    ],
)
def test_ui_wording_has_no_api_names(
    values: list[Any], api_words: list[str], ui_words: list[str]
) -> None:
    with pytest.raises(NegIPError) as caught:
        parse_script_args(values)
    api, ui = str(caught.value), caught.value.ui
    for word in api_words:
        assert word in api, (word, api)
    assert UI_FORBIDDEN.search(api) is not None, api  # the API's wording names its fields
    assert UI_FORBIDDEN.search(ui) is None, ui
    for word in ui_words:
        assert word in ui, (word, ui)
    assert "enabled" not in ui.lower().replace("negative image prompt", ""), ui
