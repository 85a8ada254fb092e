"""Axes for A1111's X/Y/Z plot script: each sets one field of the generation's arguments."""

from __future__ import annotations

import threading
from typing import Any, NoReturn

from lib_negip import logger
from lib_negip.blocks import PRESETS
from lib_negip.errors import NegIPError
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
        from lib_negip.errors import ArgumentError
        from lib_negip.webui.failures import prefixed, wants_ui_words
        from lib_negip.webui.generation import without_ui_references

        def refuse(error: NegIPError, prefix: str = "") -> NoReturn:
            raised = prefixed(error, prefix, for_ui=wants_ui_words(p))
            logger.error("Negative Image Prompt: %s", raised.api_message)
            raise raised from None

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
                cell_fields = {"enabled": base is not None, field: value}
                partner = _WINDOW_PARTNERS.get(field)
                if partner is not None:
                    # Another axis may set the other end of the window (a start x end sweep):
                    # the window is each cell's to check, with its own start and end.
                    cell_fields[partner] = value
                cell = parse_api_dict(cell_fields, base=base)
                if field == "model" and value != AUTO_MODEL:
                    _check_installed(value)
                if field.endswith("_layers"):
                    _check_block_indices(field, parse_layers(field, getattr(cell, field)))
        except NegIPError as error:
            refuse(error, prefix)

    return confirm


#: A step window's field and the other end of its window.
_WINDOW_PARTNERS = {
    "positive_start": "positive_end",
    "positive_end": "positive_start",
    "negative_start": "negative_end",
    "negative_end": "negative_start",
}


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
    from lib_negip.webui.settings import OPT_AUTO_DOWNLOAD, setting_bool

    if setting_bool(OPT_AUTO_DOWNLOAD) and download.is_official(name):
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


class CellRefusals:
    """A refusal of ours in one cell fails the whole X/Y/Z plot.

    A1111's plot runs each cell as ``try: process_images(pc) except Exception:``, logs what a
    cell raised and draws that cell empty: the request succeeds (HTTP 200 through the API)
    with a black cell. The axes' ``confirm`` refuses before the first cell what no cell could
    take, but some refusals depend on the checkpoint a cell samples with, which another axis
    may change: an SD1.x adapter with an SDXL checkpoint, "auto" with no adapter of the
    cell's family, a block index the cell's UNet lacks.

    :meth:`install` wraps two functions of the plot's module. ``process_images``, as its cells
    call it, keeps the first :class:`NegIPError` a cell raises, stops the plot (the host's
    ``state.interrupted``, as the Interrupt button does: the cells left are skipped) and gives
    the plot the empty result it makes of a failed cell, without the traceback it would print;
    ``draw_xyz_grid`` raises the kept refusal when the plot returns, from the script's ``run``,
    where A1111 lets it reach the user (the UI shows it, the API answers 422). Any other
    exception of a cell is left to the plot. :meth:`remove` puts the module's functions back
    where ours are still the ones installed.
    """

    PREFIX = "X/Y/Z plot: a cell cannot be made, so the plot was stopped: "

    def __init__(self) -> None:
        self._local = threading.local()  # .plots: the refusals kept by the plots drawing
        self._host: tuple[Any, Any, Any] | None = None  # module, its process_images, its draw
        self._ours: tuple[Any, Any] = (None, None)

    @property
    def installed(self) -> bool:
        return self._host is not None

    def install(self, module: Any) -> bool:
        """Wrap ``module``'s functions (once); False where it lacks them (another plot)."""
        if self._host is not None:
            if self._host[0] is module:
                return True
            self.remove()  # the host reloaded its scripts: a new module
        process_images = getattr(module, "process_images", None)
        draw = getattr(module, "draw_xyz_grid", None)
        if not (callable(process_images) and callable(draw)):
            return False
        local = self._local

        def cell_refusal_stops_the_plot(p: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return process_images(p, *args, **kwargs)
            except NegIPError as error:
                kept = getattr(local, "plots", None)
                if not kept:
                    raise
                if kept[-1] is None:
                    kept[-1] = error
                    _set_interrupted(True)
                empty = getattr(module, "Processed", None)
                if empty is None:
                    raise
                # What the plot makes of a cell that raised, without its traceback in the
                # console: the cell's refusal is logged once already, and raised at the end.
                return empty(p, [], getattr(p, "seed", -1), "")

        def draw_raising_a_cell_refusal(*args: Any, **kwargs: Any) -> Any:
            kept = local.__dict__.setdefault("plots", [])
            kept.append(None)
            try:
                result = draw(*args, **kwargs)
            finally:  # a kept refusal wins over anything the plot raised after it
                refusal = kept.pop()
                if refusal is not None:
                    _set_interrupted(False)
                    raise _prefixed(refusal) from None
            return result

        module.process_images = cell_refusal_stops_the_plot
        module.draw_xyz_grid = draw_raising_a_cell_refusal
        self._host = (module, process_images, draw)
        self._ours = (cell_refusal_stops_the_plot, draw_raising_a_cell_refusal)
        return True

    def remove(self) -> None:
        if self._host is None:
            return
        module, process_images, draw = self._host
        our_process, our_draw = self._ours
        if getattr(module, "process_images", None) is our_process:
            module.process_images = process_images
        if getattr(module, "draw_xyz_grid", None) is our_draw:
            module.draw_xyz_grid = draw
        self._host = None
        self._ours = (None, None)


def _set_interrupted(value: bool) -> None:
    """A1111's interrupt flag: set to skip the plot's cells left after a refusal (as the
    Interrupt button does), reset when the plot is over (A1111's UI resets it after a failed
    request, its API only at the next job's start: /sdapi/v1/progress would say "interrupted"
    until then). Without host state the cells left run, and the refusal still ends the plot."""
    try:
        from modules import shared

        shared.state.interrupted = value
    except Exception:
        logger.debug("Negative Image Prompt: could not set the interrupt flag", exc_info=True)


def _prefixed(refusal: NegIPError) -> BaseException:
    """The cell's refusal (logged when the cell raised it), with the plot's words before it."""
    from lib_negip.webui.failures import prefixed

    return prefixed(refusal, CellRefusals.PREFIX)


CELL_REFUSALS = CellRefusals()


def register_xyz_axes() -> None:
    xyz = _xyz_module()
    if xyz is None:
        return
    if not CELL_REFUSALS.install(xyz):
        logger.warning(
            "the X/Y/Z plot's module is not the one expected: a cell Negative Image Prompt "
            "refuses is drawn empty, not reported"
        )
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
