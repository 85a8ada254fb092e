"""The extension's UI in a real AUTOMATIC1111 1.10.1, driven by headless Chromium (playwright).

Skipped unless ``NEGIP_WEBUI_URL`` names a running A1111 (``--api``) with this extension and the
tiny SD1.5 models of ``make_tiny_models.py`` (the harness's port 7860), and unless playwright
(the Python package) and a Chromium are installed: ``NEGIP_CHROMIUM`` names the browser's
executable (default ``/usr/bin/chromium``; playwright's own download is never used).
``NEGIP_WEBUI_LOG`` names the server's log: as in ``test_real_webui.py`` every test checks that
it added no "Error"/"Traceback" line there beyond those the test expects.

Each test opens a fresh page (a reload drops every uploaded file and restored value), sets a
64x64 image, 4 steps and a fixed seed, and waits for A1111's own elements by id. With
``NEGIP_SCREENSHOT_DIR`` set, ``test_readme_screenshot`` writes the README's picture there.

playwright is imported only inside the fixtures, so the normal test run does not need it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

URL = os.environ.get("NEGIP_WEBUI_URL", "").rstrip("/")
LOG = os.environ.get("NEGIP_WEBUI_LOG", "")
CHROMIUM = os.environ.get("NEGIP_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT_DIR = os.environ.get("NEGIP_SCREENSHOT_DIR", "")

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="NEGIP_WEBUI_URL is not set (no running A1111)"),
]

SD15_ADAPTERS = (
    "negip-tiny-ip-adapter_sd15",
    "negip-tiny-ip-adapter-plus_sd15",
    "negip-tiny-ip-adapter_sd15-pickle",
)
ENCODER = "negip-tiny-vit"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: How long one generation of a 64x64 image may take (about 2-5 s on the harness's CPU).
GENERATION_TIMEOUT_MS = 120_000
REFERENCE = re.compile(r"[0-9a-f]{16}")
OUR_ERROR_LINE = "ERROR:negip:Negative Image Prompt: "


# ---------------------------------------------------------------------------------------------
# Pictures


def random_png(path: Path, seed: int, size: int = 96) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def house_png(path: Path, size: int = 192) -> Path:
    """A house under a blue sky on green grass (the README's positive image)."""
    image = Image.new("RGB", (size, size), (130, 190, 235))
    draw = ImageDraw.Draw(image)
    s = size / 96
    draw.rectangle([0, 74 * s, size, size], fill=(70, 150, 50))
    draw.rectangle([30 * s, 46 * s, 66 * s, 76 * s], fill=(200, 110, 80))
    draw.polygon([(24 * s, 48 * s), (48 * s, 26 * s), (72 * s, 48 * s)], fill=(110, 50, 40))
    draw.rectangle([44 * s, 60 * s, 52 * s, 76 * s], fill=(80, 50, 30))
    draw.rectangle([34 * s, 52 * s, 41 * s, 59 * s], fill=(230, 230, 180))
    draw.rectangle([56 * s, 52 * s, 63 * s, 59 * s], fill=(230, 230, 180))
    image.save(path)
    return path


def lawn_png(path: Path, size: int = 192) -> Path:
    """A green lawn (the README's negative image)."""
    rng = np.random.default_rng(5)
    green = np.zeros((size, size, 3), dtype=np.float32)
    green[..., 0], green[..., 1], green[..., 2] = 60, 140, 45
    green += rng.normal(0, 18, (size, size, 1)) * np.array([0.5, 1.0, 0.4])
    Image.fromarray(np.clip(green, 0, 255).astype(np.uint8)).save(path)
    return path


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# The server log (as in test_real_webui.py)


class ServerLog:
    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self.offset = self.path.stat().st_size if self.path else 0

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


@pytest.fixture(scope="module")
def module_log() -> ServerLog:
    return ServerLog(LOG)


@pytest.fixture(autouse=True)
def server_log(module_log: ServerLog):
    module_log.new_lines()
    yield module_log
    assert ServerLog.problems(module_log.new_lines()) == []


# ---------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, with a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (set NEGIP_CHROMIUM)")
    profile = tempfile.mkdtemp(prefix="negip-chromium-")
    try:
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=shutil.which(CHROMIUM) or CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1400},
            )
            context.set_default_timeout(60_000)
            yield context
            context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any):
    """A freshly loaded A1111 page; fails the test on a JavaScript exception of the page."""
    yield from loaded_page(browser, URL, ("txt2img", "img2img"), known_page_error)


def loaded_page(
    browser: Any, url: str, tabs: tuple[str, ...], known: Callable[[str], bool]
) -> Iterator[Any]:
    """The body of a page fixture: ``url`` loaded in a new page, with our accordion on each of
    ``tabs``; after the test, the page's JavaScript exceptions other than ``known`` ones fail
    it."""
    page = browser.new_page()
    # gradio 3.41 runs each queued event over its own websocket: settle() waits for them
    sockets: set[Any] = set()

    def opened(socket: Any) -> None:
        sockets.add(socket)
        socket.on("close", lambda _socket: sockets.discard(socket))

    page.on("websocket", opened)
    page.negip_sockets = sockets
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"{error}\n{error.stack}"))
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    # gradio 3.41 builds the UI in the browser after "load": wait for the elements themselves,
    # and for A1111's onUiLoaded work (the accordion's visible checkbox is made there).
    page.wait_for_selector("#tab_txt2img", state="visible", timeout=180_000)
    for tab in tabs:
        page.wait_for_selector(f"#negip_{tab}_enabled-visible-checkbox", state="attached")
    yield page
    page.close()
    assert [error for error in errors if not known(error)] == []


def known_page_error(error: str) -> bool:
    """A1111 1.10.1's own page error: gradio 3.41's Blocks throws "Cannot read properties of
    undefined (reading 'props')" when the width/height/steps/seed inputs change (seen with
    --disable-extra-extensions too, so not ours)."""
    return "reading 'props'" in error and "/assets/Blocks-" in error


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "positive": random_png(tmp_path / "positive.png", 1),
        "negative": random_png(tmp_path / "negative.png", 2),
        "init": random_png(tmp_path / "init.png", 3, size=64),
    }


def small_settings(page: Any, tab: str = "txt2img", seed: int = 1234) -> None:
    """64x64, 4 steps, a fixed seed: a generation takes a few seconds on a CPU."""
    # fill() fires the input events gradio binds to (A1111 answers some of these changes with
    # a page error of its own: see known_page_error).
    for part, value in (("width", 64), ("height", 64), ("steps", 4)):
        page.fill(f"#{tab}_{part} input[type=number]", str(value))
    page.fill(f"#{tab}_seed input", str(seed))
    page.locator(f"#{tab}_seed input").blur()
    settle(page)


