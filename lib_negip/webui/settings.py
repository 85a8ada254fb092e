"""The extension's options in A1111's Settings tab (section "Negative Image Prompt")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib_negip import logger

SECTION = ("negip", "Negative Image Prompt")


# Settings (Settings tab, section "Negative Image Prompt"): key -> (default, label).
OPT_ADAPTER_DIRS = "negip_extra_adapter_dirs"
OPT_ENCODER_DIRS = "negip_extra_encoder_dirs"
OPT_MODELS_IN_MEMORY = "negip_models_in_memory"
OPT_IMAGES_IN_MEMORY = "negip_images_in_memory"
OPT_ENCODER_ON_GPU = "negip_encoder_on_gpu"
OPT_AUTO_DOWNLOAD = "negip_auto_download"
OPT_STORE_IMAGES = "negip_store_images"
OPT_STORE_FOLDER = "negip_store_folder"

#: Where image prompts are stored by default, under A1111's data folder (next to its own
#: "outputs/txt2img-images").
DEFAULT_STORE_FOLDER = "outputs/negip-image-prompts"

#: The sliders' ranges, which also bound values that arrive through the API unchecked.
MODELS_IN_MEMORY_RANGE = (1, 8)
IMAGES_IN_MEMORY_RANGE = (0, 512)

DEFAULTS: dict[str, Any] = {
    OPT_ADAPTER_DIRS: "",
    OPT_ENCODER_DIRS: "",
    OPT_MODELS_IN_MEMORY: 2,
    OPT_IMAGES_IN_MEMORY: 64,
    OPT_ENCODER_ON_GPU: False,
    OPT_AUTO_DOWNLOAD: False,
    OPT_STORE_IMAGES: True,
    OPT_STORE_FOLDER: "",
}


# Settings that decide which files the server reads or downloads: never changed through the API
# (POST /sdapi/v1/options, a request's override_settings); A1111 1.7+ enforces restrict_api.
RESTRICTED_SETTINGS = (OPT_ADAPTER_DIRS, OPT_ENCODER_DIRS, OPT_AUTO_DOWNLOAD, OPT_STORE_FOLDER)
FOLDER_SETTINGS = (OPT_ADAPTER_DIRS, OPT_ENCODER_DIRS, OPT_STORE_FOLDER)


def opt(key: str) -> Any:
    from modules import shared

    return getattr(shared.opts, key, DEFAULTS[key])


def setting_int(key: str, low: int, high: int) -> int:
    """A numeric setting as an int in [low, high]; A1111 does not check values set through the
    API (override_settings, POST /sdapi/v1/options), so anything may arrive here."""
    value = opt(key)
    try:
        number = int(float(value))  # sliders store floats
    except (TypeError, ValueError, OverflowError):
        logger.warning("Setting %s is %r, not a number: using %s", key, value, DEFAULTS[key])
        return DEFAULTS[key]
    return min(max(number, low), high)


#: How a checkbox setting set through the API may be written (A1111 does not check the type):
#: the spellings A1111's own API answers and its Settings tab show as ticked or not (pydantic's
#: bool), so that what the user sees is what happens.
_TRUE_TEXTS = frozenset({"true", "t", "yes", "y", "on", "1"})
_FALSE_TEXTS = frozenset({"false", "f", "no", "n", "off", "0"})


def setting_bool(key: str) -> bool:
    """A checkbox setting. The API can set any value: 0 and 1 and the texts "true"/"false",
    "on"/"off", "yes"/"no" mean what they say (storing set to 0 went on storing while the
    Settings tab showed it off); anything else is the default, with a warning."""
    value = opt(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_TEXTS | _FALSE_TEXTS:
        return value.strip().lower() in _TRUE_TEXTS
    logger.warning("Setting %s is %r, neither true nor false: using %s", key, value, DEFAULTS[key])
    return DEFAULTS[key]


def store_folder() -> tuple[Path, str]:
    """The folder of stored image prompts, and how messages name it (relative to the web UI's
    data folder when inside it: API answers never hold the server's absolute paths)."""
    from modules import paths

    data = Path(getattr(paths, "data_path", ".") or ".")
    text = str(opt(OPT_STORE_FOLDER) or "").strip() or DEFAULT_STORE_FOLDER
    folder = Path(text).expanduser()
    if not folder.is_absolute():
        folder = data / folder
    try:
        shown = folder.resolve().relative_to(data.resolve()).as_posix()
    except ValueError:
        shown = f"the folder set in Settings > Negative Image Prompt ({folder.name})"
    return folder, shown


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    options = {
        OPT_ADAPTER_DIRS: shared.OptionInfo(
            DEFAULTS[OPT_ADAPTER_DIRS],
            "Extra folders with IP-Adapter models (separate with ;)",
        ),
        OPT_ENCODER_DIRS: shared.OptionInfo(
            DEFAULTS[OPT_ENCODER_DIRS],
            "Extra folders with image encoders (CLIP vision; separate with ;)",
        ),
        OPT_MODELS_IN_MEMORY: shared.OptionInfo(
            DEFAULTS[OPT_MODELS_IN_MEMORY],
            "IP-Adapters and image encoders kept loaded (each)",
            gr.Slider,
            {"minimum": MODELS_IN_MEMORY_RANGE[0], "maximum": MODELS_IN_MEMORY_RANGE[1], "step": 1},
        ),
        OPT_IMAGES_IN_MEMORY: shared.OptionInfo(
            DEFAULTS[OPT_IMAGES_IN_MEMORY],
            "Encoded images kept in memory",
            gr.Slider,
            {"minimum": IMAGES_IN_MEMORY_RANGE[0], "maximum": IMAGES_IN_MEMORY_RANGE[1], "step": 1},
        ),
        OPT_ENCODER_ON_GPU: shared.OptionInfo(
            DEFAULTS[OPT_ENCODER_ON_GPU],
            "Keep the image encoder on the GPU after encoding (faster with new images, uses VRAM)",
        ),
        OPT_AUTO_DOWNLOAD: shared.OptionInfo(
            DEFAULTS[OPT_AUTO_DOWNLOAD],
            "Download missing official IP-Adapter and image encoder files (h94/IP-Adapter) when a "
            "generation needs them",
        ),
        OPT_STORE_IMAGES: shared.OptionInfo(
            DEFAULTS[OPT_STORE_IMAGES],
            "Store every image prompt (and mask) once, named by its content, so that PNG Info, "
            "Send to and the API's infotext restore a result's image prompts",
        ),
        OPT_STORE_FOLDER: shared.OptionInfo(
            DEFAULTS[OPT_STORE_FOLDER],
            f"Folder for stored image prompts (empty: {DEFAULT_STORE_FOLDER})",
        ),
    }
    for key, info in options.items():
        info.section = SECTION
        if key in RESTRICTED_SETTINGS:
            info.restrict_api = True  # an attribute: an older OptionInfo lacks the argument
        if key in FOLDER_SETTINGS and getattr(shared, "hide_dirs", None) is not None:
            info.component_args = shared.hide_dirs  # --hide-ui-dir-config hides and locks it
        shared.opts.add_option(key, info)
