"""The arguments of one generation: one validated, immutable object, whichever way they arrive.

Three sources, one model (:class:`NegIPArgs`):

- the UI's gradio values, positional in :data:`FIELD_ORDER` (A1111 passes them to every
  AlwaysOn script's ``process`` on every generation, enabled or not);
- the HTTP API's ``alwayson_scripts["Negative Image Prompt"]["args"]``: that positional list
  (A1111 fills missing positions with the UI defaults), or a list holding ONE dict of named
  fields at position 0, merged over the positional values at positions 1.. (which A1111 may
  have restored from the request's ``infotext`` field);
- the infotext (PNG Info, "Send to txt2img", the API's ``infotext``): :func:`to_infotext` writes
  the settings under keys starting with "NegIP", :func:`parse_infotext` reads them back typed.

A disabled UI (``enabled`` False in the positional list) is never an error: A1111 calls us on
every generation, and a disabled extension must not break one, so nothing else is looked at and
no image is decoded. A dict from the API is enabled unless it says ``"enabled": false``; a
client that writes one addresses us explicitly, so its named fields are always checked.

Strings are always base64 image data (data URLs accepted), never file names: an API client must
never make the server read a file. Only in-process upload objects (gradio's temp-file wrappers,
which JSON cannot produce) are read from disk.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from lib_negip import images as image_io
from lib_negip import noise as noise_module
from lib_negip.blocks import LayerSpec, parse_layers
from lib_negip.errors import ArgumentError, ImageError
from lib_negip.prompt import Combine, StepWindow
from lib_negip.store import format_references, parse_references

HiresPass = Literal["both", "first", "second"]
NoiseType = Literal["fade", "dissolve", "gaussian", "shuffle"]
Side = Literal["positive", "negative"]

#: The UI's components in this order are the script's positional args (and the API's list form).
FIELD_ORDER: tuple[str, ...] = (
    "enabled",
    "model",
    "image_encoder",
    "positive_images",
    "negative_images",
    "positive_weight",
    "negative_weight",
    "positive_start",
    "positive_end",
    "negative_start",
    "negative_end",
    "hires_pass",
    "combine",
    # Round 2 (appended, so that round 1's positional lists keep their meaning):
    "positive_layers",
    "negative_layers",
    "positive_mask",
    "negative_mask",
    "negative_noise",
    "negative_noise_type",
    "infotext_images",
)

#: Default of every field, in :data:`FIELD_ORDER`; floats stay floats (A1111 converts restored
#: infotext strings with ``type(component.value)``, and ``int("0.5")`` fails).
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "enabled": False,
        "model": "auto",
        "image_encoder": "auto",
        "positive_images": (),
        "negative_images": (),
        "positive_weight": 1.0,
        "negative_weight": 1.0,
        "positive_start": 0.0,
        "positive_end": 1.0,
        "negative_start": 0.0,
        "negative_end": 1.0,
        "hires_pass": "both",
        "combine": "average",
        "positive_layers": "all",
        "negative_layers": "all",
        "positive_mask": None,
        "negative_mask": None,
        "negative_noise": 0.0,
        "negative_noise_type": "fade",
        "infotext_images": "",
    }
)

MAX_IMAGES_PER_SIDE = 16
WEIGHT_MIN, WEIGHT_MAX = -1.0, 5.0
HIRES_PASSES: tuple[str, ...] = get_args(HiresPass)
COMBINES: tuple[str, ...] = get_args(Combine)
NO_MODEL = "None"
AUTO_MODEL = "auto"
AUTO_ENCODER = "auto"
NOISE_TYPES: tuple[str, ...] = get_args(NoiseType)
assert NOISE_TYPES == noise_module.NOISE_TYPES
#: Decoded pixels of all image prompts and masks of one generation together (the encoder sees
#: 224x224 of each image; masks are scaled to the latent): a request beyond it is refused.
MAX_PIXELS_PER_GENERATION = 48 * 1024 * 1024
#: An uploaded file larger than this is refused before it is read (no image prompt needs it).
MAX_UPLOAD_BYTES = 256 * 1024 * 1024

IMAGE_FIELDS: tuple[str, ...] = ("positive_images", "negative_images")
MASK_FIELDS: tuple[str, ...] = ("positive_mask", "negative_mask")
_SIDES: tuple[Side, ...] = ("positive", "negative")

# ---------------------------------------------------------------------------------------------
# Field checks: each names the field, shows the bad value (abbreviated) and the allowed values.


def _show(value: Any, limit: int = 48) -> str:
    """``repr`` of a value, cut short (base64 strings are megabytes), with its type; JSON's
    ``null`` by its JSON name (what a JavaScript client's NaN becomes in JSON.stringify)."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{text} ({type(value).__name__})"


def _check_bool(name: str, value: Any) -> bool:
    # 0/1 and "true" are refused: JSON has booleans, and bool("False") is True.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    msg = f"{name} must be true or false; got {_show(value)}."
    raise ArgumentError(msg)


#: What a number sent as a string is told (an API request; not an infotext, which is all text).
_JSON_NUMBER_HINT = " (send numbers as JSON numbers, not strings)"


def _check_number(name: str, value: Any, low: float, high: float) -> float:
    """A finite real number in [low, high] as a float; ints accepted, bools and strings not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        hint = _JSON_NUMBER_HINT if isinstance(value, str) else ""
        msg = f"{name} must be a number from {low:g} to {high:g}; got {_show(value)}{hint}."
        raise ArgumentError(msg)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range (JSON ints are unbounded)
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        msg = f"{name} must be a finite number from {low:g} to {high:g}; got {number}."
        raise ArgumentError(msg)
    # As the infotext writes it, so that it restores what was sampled: an X/Y/Z axis gives
    # 0.15000000000000002 for 0.15, and a step at exactly 0.15 was out of a window it opened.
    number = _infotext_float(number)  # also -0.0 -> 0.0: the infotext never shows "-0.0"
    if not low <= number <= high:
        msg = f"{name} must be from {low:g} to {high:g}; got {number}."
        raise ArgumentError(msg)
    return number


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    allowed = ", ".join(repr(choice) for choice in choices)
    msg = f"{name} must be one of {allowed}; got {_show(value)}."
    raise ArgumentError(msg)


def _check_model(name: str, value: Any) -> str:
    """A model name or label, stripped; None (a cleared dropdown, JSON null) means no model."""
    if value is None:
        return NO_MODEL
    if not isinstance(value, str):
        msg = (
            f"{name} must be a model name (a string such as 'ip-adapter_sd15'); got {_show(value)}."
        )
        raise ArgumentError(msg)
    text = _short_name(name, value.strip())
    if not text or text.lower() == NO_MODEL.lower():
        return NO_MODEL
    return AUTO_MODEL if text.lower() == AUTO_MODEL else text


#: Longer names are no file's (file systems allow 255 bytes) and are not echoed back whole.
MAX_NAME_LENGTH = 300


def _short_name(name: str, text: str) -> str:
    if len(text) > MAX_NAME_LENGTH:
        msg = (
            f"{name} is {len(text):,} characters long ({_show(text)}); a model name has at most "
            f"{MAX_NAME_LENGTH}: use a name as listed by GET /negip/v1/models."
        )
        raise ArgumentError(msg)
    return text


def _check_encoder(name: str, value: Any) -> str:
    """'auto' or an encoder name or label, stripped; None (not chosen) means 'auto'."""
    if value is None:
        return AUTO_ENCODER
    if not isinstance(value, str):
        msg = f"{name} must be 'auto' or an image encoder name (a string); got {_show(value)}."
        raise ArgumentError(msg)
    text = _short_name(name, value.strip())
    return AUTO_ENCODER if text.lower() == AUTO_ENCODER else text


def _check_references(name: str, value: Any) -> str:
    """Stored image references (see :mod:`lib_negip.store`) and the restored noise seed (see
    :func:`split_noise_seed`) in their canonical text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        msg = f"{name} must be a text of stored image references; got {_show(value)}."
        raise ArgumentError(msg)
    references, noise_seed = split_noise_seed(name, value)
    references, unstored = split_unstored(name, references)
    parsed = parse_references(name, references)
    for side, found in parsed.items():  # counted before any stored image is read
        if len(found) > MAX_IMAGES_PER_SIDE:
            msg = (
                f"{name} names {len(found)} stored images for {side}; at most "
                f"{MAX_IMAGES_PER_SIDE} per side are accepted."
            )
            raise ArgumentError(msg)
    return _with_noise_seed(_with_unstored(format_references(parsed), unstored), noise_seed)


#: The part of ``infotext_images`` that carries a noise negative's seed restored from an
#: infotext: "noise seed: <seed of the noise> for seed <the image's seed>".
NOISE_SEED_PART = "noise seed"
_NOISE_SEED = re.compile(r"^noise seed\s*:\s*(\d{1,20})\s+for seed\s+(\d{1,20})$", re.IGNORECASE)

NoiseSeed = tuple[int, int]  # (seed of the noise, seed of the image it was restored with)


def split_noise_seed(name: str, text: str) -> tuple[str, NoiseSeed | None]:
    """``text`` (an ``infotext_images`` value) without its noise seed part, and that part.

    The noise of a noise negative is seeded with the first seed of its generation, so an image
    after the first of a batch was made with another seed than its own: restored from its
    infotext, the noise seed comes back with the image seed it belongs to, and applies only
    while the generation's seed is still that one (a new seed makes new noise, as always).
    """
    rest, match = _split_part(
        name, text, NOISE_SEED_PART, _NOISE_SEED, f"{NOISE_SEED_PART}: <seed> for seed <seed>"
    )
    return rest, None if match is None else (int(match[1]), int(match[2]))


#: The part of ``infotext_images`` that counts the image prompts of an infotext made with
#: storing off (its "NegIP images"), which the request must give again: "not stored: <n>
#: positive / <m> negative".
UNSTORED_PART = "not stored"
_UNSTORED = re.compile(r"^not stored\s*:\s*(\d{1,4}) positive / (\d{1,4}) negative$", re.IGNORECASE)

ImageCounts = tuple[int, int]  # (positive, negative)


def split_unstored(name: str, text: str) -> tuple[str, ImageCounts | None]:
    """``text`` (an ``infotext_images`` value) without its "not stored" part, and the counts
    that part gives."""
    rest, match = _split_part(
        name, text, UNSTORED_PART, _UNSTORED, f"{UNSTORED_PART}: <n> positive / <m> negative"
    )
    return rest, None if match is None else (int(match[1]), int(match[2]))


def _split_part(
    name: str, text: str, prefix: str, pattern: re.Pattern[str], form: str
) -> tuple[str, re.Match[str] | None]:
    """``text`` without its part that starts with ``prefix``, and that part matched."""
    rest, found = [], None
    for part in text.split(";"):
        words = " ".join(part.split())
        if not words.lower().startswith(prefix):
            rest.append(part)
            continue
        match = pattern.match(words)
        if match is None:
            msg = f"{name}: {words[:60]!r} is not '{form}'."
            raise ArgumentError(msg)
        if found is not None:
            msg = f"{name}: the {prefix} part is named twice; name it once."
            raise ArgumentError(msg)
        found = match
    return ";".join(rest), found


def noise_seed_text(noise_seed: NoiseSeed | None) -> str:
    """The noise seed part of ``infotext_images`` ("" for None)."""
    if noise_seed is None:
        return ""
    return f"{NOISE_SEED_PART}: {noise_seed[0]} for seed {noise_seed[1]}"


def without_stored_references(name: str, text: str) -> str:
    """``text`` (an ``infotext_images`` value) with its noise seed and "not stored" parts only:
    what a UI generation keeps of it, whose stored images are in the file boxes themselves."""
    rest, noise_seed = split_noise_seed(name, text)
    _, unstored = split_unstored(name, rest)
    return _with_noise_seed(_with_unstored("", unstored), noise_seed)


def with_noise_seed(name: str, text: str, noise_seed: NoiseSeed | None) -> str:
    """``text`` (an ``infotext_images`` value) with its noise seed part replaced by
    ``noise_seed``'s (removed for None); its other parts kept."""
    rest, _ = split_noise_seed(name, text)
    return _with_noise_seed(rest.strip(), noise_seed)


def _with_noise_seed(references: str, noise_seed: NoiseSeed | None) -> str:
    part = noise_seed_text(noise_seed)
    return "; ".join(text for text in (references, part) if text)


def _with_unstored(references: str, counts: ImageCounts | None) -> str:
    if counts is None or not any(counts):
        return references
    part = f"{UNSTORED_PART}: {counts[0]} positive / {counts[1]} negative"
    return "; ".join(text for text in (references, part) if text)


def _weight(name: str, value: Any) -> float:
    return _check_number(name, value, WEIGHT_MIN, WEIGHT_MAX)


def _fraction(name: str, value: Any) -> float:
    return _check_number(name, value, 0.0, 1.0)


#: Check and normalise each non-image field; every checker takes (field name, value).
_SCALAR_CHECKS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType(
    {
        "enabled": _check_bool,
        "model": _check_model,
        "image_encoder": _check_encoder,
        "positive_weight": _weight,
        "negative_weight": _weight,
        "positive_start": _fraction,
        "positive_end": _fraction,
        "negative_start": _fraction,
        "negative_end": _fraction,
        "hires_pass": lambda name, value: _check_choice(name, value, HIRES_PASSES),
        "combine": lambda name, value: _check_choice(name, value, COMBINES),
        "positive_layers": lambda name, value: parse_layers(name, value).text(),
        "negative_layers": lambda name, value: parse_layers(name, value).text(),
        "negative_noise": _fraction,
        "negative_noise_type": lambda name, value: _check_choice(name, value, NOISE_TYPES),
        "infotext_images": lambda name, value: _check_references(name, value),
    }
)


def _check_window(side: Side, start: float, end: float) -> None:
    if start > end:
        msg = (
            f"{side}_start ({start}) must not be greater than {side}_end ({end}): the "
            f"{side} image prompt acts from start to end, as fractions 0..1 of the sampling steps."
        )
        raise ArgumentError(msg)


# ---------------------------------------------------------------------------------------------
# The arguments object


@dataclass(frozen=True)
class NegIPArgs:
    """The validated arguments of one generation; the fields are the API's public contract.

    Valid by construction: every field is checked (and numbers turned into floats, images into
    RGB) in ``__post_init__``, so ``dataclasses.replace`` cannot make an invalid object either.
    An enabled object always has a model and at least one image. A disabled one carries no
    settings that matter: parsers return the defaults for it.
    """

    enabled: bool = False
    model: str = AUTO_MODEL
    image_encoder: str = AUTO_ENCODER
    positive_images: tuple[Image.Image, ...] = field(default=(), hash=False, repr=False)
    negative_images: tuple[Image.Image, ...] = field(default=(), hash=False, repr=False)
    positive_weight: float = 1.0
    negative_weight: float = 1.0
    positive_start: float = 0.0
    positive_end: float = 1.0
    negative_start: float = 0.0
    negative_end: float = 1.0
    hires_pass: HiresPass = "both"
    combine: Combine = "average"
    positive_layers: str = "all"
    negative_layers: str = "all"
    positive_mask: Image.Image | None = field(default=None, hash=False, repr=False)
    negative_mask: Image.Image | None = field(default=None, hash=False, repr=False)
    negative_noise: float = 0.0
    negative_noise_type: NoiseType = "fade"
    infotext_images: str = ""

    def __post_init__(self) -> None:
        for name, check in _SCALAR_CHECKS.items():
            object.__setattr__(self, name, check(name, getattr(self, name)))
        for side in _SIDES:
            _check_window(side, getattr(self, f"{side}_start"), getattr(self, f"{side}_end"))
        for name in IMAGE_FIELDS:
            object.__setattr__(self, name, _checked_images(name, getattr(self, name)))
        for name in MASK_FIELDS:
            object.__setattr__(self, name, _checked_mask(name, getattr(self, name)))
        if self.enabled:
            _require_model(self.model, self.image_encoder)
            _require_unstored(self)
            _check_noise(
                self.negative_noise, self.negative_images, self.positive_images, self.references
            )
            _require_images(self.positive_images, self.negative_images, self.references)
            _refuse_unused_side_fields(self)

    def __repr__(self) -> str:
        scalars = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in FIELD_ORDER
            if name not in IMAGE_FIELDS + MASK_FIELDS
        )
        counts = (
            f"positive_images={len(self.positive_images)}, "
            f"negative_images={len(self.negative_images)}, "
            f"masks={[name for name in MASK_FIELDS if getattr(self, name) is not None]}"
        )
        return f"NegIPArgs({scalars}, {counts})"

    @property
    def positive_window(self) -> StepWindow:
        """Where the positive side (cond rows) is active, as fractions of a sampling pass."""
        return StepWindow(self.positive_start, self.positive_end)

    @property
    def negative_window(self) -> StepWindow:
        """Where the negative side (uncond rows) is active, as fractions of a sampling pass."""
        return StepWindow(self.negative_start, self.negative_end)

    @property
    def sides_present(self) -> tuple[Side, ...]:
        """The sides that have images: ('positive',), ('negative',) or both, in that order."""
        return tuple(side for side in _SIDES if getattr(self, f"{side}_images"))

    @property
    def image_counts(self) -> tuple[int, int]:
        """(positive, negative) number of images."""
        return len(self.positive_images), len(self.negative_images)

    @property
    def positive_layer_spec(self) -> LayerSpec:
        return parse_layers("positive_layers", self.positive_layers)

    @property
    def negative_layer_spec(self) -> LayerSpec:
        return parse_layers("negative_layers", self.negative_layers)

    @property
    def references(self) -> dict[str, tuple[str, ...]]:
        """Stored images named by ``infotext_images`` (restored from an infotext), by field."""
        text, _ = split_noise_seed("infotext_images", self.infotext_images)
        text, _ = split_unstored("infotext_images", text)
        return parse_references("infotext_images", text)

    @property
    def unstored_counts(self) -> ImageCounts | None:
        """(positive, negative) image prompts of a restored infotext made with storing off."""
        text, _ = split_noise_seed("infotext_images", self.infotext_images)
        return split_unstored("infotext_images", text)[1]

    @property
    def restored_noise_seed(self) -> NoiseSeed | None:
        """The noise seed restored from an infotext, with the image seed it belongs to."""
        return split_noise_seed("infotext_images", self.infotext_images)[1]

    def as_fields(self) -> dict[str, Any]:
        """Every field by name, in :data:`FIELD_ORDER` (images as tuples of PIL RGB images)."""
        return {name: getattr(self, name) for name in FIELD_ORDER}


