"""The extension's UI in a real Forge-family host (Forge, reForge, Forge Classic), in headless
Chromium: what a user sees there, beside the API checks of ``test_real_forge.py``.

Skipped unless ``NEGIP_FORGE_URL`` names a running host with this extension (the same server
``test_real_forge.py`` uses: a full-size SD1.5 checkpoint, an SD1.5 IP-Adapter and a ViT-H-14
encoder) and playwright and a Chromium are installed (``NEGIP_CHROMIUM``, as in
``test_browser.py``, whose helpers these tests share).

The point of these tests is what differs from A1111 in these hosts: a generation made from the
UI changes the pixels, a refusal reaches the page in the extension's words, and img2img's
pictures live in Forge's own canvas, not in gradio images.
reForge and Forge Classic run a generation in their own worker thread and hand the UI the
host's "TypeError: 'NoneType' object is not iterable" for any exception there; the extension's
``MainThreadErrors`` puts its own message back (see docs/architecture.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_browser
from test_browser import (  # noqa: F401  (browser is a fixture)
    browser,
    click_add,
    decode,
    fetch,
    generate,
    loaded_page,
    negip_value,
    open_accordion,
    random_png,
    result_with_both_sides,
    send_on_a_fresh_page,
    small_settings,
    upload,
)

URL = os.environ.get("NEGIP_FORGE_URL", "").rstrip("/")

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="NEGIP_FORGE_URL is not set (no running Forge)"),
]

#: A full-size SD1.5 UNet on the CPU: one 64x64 image of 4 steps takes 10-40 s.
SLOW_GENERATION_MS = 300_000


@pytest.fixture
def page(browser: Any, monkeypatch: pytest.MonkeyPatch):  # noqa: F811  (the imported fixture)
    """A freshly loaded page of the host; fails the test on a JavaScript exception."""
    monkeypatch.setattr(test_browser, "GENERATION_TIMEOUT_MS", SLOW_GENERATION_MS)
    for page in loaded_page(browser, URL, ("txt2img",), lambda error: "reading 'props'" in error):
        page.set_default_timeout(SLOW_GENERATION_MS)
        yield page


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "positive": random_png(tmp_path / "positive.png", 1),
        "negative": random_png(tmp_path / "negative.png", 2),
    }


def close_accordion(page: Any, tab: str = "txt2img") -> None:
    accordion = f"#negip_{tab}_enabled"
    page.locator(f"{accordion} .label-wrap").first.click()
    page.wait_for_function(
        "id => !document.querySelector(`#${id}-checkbox input`).checked", arg=accordion[1:]
    )


def test_a_generation_from_the_ui_changes_the_pixels(page: Any, files: dict[str, Path]) -> None:
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    upload(page, "txt2img", "negative", files["negative"])
    ours = generate(page)
    assert ours["image"], ours["log"]
    text = ours["infotext"]
    assert "NegIP model: " in text, text
    negip_value(text, "NegIP positive images")
    negip_value(text, "NegIP negative images")
    close_accordion(page)  # the extension off: the host's own image, same settings
    plain = generate(page)
    assert plain["image"], plain["log"]
    assert "NegIP" not in plain["infotext"]
    ours_pixels = decode(fetch(page, ours["image"])).astype(np.int16)
    plain_pixels = decode(fetch(page, plain["image"])).astype(np.int16)
    assert ours_pixels.shape == plain_pixels.shape
    assert float(np.abs(ours_pixels - plain_pixels).mean()) >= 0.5
    # gradio 4's file boxes: a file keeps its name through a ➕ (it came back as a hash)
    open_accordion(page)
    added = click_add(page, "txt2img", "positive", "result", 2)
    assert added[0].replace(" ", "") == "positive.png", added  # gradio 4 shows "positive .png"


def test_png_info_send_to_txt2img_makes_the_image_again(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """Forge's PNG Info and "Send to" (gradio 4): the settings and the stored image prompts come
    back into the accordion, and Generate makes the same picture."""
    png, positive, negative = result_with_both_sides(page, files, tmp_path)
    send_on_a_fresh_page(page, png)
    page.wait_for_function(
        "() => document.querySelector('#negip_txt2img_enabled-checkbox input').checked"
    )
    for side, reference in (("positive", positive), ("negative", negative)):
        page.wait_for_function(
            "([box, name]) => document.querySelector(box)?.innerText.includes(name)",
            arg=[f"#negip_txt2img_{side}_images", reference],
        )
    again = generate(page)
    assert again["image"], again["log"]
    assert negip_value(again["infotext"], "NegIP positive images") == positive
    assert np.array_equal(decode(fetch(page, again["image"])), decode(png.read_bytes()))


def test_a_refusal_shows_the_extensions_message(page: Any) -> None:
    small_settings(page)
    open_accordion(page)  # on, and no image on either side
    result = generate(page)
    message = result["log"]
    assert result["image"] == ""
    assert "Negative Image Prompt:" in message, message
    assert "drop an image" in message, message
    assert "NoneType" not in message, message


def test_img2img_input_adds_the_picture_of_forges_canvas(page: Any, tmp_path: Path) -> None:
    """Forge's img2img pictures are ForgeCanvas editors (an HTML block and hidden images), not
    gradio images: "➕ img2img input" takes the picture from the canvas of the sub-tab in
    view."""
    from PIL import Image

    from lib_negip.images import to_rgb
    from lib_negip.store import reference_of

    picture = random_png(tmp_path / "init.png", 3, size=64)
    expected = f"{reference_of(to_rgb(Image.open(picture)))}.png"
    page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    page.wait_for_selector("#tab_img2img", state="visible")
    page.set_input_files("#img2img_image input[type=file]", str(picture))
    page.wait_for_timeout(2000)  # the canvas draws the picture and writes it to its hidden image
    open_accordion(page, "img2img")
    names = click_add(page, "img2img", "positive", "input", 1)
    # gradio 4's file list shows the stem and the suffix in two elements ("<stem> .png")
    assert ["".join(name.split()) for name in names] == [expected], names


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("broken.png", b"garbage, not a png"),
        # Pillow would hand it to Ghostscript inside gradio's decoding: refused from its header.
        ("mask.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
    ],
    ids=["garbage", "postscript"],
)
def test_an_unreadable_mask_upload_is_refused_in_the_page(
    page: Any, files: dict[str, Path], tmp_path: Path, name: str, content: bytes
) -> None:
    """gradio 4 decodes a mask upload before our code runs, as gradio 3 does: a file that is
    not a picture is refused by the mask's name in the page, not lost inside gradio."""
    broken = tmp_path / name
    broken.write_bytes(content)
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    test_browser.drop_on_positive_mask(page, broken, shown=False)
    page.wait_for_timeout(2000)  # gradio 4 uploads the file before Generate can send it
    result = generate(page)
    assert result["image"] == "", result
    assert (
        "'Positive mask': The uploaded file is not an image file that can be read"
        in (result["log"])
    ), result["log"]
