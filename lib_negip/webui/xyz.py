"""Axes for A1111's X/Y/Z plot script: each sets one field of the generation's arguments."""

from __future__ import annotations

from typing import Any

from lib_negip import logger
from lib_negip.blocks import PRESETS
from lib_negip.webui.models import adapter_choices


def _xyz_module() -> Any:
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "xyz_grid"):
            return data.module
    return None


def _override(field: str) -> Any:
    def apply(p: Any, value: Any, _values: Any) -> None:
        overrides = dict(getattr(p, "negip_overrides", None) or {})
        overrides[field] = value
        p.negip_overrides = overrides

    return apply


def disabled_message(fields: Any) -> str:
    """The refusal of [NegIP] axes while the extension is off."""
    return (
        f"the X/Y/Z plot sets Negative Image Prompt's {', '.join(sorted(fields))}, but Negative "
        "Image Prompt is not enabled: enable it (with its images), or remove the plot's [NegIP] "
        "axes."
    )


def _enabled(p: Any) -> bool:
    """Whether the request switches the extension on (True where its args are not found)."""
    from lib_negip.args import script_args_enabled
    from lib_negip.webui import TITLE

    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", None) or ():
        try:
            if script.title() == TITLE:
                return script_args_enabled(p.script_args[script.args_from : script.args_to])
        except Exception:  # another host's runner: the cells still refuse (generation.process)
            return True
    return True


def _confirm(label: str, field: str) -> Any:
    """The axis's check of all its values before the plot starts (as A1111's own axes do): a
    value no cell could take fails the plot at once, not as an empty cell after the others
    were made (the plot draws a cell that failed as an empty one)."""

    def confirm(p: Any, values: Any) -> None:
        from lib_negip.args import AUTO_MODEL, parse_api_dict
        from lib_negip.errors import ArgumentError, NegIPError
        from lib_negip.webui.failures import request_error, wants_ui_words

        if not _enabled(p):
            error = ArgumentError(disabled_message([field]))
            logger.error("Negative Image Prompt: %s", error)
            raise request_error(error, for_ui=wants_ui_words(p))
        try:
            for value in values:
                parse_api_dict({"enabled": False, field: value})  # checked, nothing decoded
                if field == "model" and value != AUTO_MODEL:
                    _check_installed(value)
        except NegIPError as error:
            prefix = f"X/Y/Z plot, axis {label}: "
            raised = type(error)(prefix + str(error), ui=prefix + error.ui)
            logger.error("Negative Image Prompt: %s", raised)
            raise request_error(raised, for_ui=wants_ui_words(p)) from None

    return confirm


def _check_installed(name: str) -> None:
    """An adapter a cell can load: installed and usable, or official with downloads on."""
    from lib_negip import download
    from lib_negip.webui.models import MODELS
    from lib_negip.webui.settings import OPT_AUTO_DOWNLOAD, opt

    if opt(OPT_AUTO_DOWNLOAD) and download.is_official(name):
        return
    MODELS.registry().resolve_adapter(name).usable_spec()


XYZ_AXES = (
    ("[NegIP] Positive weight", float, "positive_weight"),
    ("[NegIP] Negative weight", float, "negative_weight"),
    ("[NegIP] Positive start", float, "positive_start"),
    ("[NegIP] Positive end", float, "positive_end"),
    ("[NegIP] Negative start", float, "negative_start"),
    ("[NegIP] Negative end", float, "negative_end"),
    ("[NegIP] Model", str, "model"),
    ("[NegIP] Positive blocks", str, "positive_layers"),
    ("[NegIP] Negative blocks", str, "negative_layers"),
    ("[NegIP] Negative noise", float, "negative_noise"),
)


def register_xyz_axes() -> None:
    xyz = _xyz_module()
    if xyz is None:
        return
    present = {option.label for option in xyz.axis_options}
    for label, kind, field in XYZ_AXES:
        if label in present:
            continue
        choices = None
        if field == "model":
            choices = lambda: adapter_choices()[1:]  # noqa: E731 (every adapter, not "auto")
        elif field.endswith("_layers"):
            choices = lambda: list(PRESETS)  # noqa: E731
        xyz.axis_options.append(
            xyz.AxisOption(
                label, kind, _override(field), confirm=_confirm(label, field), choices=choices
            )
        )
