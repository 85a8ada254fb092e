"""A1111's checkpoint list, as far as the extension reads it: a name or title to its file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointInfo:
    filename: str
    short_title: str


#: title or name -> CheckpointInfo, as A1111's ``checkpoint_aliases``
checkpoint_aliases: dict[str, CheckpointInfo] = {}


def get_closet_checkpoint_match(search_string: str) -> CheckpointInfo | None:
    return checkpoint_aliases.get(search_string)
