"""lib_negip.store: image prompts stored by content reference, and the reference texts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import png_header

from lib_negip.errors import ArgumentError, ImageError
from lib_negip.store import (
    REFERENCE_LENGTH,
    ImageStore,
    check_reference,
    format_references,
    parse_references,
    reference_of,
)

SHOWN = "outputs/negip-images"
REF_A = "0123456789abcdef"
REF_B = "fedcba9876543210"
REF_M = "00112233445566ff"


def pattern_image(mode: str = "RGB", size: tuple[int, int] = (7, 5)) -> Image.Image:
    """An image whose every pixel differs from its neighbours (so a lossy round trip shows)."""
    rng = np.random.default_rng(3)
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def expected_reference(image: Image.Image) -> str:
    """The documented reference, computed here: sha256 of "mode:WxH:" + the raw pixels, 16 hex."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:16]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "srv-private-root" / "outputs" / "negip-images"


@pytest.fixture
def store(folder: Path) -> ImageStore:
    return ImageStore(folder, shown_as=SHOWN)


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- references ------------------------------------------------------------------------------------


def test_reference_of() -> None:
    image = pattern_image()
    reference = reference_of(image)
    assert REFERENCE_LENGTH == 16
    assert reference == expected_reference(image)
    assert len(reference) == 16
    assert set(reference) <= set("0123456789abcdef")
    # Same pixels, other object: same reference; other pixels, other mode or size: other.
    assert reference_of(image.copy()) == reference
    changed = image.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    assert reference_of(changed) != reference
    assert reference_of(image.convert("L")) != reference
    grey = Image.new("L", (4, 6), 9)
    assert reference_of(grey) != reference_of(Image.new("L", (6, 4), 9))
    assert reference_of(grey) == expected_reference(grey)


# --- save and load -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "mask"),
    [pytest.param("RGB", False, id="rgb-image"), pytest.param("L", True, id="l-mask")],
)
def test_round_trip(store: ImageStore, folder: Path, mode: str, mask: bool) -> None:
    image = pattern_image(mode)
    reference = store.save(image)
    assert reference == expected_reference(image)
    assert files_in(folder) == [f"{reference}.png"]
    assert store.path_of(reference) == folder / f"{reference}.png"
    # A PNG, lossless.
    with Image.open(folder / f"{reference}.png") as written:
        assert written.format == "PNG"
    loaded = store.load(reference, mask=mask)
    assert loaded.mode == mode
    assert loaded.size == image.size
    assert np.array_equal(np.asarray(loaded), np.asarray(image))
    assert reference_of(loaded) == reference


def test_mask_loaded_as_image_is_refused_as_changed(store: ImageStore) -> None:
    """An "L" mask's reference is of its "L" pixels: loaded as RGB, it is not that image."""
    reference = store.save(pattern_image("L"))
    with pytest.raises(ImageError, match=reference):
        store.load(reference)


def test_saving_twice_writes_one_file(store: ImageStore, folder: Path) -> None:
    image = pattern_image()
    first = store.save(image)
    path = folder / f"{first}.png"
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    second = store.save(image.copy())
    assert second == first
    assert files_in(folder) == [f"{first}.png"]  # and no temporary file left
    assert path.stat().st_mtime_ns == stamp - 10**9  # not written again
    other = store.save(pattern_image("L"))
    assert files_in(folder) == sorted([f"{first}.png", f"{other}.png"])


