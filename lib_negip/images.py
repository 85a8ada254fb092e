"""Image prompts from the outside world to CLIP pixel values.

Three steps, each usable alone:

- :func:`decode_image`: bytes, base64 or a data URL to a loaded PIL image, refusing
  decompression bombs before any pixel is decoded;
- :func:`to_rgb`: any PIL mode (alpha, palette, CMYK, 16-bit, float, animated, EXIF-rotated)
  to an 8-bit RGB image;
- :func:`clip_preprocess`: RGB images to normalised CLIP pixel values [B, 3, S, S], equal to
  what transformers' PIL-based ``CLIPImageProcessor`` (the one the IP-Adapter reference uses)
  computes.

Only PIL and numpy at runtime (no torchvision): the extension runs with A1111's pins (Pillow 9.5,
numpy 1.26) as well as current releases.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lib_negip import logger
from lib_negip.errors import ImageError

#: The OpenAI CLIP normalisation that every IP-Adapter image encoder was trained with.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Images above this many pixels are refused before decoding (about 256 MB of RGBA).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# The short side is resized to `size` and the long side follows the aspect ratio, so an extreme
# strip (1 x 60,000) would become a 224 x 13 million intermediate: refuse those instead.
_MAX_RESIZED_PIXELS = 64 * 1024 * 1024

#: The image formats read here, by Pillow's format names. Only formats whose opening reads a
#: header and nothing more: Pillow's EPS plugin hands the file to Ghostscript (a client's
#: PostScript run on the server), and its ICO, CUR and ICNS plugins decode an embedded image
#: before its size can be checked. AVIF counts where a plugin registered it (A1111 does).
ACCEPTED_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "MPO",
    "WEBP",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "PPM",
    "TGA",
    "AVIF",
)
ACCEPTED_FORMAT_WORDS = "PNG, JPEG, WebP, GIF, BMP, TIFF, PPM, TGA or AVIF"

_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _preview(text: str, limit: int = 24) -> str:
    """The start of a possibly huge string, for error messages."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def decode_base64(text: str) -> bytes:
    """Bytes of a base64 string or a ``data:`` URL; line breaks and missing padding allowed."""
    payload = text.strip()
    if payload[:8].lower().startswith(("http://", "https://")):
        msg = (
            f"The image is given as a URL ({_preview(payload, 60)}), but image prompts are not "
            "downloaded. Send the image file's bytes base64-encoded instead."
        )
        raise ImageError(msg)
    if payload[:5].lower() == "data:":
        header, sep, payload = payload.partition(",")
        if not sep:
            msg = (
                f"The image data URL {_preview(header, 40)} has no ',' before its data. Expected "
                "'data:image/png;base64,<base64 data>'."
            )
            raise ImageError(msg)
        if ";base64" not in header.lower():
            msg = (
                f"The image data URL {_preview(header, 40)} is not base64-encoded. Expected "
                "'data:image/png;base64,<base64 data>'."
            )
            raise ImageError(msg)
    shown = payload.lstrip()
    # MIME base64 wraps lines; some clients drop the '=' padding or use the URL-safe alphabet.
    payload = "".join(payload.split())
    if not payload:
        msg = "The image is an empty string. Send the image file's bytes base64-encoded."
        raise ImageError(msg)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    padded = payload + "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as error:
        msg = (
            f"The image is not valid base64 ({error}); found {len(payload)} characters starting "
            f"{_preview(shown)}. Send the image file's bytes base64-encoded, optionally as a "
            "data URL 'data:image/png;base64,...'."
        )
        raise ImageError(msg) from error


@dataclasses.dataclass(frozen=True)
class UnreadableUpload:
    """What the UI hands over for an upload its own decoding could not read: why, in words
    for the user (see :meth:`from_error`)."""

    reason: str

    @classmethod
    def from_error(cls, error: Exception) -> UnreadableUpload:
        if isinstance(error, Image.DecompressionBombError):
            return cls(_too_large(error, DEFAULT_MAX_PIXELS))
        if isinstance(error, UnidentifiedImageError):
            return cls(
                "The uploaded file is not an image file that can be read. Upload a PNG, JPEG "
                "or WebP image."
            )
        return cls(
            "The uploaded picture cannot be read (the file is damaged or incomplete). Save it "
            "again and upload the new file."
        )