def settle(page: Any, quiet_ms: int = 300, timeout_s: float = 30) -> None:
    """Wait until no gradio event is running. An upload started while another event's
    component update lands stays at "Uploading..." for ever in gradio 3.41 (A1111 answers a
    change of the width, height or seed, or of img2img's image, with events of its own)."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        page.wait_for_timeout(100)
        quiet = quiet + 100 if not page.negip_sockets else 0
        if quiet >= quiet_ms:
            return
    raise AssertionError(f"gradio events still running after {timeout_s} s")


def open_accordion(page: Any, tab: str = "txt2img") -> None:
    accordion = f"#negip_{tab}_enabled"
    page.locator(f"{accordion} .label-wrap").first.scroll_into_view_if_needed()
    if not page.is_checked(f"{accordion}-visible-checkbox"):
        page.locator(f"{accordion} .label-wrap").first.click()
    page.wait_for_function(
        "id => document.querySelector(`#${id}-checkbox input`).checked", arg=accordion[1:]
    )


def dropdown_choices(page: Any, dropdown: str) -> list[str]:
    """The choices a gradio dropdown lists when opened (then closed again)."""
    page.click(f"{dropdown} input")
    options = page.locator(f"{dropdown} ul.options li")
    options.first.wait_for()
    values = options.evaluate_all("items => items.map(item => item.dataset.value)")
    page.keyboard.press("Escape")
    page.locator(f"{dropdown} ul.options").wait_for(state="detached")
    return values


def file_names(page: Any, tab: str, side: str) -> list[str]:
    """The names the side's file box lists."""
    return page.eval_on_selector_all(
        f"#negip_{tab}_{side}_images tr.file td:first-child",
        "cells => cells.map(cell => cell.textContent.trim())",
    )


def click_add(page: Any, tab: str, side: str, button: str, count: int) -> list[str]:
    """Click a side's "➕" button (``add_<button>_<side>``), wait until the side holds
    ``count`` files, and return their names."""
    page.click(f"#negip_{tab}_add_{button}_{side}")
    page.wait_for_function(
        f"() => document.querySelectorAll('#negip_{tab}_{side}_images tr.file').length === {count}"
    )
    return file_names(page, tab, side)


def upload(page: Any, tab: str, side: str, *paths: Path) -> None:
    before = len(file_names(page, tab, side))
    box = f"#negip_{tab}_{side}_images"
    page.set_input_files(f"{box} input[type=file]", [str(p) for p in paths])
    try:
        page.wait_for_function(
            "([box, n]) => document.querySelectorAll(`${box} a[download]`).length >= n",
            arg=[box, before + len(paths)],
            timeout=30_000,
        )
    except Exception as error:
        shown = page.eval_on_selector(box, "e => e.innerText")
        raise AssertionError(f"the upload into {box} did not finish; it shows {shown!r}") from error


def gallery_source(page: Any, tab: str) -> str:
    sources = page.eval_on_selector_all(f"#{tab}_gallery img", "imgs => imgs.map(i => i.src)")
    return sources[0] if sources else ""


def log_text(page: Any, tab: str) -> str:
    return page.eval_on_selector(f"#html_log_{tab}", "e => e.innerText")


def generate(page: Any, tab: str = "txt2img") -> dict[str, str]:
    """Press Generate and wait until a new image or a new error is shown; returns the infotext,
    the log text (errors) and the new image's URL ("" after an error).

    A new image has a new URL (A1111 adds a time stamp); a new error changes the log. (The log
    must not be cleared here: gradio would not draw into the replaced element again.)
    """
    before = gallery_source(page, tab)
    log_before = page.eval_on_selector(f"#html_log_{tab}", "e => e.innerHTML")
    page.click(f"#{tab}_generate")
    page.wait_for_function(
        """([tab, before, logBefore]) => {
            const img = document.querySelector(`#${tab}_gallery img`);
            const log = document.querySelector(`#html_log_${tab}`);
            const interrupt = document.getElementById(`${tab}_interrupt`);
            const idle = !interrupt || interrupt.style.display === 'none';
            const error = log && log.innerHTML !== logBefore && log.querySelector('.error');
            return idle && ((img && img.src !== before) || error);
        }""",
        arg=[tab, before, log_before],
        timeout=GENERATION_TIMEOUT_MS,
    )
    source = gallery_source(page, tab)
    failed = page.evaluate(
        """([tab, logBefore]) => {
            const log = document.querySelector(`#html_log_${tab}`);
            return !!log && log.innerHTML !== logBefore && !!log.querySelector('.error');
        }""",
        [tab, log_before],
    )
    if source == before or failed:  # (after an error the gallery may be emptied: a "new" URL)
        source = ""
    else:  # the infotext is written together with the gallery
        page.wait_for_function(
            "tab => document.querySelector(`#html_info_${tab}`).innerText.includes('Seed:')",
            arg=tab,
        )
    return {
        "infotext": page.eval_on_selector(f"#html_info_{tab}", "e => e.innerText"),
        "log": log_text(page, tab),
        "image": source,
    }


def fetch(page: Any, url: str) -> bytes:
    response = page.request.get(url)
    assert response.ok, response.status
    return response.body()


def negip_value(infotext: str, key: str) -> str:
    match = re.search(rf"{re.escape(key)}: ([^,\n]+)", infotext)
    assert match, f"{key!r} not in {infotext!r}"
    return match[1].strip()