def _checked_images(name: str, images: Any) -> tuple[Image.Image, ...]:
    """A side's images as a tuple of RGB images; only PIL images (parsers decode the rest)."""
    if not isinstance(images, (tuple, list)):
        msg = f"{name} must be a tuple of PIL images; got {_show(images)}."
        raise ArgumentError(msg)
    if len(images) > MAX_IMAGES_PER_SIDE:
        msg = (
            f"{name} has {len(images)} images; at most {MAX_IMAGES_PER_SIDE} per side are accepted."
        )
        raise ArgumentError(msg)
    checked = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            msg = f"{name}[{index}] must be a PIL image; got {_show(image)}."
            raise ArgumentError(msg)
        # The parsers already ran to_rgb (which always copies): convert only what is not RGB.
        if image.mode != "RGB" or "transparency" in image.info:
            image = _rgb(f"{name}[{index}]", image)
        checked.append(image)
    return tuple(checked)


def _checked_mask(name: str, mask: Any) -> Image.Image | None:
    if mask is None:
        return None
    if not isinstance(mask, Image.Image):
        msg = f"{name} must be a PIL image or None; got {_show(mask)}."
        raise ArgumentError(msg)
    return _luminance(name, mask)


def _check_noise(
    noise: float,
    negative: Sequence[Any],
    positive: Sequence[Any],
    references: Mapping[str, Sequence[str]],
) -> None:
    if noise <= 0.0:
        return
    if not negative and references.get("negative_images"):
        stored = ", ".join(references["negative_images"])
        kept = format_references(
            {field: refs for field, refs in references.items() if field != "negative_images"}
        )
        msg = (
            f"negative_noise is given, but the request's infotext names stored negative "
            f"image(s) ({stored}), and the noise is the negative side only when it has no "
            f"images. To use the noise, send infotext_images with the infotext's other stored "
            f"images and masks ({kept!r}) or take 'NegIP negative images' out of the infotext; "
            "or set negative_noise to 0."
        )
        raise ArgumentError(
            msg,
            ui="Negative noise makes the negative side when it has no images, but the restored "
            "infotext names stored negative images: remove them from the negative side or set "
            "Negative noise to 0.",
        )
    if negative:
        msg = (
            "negative_noise and negative_images were both given: the noise is the negative side "
            "when it has no images. Remove the negative images or set negative_noise to 0."
        )
        raise ArgumentError(
            msg,
            ui="Negative noise makes the negative side when it has no images, but negative "
            "images were given: remove the negative images or set Negative noise to 0.",
        )
    if not positive and not references.get("positive_images"):
        msg = (
            "negative_noise makes the negative side from the positive images, but "
            "positive_images is empty: give positive images or set negative_noise to 0."
        )
        raise ArgumentError(msg)


