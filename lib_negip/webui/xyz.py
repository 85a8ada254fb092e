"""Axes for A1111's X/Y/Z plot script: each sets one field of the generation's arguments."""

from __future__ import annotations

from typing import Any, NoReturn

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


def _request_values(p: Any) -> Any:
    """This extension's args in the request (found among A1111's always-on scripts), or None
    where they are not found (another host's runner)."""
    from lib_negip.webui import TITLE

    runner = getattr(p, "scripts", None)
    try:
        for script in getattr(runner, "alwayson_scripts", None) or ():
            if script.title() == TITLE:
                return p.script_args[script.args_from : script.args_to]
    except Exception:  # the cells still check everything (generation.process)
        return None
    return None


def _confirm(label: str, field: str) -> Any:
    """The axis's check of all its values before the plot starts (as A1111's own axes do): a
    value no cell could take fails the plot at once, not as an empty cell after the others
    were made (the plot draws a cell that failed as an empty one). Each value is checked with
    the request's own arguments (a noise negative against its negative images); what depends
    on the checkpoint a cell samples with (which another axis may change) is left to the
    cell, but for block indices no UNet has."""

    def confirm(p: Any, values: Any) -> None:
        from lib_negip.args import (
            AUTO_MODEL,
            parse_api_dict,
            parse_script_args,
            script_args_enabled,
        )
        from lib_negip.blocks import parse_layers
        from lib_negip.errors import ArgumentError, NegIPError
        from lib_negip.webui.failures import request_error, wants_ui_words
        from lib_negip.webui.generation import without_ui_references

        def refuse(error: NegIPError, prefix: str = "") -> NoReturn:
            raised = type(error)(prefix + str(error), ui=prefix + error.ui)
            logger.error("Negative Image Prompt: %s", raised)
            raise request_error(raised, for_ui=wants_ui_words(p)) from None

        request = _request_values(p)
        if request is not None and not script_args_enabled(request):
            refuse(ArgumentError(disabled_message([field])))
        try:
            base = parse_script_args(without_ui_references(p, request)) if request else None
        except NegIPError as error:
            refuse(error, "X/Y/Z plot: ")
        prefix = f"X/Y/Z plot, axis {label}: "
        try:
            for value in values:
                cell = parse_api_dict({"enabled": base is not None, field: value}, base=base)
                if field == "model" and value != AUTO_MODEL:
                    _check_installed(value)
                if field.endswith("_layers"):
                    _check_block_indices(field, parse_layers(field, getattr(cell, field)))
        except NegIPError as error:
            refuse(error, prefix)

    return confirm


def _check_block_indices(field: str, spec: Any) -> None:
    """Refuse a block index past the blocks of every UNet this extension knows and of the one
    loaded (whichever checkpoint a cell samples with)."""
    from lib_negip.blocks import check_known_blocks
    from lib_negip.unet_layers import cross_attention_layers, transformer_blocks
    from lib_negip.webui import backend

    unet = backend.current_unet()
    loaded = len(transformer_blocks(cross_attention_layers(unet))) if unet is not None else 0
    check_known_blocks(field, spec, loaded)


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
