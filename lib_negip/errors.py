"""The extension's own exception types.

Every message says what was found, what was expected and what the user can do about it.
The A1111 glue turns a :class:`NegIPError` into an HTTP 422 answer / a UI error; it never
swallows one and makes an image without the requested image prompts.
"""

from __future__ import annotations


class NegIPError(Exception):
    """Base class: a request that cannot be honoured, with a message meant for the user.

    ``str(error)`` is the API's wording (field names, ``GET /negip/v1/models``); :attr:`ui` is
    the accordion's (its labels and controls), given where more than the names differ and
    otherwise derived by :func:`lib_negip.wording.for_ui`.
    """

    def __init__(self, message: str = "", *, ui: str | None = None) -> None:
        # Exception's own __init__, not super(): the host mixes this class with FastAPI's
        # HTTPException, whose __init__ takes a status code (see webui/failures.py).
        Exception.__init__(self, message)
        self._ui = ui

    @property
    def ui(self) -> str:
        from lib_negip.wording import for_ui

        return self._ui if self._ui is not None else for_ui(str(self))


class ModelFileError(NegIPError):
    """A model file cannot be read: missing, empty, truncated, corrupt or of an unknown layout."""


class UnsupportedModelError(NegIPError):
    """A readable model of a kind this extension does not run (FaceID, unknown projections)."""


class IncompatibleModelError(NegIPError):
    """Two models that do not fit together (adapter vs encoder, adapter vs checkpoint)."""


class ImageError(NegIPError):
    """An image prompt that cannot be decoded or is unreasonable (empty, bomb-sized, ...)."""


class ArgumentError(NegIPError):
    """An argument value (UI, API or infotext) that is missing, of the wrong type or out of range."""


class ResourceError(NegIPError):
    """Not enough memory (GPU or RAM) for what was asked."""


class ConditioningError(NegIPError):
    """The image tokens appended to the conditioning were changed before they reached the UNet."""


class UnreachedError(NegIPError):
    """The image prompts cannot act: the UNet or its attention never received them.

    Raised instead of letting the host make an image without the requested image prompts (a
    web UI or UNet layout this extension cannot drive, an attention that bypasses its hooks).
    """
