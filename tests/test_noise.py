"""lib_negip.noise: the IPAdapterNoise node's noise negatives, pixel for pixel.

The reference is the node's own pipeline (ComfyUI_IPAdapter_plus ``IPAdapterNoise.make_noise``
at commit 9d076a3, blur 0) run with torchvision's v2 transforms on a ComfyUI IMAGE tensor and
torch's global generator seeded with the same seed, quantised as ComfyUI's ``clip_preprocess``
does. Observed with torch 2.14.1 and torchvision 0.29.1 on x86-64 (one thread and eight): every
case below gives 0 differing values of 150,528 for all four types, shuffle included. The
comparison still tolerates 1 level on 0.1% of the values, for another CPU's floating-point
kernels; a wrong draw order or memory layout changes most values by far more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import reference_library
from PIL import Image

from lib_negip.errors import ArgumentError
from lib_negip.images import to_rgb
from lib_negip.noise import NOISE_SIZE, NOISE_TYPES, noise_images

GREY = 128
GREY_VALUE = GREY / 255


def comfy_image(pixels: np.ndarray) -> torch.Tensor:
    """A ComfyUI IMAGE, [1, H, W, 3] float32 in [0, 1], as its LoadImage node makes it."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None,]


def node_noise(images: list[np.ndarray], kind: str, strength: float, seed: int) -> list[np.ndarray]:
    """The node's output for each image as 8-bit [224, 224, 3] arrays.

    One ``torch.manual_seed(seed)`` before the first image and none between them: the node
    seeds once per call, this module once per call of several images (the node would take them
    as one batch and share one elastic field; the extension sends them one by one).
    """
    transforms = reference_library("torchvision.transforms.v2")
    torch.manual_seed(seed)
    outputs = []
    for pixels in images:
        image_optional = comfy_image(pixels)
        prepare = transforms.Compose(
            [
                transforms.CenterCrop(min(image_optional.shape[1], image_optional.shape[2])),
                transforms.Resize(
                    (224, 224), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True
                ),
            ]
        )
        image = prepare(image_optional.permute([0, 3, 1, 2])).permute([0, 2, 3, 1])
        if kind == "fade":
            noise = torch.rand_like(image)
            noise = image * (1 - strength) + noise * strength
        elif kind == "dissolve":
            mask = (torch.rand_like(image) < strength).float()
            noise = torch.rand_like(image)
            noise = image * (1 - mask) + noise * mask
        elif kind == "gaussian":
            noise = torch.randn_like(image) * strength
            noise = image + noise
        else:
            shuffle = transforms.Compose(
                [
                    transforms.ElasticTransform(alpha=75.0, sigma=(1 - strength) * 3.5),
                    transforms.RandomVerticalFlip(p=1.0),
                    transforms.RandomHorizontalFlip(p=1.0),
                ]
            )
            image = shuffle(image.permute([0, 3, 1, 2])).permute([0, 2, 3, 1])
            noise = torch.randn_like(image) * (strength * 0.75)
            noise = image * (1 - noise) + noise
        noise = torch.clamp(noise, 0, 1)
        # ComfyUI's clip_preprocess: round(clip(255 x)) before normalising.
        quantised = torch.clip(255.0 * noise, 0, 255).round().to(torch.uint8)
        outputs.append(quantised[0].numpy())
    return outputs


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB test picture: smooth gradients (bicubic overshoots at their kinks) + grain."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    phase = np.array([0.0, 2.0, 4.0])[None, None, :]
    base = 127.5 + 110.0 * np.sin(6.0 * x + 4.0 * y + phase) * np.cos(3.0 * y - phase)
    grain = rng.normal(0.0, 25.0, (height, width, 3))
    return np.clip(np.rint(base + grain), 0, 255).astype(np.uint8)


def ours(images: list[np.ndarray], kind: str, strength: float, seed: int) -> list[np.ndarray]:
    pictures = [Image.fromarray(pixels) for pixels in images]
    return [np.asarray(image) for image in noise_images(pictures, strength, kind, seed)]


