"""Callback registration; like A1111, exceptions raised by callbacks are logged, not raised."""

import logging
from types import SimpleNamespace

log = logging.getLogger("webui_stub")
callbacks = {
    name: []
    for name in (
        "cfg_denoiser",
        "ui_settings",
        "app_started",
        "before_ui",
        "script_unloaded",
        "after_component",
        "infotext_pasted",
    )
}
errors = []  # what A1111 would print to the console


def _add(category, fun, name=None):
    callbacks[category].append(SimpleNamespace(callback=fun, name=name))


def on_cfg_denoiser(fun, *, name=None):
    _add("cfg_denoiser", fun, name)


def on_ui_settings(fun, *, name=None):
    _add("ui_settings", fun, name)


def on_app_started(fun, *, name=None):
    _add("app_started", fun, name)


def on_before_ui(fun, *, name=None):
    _add("before_ui", fun, name)


def on_script_unloaded(fun, *, name=None):
    _add("script_unloaded", fun, name)


def on_after_component(fun, *, name=None):
    _add("after_component", fun, name)


def on_infotext_pasted(fun, *, name=None):
    _add("infotext_pasted", fun, name)


def run(category, *args):
    for entry in list(callbacks[category]):
        try:
            entry.callback(*args)
        except Exception as error:
            errors.append(error)
            log.exception("Error executing callback %s", category)


def cfg_denoiser_callback(params):
    run("cfg_denoiser", params)


def clear():
    for entries in callbacks.values():
        entries.clear()
    errors.clear()
