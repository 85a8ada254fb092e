"""One refusal, two audiences: the API's words and the UI's words.

Every :class:`~lib_negip.errors.NegIPError` message is written for API clients: it names the
fields of the request (``positive_weight``), the models listing (``GET /negip/v1/models``) and
``enabled``. A user of the txt2img/img2img tab has none of those; :func:`for_ui` says the same
in the words of the accordion (the slider's label, the dropdown, the switch). A message may
carry its own UI wording (``NegIPError(message, ui=...)``) where more than the names differs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

#: Field -> the label of its control in the accordion.
FIELD_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "positive_images": "Positive images",
        "negative_images": "Negative images",
        "positive_weight": "Positive weight",
        "negative_weight": "Negative weight",
        "positive_start": "Positive start",
        "positive_end": "Positive end",
        "negative_start": "Negative start",
        "negative_end": "Negative end",
        "positive_layers": "Positive blocks",
        "negative_layers": "Negative blocks",
        "positive_mask": "Positive mask",
        "negative_mask": "Negative mask",
        "negative_noise_type": "Noise type",
        "negative_noise": "Negative noise",
        "image_encoder": "Image encoder",
        "hires_pass": "Hires. fix pass",
        "combine": "Several images per side",
        "infotext_images": "the image prompts of the pasted infotext",
        "model": "IP-Adapter",
        "enabled": "the Negative Image Prompt switch",
    }
)

#: API phrases -> UI phrases, applied before the field names (longest first where they nest).
_PHRASES: tuple[tuple[str, str], ...] = (
    (r"\s*\(enabled: false\)", ""),
    (r"\bor set enabled to false\b", "or untick Negative Image Prompt"),
    (r"\bset enabled to false\b", "untick Negative Image Prompt"),
    (r"\bswitch Negative Image Prompt off\b", "untick Negative Image Prompt"),
    (r"\bSwitch Negative Image Prompt off\b", "Untick Negative Image Prompt"),
    (r"\bone of the adapters listed by GET /negip/v1/models\b", "an IP-Adapter in the dropdown"),
    (r"\b(?:a )?name listed by GET /negip/v1/models\b", "an encoder in the dropdown"),
    (
        r"\blisted by GET /negip/v1/models\b",
        "in the dropdown (press the refresh button after adding files)",
    ),
    (r"\bGET /negip/v1/models\b", "the dropdown (press the refresh button after adding files)"),
    (r"\bthe ones listed by the dropdown\b", "the ones in the dropdown"),
    # each dropdown has its own refresh button
    (
        r"(models/clip_vision\S*)[:;] the next request finds it\b",
        r"\1 and press the refresh button beside 'Image encoder'",
    ),
    (r": the next request finds it\b", " and press the refresh button beside 'IP-Adapter'"),
    (
        r"\s*Send the (?:image )?file's bytes base64-encoded(?:, optionally as a data URL "
        r"'data:image/png;base64,\.\.\.')?\.",
        " Upload the image again (PNG, JPEG or WebP).",
    ),
    # what to do with an image, in the accordion's words: it is uploaded there, not sent
    (r"\bSend the content of an image file\b", "Upload an image file"),
    (r"\bsend them in (?=(?:positive|negative)_images\b)", "add them to "),
    (r"\bSend (?=(?:a|an|smaller)\b)", "Use "),
    (r"\bsend (?=(?:the new file|the complete file|that)\b)", "upload "),
    (r"\(send numbers as JSON numbers, not strings\)", ""),
    (r"\bas JSON numbers\b", ""),
)

_INDEXED = re.compile(r"\b(positive|negative)_images\[(\d+)\]")
# Python class names carried over from a cause ("(RuntimeError: PytorchStreamReader failed ...)"):
# the UI keeps the cause's words, not its class.
_CLASS_PREFIX = re.compile(r"\b[A-Z]\w*(?:Error|Exception|Warning): ")
_BARE_CLASS = {
    "OutOfMemoryError": "out of GPU memory",
    "MemoryError": "out of memory",
}
_BARE_CLASS_NAME = re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b")


_SNAKE_FIELDS = sorted((name for name in FIELD_LABELS if "_" in name), key=len, reverse=True)
# snake_case names are unambiguous anywhere; "model", "combine" and "enabled" are also plain
# words, replaced only where they name the field ("model: ...", "combine must be ...").
# (not in a path: h94's folder "models/image_encoder" is no field)
_FIELDS = re.compile(r"(?<![\w'\"/])(" + "|".join(map(re.escape, _SNAKE_FIELDS)) + r")(?![\w'\"/])")
_WORD_FIELDS = re.compile(r"(?:^|(?<=[.;]\s))(model|combine|enabled)(?=:| must\b| is\b)")


def for_ui(message: str) -> str:
    """``message`` (written for API clients) in the words of the accordion."""
    text = message
    for pattern, replacement in _PHRASES:
        text = re.sub(pattern, replacement, text)
    text = _INDEXED.sub(lambda m: f"{m[1]} image {int(m[2]) + 1}", text)
    text = _CLASS_PREFIX.sub("", text)
    text = _BARE_CLASS_NAME.sub(lambda m: _BARE_CLASS.get(m[0], "an internal error"), text)
    text = _FIELDS.sub(lambda m: f"'{FIELD_LABELS[m[1]]}'", text)
    text = _WORD_FIELDS.sub(lambda m: f"'{FIELD_LABELS[m[1]]}'", text)
    # A space the rewriting left before a stop or a comma goes; one before a word such as
    # ".safetensors" or an ellipsis stays.
    text = re.sub(r"\s+([.,;:])(?=\s|$)", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def without_echoes(message: str) -> str:
    """``message`` without the quoted values it echoes back (a client's own input may hold any
    words): what :data:`UI_FORBIDDEN` is checked against."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "''", message)


#: What a UI message must not contain: the API's field names, its routes, Python class names.
UI_FORBIDDEN = re.compile(
    r"\b(?:" + "|".join(map(re.escape, _SNAKE_FIELDS)) + r")\b|GET /|/negip/v1|"
    r"\b\w+Error\b|\bNegIPArgs\b|\bTraceback\b|\bJSON\b"
)