def assert_node_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """At most 1 level apart on at most 0.1% of the values (observed: identical)."""
    assert actual.shape == expected.shape == (NOISE_SIZE, NOISE_SIZE, 3)
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    differing = int(np.count_nonzero(difference))
    assert int(difference.max()) <= 1, f"max difference {difference.max()}, {differing} values"
    assert differing <= difference.size // 1000, f"{differing} of {difference.size} values differ"


# The node's random numbers land on pixels in its tensor's memory order, which its crop decides
# (lib_negip.noise._node_layout): each crop kind, with and without a resize.
SHAPES = [
    pytest.param((300, 400), id="landscape"),
    pytest.param((400, 300), id="portrait"),
    pytest.param((256, 256), id="square"),
    pytest.param((224, 300), id="landscape-no-resize"),
    pytest.param((300, 224), id="portrait-no-resize"),
    pytest.param((97, 61), id="portrait-upscaled"),
]


@pytest.mark.parametrize("strength", [0.35, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_matches_the_node(kind: str, shape: tuple[int, int], strength: float) -> None:
    pixels = photo(*shape)
    (expected,) = node_noise([pixels], kind, strength, seed=20240521)
    (actual,) = ours([pixels], kind, strength, seed=20240521)
    assert_node_equal(actual, expected)


@pytest.mark.parametrize(
    ("kind", "strength"),
    [("fade", 0.0), ("dissolve", 0.05), ("gaussian", 0.5), ("shuffle", 0.0), ("shuffle", 0.7)],
)
def test_matches_the_node_at_other_strengths(kind: str, strength: float) -> None:
    pixels = photo(180, 320, seed=3)
    (expected,) = node_noise([pixels], kind, strength, seed=7)
    (actual,) = ours([pixels], kind, strength, seed=7)
    assert_node_equal(actual, expected)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 5),
        (5, 1),
        (1, 1),
        (2, 3),
        (103, 100),
        (100, 103),
        (105, 100),
        (100, 105),
        (224, 224),
        (225, 224),
        (224, 225),
        (223, 500),
    ],
)
def test_matches_the_node_on_edge_shapes(shape: tuple[int, int]) -> None:
    """One-pixel rows; odd margins (3 and 5: Python's round, half to even, places the crop);
    exactly 224 and one pixel off it."""
    pixels = photo(*shape, seed=11)
    for kind in ("fade", "gaussian"):
        (expected,) = node_noise([pixels], kind, 0.5, seed=99)
        (actual,) = ours([pixels], kind, 0.5, seed=99)
        assert_node_equal(actual, expected)


@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_several_images_share_one_generator_in_order(kind: str) -> None:
    images = [photo(300, 400, seed=1), photo(256, 256, seed=2), photo(400, 300, seed=3)]
    expected = node_noise(images, kind, 0.6, seed=5)
    actual = ours(images, kind, 0.6, seed=5)
    for got, want in zip(actual, expected, strict=True):
        assert_node_equal(got, want)
    # The second image's noise continues the sequence: not what it gets alone.
    (alone,) = ours(images[1:2], kind, 0.6, seed=5)
    assert not np.array_equal(actual[1], alone)


@pytest.mark.parametrize("kind", NOISE_TYPES)
def test_deterministic_for_a_seed(kind: str) -> None:
    image = Image.fromarray(photo(120, 200))
    first = noise_images([image, image], 0.5, kind, 42)
    second = noise_images([image, image], 0.5, kind, 42)
    other = noise_images([image, image], 0.5, kind, 43)
    assert len(first) == 2
    for output in first:
        assert output.mode == "RGB"
        assert output.size == (NOISE_SIZE, NOISE_SIZE)
    for a, b, c in zip(first, second, other, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))
    # The same image twice in one call gets two different noises (the sequence goes on).
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_one_output_per_input_and_none_for_none() -> None:
    images = [Image.fromarray(photo(50 + 10 * i, 80)) for i in range(4)]
    assert len(noise_images(images, 0.3, "dissolve", 0)) == 4
    assert noise_images([], 0.3, "dissolve", 0) == ()


