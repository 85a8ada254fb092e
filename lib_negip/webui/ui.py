"""The gradio UI (gradio 3.41, A1111 1.10): one accordion per tab, its switch in the header.

:func:`build` returns the script's components in :data:`lib_negip.args.FIELD_ORDER`, so the
values A1111 hands to ``process`` are the positional form that ``parse_script_args`` reads
(one value per field). Each side's images are ONE ``gr.File`` (several files allowed) read as
bytes; its thumbnails are drawn in the browser (``javascript/negip.js``). Element ids are
``negip_<tab>_<part>``.

Infotext: the switch restores through :func:`infotext_switch` (A1111 would turn the text
"False" into True), which also checks every NegIP value first; every other field has its own key (``args.INFOTEXT_FIELDS``) and a
component whose value type converts the text (floats for the sliders, str for the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lib_negip import args as negip_args
from lib_negip import download, logger
from lib_negip import images as negip_images
from lib_negip.errors import NegIPError
from lib_negip.webui import TITLE, models
from lib_negip.wording import for_ui

REFRESH_SYMBOL = "\U0001f504"  # the refresh icon A1111's own model lists use
SWAP_SYMBOL = "\u21c4"

HINT = (
    "Image prompts work best with **empty text prompts**: the images alone then steer the "
    "picture. The negative image takes the place of the negative prompt: subtract a green "
    "lawn (negative) from a house (positive) and you get a house in snowy winter."
)

#: Swaps the two sides in the browser: the uploaded files move as they are, nothing is re-sent.
SWAP_JS = "(positive, negative) => [negative, positive]"


def elem_id(is_img2img: bool, part: str) -> str:
    return f"negip_{'img2img' if is_img2img else 'txt2img'}_{part}"


def build(script: Any, is_img2img: bool) -> list[Any]:
    """The script's UI; returns its components in ``args.FIELD_ORDER`` (``enabled`` first)."""
    import gradio as gr
    from modules.ui_components import FormRow, InputAccordion, ToolButton

    from lib_negip import blocks
    from lib_negip.webui import backend

    def eid(part: str) -> str:
        return elem_id(is_img2img, part)

    defaults = negip_args.DEFAULTS
    components: dict[str, Any] = {}
    tab = "img2img" if is_img2img else "txt2img"

    enabled = InputAccordion(defaults["enabled"], label=TITLE, elem_id=eid("enabled"))
    components["enabled"] = enabled
    with enabled:
        warning = backend.warn_if_unsupported()
        if warning:
            gr.HTML(error_status(warning), elem_id=eid("unsupported"))
        gr.Markdown(HINT, elem_id=eid("hint"), elem_classes=["negip-hint"])

        add_buttons: dict[str, Any] = {}
        add_input_buttons: dict[str, Any] = {}
        add_png_info_buttons: dict[str, Any] = {}
        with gr.Row(elem_id=eid("images"), elem_classes=["negip-images"]):
            for side in ("positive", "negative"):
                if side == "negative":
                    with gr.Column(min_width=40, scale=0, elem_classes=["negip-swap-column"]):
                        swap = ToolButton(
                            SWAP_SYMBOL,
                            elem_id=eid("swap"),
                            tooltip="Swap the positive and the negative images",
                        )
                with gr.Column(min_width=160, elem_classes=["negip-side"]):
                    field = f"{side}_images"
                    components[field] = gr.File(
                        label=f"{side.capitalize()} image(s)",
                        file_count="multiple",
                        file_types=["image"],
                        type="binary",
                        elem_id=eid(field),
                        elem_classes=["negip-files"],
                    )
                    _name_uploads(components[field])
                    # Filled by javascript/negip.js in the browser: a server round trip
                    # here would break gradio 3.41's upload of the other side (see there).
                    gr.HTML(elem_id=eid(f"{side}_preview"), elem_classes=["negip-preview"])
                    # The buttons' "➕" comes from style.css: A1111's localization leaves any
                    # text with an emoji untranslated, so it must not share the label's text.
                    with gr.Row(elem_classes=["negip-add-row"]):
                        add_buttons[side] = gr.Button(
                            "Selected result",
                            size="sm",
                            tooltip=f"Add the image selected in the results to the {side} side",
                            elem_id=eid(f"add_result_{side}"),
                            elem_classes=["negip-add-result"],
                        )
                        if is_img2img:  # the picture being edited, as an image prompt
                            add_input_buttons[side] = gr.Button(
                                "img2img input",
                                size="sm",
                                tooltip=f"Add the picture being edited (the img2img sub-tab in "
                                f"view) to the {side} side",
                                elem_id=eid(f"add_input_{side}"),
                                elem_classes=["negip-add-result"],
                            )
                        # the picture in the PNG Info tab (a result read back from disk)
                        add_png_info_buttons[side] = gr.Button(
                            "PNG Info image",
                            size="sm",
                            tooltip=f"Add the picture on the PNG Info tab to the {side} side",
                            elem_id=eid(f"add_png_info_{side}"),
                            elem_classes=["negip-add-result"],
                        )
        swap.click(
            fn=None,
            _js=SWAP_JS,
            inputs=[components["positive_images"], components["negative_images"]],
            outputs=[components["positive_images"], components["negative_images"]],
            show_progress=False,
        )

        with FormRow(elem_classes=["negip-models"]):
            components["model"] = gr.Dropdown(
                label="IP-Adapter",
                choices=_choices(models.adapter_choices),
                value=defaults["model"],
                allow_custom_value=True,  # a restored "name [hash]" label stays as written
                elem_id=eid("model"),
                tooltip="auto: an installed IP-Adapter that fits the loaded checkpoint "
                "(models/ipadapter)",
            )
            model_refresh = ToolButton(
                REFRESH_SYMBOL, elem_id=eid("model_refresh"), tooltip="Refresh the IP-Adapters"
            )
            components["image_encoder"] = gr.Dropdown(
                label="Image encoder",
                choices=_choices(models.encoder_choices),
                value=defaults["image_encoder"],
                allow_custom_value=True,
                elem_id=eid("image_encoder"),
                tooltip="CLIP vision model: models/clip_vision; 'auto' picks one that fits the adapter",
            )
            encoder_refresh = ToolButton(
                REFRESH_SYMBOL, elem_id=eid("encoder_refresh"), tooltip="Refresh the image encoders"
            )
        model_refresh.click(
            fn=lambda: _dropdown(_choices(models.adapter_choices, refresh=True)),
            outputs=[components["model"]],
            show_progress=False,
        )
        encoder_refresh.click(
            fn=lambda: _dropdown(_choices(models.encoder_choices, refresh=True)),
            outputs=[components["image_encoder"]],
            show_progress=False,
        )

        def slider(field: str, label: str, low: float, high: float, tooltip: str) -> None:
            components[field] = gr.Slider(
                label=label,
                minimum=low,
                maximum=high,
                step=0.05,
                value=float(defaults[field]),  # float: A1111 converts restored text with it
                elem_id=eid(field),
                tooltip=tooltip,
            )

        low, high = negip_args.WEIGHT_MIN, negip_args.WEIGHT_MAX
        with FormRow():
            slider(
                "positive_weight", "Positive weight", low, high, "Strength of the positive image(s)"
            )
            slider(
                "negative_weight", "Negative weight", low, high, "Strength of the negative image(s)"
            )
        with FormRow():
            for side in ("positive", "negative"):
                components[f"{side}_layers"] = gr.Dropdown(
                    label=f"{side.capitalize()} blocks",
                    choices=list(blocks.PRESETS),
                    value=defaults[f"{side}_layers"],
                    allow_custom_value=True,  # explicit "index:weight" pairs
                    elem_id=eid(f"{side}_layers"),
                    tooltip=f"Which UNet blocks the {side} image acts on: a preset, or type "
                    "'index:weight' pairs such as 3:1, 6:0.8 (SD1.x blocks 0-15, SDXL 0-10; "
                    "unlisted blocks 0)",
                )
        with FormRow():
            slider(
                "negative_noise",
                "Negative noise",
                0.0,
                1.0,
                "Without negative images: a noise image made from the positive images is the "
                "negative side (0 = off)",
            )
            components["negative_noise_type"] = gr.Dropdown(
                label="Noise type",
                choices=list(negip_args.NOISE_TYPES),
                value=defaults["negative_noise_type"],
                tooltip="How the noise image is made from each positive image: fade blends it "
                "toward noise, dissolve replaces random pixels, gaussian adds Gaussian noise, "
                "shuffle warps, rotates and adds noise",
                elem_id=eid("negative_noise_type"),
            )

        with gr.Accordion("Masks and step windows", open=False, elem_id=eid("more")) as more:
            with FormRow():
                for side in ("positive", "negative"):
                    components[f"{side}_mask"] = _mask_input(
                        gr, f"{side.capitalize()} mask", eid(f"{side}_mask")
                    )
            for side in ("positive", "negative"):
                with FormRow():
                    for edge, verb in (("start", "from"), ("end", "until")):
                        slider(
                            f"{side}_{edge}",
                            f"{side.capitalize()} {edge}",
                            0.0,
                            1.0,
                            f"{side.capitalize()} images act {verb} a fraction of the steps",
                        )
            with FormRow():
                components["hires_pass"] = gr.Radio(
                    label="Hires. fix pass",
                    choices=list(negip_args.HIRES_PASSES),
                    value=defaults["hires_pass"],
                    visible=not is_img2img,  # img2img has no hires fix
                    elem_id=eid("hires_pass"),
                    tooltip="Which pass of Hires. fix gets the image prompts",
                )
                components["combine"] = gr.Radio(
                    label="Several images per side",
                    choices=list(negip_args.COMBINES),
                    value=defaults["combine"],
                    elem_id=eid("combine"),
                    tooltip="average: one set of image tokens per side; concat: tokens of every image",
                )

        with gr.Accordion("Download official models", open=False, elem_id=eid("download_box")):
            with FormRow():
                official = gr.Dropdown(
                    label="Official model (h94/IP-Adapter)",
                    choices=list(download.OFFICIAL_MODELS),
                    value=next(iter(download.OFFICIAL_MODELS)),
                    elem_id=eid("download_model"),
                )
                start_download = gr.Button(
                    "Download", elem_id=eid("download"), elem_classes=["negip-download"]
                )
            download_status = gr.HTML(elem_id=eid("download_status"))
        start_download.click(
            fn=download_model,
            inputs=[official],
            outputs=[download_status, components["model"], components["image_encoder"]],
        )
        restore_status = gr.HTML(elem_id=eid("restore_status"))
        # The image prompts an infotext names, for the API's infotext field (see args.py).
        components["infotext_images"] = gr.Textbox(
            value="", visible=False, elem_id=eid("infotext_images")
        )
        # The img2img sub-tab in view when a "➕ img2img input" button is pressed (set by the
        # browser at the click; not one of the script's args).
        img2img_tab = (
            gr.Number(value=-1, visible=False, elem_id=eid("img2img_tab")) if is_img2img else None
        )

    def connect(buttons: dict[str, Any], source: Any, fn: Callable, js: str | None = None) -> None:
        """Each side's "➕" button appends ``fn(source's value, side's files)`` to its files."""
        browser = {} if js is None else {"_js": js}
        for side, button in buttons.items():
            files = components[f"{side}_images"]
            button.click(
                fn=fn, inputs=[source, files], outputs=[files], show_progress=False, **browser
            )

    def wire_gallery(event: Any) -> None:
        gallery_js = "(item, files) => [extract_image_from_gallery(item)[0], files]"
        connect(add_buttons, event.component, add_image, gallery_js)

    def wire_input(event: Any) -> None:
        connect(add_input_buttons, event.component, add_input_image)

    def wire_png_info(component: Any) -> None:
        connect(add_png_info_buttons, component, add_input_image)

    script.on_after_component(wire_gallery, elem_id=f"{tab}_gallery")
    # ♻️ (A1111's seed script, made before ours) copies the selected picture's seed; its noise
    # seed goes with it into the hidden field, as a paste of its infotext would put it there.
    reuse_seed = _existing_component(f"{tab}_reuse_seed")
    if reuse_seed is not None:

        def wire_reuse_seed(event: Any) -> None:
            hidden = components["infotext_images"]
            reuse_seed.click(
                fn=reused_noise_seed,
                inputs=[event.component, hidden, hidden],
                outputs=[hidden],
                show_progress=False,
                _js="(info, hidden, index) => [info, hidden, selected_gallery_index()]",
            )

        script.on_after_component(wire_reuse_seed, elem_id=f"generation_info_{tab}")
    # The PNG Info tab is made after both generation tabs, outside their scripts' reach.
    existing = _existing_component(PNG_INFO_IMAGE)
    if existing is not None:
        wire_png_info(existing)
    else:
        PENDING_PNG_INFO[tab] = wire_png_info
    if is_img2img:
        # img2img's pictures are made before the scripts' controls: find them; a host that
        # makes its input later calls wire_input when it does.
        editors = [_editor_picture(element_id) for element_id in IMG2IMG_EDITORS]
        if all(editor is not None for editor in editors):
            for side, button in add_input_buttons.items():
                files = components[f"{side}_images"]
                button.click(
                    fn=add_editor_image,
                    inputs=[*editors, files, img2img_tab],
                    outputs=[files],
                    show_progress=False,
                    _js=IMG2IMG_TAB_JS,
                )
        elif editors[0] is not None:
            wire_input(SimpleNamespace(component=editors[0]))
        else:
            script.on_after_component(wire_input, elem_id=IMG2IMG_EDITORS[0])

    # A value in the closed "Masks and step windows" accordion changed while it was closed:
    # only a paste or "Send to img2img/inpaint" (which copies the other tab's values) does
    # that, since the user can change them only with it open: open it, to show what the next
    # Generate uses (a no-op when it is open).
    for field in MORE_FIELDS:
        if is_img2img and field in TXT2IMG_ONLY:
            continue
        components[field].change(
            fn=functools.partial(_open_if_not_default, field),
            inputs=[components[field]],
            outputs=[more],
            show_progress=False,
        )
    # The status line tells what a paste could not restore and that the extension was switched
    # off for it: switched on again (the user added the images), it has been read.
    components["enabled"].change(
        fn=_clear_status_when_on,
        inputs=[components["enabled"], restore_status],
        outputs=[restore_status],
        show_progress=False,
    )
    script.infotext_fields = infotext_fields(components, is_img2img, restore_status, more)
    script.paste_field_names = list(COPIED_KEYS)
    return [components[field] for field in negip_args.FIELD_ORDER]