def _require_model(model: str, image_encoder: str) -> None:
    """An enabled generation needs an adapter (and an encoder choice, 'auto' by default)."""
    if model == NO_MODEL:
        msg = (
            "model: image prompts are enabled but no IP-Adapter model is chosen ('None', an empty "
            "name or null). Use 'auto' or one of the adapters listed by GET /negip/v1/models, or "
            "set enabled to false."
        )
        raise ArgumentError(
            msg,
            ui="No IP-Adapter is chosen: choose one (or 'auto') in the IP-Adapter dropdown of "
            "Negative Image Prompt, or untick Negative Image Prompt.",
        )
    if not image_encoder:
        msg = (
            "image_encoder is empty. Use 'auto' (an installed encoder that fits the adapter) or a "
            "name listed by GET /negip/v1/models."
        )
        raise ArgumentError(msg)


def _require_unstored(args: NegIPArgs) -> None:
    """A restored infotext made with storing off counts its image prompts but cannot give them
    back: each side it had images for, and whose weight is not 0, must get them again."""
    counts = args.unstored_counts
    if counts is None:
        return
    references = args.references
    missing = [
        (side, count)
        for side, count in zip(_SIDES, counts, strict=True)
        if count
        and getattr(args, f"{side}_weight") != 0.0
        and not getattr(args, f"{side}_images")
        and not references.get(f"{side}_images")
    ]
    if not missing:
        return
    had = " and ".join(f"{count} {side}" for side, count in missing)
    fields = " and ".join(f"{side}_images" for side, _ in missing)
    weights = " and ".join(f"{side}_weight" for side, _ in missing)
    msg = (
        f"The infotext was made with {had} image prompt(s), which were not stored (storing was "
        "off in Settings > Negative Image Prompt), so it cannot give them back: send them in "
        f"{fields}, or set {weights} to 0."
    )
    raise ArgumentError(msg)