def test_global_random_state_and_input_untouched() -> None:
    pixels = photo(64, 96)
    image = Image.fromarray(pixels)
    torch.manual_seed(777)  # not the autouse fixture's 0, which a stray manual_seed(0) would hide
    state = torch.get_rng_state()
    for kind in NOISE_TYPES:
        noise_images([image], 0.8, kind, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.asarray(image), pixels)


def test_any_integer_seed() -> None:
    """Negative and 64-bit seeds wrap as torch.manual_seed wraps them; larger ones are reduced."""
    image = Image.fromarray(photo(32, 32))

    def pixels(seed: int) -> np.ndarray:
        return np.asarray(noise_images([image], 1.0, "fade", seed)[0])

    assert np.array_equal(pixels(-1), pixels(2**64 - 1))
    assert np.array_equal(pixels(2**64 + 3), pixels(3))
    assert np.array_equal(pixels(np.int64(17)), pixels(17))


def test_non_rgb_images_are_converted_first() -> None:
    rgba = Image.fromarray(np.dstack([photo(90, 70), np.full((90, 70), 128, np.uint8)]), "RGBA")
    grey = Image.fromarray(photo(90, 70)[..., 0], "L")
    for image in (rgba, grey):
        (got,) = noise_images([image], 0.4, "gaussian", 8)
        (want,) = noise_images([to_rgb(image)], 0.4, "gaussian", 8)
        assert np.array_equal(np.asarray(got), np.asarray(want))


def grey_noise(kind: str, strength: float, seed: int = 0) -> np.ndarray:
    """Noise of a constant grey 300x200 image, as floats in [0, 1]: [224, 224, 3]."""
    image = Image.new("RGB", (300, 200), (GREY, GREY, GREY))
    (output,) = noise_images([image], strength, kind, seed)
    return np.asarray(output).astype(np.float64) / 255


# 150,528 values: the standard error of a mean of U[0, s) noise is s * 0.29 / 388 < 0.00075.
@pytest.mark.parametrize("strength", [0.1, 0.4, 0.75, 1.0])
def test_fade_mean_and_variance(strength: float) -> None:
    values = grey_noise("fade", strength)
    mean = (1 - strength) * GREY_VALUE + strength * 0.5
    assert values.mean() == pytest.approx(mean, abs=0.004)
    # s * U[0, 1) has variance s^2 / 12; the 8-bit rounding adds 1 / (12 * 255^2).
    variance = strength**2 / 12 + 1 / (12 * 255**2)
    assert values.var() == pytest.approx(variance, rel=0.03)
    # A blend: every value lies between the grey's share and the grey's share plus s.
    low = (1 - strength) * GREY_VALUE
    assert values.min() >= low - 1 / 255
    assert values.max() <= low + strength + 1 / 255


def test_full_strength_fade_is_uniform_noise_independent_of_the_image() -> None:
    grey = Image.new("RGB", (300, 200), (GREY, GREY, GREY))
    picture = Image.fromarray(photo(200, 300))
    (from_grey,) = noise_images([grey], 1.0, "fade", 31)
    (from_picture,) = noise_images([picture], 1.0, "fade", 31)
    assert np.array_equal(np.asarray(from_grey), np.asarray(from_picture))
    values = np.asarray(from_grey).astype(np.float64) / 255
    assert values.mean() == pytest.approx(0.5, abs=0.003)
    assert values.var() == pytest.approx(1 / 12, rel=0.02)
    for quantile in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert np.mean(values < quantile) == pytest.approx(quantile, abs=0.006)


