"""lib_negip.images: decoding, every PIL mode to RGB, and CLIP preprocessing equal to transformers.

The preprocessing reference is transformers' PIL-based CLIP image processor (``CLIPImageProcessor``
up to transformers 4.x, the one the IP-Adapter reference and A1111's pin use;
``CLIPImageProcessorPil`` in transformers 5, where ``CLIPImageProcessor`` resizes with torchvision
instead). With A1111's pins transformers does not import; the golden hashes, recorded from
transformers and checked against it in the normal run, cover that run.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from lib_negip.errors import ImageError
from lib_negip.images import (
    CLIP_MEAN,
    CLIP_STD,
    UnreadableUpload,
    clip_preprocess,
    decode_image,
    to_mask,
    to_rgb,
)

A1111_PINS = os.environ.get("NEGIP_A1111_PINS") == "1"


def png_bytes(image: Image.Image, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pattern(width: int, height: int) -> Image.Image:
    """A deterministic RGB test image with detail at every scale (no RNG: stable everywhere)."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [(x * 37 + y * 91) % 256, (x * y + 3 * x) % 256, ((x ^ y) * 29 + 7) % 256]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))


# --- decode_image -----------------------------------------------------------------------------


@pytest.fixture
def small_png() -> bytes:
    image = Image.new("RGB", (5, 3), (10, 20, 30))
    image.putpixel((4, 2), (200, 100, 0))
    return png_bytes(image)


def _assert_small(image: Image.Image) -> None:
    assert image.size == (5, 3)
    assert pixel(image, (0, 0)) == (10, 20, 30)
    assert pixel(image, (4, 2)) == (200, 100, 0)


def test_decode_raw_bytes(small_png: bytes) -> None:
    _assert_small(decode_image(small_png))
    _assert_small(decode_image(bytearray(small_png)))
    _assert_small(decode_image(memoryview(small_png)))


def test_decode_base64_forms(small_png: bytes) -> None:
    text = base64.b64encode(small_png).decode()
    _assert_small(decode_image(text))
    _assert_small(decode_image(f"data:image/png;base64,{text}"))
    _assert_small(decode_image(f"  DATA:image/png;BASE64,{text}\n"))
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    _assert_small(decode_image(wrapped))
    _assert_small(decode_image(text.rstrip("=")))  # padding dropped by some clients
    urlsafe = base64.urlsafe_b64encode(small_png).decode()
    _assert_small(decode_image(urlsafe))
    # the data URL's media type is not trusted: the bytes decide
    _assert_small(decode_image(f"data:application/octet-stream;base64,{text}"))


def test_decode_invalid_base64() -> None:
    with pytest.raises(
        ImageError, match=r"not valid base64.*starting 'this is not base64!'"
    ) as info:
        decode_image("this is not base64!")
    assert "data:image/png;base64" in str(info.value)  # says what to send instead
    with pytest.raises(ImageError, match="not valid base64"):
        decode_image("abcde")  # 5 characters: no padding can fix that


def test_decode_zero_bytes_and_empty_strings() -> None:
    with pytest.raises(ImageError, match="zero bytes"):
        decode_image(b"")
    with pytest.raises(ImageError, match="empty string"):
        decode_image("")
    with pytest.raises(ImageError, match="empty string"):
        decode_image("data:image/png;base64,")


def test_decode_bad_data_urls_and_urls() -> None:
    with pytest.raises(ImageError, match="not base64-encoded"):
        decode_image("data:image/png,rawdata")
    with pytest.raises(ImageError, match="no ','"):
        decode_image("data:image/png;base64")
    with pytest.raises(ImageError, match=r"URL.*not downloaded"):
        decode_image("https://example.com/cat.png")


def test_decode_wrong_type() -> None:
    with pytest.raises(ImageError, match="found int"):
        decode_image(42)  # type: ignore[arg-type]