def api(method: str, path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        URL + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def store_folder() -> Path:
    """The server's folder of stored image prompts (skips when this machine cannot see it)."""
    flags = api("GET", "/sdapi/v1/cmd-flags")
    options = api("GET", "/sdapi/v1/options")
    folder = Path(options.get("negip_store_folder") or "outputs/negip-image-prompts").expanduser()
    if not folder.is_absolute():
        folder = Path(flags.get("data_dir") or ".") / folder
    if not folder.is_dir():
        pytest.skip(f"the server's image prompt folder {folder} is not on this machine")
    return folder


# ---------------------------------------------------------------------------------------------
# txt2img


def test_accordion_opens_and_switches_the_extension_on(page: Any) -> None:
    accordion = "#negip_txt2img_enabled"
    assert not page.is_checked(f"{accordion}-checkbox input")  # off by default
    assert not page.is_visible("#negip_txt2img_positive_images")
    page.locator(f"{accordion} .label-wrap").first.click()
    page.wait_for_selector("#negip_txt2img_positive_images", state="visible")
    assert page.is_checked(f"{accordion}-visible-checkbox")
    assert page.is_checked(f"{accordion}-checkbox input")
    for part in ("negative_images", "model", "image_encoder", "positive_layers", "negative_noise"):
        assert page.is_visible(f"#negip_txt2img_{part}"), part
    # closed again: off again
    page.locator(f"{accordion} .label-wrap").first.click()
    page.wait_for_function(
        "() => !document.querySelector('#negip_txt2img_enabled-checkbox input').checked"
    )


def test_dropdowns_show_auto_and_the_presets(page: Any) -> None:
    open_accordion(page)
    assert page.input_value("#negip_txt2img_model input") == "auto"
    assert page.input_value("#negip_txt2img_image_encoder input") == "auto"
    assert page.input_value("#negip_txt2img_positive_layers input") == "all"
    assert page.input_value("#negip_txt2img_negative_layers input") == "all"
    assert page.input_value("#negip_txt2img_negative_noise_type input") == "fade"
    choices = dropdown_choices(page, "#negip_txt2img_model")
    assert choices[0] == "auto"
    assert set(SD15_ADAPTERS) <= set(choices)
    presets = dropdown_choices(page, "#negip_txt2img_positive_layers")
    assert presets == ["all", "style", "composition", "style and composition", "strong style"]
    assert dropdown_choices(page, "#negip_txt2img_negative_noise_type") == [
        "fade",
        "dissolve",
        "gaussian",
        "shuffle",
    ]
    # the masks sit in the closed "Masks and step windows" accordion
    assert not page.is_visible("#negip_txt2img_positive_mask")
    page.locator("#negip_txt2img_more .label-wrap").first.click()
    page.wait_for_selector("#negip_txt2img_positive_mask", state="visible")
    assert page.is_visible("#negip_txt2img_negative_mask")


def test_every_label_can_be_translated(page: Any) -> None:
    """A1111's localization (``localization.js``) translates a text node only where its own
    ``canBeTranslated`` says so, which refuses any text holding an emoji: the ➕ buttons kept
    their English words under a localization while "➕" was part of their label. The symbol is
    drawn by style.css now; every text of ours with words in it must pass A1111's check."""
    for tab in ("txt2img", "img2img"):
        if tab == "img2img":
            page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
        open_accordion(page, tab)
        page.locator(f"#negip_{tab}_more .label-wrap").first.click()
        refused = page.evaluate(
            """(tab) => textNodesUnder(document.querySelector(`#negip_${tab}_enabled`))
                .map((node) => [node, node.textContent.trim()])
                .filter(([node, text]) => /[A-Za-z]/.test(text) && !canBeTranslated(node, text))
                .map(([node, text]) => text)""",
            tab,
        )
        assert refused == [], (tab, refused)
        buttons = ["add_result_positive", "add_png_info_negative"]
        buttons += ["add_input_positive"] if tab == "img2img" else []
        for button in buttons:
            selector = f"#negip_{tab}_{button}"
            text = page.inner_text(selector).strip()
            assert text in ("Selected result", "PNG Info image", "img2img input"), text
            drawn = page.evaluate(
                "(s) => getComputedStyle(document.querySelector(s), '::before').content", selector
            )
            assert "\u2795" in drawn, (selector, drawn)


def test_generate_with_a_positive_image(page: Any, files: dict[str, Path]) -> None:
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    assert file_names(page, "txt2img", "positive") == ["positive.png"]
    # javascript/negip.js draws a thumbnail of each uploaded file
    page.wait_for_selector("#negip_txt2img_positive_preview img.negip-thumbnail", state="attached")
    result = generate(page)
    assert result["image"], result["log"]
    text = result["infotext"]
    for setting in ("Steps: 4,", "Seed: 1234,", "Size: 64x64,"):
        assert setting in text, text
    model = negip_value(text, "NegIP model")
    name, _, digest = model.partition(" [")
    assert name in SD15_ADAPTERS, model  # "auto" picked an SD1.5 adapter and names it
    assert re.fullmatch(r"[0-9a-f]{10}\]", digest), model
    assert "NegIP model: negip-tiny-ip-adapter" in text
    assert negip_value(text, "NegIP encoder").startswith(f"{ENCODER} [")
    assert REFERENCE.fullmatch(negip_value(text, "NegIP positive images"))
    assert "NegIP negative images" not in text
    # the UI's image equals the API's for the same settings (the upload path = the API path)
    encoded = base64.b64encode(files["positive"].read_bytes()).decode()
    answer = api(
        "POST",
        "/sdapi/v1/txt2img",
        {
            "prompt": "",
            "negative_prompt": "",
            "steps": 4,
            "width": 64,
            "height": 64,
            "seed": 1234,
            "cfg_scale": 7,
            "sampler_name": negip_value(text, "Sampler"),
            "scheduler": negip_value(text, "Schedule type"),
            "alwayson_scripts": {
                "Negative Image Prompt": {"args": [{"positive_images": [encoded]}]}
            },
        },
    )
    ui_pixels = decode(fetch(page, result["image"]))
    api_pixels = decode(base64.b64decode(answer["images"][0]))
    assert np.array_equal(ui_pixels, api_pixels)


def test_a_refused_generation_with_images_prints_them_short(
    page: Any, files: dict[str, Path], server_log: ServerLog
) -> None:
    """A1111 prints a failed UI request's arguments: the file boxes' bytes filled the console
    with 128 KB of escaped image data per refusal. They print as name and size now."""
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    upload(page, "txt2img", "negative", files["negative"])
    choose(page, "#negip_txt2img_negative_layers", "16:1")
    result = generate(page)
    assert result["image"] == ""
    assert "block 16 does not exist" in result["log"], result["log"]
    lines = server_log.new_lines()
    arguments = [line for line in lines if "Arguments:" in line]
    assert arguments, lines
    assert "<upload 'positive.png', " in arguments[0], arguments[0][:300]
    assert max(len(line) for line in lines) < 20_000, max(len(line) for line in lines)
    choose(page, "#negip_txt2img_negative_layers", "all")


def test_no_image_shows_the_error_in_ui_words(
    page: Any, files: dict[str, Path], server_log: ServerLog
) -> None:
    small_settings(page)
    open_accordion(page)
    result = generate(page)
    message = result["log"]
    assert result["image"] == ""
    assert "Negative Image Prompt:" in message, message
    assert "drop an image" in message, message
    for word in ("ArgumentError", "NegIPError", "positive_images", "negative_images", "enabled:"):
        assert word not in message, message
    # the server logged our one line (and A1111 its own report of the failed UI call)
    lines = server_log.new_lines()
    ours = [line for line in lines if line.startswith(OUR_ERROR_LINE)]
    assert len(ours) == 1, lines
    # the same page generates once an image is there
    upload(page, "txt2img", "negative", files["negative"])
    again = generate(page)
    assert again["image"], again["log"]
    assert "Negative Image Prompt:" not in again["log"]
    assert REFERENCE.fullmatch(negip_value(again["infotext"], "NegIP negative images"))


def test_selected_result_goes_to_the_negative_side(page: Any, files: dict[str, Path]) -> None:
    small_settings(page)
    open_accordion(page)
    # Before any result, "➕" adds nothing and the side keeps its upload area (it was replaced
    # by an empty file list: nothing could be dropped there any more).
    page.click("#negip_txt2img_add_result_negative")
    upload_area = "#negip_txt2img_negative_images input[type=file]"
    with pytest.raises(Exception, match="Timeout"):
        page.wait_for_function(
            f"() => document.querySelectorAll('{upload_area}').length === 0", timeout=3000
        )
    assert file_names(page, "txt2img", "negative") == []
    upload(page, "txt2img", "positive", files["positive"])
    first = generate(page)
    assert first["image"], first["log"]
    assert file_names(page, "txt2img", "negative") == []
    names = click_add(page, "txt2img", "negative", "result", 1)
    assert len(names) == 1, names
    assert re.fullmatch(r"[0-9a-f]{16}\.png", names[0]), names
    assert file_names(page, "txt2img", "positive") == ["positive.png"]  # untouched
    second = generate(page)
    assert second["image"], second["log"]
    # the negative image is the first result, stored under the same reference
    assert negip_value(second["infotext"], "NegIP negative images") == names[0][:-4]
    assert not np.array_equal(
        decode(fetch(page, second["image"])), decode(fetch(page, first["image"]))
    )
    # a second click adds the newest result too; the file already there keeps its name
    assert click_add(page, "txt2img", "negative", "result", 2)[0] == names[0]
    # a file uploaded to the side keeps its own name through a ➕ (it came back as 16 hex
    # digits of its content, which looked like a stored reference)
    added = click_add(page, "txt2img", "positive", "result", 2)
    assert added[0] == "positive.png", added
    assert re.fullmatch(r"[0-9a-f]{16}\.png", added[1]), added


def test_swap_button_swaps_the_sides(page: Any, files: dict[str, Path]) -> None:
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    upload(page, "txt2img", "negative", files["negative"])
    page.click("#negip_txt2img_swap")
    page.wait_for_function(
        """() => {
            const cell = s => document.querySelector(`#negip_txt2img_${s}_images tr.file td`);
            return cell('positive') && cell('positive').textContent.trim() === 'negative.png'
                && cell('negative') && cell('negative').textContent.trim() === 'positive.png';
        }"""
    )


def send_png_to_txt2img(page: Any, png: Path) -> None:
    """PNG Info: drop the file, then "Send to txt2img"."""
    page.locator("#tabs > .tab-nav button", has_text="PNG Info").click()
    page.wait_for_selector("#pnginfo_image", state="visible")
    page.set_input_files("#pnginfo_image input[type=file]", str(png))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_generation_info textarea')?.value.includes('NegIP')"
        " || document.querySelector('#tab_pnginfo')?.innerText.includes('NegIP model')"
    )
    page.click("#txt2img_tab")
    page.wait_for_selector("#tab_txt2img", state="visible")