#: The PNG Info tab's picture (A1111's and Forge's element id).
PNG_INFO_IMAGE = "pnginfo_image"

#: Per tab, the wiring of its "PNG Info image" buttons, waiting for the PNG Info tab's
#: picture to be made: :func:`on_after_component` wires them when it is, then forgets them
#: (a tab built again for a reloaded UI replaces its entry).
PENDING_PNG_INFO: dict[str, Callable[[Any], None]] = {}


def on_after_component(component: Any, **_kwargs: Any) -> None:
    """A1111's after-component callback (every component of every tab): wires the waiting
    "PNG Info image" buttons to the PNG Info tab's picture."""
    if getattr(component, "elem_id", None) != PNG_INFO_IMAGE:
        return
    pending = list(PENDING_PNG_INFO.values())
    PENDING_PNG_INFO.clear()
    for wire in pending:
        try:
            wire(component)
        except Exception:  # a UI that cannot take the event keeps working without the button
            logger.exception("could not connect a 'PNG Info image' button")


def _editor_picture(element_id: str) -> Any:
    """The component holding the picture of img2img's editor ``element_id``: the editor itself
    (A1111's gr.Image), or in Forge, whose ForgeCanvas puts the id on an HTML block and keeps
    the picture in a hidden component made after it, that component."""
    editor = _existing_component(element_id)
    if editor is None or type(editor).__name__ != "HTML":
        return editor
    try:
        from gradio.context import Context

        blocks = list(Context.root_block.blocks.values())
        position = blocks.index(editor)
        after = blocks[position + 1 : position + 4]
    except (AttributeError, ValueError):
        return None
    for block in after:
        if "logical_image_background" in (getattr(block, "elem_classes", None) or []):
            return block
    return None