def test_decode_non_image_bytes() -> None:
    with pytest.raises(ImageError, match=r"not an image file.*11 bytes starting b'hello world'"):
        decode_image(b"hello world")
    text = base64.b64encode(b"%PDF-1.4 not an image").decode()
    with pytest.raises(ImageError, match=r"read here: 21 bytes starting b'%PDF-1.4 not'"):
        decode_image(text)


def test_decode_never_hands_postscript_to_ghostscript(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Pillow's EPS plugin runs Ghostscript on the file; a client's PostScript must never reach
    # it. A "gs" on PATH that would leave a mark if it were run.
    mark = tmp_path / "gs-ran"
    gs = tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    with pytest.raises(ImageError, match=r"not an image file of a kind read here.*PNG, JPEG"):
        decode_image(eps)
    assert not mark.exists()


def test_decode_refuses_an_icon_before_decoding_the_picture_inside() -> None:
    # An ICO entry may hold a whole PNG, which Pillow's ICO plugin decodes while opening, before
    # any size can be checked: icons are not read at all.
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="ICO", sizes=[(64, 64)])
    with pytest.raises(ImageError, match="not an image file of a kind read here"):
        decode_image(buffer.getvalue())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA"])
def test_decode_reads_the_common_formats(fmt: str) -> None:
    image = pattern(16, 8).convert("RGB")
    decoded = decode_image(encode(image, fmt))
    assert decoded.size == (16, 8)
    assert decoded.format == fmt


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_truncated_file(fmt: str) -> None:
    data = encode(pattern(64, 64), fmt)
    with pytest.raises(ImageError, match=rf"{fmt} file \(64x64, \d+ bytes\) is truncated"):
        decode_image(data[: len(data) * 2 // 3])


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose pixel data is broken."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x78\x9c\x00")


def test_decode_refuses_large_images_before_decoding() -> None:
    # 70 megapixels (below Pillow's own warning threshold): the pixel data is broken, so
    # decoding it first would report truncation instead of the size
    with pytest.raises(ImageError, match=r"10000x7000 = 70,000,000 pixels; at most 67,108,864"):
        decode_image(png_header(10000, 7000))
    with pytest.raises(ImageError, match=r"200x100 = 20,000 pixels; at most 19,999"):
        decode_image(png_bytes(Image.new("L", (200, 100))), max_pixels=19_999)
    assert decode_image(png_bytes(Image.new("L", (200, 100))), max_pixels=20_000).size == (200, 100)


def test_decode_pillow_decompression_bomb_error() -> None:
    # 10^10 pixels: Pillow itself raises DecompressionBombError while opening. The message
    # names our limit only (Pillow's text named its own, 178,956,970 pixels, beside it).
    with pytest.raises(ImageError) as caught:
        decode_image(png_header(100_000, 100_000))
    assert str(caught.value) == (
        "The image is too large to decode safely (10,000,000,000 pixels); at most 67,108,864 "
        "pixels are accepted. Send a smaller image (CLIP sees an image prompt at 224x224, and a mask is scaled to the picture's latent grid)."
    )


# --- to_rgb -------------------------------------------------------------------------------------


def test_rgb_passes_through() -> None:
    image = pattern(7, 5)
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_rgba_composited_on_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # transparent black
    image.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in pixel(out, (2, 0)))
    assert image.mode == "RGBA"  # the input is not modified


def test_la_composited_on_white() -> None:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))
    image.putpixel((1, 0), (50, 255))
    out = to_rgb(image)
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (50, 50, 50)


def test_palette_with_transparency_composited_on_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    for candidate in (
        image,
        decode_image(png_bytes(image, transparency=0)),
        decode_image(encode(image, "GIF", transparency=0)),
    ):
        out = to_rgb(candidate)
        assert pixel(out, (0, 0)) == (255, 255, 255)
        assert pixel(out, (1, 0)) == (255, 0, 0)


