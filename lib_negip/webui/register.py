"""What the entry script registers with the web UI: callbacks, the API route, settings."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from lib_negip import logger
from lib_negip.webui.generation import Generation, on_cfg_denoiser
from lib_negip.webui.models import MODELS, models_listing
from lib_negip.webui.settings import on_ui_settings
from lib_negip.webui.xyz import CELL_REFUSALS, register_xyz_axes


def on_app_started(_demo: Any, app: Any) -> None:
    # Registered now, after every extension's scripts loaded, so that ours runs last and
    # sees (and appends after) whatever other callbacks did to the conditioning. First, so that
    # nothing below can leave the image prompts without it (A1111 logs a callback's exception
    # and goes on with the next callback, not with the rest of this one).
    _on("cfg_denoiser", on_cfg_denoiser)
    add_routes(app)


def add_routes(app: Any) -> None:
    """``GET /negip/v1/models``, like A1111's own /sdapi routes: only with --api (or
    --nowebui), behind --api-auth."""
    from modules import shared

    options = shared.cmd_opts
    if getattr(options, "api", False) or getattr(options, "nowebui", False):
        app.add_api_route(
            "/negip/v1/models",
            models_listing,
            methods=["GET"],
            dependencies=api_auth(getattr(options, "api_auth", None)),
        )


def api_auth(setting: str | None) -> list[Any]:
    """The dependency A1111 gives its API routes for ``--api-auth user:password[,user:password]``:
    HTTP basic authentication, 401 otherwise; none without the option."""
    if not setting:
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    security = HTTPBasic()

    # No annotation on the parameter: with ``from __future__ import annotations`` it would be the
    # string "HTTPBasicCredentials", which FastAPI evaluates in this module's globals, where the
    # name is not (a NameError when the route is added, seen in a real A1111 with --api-auth).
    # FastAPI passes what ``Depends`` returns whatever the annotation says.
    def check(credentials=Depends(security)) -> None:  # noqa: B008
        if not credentials_match(setting, credentials.username, credentials.password):
            raise HTTPException(
                status_code=401,
                detail="Incorrect username or password",
                headers={"WWW-Authenticate": "Basic"},
            )

    return [Depends(check)]


def credentials_match(setting: str, username: str, password: str) -> bool:
    """Whether ``--api-auth``'s ``setting`` (``user:password[,user:password]``) holds these."""
    import secrets

    users = dict(entry.split(":", 1) for entry in setting.split(",") if ":" in entry)
    expected = users.get(username)
    return expected is not None and secrets.compare_digest(password, expected)


def register() -> None:
    """Called once by the entry script."""
    from modules import safe

    from lib_negip import files

    # A1111's torch.load (modules/safe.py) refuses files saved by current torch (".format_version")
    # and returns None after logging a traceback; ours always loads with weights_only=True.
    files.set_torch_load(safe.unsafe_torch_load)
    _console_logging()
    _on("ui_settings", on_ui_settings)
    _on("app_started", on_app_started)
    _on("before_ui", register_xyz_axes)
    # Now too: with --nowebui, A1111 builds the scripts' UI (the X/Y/Z plot's list of axes, which
    # its API indexes) while it makes the API, before the before_ui callbacks run. The plot's
    # script is loaded before any extension's; the callback adds nothing twice.
    register_xyz_axes()
    _on("script_unloaded", shutdown)
    from lib_negip.webui import ui

    _on("after_component", ui.on_after_component)
    _on("infotext_pasted", ui.on_infotext_pasted)
    _show_errors_of_the_main_thread()


def _on(event: str, callback: Any) -> None:
    """``script_callbacks.on_<event>(callback)``, named "negip" where the host takes names.

    A1111 1.9 added the ``name`` keyword (shown in its callback-order settings); Forge Classic
    (2025-02) still has the older functions, which take the callback alone.
    """
    from modules import script_callbacks

    add = getattr(script_callbacks, f"on_{event}")
    try:
        takes_name = "name" in inspect.signature(add).parameters
    except (TypeError, ValueError):  # no signature to read: call it the old way
        takes_name = False
    if takes_name:
        add(callback, name="negip")
    else:
        add(callback)


def _show_errors_of_the_main_thread() -> None:
    """On reForge and Forge Classic, our refusals reach the UI through their main thread only
    with :data:`~lib_negip.webui.failures.MAIN_THREAD_ERRORS` installed."""
    from lib_negip.webui.backend import FORGE_CLASSIC, REFORGE, host_kind
    from lib_negip.webui.failures import MAIN_THREAD_ERRORS

    if host_kind() not in (REFORGE, FORGE_CLASSIC):
        return
    try:
        from modules_forge import main_thread  # type: ignore[import-not-found]
    except ImportError:
        return
    if not MAIN_THREAD_ERRORS.install(main_thread):
        logger.warning(
            "this web UI's main thread is not the one expected: a refusal shows as a TypeError in "
            "the UI (the console and the API have the message)"
        )


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
    from lib_negip.webui.failures import MAIN_THREAD_ERRORS

    MAIN_THREAD_ERRORS.remove()
    CELL_REFUSALS.remove()
    Generation.end()
    MODELS.clear()