def _existing_component(element_id: str) -> Any:
    """The component already made with ``element_id`` in the UI being built, or None."""
    try:
        from gradio.context import Context
    except ImportError:
        return None
    root = getattr(Context, "root_block", None)
    for block in getattr(root, "blocks", {}).values():
        if getattr(block, "elem_id", None) == element_id:
            return block
    return None


def _mask_input(gr: Any, label: str, element_id: str) -> Any:
    """A mask: an uploaded image whose luminance is the mask, on which a mask can also be
    drawn (gradio 3's sketch tool; gradio 4, in Forge, takes an upload: it has no ``source`` /
    ``tool`` arguments and only warns about them, so they are not passed there)."""
    common = {
        "label": label,
        "type": "pil",
        "image_mode": "RGBA",
        "elem_id": element_id,
        "elem_classes": ["negip-mask"],
    }
    if _gradio_major(gr) >= 4:
        return _tolerant(gr.Image(**common))
    try:
        return _tolerant(gr.Image(source="upload", tool="sketch", **common))
    except TypeError:  # a gradio that refuses them outright
        return _tolerant(gr.Image(**common))


def _tolerant(component: Any) -> Any:
    """``component`` whose own decoding of an upload hands over what went wrong instead of
    raising. gradio decodes an image input before any of our code runs; a file it cannot decode
    (not an image, empty, a decompression bomb) failed the whole request inside gradio, the page
    stayed at "Waiting..." with no reason shown, and every later Generate of that page hung.
    Now the generation refuses it by the mask's name, in the page like any other refusal."""
    decode = getattr(component, "preprocess", None)
    if decode is None:  # not a gradio component as we know them: left as it is
        return component

    def preprocess(value: Any) -> Any:
        refused = _unaccepted_upload(value)
        if refused is not None:  # never handed to gradio's decoding (an EPS runs Ghostscript)
            return refused
        if isinstance(value, str) and getattr(component, "tool", None) == "sketch":
            # gradio 3's sketch box sends its picture alone, without the {"image", "mask"} of
            # its tool, after a paste restored the mask it already held (PNG Info's Send to
            # twice): its own decoding asserts the dict. The picture is the mask, nothing drawn.
            return {"image": value, "mask": None}
        try:
            decoded = decode(value)
        except Exception as error:  # gradio's decoding, before any of ours
            logger.info("Negative Image Prompt: an uploaded mask cannot be read (%r)", error)
            return negip_images.UnreadableUpload.from_error(error)
        return _with_deep_picture(value, decoded)

    component.preprocess = preprocess
    return component


