"""lib_negip.wording: the API's messages in the accordion's words, and what a UI message must not say."""

from __future__ import annotations

import pytest

from lib_negip.errors import ArgumentError, ImageError, NegIPError
from lib_negip.wording import FIELD_LABELS, UI_FORBIDDEN, for_ui

FOR_UI = [
    # field names -> the labels of their controls
    pytest.param(
        "positive_weight must be from -1 to 5; got 7.0.",
        "'Positive weight' must be from -1 to 5; got 7.0.",
        id="weight",
    ),
    pytest.param(
        "positive_start (0.8) must not be greater than positive_end (0.2): the positive image "
        "prompt acts from start to end.",
        "'Positive start' (0.8) must not be greater than 'Positive end' (0.2): the positive image "
        "prompt acts from start to end.",
        id="two-fields-one-message",
    ),
    pytest.param(
        "negative_noise_type must be one of 'fade', 'dissolve'; got 'perlin' (str).",
        "'Noise type' must be one of 'fade', 'dissolve'; got 'perlin' (str).",
        id="longest-field-name-first",
    ),
    pytest.param(
        "negative_noise and negative_images were both given.",
        "'Negative noise' and 'Negative images' were both given.",
        id="noise-and-images",
    ),
    pytest.param(
        "positive_layers: block 3 is listed twice.",
        "'Positive blocks': block 3 is listed twice.",
        id="layers",
    ),
    pytest.param(
        "negative_mask: the mask cannot be read.",
        "'Negative mask': the mask cannot be read.",
        id="mask",
    ),
    pytest.param(
        "hires_pass must be one of 'both', 'first', 'second'.",
        "'Hires. fix pass' must be one of 'both', 'first', 'second'.",
        id="hires-pass",
    ),
    pytest.param("image_encoder is empty.", "'Image encoder' is empty.", id="encoder"),
    # the plain-word fields only where they name the field
    pytest.param(
        "model: 'x' is not installed.", "'IP-Adapter': 'x' is not installed.", id="model-colon"
    ),
    pytest.param(
        "combine must be one of 'average', 'concat'; got 'sum' (str).",
        "'Several images per side' must be one of 'average', 'concat'; got 'sum' (str).",
        id="combine-must",
    ),
    pytest.param(
        "The adapter is for model family SDXL. enabled is off.",
        "The adapter is for model family SDXL. 'the Negative Image Prompt switch' is off.",
        id="enabled-after-a-sentence",
    ),
    # indexed images
    pytest.param(
        "positive_images[2]: the data is not an image file.",
        "positive image 3: the data is not an image file.",
        id="indexed-positive",
    ),
    pytest.param(
        "negative_images[0]: empty; negative_images[15]: too large.",
        "negative image 1: empty; negative image 16: too large.",
        id="indexed-negative-twice",
    ),
    # API phrases -> UI actions
    pytest.param(
        "Use 'auto' or one of the adapters listed by GET /negip/v1/models, or set enabled to false.",
        "Use 'auto' or an IP-Adapter in the dropdown, or untick Negative Image Prompt.",
        id="adapters-listed-and-enabled",
    ),
    pytest.param(
        "The file is listed by GET /negip/v1/models with the reason.",
        "The file is in the dropdown (press the refresh button after adding files) with the reason.",
        id="listed-by",
    ),
    pytest.param(
        "See GET /negip/v1/models.",
        "See the dropdown (press the refresh button after adding files).",
        id="bare-route",
    ),
    pytest.param(
        "Give an image, or switch Negative Image Prompt off (enabled: false).",
        "Give an image, or untick Negative Image Prompt.",
        id="switch-off-enabled-false",
    ),
    pytest.param(
        "model names are the ones listed by GET /negip/v1/models; paths are not accepted",
        "model names are the ones in the dropdown (press the refresh button after adding files); "
        "paths are not accepted",
        id="registry-paths-refused",
    ),
    pytest.param(
        "Put the file into models/ipadapter: the next request finds it",
        "Put the file into models/ipadapter and press the refresh button beside 'IP-Adapter'",
        id="next-request-finds-it",
    ),
    pytest.param(
        "there is no image encoder named 'x'. Put the file into models/clip_vision: the next "
        "request finds it",
        "there is no image encoder named 'x'. Put the file into models/clip_vision and press the "
        "refresh button beside 'Image encoder'",
        id="next-request-finds-the-encoder",
    ),
    pytest.param(
        "x needs the ViT-H-14 image encoder, but no image encoder is installed: put X (h94/"
        "IP-Adapter models/image_encoder: model.safetensors and config.json) into "
        "models/clip_vision/X/; the next request finds it, or enable the automatic download",
        "x needs the ViT-H-14 image encoder, but no image encoder is installed: put X (h94/"
        "IP-Adapter models/image_encoder: model.safetensors and config.json) into "
        "models/clip_vision/X/ and press the refresh button beside 'Image encoder', or enable "
        "the automatic download",
        id="no-encoder-folder-is-not-a-field",
    ),
    pytest.param(
        "positive_images[0]: not valid base64. Send the file's bytes base64-encoded, optionally "
        "as a data URL 'data:image/png;base64,...'.",
        "positive image 1: not valid base64. Upload the image again (PNG, JPEG or WebP).",
        id="send-bytes-becomes-upload",
    ),
    # untouched
    pytest.param(
        "The IP-Adapter is for model family SDXL, the checkpoint is SD1.x: the model family must match.",
        "The IP-Adapter is for model family SDXL, the checkpoint is SD1.x: the model family must match.",
        id="model-family-untouched",
    ),
    pytest.param(
        "Not enough memory to combine the images; the model is large.",
        "Not enough memory to combine the images; the model is large.",
        id="plain-words-untouched",
    ),
    pytest.param(
        "Unknown field(s) 'positive_weigth'.",
        "Unknown field(s) 'positive_weigth'.",
        id="quoted-unknown-name-untouched",
    ),
    pytest.param(
        "'positive_weight' was quoted.",
        "'positive_weight' was quoted.",
        id="quoted-field-untouched",
    ),
    pytest.param(
        "my_positive_weight and positive_weights are other names.",
        "my_positive_weight and positive_weights are other names.",
        id="longer-identifiers-untouched",
    ),
    pytest.param("", "", id="empty"),
]


