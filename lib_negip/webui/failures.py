"""Errors as they reach the user.

A1111 catches and only logs exceptions raised in Script hooks and callbacks. An exception raised
inside the UNet's forward reaches the user: the UI shows its message, and the API answers with
the exception's ``status_code`` and ``detail`` when it is a FastAPI ``HTTPException``. Every
refusal is therefore raised as a :class:`~lib_negip.errors.NegIPError` that is also an
``HTTPException`` with status 422 (see :func:`request_error`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

from lib_negip.errors import NegIPError, ResourceError

#: The name the UI shows before the message (A1111 shows "<exception class name>: <message>"):
#: the extension's title, not a Python class name.
UI_NAME = "Negative Image Prompt"


@functools.cache
def _request_error_class(error_type: type[NegIPError], for_ui: bool) -> type[Exception]:
    """``error_type`` that is also FastAPI's ``HTTPException`` with status 422.

    The API turns an exception raised while generating into a response from its attributes
    (``status_code``, ``detail``); an ``HTTPException`` is answered without a traceback in the
    log. starlette 0.26's ``HTTPException`` has no ``__str__`` of its own and does not
    initialise ``Exception``: both bases are initialised explicitly. For the UI the class is
    named after the extension, since A1111 shows the class name before the message.
    """
    try:
        from fastapi import HTTPException
    except ImportError:  # no web stack: the same error with the same attributes, no HTTP base
        HTTPException = None

    def __init__(self, message: str, *, api: str = "", ui: str = "") -> None:
        error_type.__init__(self, message, ui=ui or None)
        if HTTPException is None:
            self.status_code, self.detail = 422, message
        else:
            HTTPException.__init__(self, status_code=422, detail=message)
        self.api_message = api or message
        self.ui_message = ui or message

    def __str__(self) -> str:
        return str(self.detail)

    bases = (error_type,) if HTTPException is None else (error_type, HTTPException)
    return type(
        UI_NAME if for_ui else error_type.__name__,
        bases,
        {
            "__init__": __init__,
            "__str__": __str__,
            "__module__": __name__,
            "error_type": error_type,
            "for_ui": for_ui,
        },
    )


def request_error(error: BaseException, *, for_ui: bool = False) -> Exception:
    """The exception to raise for ``error`` so that the UI (``for_ui``) or the API shows its
    message in its audience's words; both wordings stay on it (``api_message``,
    ``ui_message``)."""
    if isinstance(error, NegIPError):
        api, ui = str(error), error.ui
        cls = _request_error_class(type(error), for_ui)
    else:
        text = _without_paths(error)
        api = (
            f"Negative Image Prompt failed: {type(error).__name__}: {text}. The console has the "
            "details; please report it with them."
        )
        ui = (
            f"something went wrong ({text}). The console has the details; please report them, "
            "and untick Negative Image Prompt to generate without image prompts meanwhile."
        )
        cls = _request_error_class(NegIPError, for_ui)
    return cls(ui if for_ui else api, api=api, ui=ui)


def prefixed(error: NegIPError, prefix: str, *, for_ui: bool | None = None) -> Exception:
    """``error``, a refusal as :func:`request_error` made it (or a plain :class:`NegIPError`),
    with ``prefix`` before both of its wordings, raised for ``for_ui``'s audience (by default
    the one ``error`` was made for)."""
    api = getattr(error, "api_message", None) or str(error)
    ui = getattr(error, "ui_message", None) or error.ui
    error_type = getattr(type(error), "error_type", type(error))
    if for_ui is None:
        for_ui = getattr(type(error), "for_ui", False)
    return request_error(error_type(prefix + api, ui=prefix + ui), for_ui=for_ui)


def _without_paths(error: BaseException) -> str:
    """``str(error)``, but for an ``OSError`` that names files its number, reason and the
    files' names only: an answer never shows the server's folders (the console's traceback has
    the paths). Built anew, not replaced in ``str(error)``, which quotes the paths with
    ``repr`` (doubled backslashes on Windows)."""
    if not isinstance(error, OSError):
        return str(error)
    names = [
        re.split(r"[\\/]", path.rstrip("\\/"))[-1] or path
        for path in (error.filename, error.filename2)
        if isinstance(path, str) and path
    ]
    if not names:
        return str(error)
    number = f"[Errno {error.errno}] " if error.errno is not None else ""
    reason = error.strerror or type(error).__name__
    return f"{number}{reason}: " + " -> ".join(repr(name) for name in names)


def wants_ui_words(p: object) -> bool:
    """Whether the generation ``p`` came from the UI (A1111 marks API requests ``is_api``)."""
    return getattr(p, "is_api", True) is False


def explain_out_of_memory(error: BaseException) -> BaseException:
    """``error`` as a :class:`ResourceError` that says what to change, if it is one of the
    out-of-memory errors (torch's, A1111's "CUDA out of memory" RuntimeErrors, MemoryError)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(error).strip()
    gpu = isinstance(error, oom) or (
        isinstance(error, RuntimeError) and "out of memory" in text.lower()
    )
    if not gpu and not isinstance(error, MemoryError):
        return error
    what = text.splitlines()[0][:200] if text else type(error).__name__
    if gpu:
        msg = (
            f"Negative Image Prompt ran out of GPU memory while preparing the image prompts "
            f"({what}): use fewer images per side, turn off 'Keep the image encoder on the GPU' "
            "and lower 'IP-Adapters and image encoders kept loaded' in Settings > Negative Image "
            "Prompt, or free GPU memory (a smaller batch, --medvram)."
        )
    else:
        msg = (
            f"Negative Image Prompt ran out of memory while preparing the image prompts ({what}): "
            "use fewer or smaller images (the encoder sees 224x224 pixels; a few megapixels are "
            "plenty), and lower 'Encoded images kept in memory' and 'IP-Adapters and image "
            "encoders kept loaded' in Settings > Negative Image Prompt."
        )
    return ResourceError(msg)


