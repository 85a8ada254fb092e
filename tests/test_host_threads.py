"""Host differences outside the UNet: callbacks on hosts without callback names (Forge
Classic), and refusals raised on the "main thread" of reForge and Forge Classic.

The main threads here are written for the test from those hosts' observed behaviour (a task's
exception is printed by the thread's loop and dropped; the waiting call returns None, which the
UI then shows as "TypeError: 'NoneType' object is not iterable"), not taken from their code.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

import pytest

from lib_negip.errors import ArgumentError
from lib_negip.webui import backend, failures, register


def dropping_main_thread(keeps_exceptions: bool = False) -> types.ModuleType:
    """A ``modules_forge.main_thread``: each ``run_and_wait_result`` runs its task on another
    thread and waits. ``keeps_exceptions``: ``Task.work`` catches and stores exceptions itself
    (Forge's way); otherwise the loop prints and drops them (reForge's and Classic's)."""
    module = types.ModuleType("modules_forge.main_thread")
    module.printed = []

    class Task:
        def __init__(self, func: Any, args: tuple, kwargs: dict) -> None:
            self.func, self.args, self.kwargs = func, args, kwargs
            self.result = None
            self.exception = None

        if keeps_exceptions:

            def work(self) -> None:
                try:
                    self.result = self.func(*self.args, **self.kwargs)
                except Exception as error:
                    self.exception = error
        else:

            def work(self) -> None:
                self.result = self.func(*self.args, **self.kwargs)

    def loop(task: Task, finished: threading.Event) -> None:
        try:
            task.work()
        except Exception as error:
            module.printed.append(error)
        finished.set()

    def run_and_wait_result(func: Any, *args: Any, **kwargs: Any) -> Any:
        task = module.Task(func, args, kwargs)
        finished = threading.Event()
        threading.Thread(target=loop, args=(task, finished)).start()
        assert finished.wait(10)
        return task.result

    module.Task = Task
    module.run_and_wait_result = run_and_wait_result
    return module


@pytest.fixture
def errors():
    errors = failures.MainThreadErrors()
    yield errors
    errors.remove()


def refusal() -> Exception:
    return failures.request_error(ArgumentError("'Positive weight' must be a number"), for_ui=True)


def test_the_host_thread_drops_the_refusal_without_us() -> None:
    """The premise: without the wrapper the waiting call gets None, not the refusal."""
    main_thread = dropping_main_thread()
    error = refusal()

    def generate() -> Any:
        raise error

    assert main_thread.run_and_wait_result(generate) is None
    assert main_thread.printed == [error]


def test_our_refusal_is_raised_in_the_waiting_thread(errors) -> None:
    main_thread = dropping_main_thread()
    assert errors.install(main_thread)
    error = refusal()

    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("fail"):
            raise error
        return ("images", args, kwargs)

    with pytest.raises(type(error)) as raised:
        main_thread.run_and_wait_result(generate, 1, fail=True)
    assert raised.value is error
    assert str(raised.value).startswith("'Positive weight' must be a number")
    assert type(raised.value).__name__ == failures.UI_NAME  # what the host's UI shows first
    assert main_thread.printed == [error]  # the host's console still prints it
    # calls that succeed pass through, arguments and result unchanged
    assert main_thread.run_and_wait_result(generate, 1, 2, x=3) == ("images", (1, 2), {"x": 3})


def test_other_exceptions_are_left_to_the_host(errors) -> None:
    main_thread = dropping_main_thread()
    errors.install(main_thread)

    def generate() -> Any:
        raise ValueError("not ours")

    assert main_thread.run_and_wait_result(generate) is None
    assert [str(e) for e in main_thread.printed] == ["not ours"]


def test_a_host_that_keeps_exceptions_sees_no_change(errors) -> None:
    main_thread = dropping_main_thread(keeps_exceptions=True)
    errors.install(main_thread)
    error = refusal()

    def generate() -> Any:
        raise error

    assert main_thread.run_and_wait_result(generate) is None
    assert main_thread.printed == []


def test_a_task_not_waited_for_keeps_nothing(errors) -> None:
    """A task queued without run_and_wait_result (the host's model loading) is not recorded:
    nothing is kept that no caller would take."""
    main_thread = dropping_main_thread()
    errors.install(main_thread)
    error = refusal()

    def load() -> Any:
        raise error

    task = main_thread.Task(load, (), {})
    with pytest.raises(type(error)):
        task.work()
    assert errors.failed == {}


def test_remove_puts_the_host_functions_back(errors) -> None:
    main_thread = dropping_main_thread()
    run, work = main_thread.run_and_wait_result, main_thread.Task.work
    errors.install(main_thread)
    assert main_thread.run_and_wait_result is not run
    assert errors.install(main_thread)  # a second install changes nothing
    errors.remove()
    assert main_thread.run_and_wait_result is run
    assert main_thread.Task.work is work
    assert not errors.installed


def test_remove_leaves_a_later_wrapper_in_place(errors) -> None:
    main_thread = dropping_main_thread()
    errors.install(main_thread)
    ours = main_thread.run_and_wait_result

    def theirs(func: Any, *args: Any, **kwargs: Any) -> Any:
        return ours(func, *args, **kwargs)

    main_thread.run_and_wait_result = theirs
    errors.remove()
    assert main_thread.run_and_wait_result is theirs


def test_install_declines_an_unexpected_main_thread(errors) -> None:
    module = types.ModuleType("modules_forge.main_thread")
    module.run_and_wait_result = lambda func, *a, **k: func(*a, **k)
    assert not errors.install(module)
    assert not errors.installed


@pytest.mark.parametrize(
    ("host", "installed"),
    [
        (backend.REFORGE, True),
        (backend.FORGE_CLASSIC, True),
        (backend.FORGE, False),
        (backend.A1111, False),
    ],
)
def test_registration_installs_it_on_reforge_and_classic_only(
    monkeypatch, host: str, installed: bool
) -> None:
    main_thread = dropping_main_thread()
    package = types.ModuleType("modules_forge")
    package.main_thread = main_thread
    monkeypatch.setitem(sys.modules, "modules_forge", package)
    monkeypatch.setitem(sys.modules, "modules_forge.main_thread", main_thread)
    monkeypatch.setattr(backend, "host_kind", lambda: host)
    run = main_thread.run_and_wait_result
    try:
        register._show_errors_of_the_main_thread()
        assert failures.MAIN_THREAD_ERRORS.installed is installed
        assert (main_thread.run_and_wait_result is not run) is installed
    finally:
        register.shutdown()
    assert not failures.MAIN_THREAD_ERRORS.installed
    assert main_thread.run_and_wait_result is run


def test_callbacks_are_named_where_the_host_takes_names(monkeypatch) -> None:
    """A1111 1.9+ takes ``name=``; Forge Classic's older functions take the callback alone
    (passing a name there raised TypeError and the extension did not load)."""
    from webui_harness import script_callbacks

    seen: list[tuple[str, Any, dict]] = []

    def old_style(callback: Any) -> None:
        seen.append(("old", callback, {}))

    def new_style(callback: Any, *, name: str | None = None) -> None:
        seen.append(("new", callback, {"name": name}))

    monkeypatch.setattr(script_callbacks, "on_ui_settings", old_style)
    monkeypatch.setattr(script_callbacks, "on_app_started", new_style)
    register._on("ui_settings", print)
    register._on("app_started", len)
    assert seen == [("old", print, {}), ("new", len, {"name": "negip"})]