def _with_deep_picture(value: Any, decoded: Any) -> Any:
    """``decoded`` (gradio's decoding of a mask upload) with the picture decoded by the
    extension where it has more than 8 bits per channel: gradio converts it to the box's mode,
    which clips a 16-bit grey mask to white (no mask at all), where the API's decoding scales it.
    gradio 3's picture is handed on as its data URL (the sketch tool's strokes stay gradio's),
    gradio 4's file read here."""
    picture = value.get("image") if isinstance(value, dict) and "image" in value else value
    sources = _upload_sources(picture)
    if len(sources) != 1:
        return decoded
    source = sources[0]
    try:
        with _upload_header(source) as image:
            deep = negip_images.is_high_depth(image.mode)
    except Exception:  # gradio decoded it; what it could not read is reported there
        return decoded
    if not deep:
        return decoded
    if isinstance(picture, str):  # gradio 3: a data URL, read by the extension as the API's
        return {**decoded, "image": picture} if isinstance(decoded, dict) else picture
    try:
        return negip_images.decode_image(Path(source).read_bytes())
    except Exception as error:
        logger.info("Negative Image Prompt: an uploaded mask cannot be read (%r)", error)
        return negip_images.UnreadableUpload.from_error(error)


def _unaccepted_upload(value: Any) -> Any:
    """An :class:`UnreadableUpload` for an upload whose header is not of a format the
    extension reads (:data:`lib_negip.images.ACCEPTED_FORMATS`); None for anything else, which
    gradio then decodes. gradio 3 hands a data URL (or a dict of them, the sketch tool's), gradio
    4 a file (a dict or object with a ``path``)."""
    from PIL import UnidentifiedImageError

    for source in _upload_sources(value):
        try:
            with _upload_header(source):
                pass  # the header was enough
        except UnidentifiedImageError as error:
            logger.info("Negative Image Prompt: an uploaded mask is not of a format read here")
            return negip_images.UnreadableUpload.from_error(error)
        except Exception:  # anything else is for gradio's decoding to report
            continue
    return None


def _upload_header(source: Any) -> Any:
    """Pillow's lazily read image of an upload (bytes, or a path), of a format read here: open
    it in a ``with`` to read its header only."""
    import io

    from PIL import Image

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return Image.open(source, formats=negip_images.accepted_formats())


def _upload_sources(value: Any) -> list[Any]:
    """The files in what gradio hands a mask box: bytes of data URLs, paths of uploaded
    files."""
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", None)
    if isinstance(path, str):
        return [path]
    if isinstance(value, str) and value.startswith("data:"):
        try:
            return [negip_images.decode_base64(value)]
        except Exception:  # gradio's decoding reports it
            return []
    if isinstance(value, dict):
        return [source for part in value.values() for source in _upload_sources(part)]
    return []


def _gradio_major(gr: Any) -> int:
    try:
        return int(str(getattr(gr, "__version__", "3")).split(".")[0])
    except ValueError:
        return 3


def add_image(item: Any, files: Any) -> Any:
    """The side's files with one more: the selected result (a gallery item)."""
    return _with_image(files, _gallery_image(item))


#: A1111's img2img pictures, in the order of its sub-tabs (img2img, Sketch, Inpaint, Inpaint
#: sketch, Inpaint upload; Batch, the sixth, has none).
IMG2IMG_EDITORS = (
    "img2img_image",
    "img2img_sketch",
    "img2maskimg",
    "inpaint_sketch",
    "img_inpaint_base",
)

#: The browser's part of the "➕ img2img input" click: the index of the img2img sub-tab in
#: view (A1111's get_tab_index) as the last input. gradio 3 passes the inputs (the pictures,
#: the side's files, the index) followed by the outputs' values (the files again) and sends
#: back as many values as there are inputs.
IMG2IMG_TAB_JS = (
    "(...values) => { let tab = -1; try { tab = get_tab_index('mode_img2img'); } catch (e) {} "
    f"values[{len(IMG2IMG_EDITORS) + 1}] = tab; return values.slice(0, {len(IMG2IMG_EDITORS) + 2}); }}"
)