def _require_images(
    positive: Sequence[Any],
    negative: Sequence[Any],
    references: Mapping[str, Sequence[str]] | None = None,
) -> None:
    references = references or {}
    if (
        positive
        or negative
        or references.get("positive_images")
        or references.get("negative_images")
    ):
        return
    msg = (
        "positive_images and negative_images are both empty, but image prompts are enabled: "
        "give at least one image on either side, or switch Negative Image Prompt off "
        "(enabled: false)."
    )
    raise ArgumentError(
        msg,
        ui="Negative Image Prompt is on but has no image: drop an image on the positive or the "
        "negative side, or untick Negative Image Prompt.",
    )


def _refuse_unused_side_fields(args: NegIPArgs) -> None:
    """A side without images (nor stored ones, nor a noise negative) follows the other side's
    blocks and mask, as plain IP-Adapter's "no image" side does: blocks or a mask set for it
    would be written to the infotext and restored while changing no pixel, so they are refused.
    Its weight and window are not: the UI always sends them. A side at weight 0 is switched off
    by its user (as the refusals of missing stored images suggest): what it holds is moot."""
    references = args.references
    for side, other in (("positive", "negative"), ("negative", "positive")):
        if getattr(args, f"{side}_images") or references.get(f"{side}_images"):
            continue
        if side == "negative" and args.negative_noise > 0.0:
            continue  # the noise images are the negative side
        if getattr(args, f"{side}_weight") == 0.0:
            continue
        label = side.capitalize()
        follows = f"a side without images follows the {other} side's blocks and mask"
        layers = parse_layers(f"{side}_layers", getattr(args, f"{side}_layers"))
        if not layers.is_all:
            text = layers.text()
            msg = (
                f"{side}_layers is {text!r}, but the {side} side has no images, so it would "
                f"change nothing ({follows}). Give {side} images, set the blocks in "
                f'{other}_layers, or leave {side}_layers out ("all").'
            )
            raise ArgumentError(
                msg,
                ui=f"'{label} blocks' is {text!r}, but there are no {side} images, so it would "
                f"change nothing ({follows}): add {side} images, choose the blocks in "
                f"'{other.capitalize()} blocks', or set '{label} blocks' to all.",
            )
        if getattr(args, f"{side}_mask") is not None or references.get(f"{side}_mask"):
            msg = (
                f"{side}_mask is given, but the {side} side has no images, so it would change "
                f"nothing ({follows}). Give {side} images, put the mask in {other}_mask, or "
                f"leave {side}_mask out."
            )
            raise ArgumentError(
                msg,
                ui=f"'{label} mask' is set, but there are no {side} images, so it would change "
                f"nothing ({follows}): add {side} images, put the mask in "
                f"'{other.capitalize()} mask', or remove it.",
            )


# ---------------------------------------------------------------------------------------------
# Images from the outside world


def _rgb(label: str, image: Image.Image) -> Image.Image:
    """``images.to_rgb`` with the field and index in the message; a strip too thin for the
    image encoder is refused here too, where the message can name it."""
    try:
        rgb = image_io.to_rgb(image)
        image_io.check_proportions(rgb)
        return rgb
    except ImageError as error:
        msg = f"{label}: {error}"
        raise ImageError(msg) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # A lazily opened PIL image decodes only here; a truncated file fails now.
        msg = f"{label}: the image cannot be read ({error}). Save it again and send the new file."
        raise ImageError(msg) from error


def _looks_like_path(text: str) -> bool:
    """Whether a string that failed to decode was probably meant as a file path or URL."""
    stripped = text.strip()
    if stripped.startswith("/9j/"):  # the base64 of every JPEG (FF D8 FF), not a path
        return False
    if stripped[:8].lower().startswith(("http://", "https://")):
        return False  # a URL: decode_image's own message says what to do
    return len(stripped) < 4096 and bool(
        stripped.startswith(("/", "~", "./", "../", "file:"))
        or re.match(r"^[A-Za-z]:[\\/]", stripped)
        or "\\" in stripped
        or re.search(r"\.(png|jpe?g|webp|gif|bmp|tiff?)$", stripped, re.IGNORECASE)
    )


def _decode(label: str, data: str | bytes | bytearray | memoryview) -> Image.Image:
    try:
        return image_io.decode_image(data if isinstance(data, str) else bytes(data))
    except ImageError as error:
        hint = ""
        if isinstance(data, str) and _looks_like_path(data):
            hint = (
                " A string is always read as base64 image data: file paths are never opened. "
                "Send the file's bytes base64-encoded."
            )
        msg = f"{label}: {error}{hint}"
        raise ImageError(msg) from error


