"""A1111's ``modules.infotext_utils``: the key/value part of ``parse_generation_parameters``
(the last line of an infotext; prompts and quoting rules left out), written from its
behaviour for the stand-in."""

from __future__ import annotations

import re

_PARAM = re.compile(r'\s*(\w[\w /-]+):\s*("(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')


def parse_generation_parameters(text: str, skip_fields: list | None = None) -> dict[str, str]:
    *_, last = text.strip().split("\n") if text.strip() else [""]
    return {key: value for key, value in _PARAM.findall(last) if value}