def result_with_both_sides(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> tuple[Path, str, str]:
    """A result made with the positive and the negative file (seed 4321): its PNG, saved under
    ``tmp_path``, and the references of its stored positive and negative image prompts."""
    small_settings(page, seed=4321)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    upload(page, "txt2img", "negative", files["negative"])
    original = generate(page)
    assert original["image"], original["log"]
    png = tmp_path / "result.png"
    png.write_bytes(fetch(page, original["image"]))
    text = original["infotext"]
    return (
        png,
        negip_value(text, "NegIP positive images"),
        negip_value(text, "NegIP negative images"),
    )


def send_on_a_fresh_page(page: Any, png: Path) -> None:
    """PNG Info > "Send to txt2img" of ``png`` on a reloaded page (nothing uploaded, the
    extension off)."""
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#negip_txt2img_enabled-visible-checkbox", state="attached")
    assert not page.is_checked("#negip_txt2img_enabled-checkbox input")
    send_png_to_txt2img(page, png)


def test_png_info_send_to_txt2img_restores_the_image_prompts(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    png, positive, negative = result_with_both_sides(page, files, tmp_path)
    send_on_a_fresh_page(page, png)
    page.wait_for_function(
        "() => document.querySelector('#negip_txt2img_enabled-checkbox input').checked"
    )
    page.wait_for_function(
        "() => document.querySelectorAll('#negip_txt2img_positive_images tr.file').length === 1"
        " && document.querySelectorAll('#negip_txt2img_negative_images tr.file').length === 1"
    )
    assert file_names(page, "txt2img", "positive") == [f"{positive}.png"]
    assert file_names(page, "txt2img", "negative") == [f"{negative}.png"]
    status = page.eval_on_selector_all(
        "#negip_txt2img_restore_status", "els => els.map(e => e.innerText).join('')"
    )
    assert status.strip() == "", status  # nothing missing
    assert page.input_value("#txt2img_seed input") == "4321"
    assert page.input_value("#negip_txt2img_model input").startswith("negip-tiny-ip-adapter")
    # no mask and default windows: the "Masks and step windows" accordion stays closed
    assert not page.is_visible("#negip_txt2img_positive_mask")

    again = generate(page)
    assert again["image"], again["log"]
    assert negip_value(again["infotext"], "NegIP positive images") == positive
    assert np.array_equal(decode(fetch(page, again["image"])), decode(png.read_bytes()))


def test_send_to_img2img_opens_the_accordion_it_copies_a_window_into(
    page: Any, files: dict[str, Path]
) -> None:
    """Send to img2img copies the step windows and the combine mode into img2img's closed
    "Masks and step windows" accordion, where the next Generate uses them unseen: it opens."""
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    page.locator("#negip_txt2img_more .label-wrap").first.click()
    page.wait_for_selector("#negip_txt2img_positive_start", state="visible")
    set_number(page, "#negip_txt2img_positive_start", 0.5)
    result = generate(page)
    assert result["image"], result["log"]
    page.click("#txt2img_send_to_img2img")
    page.wait_for_selector("#tab_img2img", state="visible")
    settle(page)
    open_accordion(page, "img2img")  # the switch is not copied: the user opens it
    page.wait_for_selector("#negip_img2img_positive_start", state="visible")
    assert page.input_value("#negip_img2img_positive_start input[type=number]") == "0.5"


def test_the_paste_button_with_an_empty_prompt_restores_the_last_generation(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """↙ with an empty prompt reads params.txt, the last generation's infotext, which A1111
    writes before sampling: it held no NegIP values (they were added after sampling), so the
    paste switched the extension off and Generate made the image without it."""
    png, _, _ = result_with_both_sides(page, files, tmp_path)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#negip_txt2img_enabled-visible-checkbox", state="attached")
    assert not page.is_checked("#negip_txt2img_enabled-checkbox input")
    page.fill("#txt2img_prompt textarea", "")
    page.click("#paste")
    page.wait_for_function(
        "() => document.querySelector('#negip_txt2img_enabled-checkbox input').checked"
        " && document.querySelectorAll('#negip_txt2img_negative_images tr.file').length === 1"
    )
    settle(page)
    again = generate(page)
    assert again["image"], again["log"]
    assert np.array_equal(decode(fetch(page, again["image"])), decode(png.read_bytes()))


def test_png_info_image_goes_to_the_negative_side(page: Any, files: dict[str, Path]) -> None:
    """The "➕ PNG Info image" button adds the picture dropped on the PNG Info tab (here a
    plain PNG without parameters) to a side of the txt2img tab; the generation stores it, the
    same pixels, under the reference its infotext names. img2img's button takes it too."""
    page.locator("#tabs > .tab-nav button", has_text="PNG Info").click()
    page.wait_for_selector("#pnginfo_image", state="visible")
    page.set_input_files("#pnginfo_image input[type=file]", str(files["negative"]))
    page.wait_for_selector("#pnginfo_image img", state="attached")
    settle(page)
    # the tab itself: "#txt2img_tab" is PNG Info's "Send to txt2img", which for a picture
    # without parameters pastes the last generation's (params.txt)
    page.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
    page.wait_for_selector("#tab_txt2img", state="visible")
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    assert file_names(page, "txt2img", "negative") == []
    names = click_add(page, "txt2img", "negative", "png_info", 1)
    assert len(names) == 1, names
    assert REFERENCE.fullmatch(names[0][:-4]), names
    assert file_names(page, "txt2img", "positive") == ["positive.png"]  # untouched
    result = generate(page)
    assert result["image"], result["log"]
    reference = negip_value(result["infotext"], "NegIP negative images")
    assert reference == names[0][:-4]
    stored = np.asarray(Image.open(store_folder() / f"{reference}.png").convert("RGB"))
    assert np.array_equal(stored, np.asarray(Image.open(files["negative"]).convert("RGB")))
    # the img2img tab's buttons take the same picture
    page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    page.wait_for_selector("#tab_img2img", state="visible")
    open_accordion(page, "img2img")
    assert click_add(page, "img2img", "positive", "png_info", 1) == names


def result_of_a_unique_image(page: Any, tmp_path: Path, seed: int) -> tuple[Path, str]:
    """A result made with one positive image only the calling test uses (random ``seed``):
    its PNG, saved under ``tmp_path``, and the reference of its stored image prompt."""
    unique = random_png(tmp_path / "unique.png", seed)
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", unique)
    original = generate(page)
    assert original["image"], original["log"]
    png = tmp_path / "result.png"
    png.write_bytes(fetch(page, original["image"]))
    return png, negip_value(original["infotext"], "NegIP positive images")


def paste_on_a_fresh_page(page: Any, png: Path, reference: str) -> str:
    """PNG Info > "Send to txt2img" of ``png`` on a reloaded page; the accordion's status once
    it names ``reference``."""
    send_on_a_fresh_page(page, png)
    page.wait_for_function(
        "ref => document.querySelector('#negip_txt2img_restore_status').innerText.includes(ref)",
        arg=reference,
    )
    return page.eval_on_selector("#negip_txt2img_restore_status", "e => e.innerText")


def test_send_to_txt2img_names_a_deleted_stored_image(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    folder = store_folder()
    png, reference = result_of_a_unique_image(page, tmp_path, 7002)
    (folder / f"{reference}.png").unlink()
    status = paste_on_a_fresh_page(page, png, reference)
    assert "outputs/negip-image-prompts" in status, status
    assert "/work/" not in status, status
    assert str(folder) not in status, status
    assert file_names(page, "txt2img", "positive") == []
    # Switched off by the paste: Generate makes no image without the missing image prompt.
    assert "switch Negative Image Prompt on again" in status, status
    assert not page.is_checked("#negip_txt2img_enabled-checkbox input")
    # Switched on again (here without adding the image back): the status has been read and
    # goes (it stayed until the next paste, after the image was added and drawn).
    open_accordion(page)
    page.wait_for_function(
        "() => document.querySelector('#negip_txt2img_restore_status').innerText.trim() === ''"
    )


def test_send_to_txt2img_names_a_changed_stored_image(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """A stored image prompt whose file now holds another picture is not put into the box
    under its reference (it was, and Generate drew with the other picture): the accordion says
    which, and the paste switches the extension off."""
    folder = store_folder()
    png, reference = result_of_a_unique_image(page, tmp_path, 7003)
    random_png(folder / f"{reference}.png", 7004)
    status = paste_on_a_fresh_page(page, png, reference)
    assert "cannot be restored" in status, status
    assert "the file was changed" in status, status
    assert str(folder) not in status, status
    assert file_names(page, "txt2img", "positive") == []
    assert "switch Negative Image Prompt on again" in status, status
    assert not page.is_checked("#negip_txt2img_enabled-checkbox input")


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("NegIP positive weight: abc", "'NegIP positive weight'"),
        ("NegIP style strength: 0.5", "'NegIP style strength': not a Negative Image Prompt value"),
        ("negip positive weight: 0.5", "typo: the key is 'NegIP positive weight'"),
    ],
    ids=["malformed", "unknown to this version", "another letter case"],
)
def test_send_to_txt2img_names_a_malformed_value(
    page: Any, tmp_path: Path, server_log: ServerLog, value: str, named: str
) -> None:
    """An edited infotext with a malformed NegIP value (or a key this version does not know):
    none of its NegIP values is restored (not even the well-formed ones), the extension is
    switched off, and the accordion says which value, in the UI's words (the API answers 422
    for it)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a house\nSteps: 4, Seed: 1, Size: 64x64, NegIP model: negip-tiny-ip-adapter_sd15, "
        f"{value}, NegIP negative weight: 0.35",
    )
    png = tmp_path / "edited.png"
    Image.new("RGB", (64, 64), (120, 130, 140)).save(png, pnginfo=info)
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#negip_txt2img_enabled-visible-checkbox", state="attached")
    open_accordion(page)  # on before the paste: the paste must switch it off
    weight = "#negip_txt2img_negative_weight input[type=number]"
    before = page.input_value(weight)
    send_png_to_txt2img(page, png)
    page.wait_for_function(
        "() => document.querySelector('#negip_txt2img_restore_status')"
        ".innerText.includes('were not restored')"
    )
    status = page.eval_on_selector("#negip_txt2img_restore_status", "e => e.innerText")
    assert named in status, status
    if value.endswith("abc"):
        assert "abc" in status, status  # the malformed value itself
    assert "positive_weight" not in status, status  # the UI's words, not the API's
    assert "switched off" in status, status
    assert not page.is_checked("#negip_txt2img_enabled-checkbox input")
    assert page.input_value(weight) == before != "0.35"  # a well-formed value is not restored
    # Our one line (A1111 converts nothing of ours, so it logs nothing of its own).
    lines = server_log.new_lines()
    key = value.split(":")[0]
    ours = [line for line in lines if f"Negative Image Prompt: Infotext '{key}'" in line]
    assert len(ours) == 1, lines


def api_twin(text: str, fields: dict[str, Any]) -> np.ndarray:
    """The API's image for the UI result whose infotext is ``text``, with our ``fields``."""
    answer = api(
        "POST",
        "/sdapi/v1/txt2img",
        {
            "prompt": "",
            "negative_prompt": "",
            "steps": 4,
            "width": 64,
            "height": 64,
            "seed": int(negip_value(text, "Seed")),
            "cfg_scale": 7,
            "sampler_name": negip_value(text, "Sampler"),
            "scheduler": negip_value(text, "Schedule type"),
            "alwayson_scripts": {"Negative Image Prompt": {"args": [fields]}},
        },
    )
    return decode(base64.b64decode(answer["images"][0]))


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def choose(page: Any, dropdown: str, value: str) -> None:
    """Pick ``value`` in a gradio dropdown (one of its choices, or typed where it takes any)."""
    page.fill(f"{dropdown} input", value)
    page.keyboard.press("Enter")
    page.locator(f"{dropdown} input").blur()
    settle(page)
    assert page.input_value(f"{dropdown} input") == value


def set_number(page: Any, slider: str, value: float) -> None:
    """A slider's value through the number box beside it."""
    box = f"{slider} input[type=number]"
    page.fill(box, str(value))
    page.locator(box).blur()
    settle(page)


def thumbnail_sources(page: Any, tab: str = "txt2img") -> list[str]:
    """The gallery's pictures in order (gradio draws the thumbnails twice: strip and grid)."""
    return page.eval_on_selector_all(
        f"#{tab}_gallery .thumbnail-item img", "images => [...new Set(images.map(i => i.src))]"
    )


def drop_on_positive_mask(page: Any, path: Path, *, shown: bool = True) -> None:
    """Open txt2img's "Masks and step windows" and drop ``path`` on the positive mask box;
    ``shown``: wait until the box shows it (gradio 4 shows no picture it cannot read)."""
    page.locator("#negip_txt2img_more .label-wrap").first.click()
    page.wait_for_selector("#negip_txt2img_positive_mask", state="visible")
    page.set_input_files("#negip_txt2img_positive_mask input[type=file]", str(path))
    if shown:
        page.wait_for_selector("#negip_txt2img_positive_mask img", state="attached")
        settle(page)


def noise_batch_of_two(page: Any, files: dict[str, Path]) -> list[str]:
    """A txt2img batch of two (seed 1234) with a noise negative made from the positive file;
    the gallery's sources: the grid, then the two pictures."""
    small_settings(page, seed=1234)
    page.fill("#txt2img_batch_size input[type=number]", "2")
    settle(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    set_number(page, "#negip_txt2img_negative_noise", 0.5)
    batch = generate(page)
    assert batch["image"], batch["log"]
    sources = thumbnail_sources(page)
    assert len(sources) == 3, sources
    return sources


def upscale_result(page: Any, index: int) -> dict[str, str]:
    """Select result ``index`` in txt2img's gallery and press A1111's ✨ (Hires. fix on that
    picture); the new picture's URL and the infotext."""
    page.locator("#txt2img_gallery .thumbnail-item").nth(index).click()
    settle(page)
    before = thumbnail_sources(page)
    page.click("#txt2img_upscale")
    page.wait_for_function(
        """before => {
            const now = [...document.querySelectorAll('#txt2img_gallery .thumbnail-item img')]
                .map(i => i.src);
            const interrupt = document.getElementById('txt2img_interrupt');
            return now.length && now.join() !== before.join()
                && (!interrupt || interrupt.style.display === 'none');
        }""",
        arg=before,
        timeout=GENERATION_TIMEOUT_MS,
    )
    settle(page)
    return {
        "image": thumbnail_sources(page)[index],
        "infotext": page.eval_on_selector("#html_info_txt2img", "e => e.innerText"),
    }


def test_upscale_of_a_later_image_of_a_noise_batch_uses_the_batch_noise(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """✨ under the results runs Hires. fix on the selected picture with its seed, and A1111
    passes nothing else of its infotext: image 2 of a noise-negative batch (seed 1235, made
    with the noise of seed 1234) was upscaled with the noise of seed 1235 (up to 44/255 from
    the same ✨ after a PNG Info restore of the picture, where the paste brings the noise seed
    back), and its infotext said 1235."""
    sources = noise_batch_of_two(page, files)
    second = tmp_path / "second.png"
    second.write_bytes(fetch(page, sources[2]))
    upscaled = upscale_result(page, 2)
    assert "Seed: 1235," in upscaled["infotext"], upscaled["infotext"]
    assert negip_value(upscaled["infotext"], "NegIP noise seed") == "1234"
    # The same ✨ on the picture restored through PNG Info, on a fresh page.
    send_on_a_fresh_page(page, second)
    restored = generate(page)
    assert restored["image"], restored["log"]
    again = upscale_result(page, 0)
    assert negip_value(again["infotext"], "NegIP noise seed") == "1234"
    difference = np.abs(
        decode(fetch(page, again["image"])).astype(int)
        - decode(fetch(page, upscaled["image"])).astype(int)
    )
    assert difference.max() <= 1, difference.max()  # a batch's rounding, as documented


def test_reuse_seed_of_a_later_picture_of_a_noise_batch_remakes_it(
    page: Any, files: dict[str, Path]
) -> None:
    """♻️ copies the selected picture's seed only: picture 2 of a noise-negative batch (seed
    1235, made with the batch's noise of seed 1234) came out with the noise of seed 1235, up to
    85/255 off (probe AE). Its noise seed now goes with the seed, as a paste would restore it."""
    sources = noise_batch_of_two(page, files)
    second = decode(fetch(page, sources[2]))
    page.locator("#txt2img_gallery .thumbnail-item").nth(2).click()
    settle(page)
    page.click("#txt2img_reuse_seed")
    page.wait_for_function("() => document.querySelector('#txt2img_seed input').value === '1235'")
    page.fill("#txt2img_batch_size input[type=number]", "1")
    settle(page)
    again = generate(page)
    assert again["image"], again["log"]
    assert "Seed: 1235," in again["infotext"], again["infotext"]
    assert negip_value(again["infotext"], "NegIP noise seed") == "1234"
    difference = np.abs(decode(fetch(page, again["image"])).astype(int) - second.astype(int))
    assert difference.max() <= 1, difference.max()  # a batch's rounding, as documented
    # A new seed makes new noise again.
    page.fill("#txt2img_seed input", "1236")
    settle(page)
    other = generate(page)
    assert negip_value(other["infotext"], "NegIP noise seed") == "1236"


def test_blocks_mask_and_window_from_the_ui_equal_the_api(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """Round 2's controls set in the page (a block preset, typed block pairs, a mask upload, a
    step window) make the image the API makes with the same fields, and the infotext says them."""
    mask = tmp_path / "mask.png"
    values = np.zeros((64, 64), dtype=np.uint8)
    values[:, :32] = 255
    Image.fromarray(values).save(mask)
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    upload(page, "txt2img", "negative", files["negative"])
    plain = generate(page)
    assert plain["image"], plain["log"]
    choose(page, "#negip_txt2img_positive_layers", "style")
    choose(page, "#negip_txt2img_negative_layers", "3:1, 6:0.5")
    drop_on_positive_mask(page, mask)
    set_number(page, "#negip_txt2img_negative_end", 0.5)
    result = generate(page)
    assert result["image"], result["log"]
    text = result["infotext"]
    assert negip_value(text, "NegIP positive layers") == "style"
    assert 'NegIP negative layers: "3:1, 6:0.5"' in text, text
    assert negip_value(text, "NegIP negative end") == "0.5"
    assert REFERENCE.fullmatch(negip_value(text, "NegIP positive mask"))
    assert "NegIP negative mask" not in text
    ui_pixels = decode(fetch(page, result["image"]))
    assert not np.array_equal(ui_pixels, decode(fetch(page, plain["image"])))
    fields = {
        "positive_images": [encoded(files["positive"])],
        "negative_images": [encoded(files["negative"])],
        "positive_layers": "style",
        "negative_layers": "3:1, 6:0.5",
        "positive_mask": encoded(mask),
        "negative_end": 0.5,
    }
    assert np.array_equal(ui_pixels, api_twin(text, fields))
    # PNG Info > Send to txt2img opens the accordion the mask and the window are restored in
    # (it stayed closed, hiding them), and the restore draws the same picture.
    png = tmp_path / "result.png"
    png.write_bytes(fetch(page, result["image"]))
    send_on_a_fresh_page(page, png)
    page.wait_for_selector("#negip_txt2img_positive_mask img", state="visible")
    assert page.input_value("#negip_txt2img_negative_end input[type=number]") == "0.5"
    again = generate(page)
    assert again["image"], again["log"]
    assert np.array_equal(decode(fetch(page, again["image"])), ui_pixels)
    # Sent once more, where the box already holds that mask: gradio's sketch box then sends
    # the picture alone, which its decoding refused, so every Generate was refused as a
    # damaged upload (probe AE).
    send_png_to_txt2img(page, png)
    settle(page)
    twice = generate(page)
    assert twice["image"], twice["log"]
    assert np.array_equal(decode(fetch(page, twice["image"])), ui_pixels)


def test_a_16_bit_mask_upload_acts_as_through_the_api(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """gradio converts a mask upload to RGBA, which clipped a 16-bit grey PNG (a depth map, an
    export at 16 bits) to white: in the page the mask was no mask at all, through the API the
    same file gave 25 % and 50 % (probe AG). Now the page's picture equals the API's."""
    values = np.zeros((64, 64), dtype="<u2")
    values[:, :32], values[:, 32:] = 16384, 32768
    mask = tmp_path / "deep.png"
    Image.frombytes("I;16", (64, 64), values.tobytes()).save(mask)
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    drop_on_positive_mask(page, mask)
    result = generate(page)
    assert result["image"], result["log"]
    fields = {"positive_images": [encoded(files["positive"])], "positive_mask": encoded(mask)}
    ui_pixels = decode(fetch(page, result["image"]))
    assert np.array_equal(ui_pixels, api_twin(result["infotext"], fields))
    unmasked = {"positive_images": [encoded(files["positive"])]}
    assert not np.array_equal(ui_pixels, api_twin(result["infotext"], unmasked))


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
    page: Any,
    files: dict[str, Path],
    tmp_path: Path,
    server_log: ServerLog,
    name: str,
    content: bytes,
) -> None:
    """A file gradio cannot decode dropped on a mask box: Generate shows the reason in the page
    (gradio's own decoding failed the request before: the page stayed at "Waiting..." with no
    reason, and every later Generate of the page hung); a good mask then generates."""
    broken = tmp_path / name
    broken.write_bytes(content)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    drop_on_positive_mask(page, broken)
    refused = generate(page)
    assert refused["image"] == "", refused
    assert (
        "'Positive mask': The uploaded file is not an image file that can be read"
        in (refused["log"])
    ), refused["log"]
    lines = server_log.new_lines()
    assert len([line for line in lines if line.startswith(OUR_ERROR_LINE)]) == 1, lines
    page.set_input_files("#negip_txt2img_positive_mask input[type=file]", str(mask))
    settle(page)
    result = generate(page)
    assert result["image"], result["log"]
    assert REFERENCE.fullmatch(negip_value(result["infotext"], "NegIP positive mask"))


def test_noise_negative_from_the_ui_equals_the_api(page: Any, files: dict[str, Path]) -> None:
    """The noise slider and its type, set in the page with no negative image: the API's image
    for the same fields, and the infotext names the noise and its seed."""
    small_settings(page, seed=777)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    set_number(page, "#negip_txt2img_negative_noise", 0.6)
    choose(page, "#negip_txt2img_negative_noise_type", "shuffle")
    result = generate(page)
    assert result["image"], result["log"]
    text = result["infotext"]
    assert negip_value(text, "NegIP negative noise") == "0.6"
    assert negip_value(text, "NegIP noise type") == "shuffle"
    assert negip_value(text, "NegIP noise seed") == "777"
    assert "NegIP negative images" not in text
    fields = {
        "positive_images": [encoded(files["positive"])],
        "negative_noise": 0.6,
        "negative_noise_type": "shuffle",
    }
    ui_pixels = decode(fetch(page, result["image"]))
    assert np.array_equal(ui_pixels, api_twin(text, fields))
    without = api_twin(text, {"positive_images": [encoded(files["positive"])]})
    assert not np.array_equal(ui_pixels, without)


def gallery_sources(page: Any, tab: str = "txt2img") -> list[str]:
    return page.eval_on_selector_all(
        f"#{tab}_gallery img", "imgs => [...new Set(imgs.map(i => i.src))]"
    )


def test_xyz_plot_axis_from_the_ui(
    page: Any, files: dict[str, Path], server_log: ServerLog
) -> None:
    """The X/Y/Z plot script chosen in the page with our negative weight axis: a value no cell
    can take stops it before any image with the reason in the page; "0, 1" draws the cells the
    API draws for those weights."""
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", files["positive"])
    upload(page, "txt2img", "negative", files["negative"])
    choose(page, "#tab_txt2img #script_list", "X/Y/Z plot")
    xyz = "#script_txt2img_xyz_plot"
    page.wait_for_selector(f"{xyz}_x_type", state="visible")
    choose(page, f"{xyz}_x_type", "[NegIP] Negative weight")
    page.check(f"{xyz}_include_lone_images input[type=checkbox]")
    page.fill(f"{xyz}_x_values textarea", "0, 9")
    settle(page)
    refused = generate(page)
    assert refused["image"] == "", refused
    assert "Negative weight" in refused["log"], refused["log"]
    assert "9" in refused["log"], refused["log"]
    lines = server_log.new_lines()
    assert any(line.startswith(OUR_ERROR_LINE) for line in lines), lines
    page.fill(f"{xyz}_x_values textarea", "0, 1")
    settle(page)
    result = generate(page)
    assert result["image"], result["log"]
    page.wait_for_function(
        "() => new Set([...document.querySelectorAll('#txt2img_gallery img')].map(i => i.src))"
        ".size >= 3"
    )
    sources = gallery_sources(page)
    assert len(sources) == 3, sources  # the grid, then each cell
    text = result["infotext"]
    cells = [decode(fetch(page, source)) for source in sources[1:]]
    fields = {
        "positive_images": [encoded(files["positive"])],
        "negative_images": [encoded(files["negative"])],
    }
    for cell, weight in zip(cells, (0.0, 1.0), strict=True):
        assert np.array_equal(cell, api_twin(text, {**fields, "negative_weight": weight}))
    assert not np.array_equal(cells[0], cells[1])


def test_settings_section_and_storing_off(
    page: Any, files: dict[str, Path], tmp_path: Path, server_log: ServerLog
) -> None:
    """The Settings tab's "Negative Image Prompt" section: storing switched off there (and
    applied) makes an infotext that counts its images, whose paste then says to add them."""
    assert api("GET", "/sdapi/v1/options")["negip_store_images"] is True
    page.locator("#tabs > .tab-nav button", has_text="Settings").click()
    page.locator("#settings .tab-nav button", has_text="Negative Image Prompt").click()
    for key in ("negip_store_images", "negip_store_folder", "negip_images_in_memory"):
        page.wait_for_selector(f"#setting_{key}", state="visible")
    try:
        page.uncheck("#setting_negip_store_images input[type=checkbox]")
        settle(page)
        page.click("#settings_submit")
        page.wait_for_function(
            "() => document.querySelector('#settings_result')?.innerText.includes('settings')"
        )
        assert api("GET", "/sdapi/v1/options")["negip_store_images"] is False
        page.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
        page.wait_for_selector("#tab_txt2img", state="visible")
        small_settings(page)
        open_accordion(page)
        upload(page, "txt2img", "positive", files["positive"])
        result = generate(page)
        assert result["image"], result["log"]
        assert negip_value(result["infotext"], "NegIP images") == "1 positive / 0 negative"
        assert "NegIP positive images" not in result["infotext"]
        png = tmp_path / "unstored.png"
        png.write_bytes(fetch(page, result["image"]))
    finally:
        api("POST", "/sdapi/v1/options", {"negip_store_images": True})
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#negip_txt2img_enabled-visible-checkbox", state="attached")
    send_png_to_txt2img(page, png)
    page.wait_for_function(
        "() => document.querySelector('#negip_txt2img_restore_status')"
        ".innerText.includes('were not stored')"
    )
    status = page.eval_on_selector("#negip_txt2img_restore_status", "e => e.innerText")
    assert "(1 positive, 0 negative)" in status, status
    assert "add them to the sides again" in status, status
    assert file_names(page, "txt2img", "positive") == []
    # Generate without them is refused (it drew without the positive side), in the UI's words.
    refused = generate(page)
    assert refused["image"] == "", refused
    assert "which were not stored" in refused["log"], refused["log"]
    assert "add them to 'Positive images', or set 'Positive weight' to 0" in refused["log"]
    ours = [line for line in server_log.new_lines() if line.startswith(OUR_ERROR_LINE)]
    assert len(ours) == 1, ours
    # Given again, the image comes back bit for bit.
    upload(page, "txt2img", "positive", files["positive"])
    again = generate(page)
    assert again["image"], again["log"]
    assert np.array_equal(decode(fetch(page, again["image"])), decode(png.read_bytes()))


# ---------------------------------------------------------------------------------------------
# img2img


def test_img2img_accordion_and_generation(page: Any, files: dict[str, Path]) -> None:
    page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    page.wait_for_selector("#tab_img2img", state="visible")
    page.set_input_files("#img2img_image input[type=file]", str(files["init"]))
    page.wait_for_selector("#img2img_image img", state="attached")
    settle(page)
    small_settings(page, "img2img")
    page.wait_for_selector("#negip_img2img_enabled", state="attached")
    open_accordion(page, "img2img")
    assert page.input_value("#negip_img2img_model input") == "auto"
    assert not page.is_visible("#negip_img2img_hires_pass")  # img2img has no hires fix
    upload(page, "img2img", "positive", files["positive"])
    result = generate(page, "img2img")
    assert result["image"], result["log"]
    assert negip_value(result["infotext"], "NegIP model").split(" [")[0] in SD15_ADAPTERS
    assert REFERENCE.fullmatch(negip_value(result["infotext"], "NegIP positive images"))


def test_img2img_input_goes_to_the_positive_side(page: Any, files: dict[str, Path]) -> None:
    """The img2img tab's "➕ img2img input" button adds the picture being edited to a side;
    a generation with it then names one stored positive image."""
    page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    page.wait_for_selector("#tab_img2img", state="visible")
    page.set_input_files("#img2img_image input[type=file]", str(files["init"]))
    page.wait_for_selector("#img2img_image img", state="attached")
    settle(page)
    small_settings(page, "img2img")
    open_accordion(page, "img2img")
    assert file_names(page, "img2img", "positive") == []
    page.click("#negip_img2img_add_input_positive")
    page.wait_for_function(
        "() => document.querySelectorAll('#negip_img2img_positive_images a[download]').length"
        " === 1",
        timeout=30_000,
    )
    settle(page)
    names = file_names(page, "img2img", "positive")
    assert len(names) == 1, names
    assert re.fullmatch(r"[0-9a-f]{16}\.png", names[0]), names
    assert file_names(page, "img2img", "negative") == []
    result = generate(page, "img2img")
    assert result["image"], result["log"]
    assert REFERENCE.fullmatch(negip_value(result["infotext"], "NegIP positive images"))


def test_img2img_input_is_the_picture_of_the_sub_tab_in_view(
    page: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    """With a picture in the img2img sub-tab and another in the Inpaint sub-tab, "➕ img2img
    input" adds the one of the sub-tab in view (it read only the img2img sub-tab's before)."""
    from lib_negip.images import to_rgb
    from lib_negip.store import reference_of

    inpaint = random_png(tmp_path / "inpaint.png", 4, size=64)
    expected = {
        name: f"{reference_of(to_rgb(Image.open(path)))}.png"
        for name, path in (("img2img", files["init"]), ("inpaint", inpaint))
    }
    page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    page.wait_for_selector("#tab_img2img", state="visible")
    page.set_input_files("#img2img_image input[type=file]", str(files["init"]))
    page.wait_for_selector("#img2img_image img", state="attached")
    settle(page)
    page.locator("#mode_img2img > div > button", has_text="Inpaint").first.click()
    page.wait_for_selector("#img2maskimg", state="visible")
    page.set_input_files("#img2maskimg input[type=file]", str(inpaint))
    page.wait_for_selector("#img2maskimg img", state="attached")
    settle(page)
    open_accordion(page, "img2img")
    added = click_add(page, "img2img", "positive", "input", 1)
    assert added == [expected["inpaint"]], (added, expected)
    page.locator("#mode_img2img > div > button", has_text="img2img").first.click()
    page.wait_for_selector("#img2img_image", state="visible")
    settle(page)
    names = click_add(page, "img2img", "negative", "input", 1)
    assert names == [expected["img2img"]]


# ---------------------------------------------------------------------------------------------
# README screenshot


@pytest.mark.skipif(not SCREENSHOT_DIR, reason="NEGIP_SCREENSHOT_DIR is not set")
def test_readme_screenshots(page: Any, tmp_path: Path) -> None:
    """The README's pictures, after a generation with an image on each side (a house, and a
    lawn to subtract): ``accordion-txt2img.png``, the txt2img tab from the prompt down to the
    open accordion with the result and its infotext on the right, and
    ``accordion-closeup.png``, the accordion alone."""
    out = Path(SCREENSHOT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1100, "height": 1400})  # narrow: readable when scaled
    small_settings(page)
    open_accordion(page)
    upload(page, "txt2img", "positive", house_png(tmp_path / "house.png"))
    upload(page, "txt2img", "negative", lawn_png(tmp_path / "lawn.png"))
    page.wait_for_function(
        "() => [...document.querySelectorAll('#negip_txt2img_positive_preview img.negip-thumbnail,"
        " #negip_txt2img_negative_preview img.negip-thumbnail')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length === 2"
    )
    result = generate(page)
    assert result["image"], result["log"]
    assert "NegIP negative images" in result["infotext"]
    page.mouse.move(0, 0)  # no hover effects
    page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    tab = page.locator("#tab_txt2img").bounding_box()
    accordion = page.locator("#negip_txt2img_enabled").first
    box = accordion.bounding_box()
    page.screenshot(
        path=str(out / "accordion-txt2img.png"),
        full_page=True,
        clip={
            "x": tab["x"],
            "y": tab["y"],
            "width": tab["width"],
            "height": box["y"] + box["height"] - tab["y"] + 8,
        },
    )
    accordion.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    accordion.screenshot(path=str(out / "accordion-closeup.png"))