def _from_array(label: str, array: np.ndarray) -> Image.Image:
    shape = "x".join(str(size) for size in array.shape)
    if array.dtype != np.uint8:
        msg = f"{label}: a numpy image must have dtype uint8 (0..255); got {array.dtype} of shape {shape}."
        raise ArgumentError(msg)
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        msg = (
            f"{label}: a numpy image must be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA); got shape "
            f"{shape}."
        )
        raise ArgumentError(msg)
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        msg = f"{label}: the numpy image is {shape}; an image needs at least one pixel."
        raise ArgumentError(msg)
    if height * width > image_io.DEFAULT_MAX_PIXELS:
        msg = (
            f"{label}: the numpy image has {height * width:,} pixels; at most "
            f"{image_io.DEFAULT_MAX_PIXELS:,} are accepted."
        )
        raise ImageError(msg)
    # Pillow infers L / RGB / RGBA from a uint8 array's shape (the mode argument is deprecated).
    return Image.fromarray(np.ascontiguousarray(array))


def _is_uploaded_file(item: Any) -> bool:
    """gradio's uploaded files (``tempfile._TemporaryFileWrapper``-like): objects with a ``.name``.

    Strings, bytes and dicts are excluded: those are what JSON can carry, and a client must never
    name a file for us to read. Path objects too: their ``.name`` is only the last component.
    """
    if isinstance(item, (str, bytes, bytearray, memoryview, Mapping, os.PathLike)):
        return False
    return isinstance(getattr(item, "name", None), (str, os.PathLike))


def _read_upload(label: str, upload: Any) -> Image.Image:
    path = os.fspath(upload.name)
    try:
        size = os.path.getsize(path)
        if size > MAX_UPLOAD_BYTES:
            msg = (
                f"{label}: the uploaded file {os.path.basename(path)!r} has {size:,} bytes; at most "
                f"{MAX_UPLOAD_BYTES:,} are accepted."
            )
            raise ImageError(msg)
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        msg = (
            f"{label}: the uploaded file {os.path.basename(path)!r} cannot be read ({error}). "
            "Upload the image again."
        )
        raise ImageError(msg) from error
    return _decode(label, data)


def _parse_image(
    label: str, item: Any, *, rgb: bool = True, budget: _PixelBudget | None = None
) -> Image.Image | None:
    """One image prompt of any accepted form as an RGB image (or as decoded, ``rgb`` False);
    None for an empty gradio dict. Its pixels are taken from ``budget`` before any conversion
    (a 16-bit or float image needs several bytes per pixel while it is converted)."""
    if isinstance(item, Mapping):
        # gradio's sketch/upload value {"image": ..., "mask": ...}; the mask is not used.
        if "image" not in item:
            keys = ", ".join(repr(key)[:40] for key in list(item)[:6])
            msg = (
                f"{label}: a dict image must be gradio's {{'image': ..., 'mask': ...}}; got a dict "
                f"with keys {keys or 'none'}. Files named in a dict are never read: send the image "
                "itself as a base64 string or data URL."
            )
            raise ArgumentError(msg)
        inner = item["image"]
        if inner is None:
            return None
        if isinstance(inner, Mapping):
            msg = f"{label}: the 'image' entry of a gradio image dict must be an image, not a dict."
            raise ArgumentError(msg)
        return _parse_image(label, inner, rgb=rgb, budget=budget)
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, np.ndarray):
        image = _from_array(label, item)
    elif isinstance(item, (str, bytes, bytearray, memoryview)):
        image = _decode(label, item)
    elif _is_uploaded_file(item):
        image = _read_upload(label, item)
    else:
        msg = (
            f"{label}: an image must be a base64 string or data URL (API), a PIL image, a uint8 "
            f"numpy array or a gradio image value; got {_show(item)}."
        )
        raise ArgumentError(msg)
    if budget is not None:
        budget.take(label, image)
    return _rgb(label, image) if rgb else image


class _PixelBudget:
    """The pixels the image prompts of one generation may hold once decoded."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_PIXELS_PER_GENERATION if limit is None else limit
        self.used = 0

    def take(self, label: str, image: Image.Image) -> None:
        self.take_pixels(label, image.width * image.height)

    def give_back(self, image: Image.Image) -> None:
        """Return what :meth:`take` took for ``image`` (an image that turned out unused)."""
        self.used -= image.width * image.height

    def take_pixels(self, label: str, pixels: int) -> None:
        self.used += pixels
        if self.used > self.limit:
            msg = (
                f"{label}: the image prompts of this generation hold {self.used:,} pixels "
                f"together; at most {self.limit:,} are accepted. Send smaller images (the image "
                "encoder sees each at 224x224 pixels; masks are scaled to the latent)."
            )
            raise ImageError(msg)


def stored_images_budget(args: NegIPArgs) -> _PixelBudget:
    """The pixel budget left for stored images after ``args``' own images and masks."""
    budget = _PixelBudget()
    present = [*args.positive_images, *args.negative_images, args.positive_mask, args.negative_mask]
    for image in present:
        if image is not None:
            budget.take("image prompts", image)
    return budget


def _parse_side(
    name: str, value: Any, budget: _PixelBudget | None = None
) -> tuple[Image.Image, ...]:
    """A side's images: a list (or one image, or None) of any accepted form, as RGB images."""
    if value is None:
        return ()
    budget = budget or _PixelBudget()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    present = [(index, item) for index, item in enumerate(items) if item is not None]
    # Count before decoding, so a request with 10,000 images costs nothing.
    if len(present) > MAX_IMAGES_PER_SIDE:
        msg = (
            f"{name} has {len(present)} images; at most {MAX_IMAGES_PER_SIDE} per side are "
            "accepted (with 'average' more add nothing; with 'concat' each adds tokens)."
        )
        raise ArgumentError(msg)
    parsed = []
    for index, item in present:
        image = _parse_image(f"{name}[{index}]", item, budget=budget)
        if image is not None:
            parsed.append(image)
    return tuple(parsed)


def _luminance(label: str, image: Image.Image) -> Image.Image:
    """A mask's values: see :func:`lib_negip.images.to_mask`."""
    try:
        image.load()
        return image_io.to_mask(image)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        msg = f"{label}: the mask cannot be read ({error}). Save it again and send the new file."
        raise ImageError(msg) from error