def test_palette_without_transparency() -> None:
    image = Image.new("P", (1, 1))
    image.putpalette([0, 0, 0, 0, 200, 100] + [0] * 762)
    image.putpixel((0, 0), 1)
    assert pixel(to_rgb(image), (0, 0)) == (0, 200, 100)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_colour_key_transparency(mode: str) -> None:
    key: Any = (10, 20, 30) if mode == "RGB" else 10
    image = Image.new(mode, (2, 1), key)
    image.putpixel((1, 0), (40, 40, 40) if mode == "RGB" else 40)
    decoded = decode_image(png_bytes(image, transparency=key))
    out = to_rgb(decoded)
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (40, 40, 40)


def test_cmyk_and_ycbcr() -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    out = to_rgb(cmyk)
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (0, 255, 255)
    ycbcr = pattern(4, 3).convert("YCbCr")
    assert np.array_equal(np.asarray(to_rgb(ycbcr)), np.asarray(ycbcr.convert("RGB")))


def test_grey_and_bilevel() -> None:
    assert pixel(to_rgb(Image.new("L", (1, 1), 77)), (0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    out = to_rgb(bilevel)
    assert pixel(out, (0, 0)) == (0, 0, 0)
    assert pixel(out, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B"])
def test_16_bit_scaled_not_clipped(mode: str) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=">u2" if mode == "I;16B" else "<u2")
    image = Image.frombytes(mode, (4, 1), values.tobytes())
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_16_bit_png_round_trip() -> None:
    """Pillow 9.5 opens 16-bit grey PNGs as 'I', Pillow 13 as 'I;16': both scale."""
    values = np.array([[0, 65535, 1000]], dtype="<u2")
    data = png_bytes(Image.frombytes("I;16", (3, 1), values.tobytes()))
    decoded = decode_image(data)
    assert decoded.mode in ("I", "I;16")
    out = to_rgb(decoded)
    assert [pixel(out, (x, 0))[0] for x in range(3)] == [0, 255, 4]


def test_16_bit_png_with_a_transparency_key_scales_and_keys() -> None:
    """A 16-bit grey PNG with a tRNS key: Pillow's conversion to RGBA clips its values, so
    every opaque pixel came out white (a white image prompt, a mask at full strength
    everywhere; probe AG). The grey scales as without the key; the key's pixels are
    transparent: white in an image prompt, black (no effect) in a mask."""
    values = np.array([[0, 16384, 32768, 65535]], dtype="<u2")
    # As Pillow 13 opens such a PNG ('I;16'); Pillow 9.5 opens it as 'I' (and cannot write one).
    decoded = Image.frombytes("I;16", (4, 1), values.tobytes())
    if not A1111_PINS:
        buffer = io.BytesIO()
        decoded.save(buffer, "PNG", transparency=0)
        decoded = decode_image(buffer.getvalue())
    else:
        decoded = Image.fromarray(values.astype(np.int32))  # mode 'I'
        decoded.info["transparency"] = 0
    assert decoded.info["transparency"] == 0
    assert [pixel(to_rgb(decoded), (x, 0)) for x in range(4)] == [
        (255, 255, 255),
        (64, 64, 64),
        (128, 128, 128),
        (255, 255, 255),
    ]
    assert [to_mask(decoded).getpixel((x, 0)) for x in range(4)] == [0, 64, 128, 255]


def test_32_bit_integer_modes() -> None:
    sixteen_bit = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert [pixel(to_rgb(sixteen_bit), (x, 0))[0] for x in range(2)] == [0, 255]
    full_range = Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32))
    out = to_rgb(full_range)
    assert [pixel(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_mode() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [pixel(to_rgb(unit), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert [pixel(to_rgb(bytes_range), (x, 0))[0] for x in range(3)] == [0, 100, 255]


@pytest.mark.parametrize(
    "mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr", "I;16", "I", "F"]
)
def test_one_pixel_images(mode: str) -> None:
    out = to_rgb(Image.new(mode, (1, 1)))
    assert (out.mode, out.size) == ("RGB", (1, 1))
    assert clip_preprocess([out]).shape == (1, 3, 224, 224)


def _exif_image(orientation: int, fmt: str) -> Image.Image:
    """3 wide x 2 high, red at the top-left, the rest black, with an EXIF orientation."""
    image = Image.new("RGB", (3, 2))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"lossless": True} if fmt == "WEBP" else {}
    return decode_image(encode(image, fmt, exif=exif.tobytes(), **params))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_applied(fmt: str) -> None:
    rotated = to_rgb(_exif_image(6, fmt))  # 6: rotate 90 degrees clockwise to display
    assert rotated.size == (2, 3)
    assert pixel(rotated, (1, 0)) == (255, 0, 0)  # top-left went to the top-right corner
    assert pixel(rotated, (0, 0)) == (0, 0, 0)
    upside_down = to_rgb(_exif_image(3, fmt))  # 3: rotate 180 degrees
    assert upside_down.size == (3, 2)
    assert pixel(upside_down, (2, 1)) == (255, 0, 0)
    assert pixel(to_rgb(_exif_image(1, fmt)), (0, 0)) == (255, 0, 0)  # 1: as stored


def test_exif_orientation_of_a_jpeg() -> None:
    image = Image.new("RGB", (32, 16))
    image.paste((255, 0, 0), (0, 0, 16, 8))  # red block at the top-left
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    out = to_rgb(decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95)))
    assert out.size == (16, 32)
    red, green, blue = pixel(out, (4, 28))  # top-left block went to the bottom-left corner
    assert red > 200
    assert max(green, blue) < 60
    assert max(pixel(out, (12, 4))) < 60