@pytest.mark.parametrize(("api", "ui"), FOR_UI)
def test_for_ui(api: str, ui: str) -> None:
    assert for_ui(api) == ui


def test_for_ui_article_of_the_encoder_phrase() -> None:
    ui = for_ui("Use 'auto' or a name listed by GET /negip/v1/models.")
    assert " a encoder" not in ui


def test_for_ui_drops_the_json_hint() -> None:
    ui = for_ui(
        "negative_weight must be a number from -1 to 5; got '0.5' (str) (send numbers as JSON "
        "numbers, not strings)."
    )
    assert ui.startswith("'Negative weight' must be a number from -1 to 5; got '0.5' (str)")
    assert "JSON" not in ui
    assert "send" not in ui
    assert ui.endswith(".")


def test_for_ui_no_space_before_full_stop() -> None:
    ui = for_ui("x must be a number; got '0.5' (str) (send numbers as JSON numbers, not strings).")
    assert " ." not in ui


def test_for_ui_keeps_the_space_before_a_file_suffix_and_an_ellipsis() -> None:
    ui = for_ui(
        "Use the .safetensors release of this model, or a .bin from a source you trust; "
        "layers 1, 3, ..., 41."
    )
    assert "the .safetensors release" in ui
    assert "a .bin from" in ui
    assert "1, 3, ..., 41." in ui


@pytest.mark.parametrize(
    "api",
    [
        "positive_weight must be from -1 to 5; got 7.0.",
        "positive_images and negative_images are both empty, but image prompts are enabled: give "
        "at least one image on either side, or switch Negative Image Prompt off (enabled: false).",
        "model: image prompts are enabled but no IP-Adapter model is chosen. Use 'auto' or one of "
        "the adapters listed by GET /negip/v1/models, or set enabled to false.",
        "negative_images[3]: the numpy image has 1 pixels.",
        "infotext_images: 'x' is not a stored image reference.",
        "negative_noise makes the negative side from the positive images, but positive_images is "
        "empty: give positive images or set negative_noise to 0.",
        "negative_weight must be a number; got '0.5' (str) (send numbers as JSON numbers, not strings).",
    ],
)
def test_for_ui_result_is_not_forbidden(api: str) -> None:
    assert UI_FORBIDDEN.search(api) is not None  # the API's words are
    assert UI_FORBIDDEN.search(for_ui(api)) is None, for_ui(api)


def test_every_field_with_an_underscore_is_replaced() -> None:
    for field, label in FIELD_LABELS.items():
        if "_" not in field:
            continue
        assert for_ui(f"{field} is wrong.") == f"'{label}' is wrong.", field
        assert UI_FORBIDDEN.search(field) is not None, field
        assert UI_FORBIDDEN.search(label) is None, label


@pytest.mark.parametrize(
    "text",
    [
        "positive_weight",
        "set negative_noise to 0",
        "(negative_noise_type)",
        "positive_images[2] is bad",
        "infotext_images",
        "GET /negip/v1/models",
        "GET /sdapi/v1/options",
        "see /negip/v1/models",
        "ArgumentError: bad",
        "raised ImageError",
        "NegIPError",
        "a NegIPArgs object",
        "Traceback (most recent call last)",
        "send JSON numbers",
    ],
)
def test_ui_forbidden_catches(text: str) -> None:
    assert UI_FORBIDDEN.search(text) is not None, text


@pytest.mark.parametrize(
    "text",
    [
        "'Positive weight' must be from -1 to 5.",
        "The model family must match.",
        "Choose an IP-Adapter in the dropdown, or untick Negative Image Prompt.",
        "positive image 3 cannot be read.",
        "The error is shown here.",  # "error" alone is no class name
        "Enabled by default; combine them.",
        "positive_weights",
        "json",
    ],
)
def test_ui_forbidden_lets_ui_words_pass(text: str) -> None:
    assert UI_FORBIDDEN.search(text) is None, text


def test_error_ui_wording() -> None:
    derived = ArgumentError("negative_weight must be from -1 to 5; got 9.0.")
    assert str(derived) == "negative_weight must be from -1 to 5; got 9.0."
    assert derived.ui == "'Negative weight' must be from -1 to 5; got 9.0."
    explicit = ImageError(
        "positive_images[0]: too large.", ui="The first positive image is too large."
    )
    assert str(explicit) == "positive_images[0]: too large."
    assert explicit.ui == "The first positive image is too large."
    assert NegIPError().ui == ""
    assert NegIPError("plain words").ui == "plain words"
    # An explicit empty UI wording is kept (not derived).
    assert NegIPError("positive_weight", ui="").ui == ""