def _parse_mask(name: str, value: Any, budget: _PixelBudget | None = None) -> Image.Image | None:
    """A side's mask: one image of any accepted form (or gradio's sketch value, whose drawn
    strokes win over the uploaded image), as an "L" image; None for none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, image_io.UnreadableUpload):  # the UI's upload, see ui._tolerant
        msg = f"{name}: {value.reason}"
        raise ImageError(msg)
    if isinstance(value, (list, tuple)):
        msg = f"{name} must be one image (a base64 string or data URL), not a list."
        raise ArgumentError(msg)
    budget = budget or _PixelBudget()
    if isinstance(value, Mapping) and value.get("mask") is not None:
        drawn = _parse_image(f"{name} (drawn)", value["mask"], rgb=False, budget=budget)
        strokes = None if drawn is None else _luminance(name, drawn)
        if strokes is not None and strokes.getbbox() is not None:
            return strokes
        if drawn is not None:
            # Nothing drawn: gradio's blank layer (the picture's size) was charged while it was
            # decoded, and is let go before the picture is, so that it does not count twice.
            budget.give_back(drawn)
            del drawn, strokes
        value = value.get("image")
        if value is None:
            return None
    image = _parse_image(name, value, rgb=False, budget=budget)
    return None if image is None else _luminance(name, image)


# ---------------------------------------------------------------------------------------------
# Parsing the script's args


def _build(raw: Mapping[str, Any]) -> NegIPArgs:
    """An enabled NegIPArgs from raw values of every field: cheap checks first, images last."""
    scalars = {name: check(name, raw[name]) for name, check in _SCALAR_CHECKS.items()}
    for side in _SIDES:
        _check_window(side, scalars[f"{side}_start"], scalars[f"{side}_end"])
    if scalars["enabled"]:
        # Before decoding possibly large images: this answer does not depend on them.
        _require_model(scalars["model"], scalars["image_encoder"])
    budget = _PixelBudget()
    images = {name: _parse_side(name, raw[name], budget) for name in IMAGE_FIELDS}
    masks = {name: _parse_mask(name, raw[name], budget) for name in MASK_FIELDS}
    return NegIPArgs(**scalars, **images, **masks)


def _parse_fields(fields: Mapping[str, Any], base: Mapping[str, Any]) -> NegIPArgs:
    """The API's dict of named fields, merged over ``base`` (raw values by field name)."""
    if not isinstance(fields, Mapping):
        msg = (
            "The dict form of the args must be a JSON object of named fields, e.g. "
            f'[{{"model": "...", "positive_images": ["<base64>"]}}]; got {_show(fields)}.'
        )
        raise ArgumentError(msg)
    unknown = [key for key in fields if key not in FIELD_ORDER]
    if unknown:
        names = ", ".join(repr(key)[:40] for key in unknown[:5])
        msg = f"Unknown field(s) {names}; the fields are: {', '.join(FIELD_ORDER)}."
        raise ArgumentError(msg)
    enabled = _check_bool("enabled", fields.get("enabled", True))
    if not enabled:
        # The client wrote these fields to us: report its mistakes, but decode no image.
        for name, value in fields.items():
            if name in _SCALAR_CHECKS:
                _SCALAR_CHECKS[name](name, value)
        return NegIPArgs()
    for name in IMAGE_FIELDS:
        _refuse_null_images(name, fields.get(name))
    args = _build({**DEFAULTS, **base, **fields, "enabled": True})
    _refuse_empty_over_stored(fields, args)
    return args


def _refuse_empty_over_stored(fields: Mapping[str, Any], args: NegIPArgs) -> None:
    """A side or mask that the dict gives as empty (``[]``, null, "") where the restored
    infotext names stored images for it. The stored ones would be used (as for the positional
    form, whose every position holds a value), so the client's value would change nothing:
    refused with the ways to say what it means. A side whose weight is 0 is not drawn."""
    references = args.references
    for name in (*IMAGE_FIELDS, *MASK_FIELDS):
        side = name.split("_", 1)[0]
        if (
            name not in fields
            or not references.get(name)
            or getattr(args, name) not in (None, ())
            or getattr(args, f"{side}_weight") == 0.0
        ):
            continue
        named = ", ".join(references[name])
        if name in IMAGE_FIELDS:
            msg = (
                f"{name} is empty, but the request's infotext names stored {side} image(s) "
                f"({named}): leave {name} out to use them, send the images to use instead, or "
                f"set {side}_weight to 0 to draw without that side."
            )
        else:
            msg = (
                f"{name} is empty, but the request's infotext names a stored {side} mask "
                f"({named}): leave {name} out to use it, send the mask to use instead, or take "
                f"'NegIP {side} mask' out of the infotext to draw without one."
            )
        raise ArgumentError(msg)


def _refuse_null_images(name: str, value: Any) -> None:
    """A null inside a side's list, as a client writes it: most likely a client's bug (an image
    it failed to read), which would otherwise leave the side short of an image without a word.
    The UI's lists are not checked (gradio leaves empty slots as None)."""
    if not isinstance(value, (list, tuple)):
        return
    for index, item in enumerate(value):
        if item is None:
            msg = (
                f"{name}[{index}] is null: each entry must be an image (a base64 string or data "
                f"URL). Leave the entry out; an empty list means no images on that side."
            )
            raise ArgumentError(msg)


def parse_api_dict(fields: Mapping[str, Any], base: NegIPArgs | None = None) -> NegIPArgs:
    """Arguments from the API's dict of named fields, merged over ``base`` (or the defaults).

    ``enabled`` is True unless the dict says false. Unknown fields, wrong types (a string number,
    a bool for a number), non-finite or out-of-range values raise :class:`ArgumentError` naming
    the field; undecodable images raise :class:`ImageError` naming ``<side>_images[<index>]``.
    With ``"enabled": false`` the named fields are still checked but no image is decoded.
    """
    return _parse_fields(fields, {} if base is None else base.as_fields())


