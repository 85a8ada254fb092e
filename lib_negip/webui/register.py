"""What the entry script registers with the web UI: callbacks, the API route, settings."""

from __future__ import annotations

import logging
from typing import Any

from lib_negip import logger
from lib_negip.webui.generation import Generation, on_cfg_denoiser
from lib_negip.webui.models import MODELS, models_listing
from lib_negip.webui.settings import on_ui_settings
from lib_negip.webui.xyz import register_xyz_axes


def on_app_started(_demo: Any, app: Any) -> None:
    app.add_api_route("/negip/v1/models", models_listing, methods=["GET"])
    # Registered now, after every extension's scripts loaded, so that ours runs last and
    # sees (and appends after) whatever other callbacks did to the conditioning.
    from modules import script_callbacks

    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="negip")


def register() -> None:
    """Called once by the entry script."""
    from modules import safe, script_callbacks

    from lib_negip import files

    # A1111's torch.load (modules/safe.py) refuses files saved by current torch (".format_version")
    # and returns None after logging a traceback; ours always loads with weights_only=True.
    files.set_torch_load(safe.unsafe_torch_load)
    _console_logging()
    script_callbacks.on_ui_settings(on_ui_settings, name="negip")
    script_callbacks.on_app_started(on_app_started, name="negip")
    script_callbacks.on_before_ui(register_xyz_axes, name="negip")
    script_callbacks.on_script_unloaded(shutdown, name="negip")
    from lib_negip.webui import ui

    script_callbacks.on_after_component(ui.on_after_component, name="negip")


def _console_logging() -> None:
    """Show our records in the console, each as one "LEVEL:negip:message" line.

    Without --loglevel A1111 configures no logging: our records would go to logging's last
    resort (warnings and errors only, without level or name) until some code's first
    ``logging.warning(...)`` configures the root logger, and the format would depend on that.
    With --loglevel (root configured before extensions load) they go to A1111's handler.
    """
    if logging.root.handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler added later would print every record twice


def shutdown() -> None:
    Generation.end()
    MODELS.clear()