def add_editor_image(*values: Any) -> Any:
    """The side's files with one more: the picture of the img2img sub-tab in view.

    ``values``: the pictures of :data:`IMG2IMG_EDITORS`, the side's files, the sub-tab's index
    (-1 when the browser could not tell: then the first sub-tab holding a picture)."""
    *pictures, files, tab = values
    try:
        index = int(tab)
    except (TypeError, ValueError):
        index = -1
    if 0 <= index < len(pictures):
        picture = pictures[index]
    elif index < 0:
        picture = next((p for p in pictures if p is not None), None)
    else:
        picture = None  # the Batch sub-tab: no picture being edited
    return add_input_image(picture, files)


def add_input_image(image: Any, files: Any) -> Any:
    """The side's files with one more: img2img's input picture (a PIL image, or nothing)."""
    if isinstance(image, dict):  # the sketch/inpaint editors' {"image": ..., "mask": ...}
        image = image.get("image")
    return _with_image(files, image if hasattr(image, "convert") else None)


class Upload(bytes):
    """An uploaded file's bytes (the file boxes are ``type="binary"``) with its file name.

    The name lets ➕ give the files already in a box back under their own names (they came
    back as content hashes); the short ``repr`` keeps the files out of the console, where
    A1111 prints a failed UI request's arguments (128 KB of escaped image bytes)."""

    file_name: str = ""

    def __repr__(self) -> str:
        return f"<upload {self.file_name!r}, {len(self)} bytes>"


def _name_uploads(component: Any) -> None:
    """Make ``component`` (a file box) hand over :class:`Upload` values: its ``preprocess``
    (gradio 3's list of dicts, gradio 4's list of FileData) is wrapped on this instance only."""
    preprocess = getattr(component, "preprocess", None)
    if preprocess is None:
        return

    def named(payload: Any, *args: Any, **kwargs: Any) -> Any:
        value = preprocess(payload, *args, **kwargs)
        entries = getattr(payload, "root", payload)
        try:
            if isinstance(value, (bytes, bytearray)):  # a box of one file
                return _upload(value, entries[0] if isinstance(entries, list) else entries)
            if isinstance(value, list) and isinstance(entries, list) and len(entries) == len(value):
                return [
                    _upload(data, entry) if isinstance(data, (bytes, bytearray)) else data
                    for data, entry in zip(value, entries, strict=True)
                ]
        except Exception:  # never fail an upload over a name
            logger.debug("could not name the uploads", exc_info=True)
        return value

    component.preprocess = named


def _upload(data: bytes | bytearray, entry: Any) -> Upload:
    if isinstance(entry, dict):
        name = entry.get("orig_name") or entry.get("name")
    else:
        name = getattr(entry, "orig_name", None) or getattr(entry, "path", None)
    upload = Upload(data)
    upload.file_name = Path(str(name or "")).name
    return upload


def _with_image(files: Any, image: Any) -> Any:
    """Paths of the side's files (they come as bytes, the component's type), then ``image``
    as a PNG copy in a temporary folder named by its content; with no ``image``, no change to
    the side (an empty list would replace gradio's upload area with an empty file list)."""
    import gradio as gr

    from lib_negip.images import to_rgb
    from lib_negip.store import reference_of

    if image is None:
        return gr.update()

    paths = []
    folder = _private_folder()
    for data in files or []:
        if isinstance(data, (bytes, bytearray)):
            digest = hashlib.sha256(data).hexdigest()[:16]
            name = _safe_name(getattr(data, "file_name", ""))
            # under its own name, in a folder named by its content (two files may share a name)
            path = folder / digest / name if name else folder / f"{digest}.png"
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
            paths.append(str(path))
        elif getattr(data, "name", None):
            paths.append(str(data.name))
    image = to_rgb(image)  # as an uploaded file would be read: transparency over white
    path = folder / f"{reference_of(image)}.png"
    if not path.exists():
        image.save(path)
    paths.append(str(path))
    return paths


def _safe_name(name: str) -> str:
    """A file name to write an upload under: its last part, without characters that are not
    allowed in names somewhere (empty for none left, or a name that is all dots)."""
    name = re.sub(r'[\x00-\x1f<>:"/\\|?*]', "_", Path(name).name)[:200].strip()
    return "" if not name.strip(".") else name


_FOLDER: list[Path] = []  # this process's folder for the files of ➕, made at first use
_FOLDER_PREFIX = "negip-ui-"


def _private_folder() -> Path:
    """A folder only this process's user can use (``mkdtemp``: mode 0700, a new name),
    removed at a normal exit. A fixed name under the shared temporary folder
    (``/tmp/negip-ui`` before) could be made first by another user of the machine, with links
    or files of their choice under the names (content hashes) ➕ writes and reuses.

    A server that is stopped with Ctrl+C (A1111 leaves with ``os._exit``, which skips the exit
    handlers) or killed leaves its folder behind: the name carries the process id, and the
    first use of ➕ removes this user's folders whose process is gone
    (:func:`_remove_abandoned_folders`)."""
    if not _FOLDER or not _FOLDER[0].is_dir():
        import atexit
        import os
        import shutil
        import tempfile

        _remove_abandoned_folders(Path(tempfile.gettempdir()))
        folder = Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _FOLDER[:] = [folder]
    return _FOLDER[0]