def test_failed_save_leaves_no_temporary_file(
    store: ImageStore, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.save(pattern_image())
    real_save = Image.Image.save

    def half_written(self: Image.Image, fp, *args, **kwargs) -> None:
        fp.write(b"\x89PNG half a file")
        msg = "No space left on device"
        raise OSError(28, msg)

    monkeypatch.setattr(Image.Image, "save", half_written)
    other = Image.new("RGB", (3, 3), (9, 8, 7))
    with pytest.raises(OSError, match="No space left"):
        store.save(other)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert files_in(folder) == [f"{reference_of(pattern_image())}.png"]


def test_only_rgb_and_l_images_are_stored(store: ImageStore) -> None:
    with pytest.raises(ValueError, match="not CMYK"):
        store.save(Image.new("CMYK", (3, 3), (1, 2, 3, 4)))


def test_folder_created_on_first_save(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    store = ImageStore(folder)
    assert not folder.exists()
    reference = store.save(pattern_image())
    assert (folder / f"{reference}.png").is_file()
    assert store.shown_as == "b"  # without shown_as, only the folder's own name


def _assert_names_only(error: ImageError, reference: str, folder: Path) -> None:
    message = str(error)
    assert reference in message, message
    assert SHOWN in message, message
    assert str(folder) not in message, message
    assert str(folder.parent) not in message, message
    assert "srv-private-root" not in message, message  # no part of the absolute path


def test_missing_file(store: ImageStore, folder: Path) -> None:
    store.save(pattern_image("L"))  # the folder exists, the file does not
    with pytest.raises(ImageError) as caught:
        store.load(REF_A)
    _assert_names_only(caught.value, REF_A, folder)
    assert "not in the image prompt folder" in str(caught.value)


def test_missing_folder(store: ImageStore, folder: Path) -> None:
    with pytest.raises(ImageError) as caught:
        store.load(REF_B, mask=True)
    _assert_names_only(caught.value, REF_B, folder)


def test_changed_file(store: ImageStore, folder: Path) -> None:
    """A valid PNG under the name of another image's reference."""
    image = pattern_image()
    reference = store.save(image)
    other = image.copy()
    other.putpixel((3, 2), (0, 0, 0))
    other.save(folder / f"{reference}.png", format="PNG")
    with pytest.raises(ImageError) as caught:
        store.load(reference)
    _assert_names_only(caught.value, reference, folder)
    assert "changed" in str(caught.value)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a png at all")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _bomb(path: Path) -> None:
    """A PNG header claiming 100000x100000 pixels: Pillow refuses to open it at all."""
    path.write_bytes(png_header(100_000, 100_000))


def _too_large(path: Path) -> None:
    """A PNG header claiming 9000x9000 pixels: more than a stored file may hold."""
    path.write_bytes(png_header(9000, 9000))


UNREADABLE = [
    pytest.param(_garbage, id="garbage"),
    pytest.param(_truncated, id="truncated"),
    pytest.param(_directory, id="directory"),
    pytest.param(_bomb, id="decompression-bomb"),
]


@pytest.mark.parametrize("spoil", UNREADABLE)
def test_unreadable_file_is_an_image_error(store: ImageStore, folder: Path, spoil) -> None:
    reference = store.save(pattern_image())
    spoil(folder / f"{reference}.png")
    with pytest.raises(ImageError) as caught:
        store.load(reference)
    message = str(caught.value)
    assert reference in message
    assert SHOWN in message


@pytest.mark.parametrize("spoil", UNREADABLE)
def test_unreadable_file_message_has_no_absolute_path(
    store: ImageStore, folder: Path, spoil
) -> None:
    reference = store.save(pattern_image())
    spoil(folder / f"{reference}.png")
    with pytest.raises(ImageError) as caught:
        store.load(reference)
    _assert_names_only(caught.value, reference, folder)


def test_a_bomb_is_counted_from_its_header(store: ImageStore, folder: Path) -> None:
    reference = store.save(pattern_image())
    _bomb(folder / f"{reference}.png")
    assert store.pixels(reference) == 10**10  # not 0: the pixel budget refuses it
    assert "10,000,000,000 pixels" in store.unusable(reference)


@pytest.mark.parametrize(
    "spoil",
    [*UNREADABLE, pytest.param(_too_large, id="too-large"), pytest.param(None, id="changed")],
)
def test_unusable_says_why_as_load_does(store: ImageStore, folder: Path, spoil) -> None:
    image = pattern_image()
    reference = store.save(image)
    path = folder / f"{reference}.png"
    if spoil is None:
        pattern_image(size=(5, 7)).save(path)
    else:
        spoil(path)
    why = store.unusable(reference)
    assert why is not None
    assert reference in why
    assert SHOWN in why
    assert str(folder) not in why
    if spoil is _too_large:
        assert "81,000,000 pixels; at most 67,108,864" in why
    if path.is_file():
        store.save(image)  # stored again
        assert store.unusable(reference) is None


def test_unusable_decodes_an_unchanged_file_once(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = store.save(pattern_image())
    assert store.unusable(reference) is None  # known intact since it was saved
    loads = []
    monkeypatch.setattr(ImageStore, "load", lambda *a, **k: loads.append(a))
    assert store.unusable(reference) is None
    assert loads == []


def test_saving_again_repairs_a_spoilt_file(store: ImageStore, folder: Path) -> None:
    image = pattern_image()
    reference = store.save(image)
    _garbage(folder / f"{reference}.png")
    assert store.save(image) == reference
    assert np.array_equal(np.asarray(store.load(reference)), np.asarray(image))


def test_load_accepts_an_upper_case_reference(store: ImageStore) -> None:
    image = pattern_image()
    reference = store.save(image)
    assert np.array_equal(np.asarray(store.load(reference.upper())), np.asarray(image))


@pytest.mark.parametrize("reference", ["", "xyz", REF_A[:-1], REF_A + "0", "../" + REF_A[3:]])
def test_load_refuses_what_is_not_a_reference(
    store: ImageStore, folder: Path, reference: str
) -> None:
    with pytest.raises(ArgumentError, match="not a stored image reference"):
        store.load(reference)
    assert not folder.exists()


# --- reference texts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", {}, id="empty"),
        pytest.param(" ; ; ", {}, id="separators-only"),
        pytest.param(
            f"positive images: {REF_A} {REF_B}; negative mask: {REF_M}",
            {"positive_images": (REF_A, REF_B), "negative_mask": (REF_M,)},
            id="canonical",
        ),
        pytest.param(
            f"NEGATIVE   images:{REF_B.upper()};positive Mask : {REF_M} ",
            {"negative_images": (REF_B,), "positive_mask": (REF_M,)},
            id="case-and-spaces",
        ),
        pytest.param(
            f"negative mask: {REF_M}; negative images: {REF_A}; positive images: {REF_B}",
            {"negative_mask": (REF_M,), "negative_images": (REF_A,), "positive_images": (REF_B,)},
            id="any-order",
        ),
        pytest.param(
            f"positive images: {REF_A} {REF_A}",
            {"positive_images": (REF_A, REF_A)},
            id="same-image-twice-kept",
        ),
    ],
)
def test_parse_references(text: str, expected: dict[str, tuple[str, ...]]) -> None:
    assert parse_references("infotext_images", text) == expected


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        pytest.param(
            f"positive images: {REF_A[:-1]}g", [f"'{REF_A[:-1]}g'", "16 hex"], id="bad-hex"
        ),
        pytest.param(
            f"positive images: {REF_A[:-1]}", [f"'{REF_A[:-1]}'", "16 hex"], id="too-short"
        ),
        pytest.param(f"negative images: {REF_A}ab", [f"'{REF_A}ab'", "16 hex"], id="too-long"),
        pytest.param(f"positive images: {REF_A},{REF_B}", ["16 hex"], id="comma-separated"),
        pytest.param(
            f"side images: {REF_A}",
            [
                "'side images: ",
                "'positive images', 'negative images', 'positive mask', 'negative mask'",
            ],
            id="unknown-part",
        ),
        pytest.param(
            f"positive images {REF_A}",
            ["'positive images ", "'<part>: <references>'"],
            id="no-colon",
        ),
        pytest.param(f"{REF_A}", [f"'{REF_A}'"], id="bare-reference"),
        pytest.param(
            f"negative mask: {REF_A} {REF_B}",
            ["negative mask names 2 images", "a mask is one image"],
            id="mask-two",
        ),
        pytest.param(
            f"positive mask: {REF_A} {REF_B} {REF_M}",
            ["positive mask names 3 images"],
            id="mask-three",
        ),
    ],
)
def test_parse_references_errors(text: str, patterns: list[str]) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_references("NegIP stored", text)
    message = str(caught.value)
    assert message.startswith("NegIP stored: "), message
    for pattern in patterns:
        assert pattern in message, (pattern, message)


