"""A1111's ``modules.images``: only the infotext reader the extension calls."""

from __future__ import annotations

from typing import Any


def read_info_from_image(image: Any) -> tuple[str | None, dict]:
    """The PNG text "parameters" (A1111 also reads JPEG/WebP EXIF comments; not needed here)."""
    info = dict(getattr(image, "info", None) or {})
    return info.pop("parameters", None), info