def test_animated_gif_takes_the_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(data)
    assert getattr(image, "n_frames", 1) == 2
    image.seek(1)  # as a UI might leave it
    assert pixel(to_rgb(image), (2, 2)) == (255, 0, 0)


def test_animated_png_takes_the_first_frame() -> None:
    frames = [Image.new("RGBA", (4, 4), colour) for colour in ((0, 255, 0, 255), (0, 0, 255, 255))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    image = decode_image(data)
    image.seek(1)
    assert pixel(to_rgb(image), (0, 0)) == (0, 255, 0)


def test_a_multi_page_tiff_takes_the_first_page() -> None:
    # Under A1111's Pillow 9.5 reading its EXIF failed with an AttributeError, which reached
    # the user as an internal error.
    pages = [
        Image.fromarray(np.full((4, 6, 3), colour, dtype=np.uint8))
        for colour in ((0, 255, 0), (0, 0, 255))
    ]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    rgb = to_rgb(decode_image(data))  # (asking for n_frames first hid the failure)
    assert rgb.size == (6, 4)
    assert pixel(rgb, (0, 0)) == (0, 255, 0)
    assert Image.open(io.BytesIO(data)).n_frames == 2


# --- clip_preprocess ----------------------------------------------------------------------------


def _transformers_processor(size: int) -> Any:
    if A1111_PINS:
        pytest.skip(
            "transformers 5 does not import beside A1111's pinned safetensors 0.4.2; the golden "
            "hashes (test_golden_hashes) cover this run"
        )
    import transformers

    # transformers 5 renamed the PIL implementation; its CLIPImageProcessor uses torchvision
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


SIZES = [
    (1, 1, 224),
    (3, 500, 224),
    (500, 3, 224),
    (224, 224, 224),
    (225, 223, 224),
    (223, 225, 224),
    (640, 480, 224),
    (301, 907, 224),
    (97, 41, 56),
    (41, 97, 57),
    (123, 77, 17),
    (1000, 10, 56),
    (400, 300, 336),
]


@pytest.mark.parametrize(("width", "height", "size"), SIZES)
def test_matches_transformers_clip_processor(width: int, height: int, size: int) -> None:
    processor = _transformers_processor(size)
    image = pattern(width, height)
    expected = processor(images=[image], return_tensors="pt").pixel_values
    got = clip_preprocess([image], size=size)
    assert got.shape == expected.shape == (1, 3, size, size)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6


def test_batch_matches_transformers() -> None:
    processor = _transformers_processor(224)
    images = [pattern(300, 200), pattern(50, 90), pattern(224, 224)]
    expected = processor(images=images, return_tensors="pt").pixel_values
    assert (clip_preprocess(images) - expected).abs().max().item() <= 1e-6


GOLDEN = {  # sha256 of the float32 output bytes, recorded from transformers' PIL processor
    (97, 61, 56): "97f59e763acfb3b7aac427e6",
    (61, 97, 224): "a480c91970406c348253a3c8",
    (300, 200, 224): "56620fe1c9a1ed237a8ee35c",
}


def _digest(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:24]


@pytest.mark.parametrize(("width", "height", "size"), list(GOLDEN))
def test_golden_hashes(width: int, height: int, size: int) -> None:
    """Bit-exact outputs on every Pillow/numpy this runs with (A1111's pins included)."""
    assert (
        _digest(clip_preprocess([pattern(width, height)], size=size)) == GOLDEN[width, height, size]
    )


@pytest.mark.parametrize(("width", "height", "size"), list(GOLDEN))
def test_golden_hashes_come_from_transformers(width: int, height: int, size: int) -> None:
    processor = _transformers_processor(size)
    expected = processor(images=[pattern(width, height)], return_tensors="pt").pixel_values
    assert _digest(expected.contiguous()) == GOLDEN[width, height, size]


def test_normalisation_values() -> None:
    white, black = Image.new("RGB", (5, 5), (255, 255, 255)), Image.new("RGB", (5, 5), (0, 0, 0))
    pixels = clip_preprocess([white, black], size=8)
    assert pixels.shape == (2, 3, 8, 8)
    assert pixels.is_contiguous()
    assert pixels.device == torch.device("cpu")
    for c in range(3):
        assert pixels[0, c].allclose(torch.tensor((1 - CLIP_MEAN[c]) / CLIP_STD[c]))
        assert pixels[1, c].allclose(torch.tensor(-CLIP_MEAN[c] / CLIP_STD[c]))


def test_centre_crop_takes_the_middle() -> None:
    # 3 vertical bands at 224 px: the crop of a 672 x 224 image is exactly the middle band
    image = Image.new("RGB", (672, 224), (255, 0, 0))
    image.paste((0, 255, 0), (224, 0, 448, 224))
    pixels = clip_preprocess([image])
    green = torch.tensor([(0 - CLIP_MEAN[0]) / CLIP_STD[0], (1 - CLIP_MEAN[1]) / CLIP_STD[1]])
    assert pixels[0, :2, :, :].amax(dim=(1, 2)).allclose(green)
    assert pixels[0, :2, :, :].amin(dim=(1, 2)).allclose(green)


def test_non_rgb_input_goes_through_to_rgb() -> None:
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert torch.equal(
        clip_preprocess([transparent]), clip_preprocess([Image.new("RGB", (10, 10), "white")])
    )


def test_preprocess_errors() -> None:
    with pytest.raises(ImageError, match="at least one image"):
        clip_preprocess([])
    with pytest.raises(ImageError, match=r"1x2000000.*224x448000000"):
        clip_preprocess([Image.new("L", (1, 2_000_000))])


# --- an upload the UI's own decoding could not read ---------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UnidentifiedImageError("cannot identify image file <_io.BytesIO>"), "not an image file"),
        (
            Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit of ..."),
            "too large to decode safely (400,000,000 pixels); at most 67,108,864",
        ),
        (OSError("image file is truncated"), "damaged or incomplete"),
    ],
)
def test_unreadable_upload_says_why_in_the_users_words(error: Exception, expected: str) -> None:
    from lib_negip.args import _parse_mask
    from lib_negip.wording import UI_FORBIDDEN, for_ui

    upload = UnreadableUpload.from_error(error)
    assert expected in upload.reason
    with pytest.raises(ImageError) as caught:
        _parse_mask("positive_mask", upload)
    message = for_ui(str(caught.value))
    assert message.startswith("'Positive mask': "), message
    assert UI_FORBIDDEN.search(message) is None, message
    assert "BytesIO" not in message