def test_parse_references_refuses_a_part_named_twice() -> None:
    with pytest.raises(ArgumentError):
        parse_references("f", f"positive images: {REF_A}; positive images: {REF_B}")


def test_format_references() -> None:
    assert format_references({}) == ""
    assert format_references({"positive_images": []}) == ""
    assert (
        format_references(
            {
                "negative_mask": [REF_M],
                "positive_images": (REF_A, REF_B),
                "negative_images": [],
                "positive_mask": iter([REF_B]),
            }
        )
        == f"positive images: {REF_A} {REF_B}; positive mask: {REF_B}; negative mask: {REF_M}"
    )
    # Its output parses back to the same references.
    text = f"positive images: {REF_A}; negative images: {REF_B} {REF_A}; negative mask: {REF_M}"
    assert format_references(parse_references("f", text)) == text


@pytest.mark.parametrize(
    ("written", "canonical"),
    [(REF_A, REF_A), (f"  {REF_B.upper()} ", REF_B), ("00112233445566FF", REF_M)],
)
def test_check_reference(written: str, canonical: str) -> None:
    assert check_reference("label", written) == canonical


@pytest.mark.parametrize(
    "written", ["", "0x0123456789abcd", "0123456789abcde", "g" * 16, REF_A * 2]
)
def test_check_reference_errors(written: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        check_reference("NegIP positive images", written)
    message = str(caught.value)
    assert message.startswith("NegIP positive images: "), message
    assert repr(written[:40]) in message
    assert "16 hex digits" in message