def bomb_pixels(error: Exception) -> int:
    """The pixel count Pillow names in its decompression bomb refusal (Pillow's text is the
    only place it is given; a count beyond any limit when the text changes)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found[1]) if found else sys.maxsize


def _too_large(error: Exception, max_pixels: int) -> str:
    """Pillow's decompression bomb refusal, with the one limit that applies here (Pillow's
    text names its own, higher limit)."""
    pixels = bomb_pixels(error)
    size = f" ({pixels:,} pixels)" if pixels != sys.maxsize else ""
    return (
        f"The image is too large to decode safely{size}; at most {max_pixels:,} pixels are "
        "accepted. Send a smaller image (CLIP sees an image prompt at 224x224, and a mask is scaled to the picture's latent grid)."
    )


def accepted_formats() -> list[str]:
    """:data:`ACCEPTED_FORMATS` that this Pillow can open (``Image.open`` fails on a name it
    has no plugin for)."""
    Image.init()
    return [name for name in ACCEPTED_FORMATS if name in Image.OPEN]


def decode_image(data: bytes | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode raw bytes, a base64 string or a data URL into a loaded PIL image.

    Only :data:`ACCEPTED_FORMATS` are opened. The pixel count is checked against
    ``max_pixels`` from the header, before any pixel is decoded; then the image is loaded so
    that a truncated file fails here, not later.
    """
    if isinstance(data, str):
        raw = decode_base64(data)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        msg = f"An image must be bytes, a base64 string or a data URL; found {type(data).__name__}."
        raise ImageError(msg)
    if not raw:
        msg = "The image has zero bytes. Send the content of an image file (PNG, JPEG, WebP, ...)."
        raise ImageError(msg)

    try:
        image = Image.open(io.BytesIO(raw), formats=accepted_formats())
    except Image.DecompressionBombError as error:
        raise ImageError(_too_large(error, max_pixels)) from error
    except UnidentifiedImageError as error:
        msg = (
            f"The data is not an image file of a kind read here: {len(raw)} bytes starting "
            f"{raw[:12]!r}. Send a {ACCEPTED_FORMAT_WORDS} file."
        )
        raise ImageError(msg) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        msg = (
            f"The image file is corrupt ({error}); {len(raw)} bytes starting {raw[:12]!r}. "
            "Save the image again and send the new file."
        )
        raise ImageError(msg) from error

    width, height = image.size
    if width * height > max_pixels:
        msg = (
            f"The image is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} "
            "are accepted. Scale the image down (CLIP sees an image prompt at 224x224, and a mask is scaled to the picture's latent grid)."
        )
        raise ImageError(msg)
    if width < 1 or height < 1:
        msg = f"The image is {width}x{height} pixels; an image needs at least one pixel."
        raise ImageError(msg)

    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageError(_too_large(error, max_pixels)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        msg = (
            f"The {image.format or 'image'} file ({width}x{height}, {len(raw)} bytes) is truncated "
            f"or corrupt: {error}. Save the image again and send the complete file."
        )
        raise ImageError(msg) from error
    return image


def _first_frame(image: Image.Image) -> Image.Image:
    """Frame 0 of an animated image (GIF, APNG, WebP); the image itself otherwise."""
    if getattr(image, "is_animated", False) and image.tell() != 0:
        image.seek(0)
    return image


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: EXIF orientation applied, always a new image."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, AttributeError) as error:
        # A broken EXIF block should not lose the prompt; the pixels themselves are fine.
        # Pillow 9.5 (A1111's) cannot read the EXIF of a loaded multi-page TIFF at all (its
        # file is gone: AttributeError), where later Pillows can.
        logger.warning("Ignoring the unreadable EXIF orientation of an image prompt: %s", error)
        return image.copy()


def _integer_to_l(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer grey image as 8-bit 'L', scaled (not clipped) to 0..255."""
    values = np.asarray(image)  # [H, W]: uint16 or int32
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        # 16-bit data (Pillow opens 16-bit PNGs as 'I' or 'I;16'): 65535 / 257 = 255 exactly.
        # In uint32, 4 bytes per pixel: these can be 64 Mi pixels.
        scaled = values.astype(np.uint32)
        scaled += 128
        scaled //= 257
    else:
        values = values.astype(np.int64)
        # Genuine 32-bit range: no standard white point, so stretch what is there.
        logger.warning(
            "Image prompt of mode %s has values %d..%d; stretching them to 0..255",
            image.mode,
            low,
            high,
        )
        span = max(high - low, 1)
        scaled = ((values - low) * 255 + span // 2) // span
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def _float_to_l(image: Image.Image) -> Image.Image:
    """A float grey image ('F') as 8-bit 'L': 0..1 and 0..255 ranges kept, others stretched."""
    # One float64 copy, then in place (these can be 64 Mi pixels: 512 MB, not several times it).
    values = np.array(image, dtype=np.float64)  # [H, W]
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        values *= 255.0
    elif low >= 0.0 and high <= 255.0:
        pass
    elif low >= 0.0 and high <= 65535.0:
        values /= 257.0
    else:
        span = max(high - low, 1e-12)
        values -= low
        values *= 255.0 / span
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode L


def to_mask(image: Image.Image) -> Image.Image:
    """Any PIL image as an 8-bit "L" mask: its luminance as a viewer shows the image.

    First frame; EXIF orientation applied; transparent pixels count as black (no effect), so
    white strokes on a transparent background mark where a side acts; 16-bit, 32-bit and float
    grey images scaled (not clipped) to 8 bits, as :func:`to_rgb` does.
    """
    image = _apply_exif_orientation(_first_frame(image))
    image = _keyed_grey_as_la(image)
    mode = image.mode
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if mode in _INT_MODES or mode.startswith("I;"):
        return _integer_to_l(image)
    if mode == "F":
        return _float_to_l(image)
    return image.convert("L")


def is_high_depth(mode: str) -> bool:
    """Whether a PIL mode holds grey values of more than 8 bits (16/32-bit integer, float),
    which are scaled to 8 bits here, not clipped."""
    return mode == "F" or mode in _INT_MODES or mode.startswith("I;")


def _keyed_grey_as_la(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image with a transparency key (a PNG's tRNS) as 8-bit
    "LA": the grey scaled as without the key, the key's pixels transparent. Pillow's own
    conversion to RGBA clips such values to 255, so every opaque pixel came out white. Any other
    image is returned as it is."""
    key = image.info.get("transparency")
    if not is_high_depth(image.mode) or isinstance(key, (bytes, tuple)) or key is None:
        return image
    alpha = np.where(np.asarray(image) == key, 0, 255).astype(np.uint8)
    grey = _float_to_l(image) if image.mode == "F" else _integer_to_l(image)
    return Image.merge("LA", (grey, Image.fromarray(alpha)))


def _composite_on_white(image: Image.Image) -> Image.Image:
    """An image with alpha laid over white: transparent areas show as most viewers show them."""
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as the 8-bit RGB image a viewer shows.

    First frame of an animation; EXIF orientation applied; transparency composited onto white
    (what browsers and image viewers show on a light page, and what users mean by "the image";
    black would turn every transparent logo into a dark blob); 16-bit, 32-bit and float grey
    images scaled to 8 bits. Returns a new image; the input is not modified (except that an
    animated image is rewound to its first frame).
    """
    image = _apply_exif_orientation(_first_frame(image))
    image = _keyed_grey_as_la(image)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    if mode in _INT_MODES or mode.startswith("I;"):
        return _integer_to_l(image).convert("RGB")
    if mode == "F":
        return _float_to_l(image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        msg = (
            f"Images of mode {mode} cannot be converted to RGB ({error}). Save the image as an "
            "RGB PNG or JPEG and send that."
        )
        raise ImageError(msg) from error


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side at ``size``; the long side truncated as transformers does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def check_proportions(image: Image.Image, size: int = 224) -> None:
    """Raise :class:`ImageError` for a strip too thin to resize for the image encoder (its short
    side to ``size``, the CLIP encoders' 224 by default)."""
    width, height = image.size
    new_width, new_height = _resized_size(width, height, size)
    if new_width * new_height > _MAX_RESIZED_PIXELS:
        msg = (
            f"The image is {width}x{height}, a strip too thin for CLIP: resizing its short side to "
            f"{size} would make a {new_width}x{new_height} image. Crop it to less extreme "
            "proportions (at most about 1:1000)."
        )
        raise ImageError(msg)


def _resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    """Short side to ``size`` (bicubic), centre crop ``size`` x ``size``: uint8 [size, size, 3]."""
    check_proportions(image, size)
    width, height = image.size
    new_width, new_height = _resized_size(width, height, size)
    resized = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.uint8)  # [H', W', 3]
    # floor division puts the extra pixel of an odd margin on the bottom/right, like transformers
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    return pixels[top : top + size, left : left + size]


def clip_preprocess(
    images: Sequence[Image.Image],
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP pixel values of ``images``: float32 [B, 3, size, size] on the CPU.

    The same arithmetic as transformers' PIL-based ``CLIPImageProcessor``: short side resized
    to ``size`` with PIL bicubic, centre crop, ``x / 255`` (in float64, then float32),
    ``(x - mean) / std`` in float32. Non-RGB images go through :func:`to_rgb` first.
    """
    if len(images) == 0:
        msg = "No images to preprocess: at least one image is needed."
        raise ImageError(msg)
    if size < 1:
        msg = f"The CLIP input size must be a positive number of pixels; found {size}."
        raise ValueError(msg)
    crops = []
    for image in images:
        rgb = image if image.mode == "RGB" and "transparency" not in image.info else to_rgb(image)
        crops.append(_resize_and_crop(rgb, size))
    batch = np.stack(crops)  # [B, size, size, 3] uint8
    scaled = (batch.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    normalised = (scaled - mean32) / std32  # float32: both operands are float32
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))