@pytest.mark.parametrize("strength", [0.1, 0.5, 0.9])
def test_dissolve_replaces_a_fraction_of_the_channel_values(strength: float) -> None:
    values = np.rint(grey_noise("dissolve", strength) * 255).astype(np.uint8)
    changed = values != GREY
    # A replaced value is uniform noise: it equals the grey again with probability 1/255.
    assert changed.mean() == pytest.approx(strength * 254 / 255, abs=0.006)
    # Channels are replaced independently (the node's mask is per channel, not per pixel).
    all_three = changed.all(axis=-1).mean()
    assert all_three == pytest.approx((strength * 254 / 255) ** 3, abs=0.006)
    # Replacements are uniform: their mean is one half.
    assert (values[changed] / 255).mean() == pytest.approx(0.5, abs=0.01)


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_gaussian_is_additive_and_clamped(strength: float) -> None:
    values = grey_noise("gaussian", strength)
    assert values.min() >= 0.0
    assert values.max() <= 1.0
    # 0 and 255 collect everything the clamp cut off (round(255 x) is 0 below x = 0.5 / 255).
    at_zero = normal_cdf((0.5 / 255 - GREY_VALUE) / strength)
    at_full = 1 - normal_cdf((254.5 / 255 - GREY_VALUE) / strength)
    assert np.mean(values == 0.0) == pytest.approx(at_zero, abs=0.006)
    assert np.mean(values == 1.0) == pytest.approx(at_full, abs=0.006)
    # Between the clamps the distribution is the grey plus N(0, s^2).
    checked = 0
    for k in (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0):
        level = math.floor(255 * (GREY_VALUE + k * strength))
        if not 0 < level < 255:
            continue
        checked += 1
        expected = normal_cdf(((level + 0.5) / 255 - GREY_VALUE) / strength)
        assert np.mean(values <= level / 255) == pytest.approx(expected, abs=0.006)
    assert checked >= 3


def test_shuffle_warps_rotates_and_adds_noise() -> None:
    # At strength 0 there is no noise: a warped constant stays constant away from the borders,
    # and near them the elastic field pulls in the zeros outside (darker edges).
    still = grey_noise("shuffle", 0.0)
    assert np.all(still[40:-40, 40:-40] == GREY_VALUE)
    assert still[:4].mean() < GREY_VALUE - 0.01
    # At strength 1: x (1 - n) + n with n ~ N(0, 0.75^2), i.e. x + 0.498 n for the grey.
    noisy = grey_noise("shuffle", 1.0)[40:-40, 40:-40]
    spread = 0.75 * (1 - GREY_VALUE)
    at_zero = normal_cdf((0.5 / 255 - GREY_VALUE) / spread)
    assert np.mean(noisy == 0.0) == pytest.approx(at_zero, abs=0.01)
    # And the warp is a 180-degree rotation at heart: a picture dark at the top comes out
    # dark at the bottom.
    top_dark = np.zeros((224, 224, 3), np.uint8)
    top_dark[112:] = 255
    (rotated,) = noise_images([Image.fromarray(top_dark)], 0.05, "shuffle", 4)
    rotated_values = np.asarray(rotated).astype(np.float64)
    assert rotated_values[20:100, 20:-20].mean() > 200
    assert rotated_values[124:204, 20:-20].mean() < 55


@pytest.mark.parametrize("strength", [-0.01, 1.01, math.nan, math.inf, -math.inf, 2])
def test_strength_out_of_range_is_refused(strength: float) -> None:
    with pytest.raises(ArgumentError, match=r"negative_noise must be a finite number from 0 to 1"):
        noise_images([Image.new("RGB", (8, 8))], strength, "fade", 0)


@pytest.mark.parametrize("strength", ["0.5", True, None, [0.5]])
def test_strength_of_the_wrong_type_is_refused(strength: object) -> None:
    with pytest.raises(ArgumentError, match=r"negative_noise must be a number from 0 to 1"):
        noise_images([], strength, "fade", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["blur", "", "Fade", None, 0])
def test_unknown_type_is_refused(kind: object) -> None:
    with pytest.raises(ArgumentError, match=r"^negative_noise_type must be one of") as caught:
        noise_images([Image.new("RGB", (8, 8))], 0.5, kind, 0)  # type: ignore[arg-type]
    for name in NOISE_TYPES:
        assert repr(name) in str(caught.value)
    assert repr(kind) in str(caught.value)


@pytest.mark.parametrize("seed", ["1", 1.5, None, True])
def test_seed_must_be_an_integer(seed: object) -> None:
    with pytest.raises(ArgumentError, match=r"seed must be an integer"):
        noise_images([], 0.5, "fade", seed)  # type: ignore[arg-type]


def test_non_images_are_a_programming_error() -> None:
    with pytest.raises(TypeError, match=r"image 1 is ndarray"):
        noise_images([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))], 0.5, "fade", 0)  # type: ignore[list-item]
