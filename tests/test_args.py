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
    infotext_image_counts,
    parse_api_dict,
    parse_infotext,
    parse_script_args,
    restore_model_label,
    split_model_label,
    to_infotext,
)
from lib_negip.errors import ArgumentError, ImageError, NegIPError
from lib_negip.prompt import StepWindow

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
    }
    values.update(overrides)
    return [values[name] for name in FIELD_ORDER]


def scalars(args: NegIPArgs) -> dict[str, Any]:
    return {k: v for k, v in args.as_fields().items() if k not in negip_args.IMAGE_FIELDS}


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
    """default_script_args: the UI components' values (gradio File components start as None)."""
    return [None if name in negip_args.IMAGE_FIELDS else DEFAULTS[name] for name in FIELD_ORDER]


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
        # ... and the enabled checkbox with a callable target.
        script_args[0] = infotext_enabled(params)
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
            {"enabled": False, "model": "None", "positive_weight": 1.0},
            id="dict-disabled-gives-defaults",
        ),
    ],
)
def test_valid_script_args(values: list[Any], expected: dict[str, Any]) -> None:
    args = parse_script_args(values)
    fields = scalars(args)
    for name, value in expected.items():
        assert fields[name] == value, name
        assert type(fields[name]) is type(value), name
    assert set(fields) | set(negip_args.IMAGE_FIELDS) == set(FIELD_ORDER)


def test_defaults_follow_field_order() -> None:
    assert tuple(DEFAULTS) == FIELD_ORDER
    assert len(FIELD_ORDER) == 13
    assert scalars(NegIPArgs()) == {
        k: v for k, v in DEFAULTS.items() if k not in negip_args.IMAGE_FIELDS
    }
    assert all(
        type(DEFAULTS[name]) is float
        for name in FIELD_ORDER
        if name.endswith(("weight", "start", "end"))
    )


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
        [r"14 values", r"at most 13"],
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
        _dict(positive_weight=None), ArgumentError, [r"positive_weight", r"None"], id="null-weight"
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
        _dict(negative_images=[b64(), None, "bm90IGFuIGltYWdl"]),
        ImageError,
        [r"^negative_images\[2\]: ", r"not an image file"],
        id="bad-image-named-with-index",
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
        [r"positive_images\[0\]", r"not downloaded"],
        id="http-url",
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
        [{"positive_images": [b64()], "negative_weight": 1.25}], previous_infotext()
    )
    args = parse_script_args(values)
    assert args.enabled
    assert args.model == "ip-adapter, plus [0a1b2c3d]"
    assert args.image_encoder == "ViT-H-14 [6ca9667d]"
    assert (args.positive_weight, args.positive_end) == (0.6, 0.8)  # restored
    assert args.negative_weight == 1.25  # the dict wins
    assert (args.hires_pass, args.combine) == ("first", "concat")
    assert args.image_counts == (1, 0)  # images are never restored


def test_positional_request_overrides_infotext() -> None:
    request = [True, "ip-adapter_sd15", "auto", [b64()], None, 0.5]
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
]


def test_infotext_keys_and_values() -> None:
    params = to_infotext(PREVIOUS, "ip-adapter, plus [0a1b2c3d]", "ViT-H-14 [6ca9667d]")
    assert list(params) == EXPECTED_KEYS
    assert params["NegIP images"] == "1 positive / 2 negative"
    assert params["NegIP positive weight"] == 0.6
    assert params["NegIP hires pass"] == "first"
    assert [key for key, _ in INFOTEXT_FIELDS] == [k for k in EXPECTED_KEYS if k != INFOTEXT_IMAGES]
    assert {name for _, name in INFOTEXT_FIELDS} == set(FIELD_ORDER) - {
        "enabled",
        *negip_args.IMAGE_FIELDS,
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
    again = parse_api_dict({**fields, "positive_images": [b64()]})
    assert scalars(again) == {**fields, "enabled": True}


def test_parse_infotext_ignores_other_keys() -> None:
    assert parse_infotext({"Steps": "20", "Negative prompt": "NegIP model: x", "NegIPx": "1"}) == {}
    fields = parse_infotext({"Steps": "20", "NegIP combine": "concat", "NegIP future key": "7"})
    assert fields == {"enabled": True, "combine": "concat"}


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


def test_image_counts_from_infotext() -> None:
    assert infotext_image_counts({INFOTEXT_IMAGES: "2 positive / 0 negative"}) == (2, 0)
    assert infotext_image_counts({INFOTEXT_IMAGES: "two"}) is None
    assert infotext_image_counts({}) is None


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