def _remove_abandoned_folders(temporary: Path) -> None:
    """Remove the ➕ folders under ``temporary`` that belong to this user and name a process
    that no longer runs (or this one: a process id used again after a restart). Folders of
    other users, of running processes, and of versions whose names carry no process id stay.
    Nothing here may fail the ➕ that called it."""
    import os
    import shutil

    try:
        candidates = list(temporary.glob(f"{_FOLDER_PREFIX}*-*"))
    except OSError:
        return
    for folder in candidates:
        pid_text = folder.name[len(_FOLDER_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or folder in _FOLDER:
            continue
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _process_runs(pid) is not False:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("Negative Image Prompt: removed %s, left by a server that stopped", folder)


def _process_runs(pid: int) -> bool | None:
    """Whether process ``pid`` runs; None where that cannot be told."""
    try:
        import psutil  # A1111 installs it

        return bool(psutil.pid_exists(pid))
    except Exception:  # not installed, or it failed: ask the OS where that is safe
        pass
    import os

    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, for one
        return True
    return True


def _gallery_image(item: Any) -> Any:
    """The PIL image of a gallery item (A1111 checks that its file is one it made)."""
    if item is None:
        return None
    from modules import infotext_utils

    if isinstance(item, (list, tuple)) and item and not isinstance(item[0], dict):
        item = item[0]  # gradio 4: (image, caption)
    if isinstance(item, dict) and "image" in item and "name" not in item:
        item = item["image"]  # gradio 4's gallery data
    if isinstance(item, dict) and "path" in item and "name" not in item:
        item = {"name": item["path"], "is_file": True}
    return infotext_utils.image_from_url_text(item)


#: Fields that img2img does not take from an infotext: it has no hires fix, and a restored
#: "second" would make every img2img generation fail.
TXT2IMG_ONLY = ("hires_pass",)
#: The infotext keys that "Send to img2img/inpaint" copies from txt2img's components to the
#: other tab's (``paste_field_names``). A1111 pairs the two tabs' fields by these names in
#: order, so only keys that both tabs have. The switch and the images are not copied (A1111
#: copies values as they are, and an uploaded file cannot be re-sent that way).
COPIED_KEYS: tuple[str, ...] = tuple(
    key for key, field in negip_args.INFOTEXT_FIELDS if field not in TXT2IMG_ONLY
)


def infotext_fields(
    components: dict[str, Any],
    is_img2img: bool,
    restore_status: Any = None,
    more: Any = None,
) -> list[tuple[Any, Any]]:
    """(component, infotext key or function) pairs for PNG Info / "Send to" / the API's infotext.

    The switch restores through :func:`infotext_switch` (A1111 would read "False" as True);
    every scalar target is the field's key, so that A1111 also copies its value between tabs.
    The model and encoder keep the written label ("name [hash]", what
    ``args.restore_model_label`` returns for every label ``args.to_infotext`` writes); their
    dropdowns accept custom values for it. The image prompts and masks come back from the
    store into their components (:func:`restore_images`), and for the API through the hidden
    ``infotext_images`` field.
    """
    fields: list[tuple[Any, Any]] = [(components["enabled"], infotext_switch)]
    fields += [
        (components[field], key)
        for key, field in negip_args.INFOTEXT_FIELDS
        if not (is_img2img and field in TXT2IMG_ONLY)
    ]
    for field in negip_args.IMAGE_FIELDS + negip_args.MASK_FIELDS:
        fields.append((components[field], functools.partial(restore_images, field)))
    fields.append((components["infotext_images"], _infotext_images))
    if restore_status is not None:
        fields.append((restore_status, restore_message))
    if more is not None:  # the API's restore passes over it: it is no script input
        fields.append((more, functools.partial(open_more, is_img2img=is_img2img)))
    return fields


#: The fields in the "Masks and step windows" accordion (the masks aside).
MORE_FIELDS = (
    "positive_start",
    "positive_end",
    "negative_start",
    "negative_end",
    "hires_pass",
    "combine",
)


#: The words of the status lines whose paste switched the extension off (see restore_message):
#: switched on afterwards, it is the user's doing. A paste of an infotext made with storing off
#: leaves it on, and its line stays until images are added (Generate refuses without them).
SWITCHED_OFF_WORDS = ("was switched off", "switch Negative Image Prompt on again")


def _clear_status_when_on(enabled: Any, status: Any) -> Any:
    import gradio as gr

    if enabled is True and any(words in str(status or "") for words in SWITCHED_OFF_WORDS):
        return gr.update(value="")
    return gr.update()


def _open_if_not_default(field: str, value: Any) -> Any:
    """The accordion's update when ``field`` took ``value``: open unless it is the default."""
    import gradio as gr

    default = negip_args.DEFAULTS[field]
    try:
        same = float(value) == float(default) if isinstance(default, float) else value == default
    except (TypeError, ValueError):
        same = False
    return gr.update() if same else gr.update(open=True)


def open_more(params: dict[str, Any], *, is_img2img: bool = False) -> Any:
    """Open the closed "Masks and step windows" accordion after a paste that restores a mask
    or a value other than the default there (a step window, the Hires. fix pass), so that the
    user sees what the next Generate uses; it stayed closed. None leaves it as it is."""
    import gradio as gr

    if RESTORE_ERROR in params or not _has_ours(params):
        return None
    try:
        restored = negip_args.parse_infotext(params)
    except NegIPError:
        return None
    masks = {"NegIP positive mask", "NegIP negative mask"}
    changed = [
        field
        for field in MORE_FIELDS
        if field in restored
        and restored[field] != negip_args.DEFAULTS[field]
        and not (is_img2img and field in TXT2IMG_ONLY)
    ]
    if changed or any(str(params.get(key) or "").strip() for key in masks):
        return gr.update(open=True)
    return None


#: Put into a pasted infotext's values in place of ours when one of them is malformed.
RESTORE_ERROR = "negip: restore error"  # not a NegIP key: parse_infotext passes over it
#: Put into a pasted infotext's values when some of its stored image prompts are missing.
RESTORE_MISSING = "negip: restore missing"
#: Put into the values of every paste in the UI (the API's ``infotext`` has none).
UI_PASTE = "negip: ui paste"


def on_infotext_pasted(_infotext: str, params: dict[str, Any]) -> None:
    """A paste in the UI (PNG Info's "Send to", the paste button; not the API's ``infotext``,
    which answers 422 from :func:`infotext_switch`): with a malformed NegIP value none of ours is
    restored, rather than every value A1111 could convert on its own, and the switch goes off
    (:func:`infotext_switch`), so that no generation mixes the pasted settings with the ones
    left from before; the accordion says which value (:func:`restore_message`)."""
    params[UI_PASTE] = "yes"  # a text, as the values of other extensions: see _infotext_images
    if not _has_ours(params):
        return
    try:
        negip_args.parse_infotext(params)
    except NegIPError as error:
        from lib_negip.webui.failures import request_error

        logger.error("Negative Image Prompt: %s", error)
        for key in [key for key in params if negip_args.names_our_key(key)]:
            del params[key]
        params[RESTORE_ERROR] = request_error(error, for_ui=True).ui_message
        return
    # A key the infotext lacks (one written before the field existed: a first release's has no
    # blocks or noise) means the default, as in the API's restore; A1111 would leave the
    # control as it was, and the next Generate would mix in the settings from before.
    for key, field in negip_args.INFOTEXT_FIELDS:
        params.setdefault(key, negip_args.DEFAULTS[field])
    # Stored images that are gone or cannot give their image back: the rest is restored, but
    # the switch goes off too, so that the next generation does not run without them (the
    # API's restore answers 422 for them).
    missing, unusable = _unrestorable_images(params)
    if missing or unusable:
        params[RESTORE_MISSING] = True


def _unrestorable_images(params: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The references an infotext names that are not in the store, and those whose file
    cannot give its image back (unreadable, too large, changed), with the reason."""
    missing: list[str] = []
    unusable: dict[str, str] = {}
    for field in negip_args.IMAGE_FIELDS + negip_args.MASK_FIELDS:
        stored = _stored_paths(field, params)
        missing += stored.missing
        unusable |= stored.unusable
    return missing, unusable


def infotext_switch(params: dict[str, Any]) -> bool:
    """The switch's value from an infotext, after checking every NegIP value in it.

    A1111 reads this field first of ours, both for the API's ``infotext`` and for a paste. A
    malformed value ("NegIP positive weight: abc") raises here as a 422 naming its key, logged
    once: the API answers with it, where A1111's own conversion of the number would fail with an
    HTTP 500 and a traceback. A paste in the UI leaves the switch as it is (A1111 logs the error)
    and the accordion shows the message (:func:`restore_message`).
    """
    if RESTORE_ERROR in params or RESTORE_MISSING in params:  # see on_infotext_pasted
        return False
    try:
        return bool(negip_args.parse_infotext(params).get("enabled", False))
    except NegIPError as error:
        from lib_negip.webui.failures import request_error

        logger.error("Negative Image Prompt: %s", error)
        raise request_error(error) from None


def error_status(text: str) -> str:
    """The accordion's status line for an error."""
    return f'<p class="negip-status"><span class="negip-error">{html.escape(text)}</span></p>'


def _has_ours(params: dict[str, Any]) -> bool:
    """Whether the infotext has NegIP values (or keys spelled like ours, which are refused)."""
    return any(negip_args.names_our_key(key) for key in params)


def reused_noise_seed(info: Any, hidden: Any, index: Any) -> Any:
    """The hidden field after ♻️ (reuse seed) on result ``index``: A1111 copies that picture's
    seed, read from its infotext in the results' generation info; a picture after the first of a
    noise-negative batch was made with the batch's noise seed, which now goes with it (the
    noise seed part is replaced, or removed where the picture's own seed made its noise). Left
    as it is where the generation info cannot tell (no result yet, another host's)."""
    import json

    import gradio as gr
    from modules import infotext_utils

    try:
        text = json.loads(info)["infotexts"][int(index)]
        params = infotext_utils.parse_generation_parameters(text)
        noise_seed = negip_args.infotext_noise_seed(params)
        if noise_seed is not None and noise_seed[0] == noise_seed[1]:
            noise_seed = None  # the picture's own seed: nothing to carry
        return negip_args.with_noise_seed("infotext_images", hidden or "", noise_seed)
    except Exception as error:  # the host's own ♻️ reports what it could not read
        logger.debug("reuse seed: the picture's noise seed could not be read: %s", error)
        return gr.update()


def _infotext_images(params: dict[str, Any]) -> str | None:
    """The hidden field's value: the stored images the infotext names and its noise seed, as
    one text (:func:`lib_negip.args.infotext_hidden_text`). A malformed reference is passed on
    as written, so that the generation refuses it by name.

    Without NegIP values (or with a malformed one) a paste in the UI empties the field: what an
    earlier paste left there (a noise seed, the counts of images that were not stored) is not
    this infotext's. The API's restore leaves the request's own value.
    """
    if RESTORE_ERROR in params or not _has_ours(params):
        return "" if UI_PASTE in params else None
    try:
        return negip_args.infotext_hidden_text(params)
    except NegIPError:
        return "; ".join(
            f"{field.replace('_', ' ')}: {params[key]}"
            for key, field in negip_args.INFOTEXT_REFERENCES
            if isinstance(params.get(key), str)
        )


@dataclasses.dataclass
class _Stored:
    """What the store holds of the images an infotext names for one field."""

    paths: list[str] = dataclasses.field(default_factory=list)  # intact files
    missing: list[str] = dataclasses.field(default_factory=list)  # references without a file
    unusable: dict[str, str] = dataclasses.field(default_factory=dict)  # reference -> why


def _stored_paths(field: str, params: dict[str, Any]) -> _Stored:
    """The stored files of the images an infotext names for ``field``, checked as the API's
    restore checks them (``ImageStore.load``: readable, within the pixel limit, holding the
    image of their reference): a paste must not put another picture into a box under the
    reference of the one it restores."""
    from lib_negip.webui.generation import image_store

    stored = _Stored()
    try:
        references = negip_args.infotext_references(params).get(field, ())
    except NegIPError:
        return stored
    store = image_store()
    for reference in references:
        path = store.path_of(reference)
        if not path.is_file():
            stored.missing.append(reference)
            continue
        why = store.unusable(reference, mask=field.endswith("_mask"))
        if why is None:
            stored.paths.append(str(path))
        else:
            stored.unusable[reference] = why
    return stored


def restore_images(field: str, params: dict[str, Any]) -> Any:
    """The component update that restores ``field``'s stored images from an infotext: left as
    it is for an infotext without image prompts, emptied where the infotext has none."""
    import gradio as gr

    if RESTORE_ERROR in params or not _has_ours(params):
        return None
    found = _stored_paths(field, params).paths
    if field.endswith("_mask"):
        if not found:
            return gr.update(value=None)
        from PIL import Image

        try:  # checked above; changed since, it must not fail A1111's whole paste
            with Image.open(found[0], formats=["PNG"]) as mask:
                return gr.update(value=mask.convert("RGBA"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            logger.exception("Negative Image Prompt: cannot restore the stored %s", field)
            return gr.update(value=None)
    return gr.update(value=found or None)


def restore_message(params: dict[str, Any]) -> Any:
    """What the accordion says after a paste with a malformed NegIP value or whose stored
    images are missing (nothing, clearing an earlier paste's words, otherwise)."""
    import gradio as gr

    if RESTORE_ERROR in params:
        text = (
            "This infotext's Negative Image Prompt settings were not restored, and Negative "
            f"Image Prompt was switched off: {params[RESTORE_ERROR]}"
        )
        return gr.update(value=error_status(text))
    if not _has_ours(params):
        # An infotext without our keys switches the extension off: what an earlier paste said
        # about its images no longer applies.
        return gr.update(value="")
    try:
        negip_args.parse_infotext(params)
    except NegIPError as error:
        from lib_negip.webui.failures import request_error

        text = (
            f"This infotext's Negative Image Prompt settings were not restored: "
            f"{request_error(error, for_ui=True).ui_message}"
        )
        return gr.update(value=error_status(text))
    missing, unusable = _unrestorable_images(params)
    counts = negip_args.infotext_image_counts(params)
    if not missing and not unusable and counts is not None and any(counts):
        # Made with storing off: the infotext counts the images but cannot give them back.
        text = (
            f"This infotext's image prompts ({counts[0]} positive, {counts[1]} negative) were "
            "not stored when it was made (storing was off in Settings > Negative Image "
            "Prompt): add them to the sides again before generating."
        )
        return gr.update(value=error_status(text))
    if not missing and not unusable:
        return gr.update(value="")
    from lib_negip.webui.settings import store_folder

    _, shown = store_folder()
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} image prompt(s) of this infotext are not in {shown} "
            f"({', '.join(missing)}): they were deleted or come from another installation."
        )
    if unusable:
        reasons = " ".join(
            re.sub(r":\s*add the image again\.$", ".", for_ui(why)) for why in unusable.values()
        )
        parts.append(
            f"{len(unusable)} image prompt(s) of this infotext cannot be restored: {reasons}"
        )
    parts.append(
        "Add them again before generating"
        + (", and switch Negative Image Prompt on again." if RESTORE_MISSING in params else ".")
    )
    return gr.update(value=error_status(" ".join(parts)))


def _choices(listing: Callable[..., list[str]], refresh: bool = False) -> list[str]:
    """The model names, or just the placeholder when the folders cannot be read (the UI must
    still build; the error shows again on refresh and when generating)."""
    try:
        return listing(refresh=refresh)
    except Exception:
        logger.exception("Negative Image Prompt: cannot list the models")
        return [
            negip_args.AUTO_MODEL if listing is models.adapter_choices else negip_args.AUTO_ENCODER
        ]


def _dropdown(choices: list[str], value: str | None = None) -> Any:
    """A dropdown update with new choices; its value is kept unless ``value`` is given."""
    import gradio as gr

    return gr.update(choices=choices) if value is None else gr.update(choices=choices, value=value)


def download_model(name: str) -> tuple[str, Any, Any]:
    """Download an official model (an adapter together with the image encoder it needs);
    returns the status HTML and the refreshed model and encoder dropdowns (a downloaded adapter
    is selected)."""
    from modules import modelloader, paths

    models_dir = Path(paths.models_path)
    fetch = download.a1111_fetch(modelloader.load_file_from_url)
    select = None
    lines = []
    try:
        model = download.official_model(name)
        wanted = [model]
        if model.kind == "adapter":
            wanted.append(download.encoder_for_official(model.name))
        for official in wanted:
            missing = download.missing_files(official.name, models_dir)
            if missing:
                download.download_official(official.name, models_dir, fetch=fetch)
            state = "downloaded" if missing else "already installed"
            lines.append(f"{html.escape(official.name)}: {state} in models/{official.folder}")
        select = model.name if model.kind == "adapter" else None
        status = f'<p class="negip-status">{"<br>".join(lines)}</p>'
    except NegIPError as error:
        logger.error("Negative Image Prompt: %s", error)
        done = "".join(f"{line}<br>" for line in lines)
        status = f'<p class="negip-status">{done}<span class="negip-error">{html.escape(str(error))}</span></p>'
    adapters = _choices(models.adapter_choices, refresh=True)
    encoders = _choices(models.encoder_choices, refresh=True)
    return status, _dropdown(adapters, select if select in adapters else None), _dropdown(encoders)
