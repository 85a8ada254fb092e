"""Axes for A1111's X/Y/Z plot script: each sets one field of the generation's arguments."""

from __future__ import annotations

from typing import Any

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
        xyz.axis_options.append(xyz.AxisOption(label, kind, _override(field), choices=choices))