def script_args_enabled(values: Sequence[Any]) -> bool:
    """Whether the script's args switch the extension on, read as :func:`parse_script_args`
    reads them but without checking or decoding anything else (True where the switch itself
    is malformed: the generation refuses it by name)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        return True
    first = values[0] if values else DEFAULTS["enabled"]
    switch = first.get("enabled", True) if isinstance(first, Mapping) else first
    try:
        return _check_bool("enabled", switch)
    except ArgumentError:
        return True


def parse_script_args(values: Sequence[Any]) -> NegIPArgs:
    """Arguments from the script's positional args (the UI's values, or the API's ``args``).

    ``values`` follow :data:`FIELD_ORDER` and may be shorter (missing positions take
    :data:`DEFAULTS`). If position 0 holds a dict, it is the API's named-field form, merged
    over the positional values at positions 1.. (A1111's defaults or values it restored from
    the request's infotext). With ``enabled`` False in the positional form nothing else is
    checked and the defaults are returned: a disabled extension never fails a generation.
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        msg = (
            "The script's args must be a list: the UI's values in the order "
            f"{', '.join(FIELD_ORDER)}, or a list holding one dict of named fields; got "
            f"{_show(values)}."
        )
        raise ArgumentError(msg)
    if len(values) > 1 and all(isinstance(value, str) and len(value) == 1 for value in values[:2]):
        # "args": "text" in an API request: A1111 puts a text's characters where the values go.
        msg = (
            "The script's args must be a list, not a text (A1111 put its characters, "
            f"{_show(''.join(v for v in values if isinstance(v, str) and len(v) == 1))}, one "
            'per value): send [{"model": "...", "positive_images": ["<base64>"], ...}], or the '
            f"values in the order {', '.join(FIELD_ORDER)}."
        )
        raise ArgumentError(msg)
    if values and isinstance(values[0], str) and values[0].strip()[:1] in ("{", "["):
        msg = (
            "The script's args hold a text where the dict of named fields belongs "
            f"({_show(values[0])}): send the dict itself, not its JSON text: "
            '[{"model": "...", "positive_images": ["<base64>"], ...}].'
        )
        raise ArgumentError(msg)
    if len(values) > len(FIELD_ORDER):
        msg = (
            f"The script's args have {len(values)} values; at most {len(FIELD_ORDER)} are "
            f"accepted, in the order {', '.join(FIELD_ORDER)} (or one dict of named fields)."
        )
        raise ArgumentError(msg)
    if values and isinstance(values[0], Mapping):
        stray = [
            name
            for name, value in zip(FIELD_ORDER[1:], values[1:], strict=False)
            if isinstance(value, Mapping) and name not in (*IMAGE_FIELDS, *MASK_FIELDS)
        ]
        if stray:  # a dict where a number or a name belongs: the client sent a second dict
            msg = (
                "The script's args hold more than one dict: send one dict of named fields, "
                '[{"model": "...", "positive_images": ["<base64>"], ...}], and nothing after it.'
            )
            raise ArgumentError(msg)
        base = dict(zip(FIELD_ORDER[1:], values[1:], strict=False))
        return _parse_fields(values[0], base)
    raw = dict(zip(FIELD_ORDER, values, strict=False))
    if not _check_bool("enabled", raw.get("enabled", DEFAULTS["enabled"])):
        return NegIPArgs()
    return _build({**DEFAULTS, **raw})


# ---------------------------------------------------------------------------------------------
# Infotext

#: Infotext key -> field, in the order written. One key per field, so A1111's own restore (string
#: keys, converted with the component's value type: float() for sliders, str for dropdowns and
#: radios) gives the right values. ``enabled`` has no key: any NegIP key means enabled, and A1111
#: would turn "False" into True; its checkbox restores through a callable (``ui.infotext_switch``).
INFOTEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("NegIP model", "model"),
    ("NegIP encoder", "image_encoder"),
    ("NegIP positive weight", "positive_weight"),
    ("NegIP positive start", "positive_start"),
    ("NegIP positive end", "positive_end"),
    ("NegIP negative weight", "negative_weight"),
    ("NegIP negative start", "negative_start"),
    ("NegIP negative end", "negative_end"),
    ("NegIP hires pass", "hires_pass"),
    ("NegIP combine", "combine"),
    ("NegIP positive layers", "positive_layers"),
    ("NegIP negative layers", "negative_layers"),
    ("NegIP negative noise", "negative_noise"),
    ("NegIP noise type", "negative_noise_type"),
)
#: The stored image prompts by reference (see :mod:`lib_negip.store`): key -> the part of the
#: ``infotext_images`` field it restores.
INFOTEXT_REFERENCES: tuple[tuple[str, str], ...] = (
    ("NegIP positive images", "positive_images"),
    ("NegIP negative images", "negative_images"),
    ("NegIP positive mask", "positive_mask"),
    ("NegIP negative mask", "negative_mask"),
)
#: Informational, where the images are not stored (the setting is off): "<n> positive / <m>
#: negative". The value must never look like "<int>x<int>": A1111 splits such values into
#: "<key>-1"/"<key>-2".
INFOTEXT_IMAGES = "NegIP images"
#: Read but never written: lets a hand-written infotext (e.g. the API's) turn the prompts off.
INFOTEXT_ENABLED = "NegIP enabled"
#: The seed of a noise negative: the generation's first seed (see :func:`split_noise_seed`).
INFOTEXT_NOISE_SEED = "NegIP noise seed"
INFOTEXT_PREFIX = "NegIP"
_KNOWN_INFOTEXT_KEYS = frozenset(
    [key for key, _ in (*INFOTEXT_FIELDS, *INFOTEXT_REFERENCES)]
    + [INFOTEXT_IMAGES, INFOTEXT_ENABLED, INFOTEXT_NOISE_SEED]
)

_IMAGE_COUNTS = re.compile(r"^\s*(\d+) positive / (\d+) negative\s*$")
_LABEL_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9A-Fa-f]{4,64})\]$")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def is_infotext_key(key: Any) -> bool:
    """Whether ``key`` is one of this extension's infotext keys ("NegIP ...")."""
    return isinstance(key, str) and (
        key == INFOTEXT_PREFIX or key.startswith(f"{INFOTEXT_PREFIX} ")
    )


def names_our_key(key: Any) -> bool:
    """Whether ``key`` is spelled as one of our infotext keys in any letter case ("negip
    model"): a hand-edited key that A1111 would pass over without a word, so that it is refused
    with the unknown ones instead."""
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    prefix = INFOTEXT_PREFIX.lower()
    return lowered == prefix or lowered.startswith(f"{prefix} ")


def _infotext_float(value: float) -> float:
    # Slider values carry binary noise (0.15000000000000002); 10 decimals keep every real value.
    return round(value, 10) + 0.0


def _label(name: str, label: Any) -> str:
    if not isinstance(label, str) or not label.strip():
        msg = f"{name} must be a non-empty string for the infotext; got {_show(label)}."
        raise ArgumentError(msg)
    return label.strip()


def to_infotext(
    args: NegIPArgs,
    model_label: str,
    encoder_label: str,
    references: Mapping[str, Sequence[str]] | None = None,
    *,
    noise_seed: int | None = None,
) -> dict[str, str | float]:
    """The generation parameters to add to ``p.extra_generation_params``; empty when disabled.

    ``model_label``/``encoder_label`` name the files actually used (e.g. "name [hash]"; the
    adapter and the encoder that 'auto' picked). Values are raw: A1111's ``create_infotext``
    quotes those with a comma, colon or newline itself. ``references``: the stored images by
    field (see :mod:`lib_negip.store`); without them only the number of images per side.
    ``noise_seed``: the seed of a noise negative (written only when there is one).
    """
    if not args.enabled:
        return {}
    info: dict[str, str | float] = {
        "NegIP model": _label("model_label", model_label),
        "NegIP encoder": _label("encoder_label", encoder_label),
    }
    if references is None:
        positive, negative = args.image_counts
        info[INFOTEXT_IMAGES] = f"{positive} positive / {negative} negative"
    else:
        for key, name in INFOTEXT_REFERENCES:
            if references.get(name):
                info[key] = " ".join(references[name])
    info |= {
        "NegIP positive weight": _infotext_float(args.positive_weight),
        "NegIP positive start": _infotext_float(args.positive_start),
        "NegIP positive end": _infotext_float(args.positive_end),
        "NegIP negative weight": _infotext_float(args.negative_weight),
        "NegIP negative start": _infotext_float(args.negative_start),
        "NegIP negative end": _infotext_float(args.negative_end),
        "NegIP hires pass": args.hires_pass,
        "NegIP combine": args.combine,
        "NegIP positive layers": args.positive_layers,
        "NegIP negative layers": args.negative_layers,
        "NegIP negative noise": _infotext_float(args.negative_noise),
        "NegIP noise type": args.negative_noise_type,
    }
    if args.negative_noise > 0.0 and noise_seed is not None:
        info[INFOTEXT_NOISE_SEED] = noise_seed
    return info


def _infotext_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    msg = f"Infotext {key!r} must be True or False; got {_show(value)}."
    raise ArgumentError(msg)


def _infotext_number(key: str, name: str, value: Any) -> float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = value  # reported below, with the allowed range
    try:
        return _SCALAR_CHECKS[name](name, number)
    except ArgumentError as error:
        msg = f"Infotext {key!r}: {str(error).replace(_JSON_NUMBER_HINT, '')}"
        raise ArgumentError(msg) from error