class MainThreadErrors:
    """Our refusals shown in the UI of reForge and Forge Classic, not a ``TypeError``.

    Those hosts run each UI generation on their "main thread" (``modules_forge.main_thread``):
    ``run_and_wait_result(func, ...)`` queues a ``Task`` and waits for it, ``Task.work`` calls
    ``func``, and the thread's loop prints an exception and drops it. The waiting call then
    returns None, and the UI shows "TypeError: 'NoneType' object is not iterable" in place of
    the message (the API, which does not go through that thread, answers 422 with it).

    :meth:`install` wraps both functions: a :class:`NegIPError` raised by a task queued
    through ``run_and_wait_result`` is kept and raised again in the waiting thread, where the
    host's ``wrap_gradio_call`` shows it the way A1111 does. Any other exception, any other
    task, and a host whose ``Task.work`` keeps its exceptions itself (Forge) see no change.
    :meth:`remove` puts the host's functions back where ours are still the ones installed.
    """

    def __init__(self) -> None:
        self.failed: dict[int, BaseException] = {}  # id of a waited-for call -> its refusal
        self._host: tuple[Any, Any, Any, Any] | None = None  # module, Task, their run, work
        self._ours: tuple[Any, Any] = (None, None)  # our run_and_wait_result, our Task.work

    @property
    def installed(self) -> bool:
        return self._host is not None

    def install(self, main_thread: Any) -> bool:
        """Wrap ``main_thread``'s functions (once); False where it lacks the expected shape."""
        if self._host is not None:
            return True
        task = getattr(main_thread, "Task", None)
        run = getattr(main_thread, "run_and_wait_result", None)
        work = getattr(task, "work", None)
        if not (callable(run) and callable(work)):
            return False
        failed = self.failed

        def work_keeping_our_errors(self: Any) -> Any:
            try:
                return work(self)
            except NegIPError as error:
                if getattr(self.func, "negip_waiting", False):
                    failed[id(self.func)] = error
                raise

        def run_raising_our_errors(func: Any, *args: Any, **kwargs: Any) -> Any:
            def call(*call_args: Any, **call_kwargs: Any) -> Any:
                return func(*call_args, **call_kwargs)

            call.negip_waiting = True  # type: ignore[attr-defined]
            result = run(call, *args, **kwargs)
            error = failed.pop(id(call), None)
            if error is not None:
                raise error
            return result

        task.work = work_keeping_our_errors
        main_thread.run_and_wait_result = run_raising_our_errors
        self._host = (main_thread, task, run, work)
        self._ours = (run_raising_our_errors, work_keeping_our_errors)
        return True

    def remove(self) -> None:
        if self._host is None:
            return
        main_thread, task, run, work = self._host
        our_run, our_work = self._ours
        if main_thread.run_and_wait_result is our_run:
            main_thread.run_and_wait_result = run
        if task.__dict__.get("work") is our_work:
            task.work = work
        self._host = None
        self._ours = (None, None)
        self.failed.clear()


MAIN_THREAD_ERRORS = MainThreadErrors()
