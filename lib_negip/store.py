"""Image prompts stored by content, so that a result's infotext can bring them back.

Each image prompt (and mask) a generation uses is written once as a PNG named by its content
reference: the first 16 hex digits of :func:`lib_negip.cache.image_digest` of the pixels the
encoder saw (RGB images, masks in "L"). PNG is lossless, so the stored file decodes to the same
pixels, the same reference and, with the same seed, the same image bit for bit. Writes go to a
temporary name in the same folder and are renamed into place: a reader never sees half a file,
and two generations storing the same image write one file.

The infotext names images by reference (``"NegIP positive images": "ab12... 34cd..."``);
:func:`parse_references` reads the combined form the host restores them through.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from PIL import Image

from lib_negip.cache import image_digest
from lib_negip.errors import ArgumentError, ImageError
from lib_negip.images import DEFAULT_MAX_PIXELS, bomb_pixels

REFERENCE_LENGTH = 16
_REFERENCE = re.compile(rf"^[0-9a-f]{{{REFERENCE_LENGTH}}}$")

#: The parts of a combined reference text, in order: field name -> its label in the text.
PARTS: Mapping[str, str] = {
    "positive_images": "positive images",
    "negative_images": "negative images",
    "positive_mask": "positive mask",
    "negative_mask": "negative mask",
}
_MASKS = ("positive_mask", "negative_mask")
#: The most pixels a stored file may hold to be decoded when checked (as an uploaded image).
MAX_STORED_PIXELS = DEFAULT_MAX_PIXELS


def reference_of(image: Image.Image) -> str:
    """The content reference of an image (RGB image prompt or "L" mask)."""
    return image_digest(image)[:REFERENCE_LENGTH]


def check_reference(label: str, reference: str) -> str:
    text = reference.strip().lower()
    if not _REFERENCE.match(text):
        msg = (
            f"{label}: {reference[:40]!r} is not a stored image reference ({REFERENCE_LENGTH} hex "
            "digits, as the infotext writes them)."
        )
        raise ArgumentError(msg)
    return text


def format_references(references: Mapping[str, Iterable[str]]) -> str:
    """``{"positive_images": [...], ...}`` as one text: "positive images: a b; negative mask: c"."""
    unknown = set(references) - set(PARTS)
    if unknown:
        msg = f"unknown reference fields {sorted(unknown)}; expected {list(PARTS)}"
        raise ValueError(msg)
    parts = []
    for field, label in PARTS.items():
        refs = list(references.get(field, ()))
        if refs:
            parts.append(f"{label}: {' '.join(refs)}")
    return "; ".join(parts)


def parse_references(name: str, text: str) -> dict[str, tuple[str, ...]]:
    """The references of a combined text (see :func:`format_references`); empty for ""."""
    labels = {label: field for field, label in PARTS.items()}
    found: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (chunk.strip() for chunk in text.split(";"))):
        label, colon, refs = part.partition(":")
        field = labels.get(" ".join(label.lower().split()))
        if not colon or field is None:
            msg = (
                f"{name}: {part[:60]!r} is not '<part>: <references>' with part one of "
                f"{', '.join(repr(label) for label in PARTS.values())}."
            )
            raise ArgumentError(msg)
        checked = tuple(check_reference(name, ref) for ref in refs.split())
        if field in found:
            msg = f"{name}: {PARTS[field]} is named twice; name each part once."
            raise ArgumentError(msg)
        if not checked:
            msg = f"{name}: {PARTS[field]} names no image; leave the part out instead."
            raise ArgumentError(msg)
        if field in _MASKS and len(checked) > 1:
            msg = f"{name}: {PARTS[field]} names {len(checked)} images; a mask is one image."
            raise ArgumentError(msg)
        found[field] = checked
    return found


#: Stored files known to be intact, with their (size, mtime): a generation does not decode its
#: stored image prompts again to check them, unless the file changed.
_verified: dict[Path, tuple[int, int] | None] = {}


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns) if path.is_file() else None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


class ImageStore:
    """The folder of stored image prompts."""

    def __init__(self, folder: Path, shown_as: str | None = None) -> None:
        self.folder = Path(folder)
        # How messages name the folder: API answers never hold the server's absolute paths.
        self.shown_as = shown_as or self.folder.name

    def path_of(self, reference: str) -> Path:
        return self.folder / f"{check_reference('reference', reference)}.png"

    def save(self, image: Image.Image) -> str:
        """Store ``image`` (RGB or "L"; once) and return its reference. A stored file that no
        longer holds the image (damaged, edited) is written again."""
        if image.mode not in ("RGB", "L"):
            msg = f"only RGB image prompts and L masks are stored, not {image.mode}"
            raise ValueError(msg)
        reference = reference_of(image)
        path = self.folder / f"{reference}.png"
        stat = _stat(path)
        if stat is not None:
            known = _verified.get(path)
            if known == stat:
                return reference
            try:
                self.load(reference, mask=image.mode == "L")
            except ImageError:
                pass  # damaged or edited: written again below
            else:
                _verified[path] = stat
                return reference
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".negip-", suffix=".png", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as file:
                image.save(file, format="PNG")
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from others
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _verified[path] = _stat(path)
        return reference

    def pixels(self, reference: str) -> int:
        """The stored image's pixel count, from its header (nothing decoded); 0 when it cannot
        be read (:meth:`load` then says why)."""
        try:
            with Image.open(self.path_of(reference), formats=["PNG"]) as opened:
                return opened.width * opened.height
        except Image.DecompressionBombError as error:  # more than Pillow opens at all
            return bomb_pixels(error)
        except (OSError, SyntaxError, ValueError):
            return 0

    def unusable(self, reference: str, *, mask: bool = False) -> str | None:
        """Why the stored file of ``reference`` cannot give its image back (missing, unreadable,
        too large, changed: :meth:`load`'s message), or None when it can. A file checked
        before and unchanged since is not decoded again."""
        path = self.path_of(reference)
        stat = _stat(path)
        if stat is not None and _verified.get(path) == stat:
            return None
        pixels = self.pixels(reference)
        if pixels > MAX_STORED_PIXELS:
            return (
                f"The stored image prompt {reference} in {self.shown_as} has {pixels:,} pixels; "
                f"at most {MAX_STORED_PIXELS:,} are accepted: add the image again."
            )
        try:
            self.load(reference, mask=mask)
        except ImageError as error:
            return str(error)
        _verified[path] = stat
        return None

    def load(self, reference: str, *, mask: bool = False) -> Image.Image:
        """The stored image of ``reference`` (RGB, or "L" for a mask), checked against it."""
        reference = check_reference("reference", reference)
        path = self.path_of(reference)
        mode = "L" if mask else "RGB"
        try:
            with Image.open(path, formats=["PNG"]) as opened:
                image = opened.convert(mode) if opened.mode != mode else opened.copy()
        except Image.DecompressionBombError as error:
            msg = (
                f"The stored image prompt {reference} in {self.shown_as} cannot be read (it "
                f"has {bomb_pixels(error):,} pixels, too many to decode safely): add the image "
                "again."
            )
            raise ImageError(msg) from None
        except FileNotFoundError:
            msg = (
                f"The stored image prompt {reference} is not in the image prompt folder "
                f"({self.shown_as}): it was deleted or the infotext comes from another "
                "installation. Add the image again, or put its file back."
            )
            raise ImageError(msg) from None
        except (OSError, SyntaxError, ValueError) as error:
            # Not the error's text: it holds the file's absolute path.
            reason = getattr(error, "strerror", None) or type(error).__name__
            msg = (
                f"The stored image prompt {reference} in {self.shown_as} cannot be read "
                f"({reason}): add the image again."
            )
            raise ImageError(msg) from error
        if reference_of(image) != reference:
            msg = (
                f"The stored image prompt {reference} in {self.shown_as} does not hold the "
                "image of that reference (the file was changed): add the image again."
            )
            raise ImageError(msg)
        return image