def restore_model_label(label: str) -> str:
    """What the model (or encoder) dropdown accepts for a restored infotext label.

    The label is kept as written ("name [hash]" stays so; the model registry resolves it, by
    hash first); only surrounding spaces go, and an empty label means no model.
    """
    text = label.strip() if isinstance(label, str) else ""
    return text or NO_MODEL


def split_model_label(label: str) -> tuple[str, str | None]:
    """("name", "hash") of a "name [hash]" label (hash lower-case hex); ("name", None) without one."""
    text = label.strip()
    match = _LABEL_HASH.match(text)
    if match is None or not match["name"]:
        return text, None
    return match["name"], match["hash"].lower()


def parse_infotext(params: Mapping[str, Any]) -> dict[str, Any]:
    """Typed field values from A1111's parsed infotext (``parse_generation_parameters``).

    Keys that are not ours are ignored; without any "NegIP" key the result is empty. A present
    NegIP key means ``enabled`` True (unless "NegIP enabled" says otherwise). Numbers and booleans
    are converted here, not by ``type(value)(text)``: ``bool("False")`` is True. Fields whose key
    is absent are left out, except ``infotext_images``, always present ("" without stored
    images), so that restoring an infotext clears the references of an earlier one. A malformed
    value raises :class:`ArgumentError` naming its key.
    """
    if not any(names_our_key(key) for key in params):
        return {}
    unknown = [key for key in params if names_our_key(key) and key not in _KNOWN_INFOTEXT_KEYS]
    split = [str(key)[:-2] for key in unknown if re.fullmatch(r".+-[12]", str(key))]
    split = [key for key in split if key in _KNOWN_INFOTEXT_KEYS]
    if split:
        # A1111 reads a value of the form "<int>x<int>" as two keys, "<key>-1" and "<key>-2".
        msg = (
            f"Infotext {split[0]!r} holds a value of the form '<number>x<number>', which is not "
            "one of its values (A1111 reads it as two). Correct the value in the infotext."
        )
        raise ArgumentError(msg)
    if unknown:
        # A newer version's setting (or a typo): restored without it, the image would differ.
        names = ", ".join(repr(str(key)[:60]) for key in unknown[:3])
        spelled = {" ".join(key.lower().split()): key for key in _KNOWN_INFOTEXT_KEYS}
        meant = [spelled.get(" ".join(str(key).lower().split())) for key in unknown[:3]]
        hint = "; ".join(f"the key is {key!r}" for key in meant if key)
        msg = (
            f"Infotext {names}: not a Negative Image Prompt value this version knows (a newer "
            f"version's, or a typo{': ' + hint if hint else ''}), so the image it describes "
            "cannot be made again here. Update the extension, or take the value out of the "
            "infotext."
        )
        raise ArgumentError(msg)
    result: dict[str, Any] = {"enabled": infotext_enabled(params)}
    for key, name in INFOTEXT_FIELDS:
        if key not in params:
            continue
        value = params[key]
        if name in ("model", "image_encoder"):
            if not isinstance(value, str):
                msg = f"Infotext {key!r} must be a name; got {_show(value)}."
                raise ArgumentError(msg)
            text = _short_name(f"Infotext {key!r}", restore_model_label(value))
            result[name] = AUTO_ENCODER if name == "image_encoder" and text == NO_MODEL else text
        elif name in (
            "hires_pass",
            "combine",
            "negative_noise_type",
            "positive_layers",
            "negative_layers",
        ):
            choice = value.strip() if isinstance(value, str) else value
            try:
                result[name] = _SCALAR_CHECKS[name](name, choice)
            except ArgumentError as error:
                msg = f"Infotext {key!r}: {error}"
                raise ArgumentError(msg) from error
        else:
            result[name] = _infotext_number(key, name, value)
    result["infotext_images"] = infotext_hidden_text(params)
    return result


def infotext_hidden_text(params: Mapping[str, Any]) -> str:
    """The ``infotext_images`` value an infotext restores: its stored images' references, and
    its noise seed with the image's own seed ("Seed"); raises :class:`ArgumentError` for a
    malformed value."""
    references = _with_unstored(
        format_references(infotext_references(params)), infotext_image_counts(params)
    )
    return _with_noise_seed(references, infotext_noise_seed(params))


def infotext_noise_seed(params: Mapping[str, Any]) -> NoiseSeed | None:
    """(the noise seed, the seed of the image it belongs to) of an infotext; None without
    either. Raises :class:`ArgumentError` for a malformed value."""
    if params.get(INFOTEXT_NOISE_SEED) is None:
        return None
    noise = _infotext_seed(INFOTEXT_NOISE_SEED, params[INFOTEXT_NOISE_SEED])
    if params.get("Seed") is None:
        return None
    return noise, _image_seed(params["Seed"])


def _image_seed(value: Any) -> int:
    """The infotext's "Seed" as the noise seed's key compares it: A1111 keeps a negative seed
    other than -1 as given and writes it so ("Seed: -5"), while the noise is seeded with its
    64-bit two's complement, as the generation's own seed is taken."""
    text = str(value).strip()
    negative = text.startswith("-")
    seed = _infotext_seed("Seed", text[1:] if negative else text, shown=value)
    return (-seed if negative else seed) & 0xFFFF_FFFF_FFFF_FFFF


def _infotext_seed(key: str, value: Any, *, shown: Any = None) -> int:
    text = str(value).strip()
    if not text.isdigit() or len(text) > 20:
        what = "a whole number" if key == "Seed" else "a whole number of at least 0"
        msg = f"Infotext {key!r} must be {what}; got {_show(value if shown is None else shown)}."
        raise ArgumentError(msg)
    return int(text)


def infotext_references(params: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The stored images an infotext names, by field (empty without any)."""
    parts = {}
    for key, name in INFOTEXT_REFERENCES:
        value = params.get(key)
        if isinstance(value, str) and value.strip():
            label = name.replace("_", " ")
            parts[name] = parse_references(key, f"{label}: {value}")[name]
    return parts


def infotext_enabled(params: Mapping[str, Any]) -> bool:
    """Whether an infotext was made with image prompts: the target for the enabled checkbox.

    A callable, not the string key, because A1111 converts a string with ``bool(text)``.
    """
    if INFOTEXT_ENABLED in params:
        return _infotext_bool(INFOTEXT_ENABLED, params[INFOTEXT_ENABLED])
    return any(is_infotext_key(key) for key in params)


def infotext_image_counts(params: Mapping[str, Any]) -> tuple[int, int] | None:
    """(positive, negative) image counts from the infotext, or None when absent. A malformed
    value raises :class:`ArgumentError`: read as absent, the sides it counts would be left out
    of the restored request without a word."""
    value = params.get(INFOTEXT_IMAGES)
    if value is None:
        return None
    match = _IMAGE_COUNTS.match(value) if isinstance(value, str) else None
    if match is None:
        msg = (
            f"Infotext {INFOTEXT_IMAGES!r} must read '<n> positive / <m> negative'; got "
            f"{_show(value)}."
        )
        raise ArgumentError(msg)
    return int(match[1]), int(match[2])
