"""Noise negatives: the negative image prompt made from the positive images and noise.

The equivalent of ComfyUI_IPAdapter_plus's ``IPAdapterNoise`` node (read at commit 9d076a3),
which users wire into ``image_negative`` when they have no negative image: the image is
centre-cropped to a square, resized to 224x224 and then

- ``fade``: blended towards uniform noise, ``x * (1 - s) + u * s``;
- ``dissolve``: each pixel channel replaced by uniform noise with probability ``s``;
- ``gaussian``: ``x + s * N(0, 1)``;
- ``shuffle``: warped by an elastic transform (smoother the lower ``s``), rotated 180 degrees,
  then ``x' * (1 - n) + n`` with ``n = 0.75 * s * N(0, 1)``,

clamped to [0, 1] and quantised to 8 bits as ComfyUI's CLIP preprocessing does. The node's blur
option is left out (the extension has none).

The node seeds torch's global generator from the image's pixel sum; here the caller gives the
seed and a private CPU generator is used, so generation's own random state is never touched.
Given the same seed, each image's pixels equal the node's output as computed with torchvision's
v2 transforms (``tests/test_noise.py`` checks every type against them): the random numbers are
drawn in the node's order and into tensors of the node's memory layout, which decides which
number lands on which pixel channel.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_negip.errors import ArgumentError
from lib_negip.images import to_rgb

#: The noise types, in the node's order.
NOISE_TYPES: tuple[str, ...] = ("fade", "dissolve", "gaussian", "shuffle")

#: Side of the noise images: CLIP's input size, so the CLIP preprocessing leaves them unchanged.
NOISE_SIZE = 224

# The node's elastic transform: ElasticTransform(alpha=75.0, sigma=(1 - strength) * 3.5).
_ELASTIC_ALPHA = 75.0
_ELASTIC_MAX_SIGMA = 3.5
# The node's multiplicative-plus-additive noise after the warp: n = N(0, 1) * (strength * 0.75).
_SHUFFLE_NOISE_SCALE = 0.75

_Layout = Literal["interleaved", "planar"]


def _check_strength(strength: object) -> float:
    """``strength`` as a float in [0, 1]; bools, strings and non-finite numbers refused."""
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, numbers.Real):
        msg = (
            "negative_noise must be a number from 0 to 1 (0 turns the noise negative off); got "
            f"{strength!r} ({type(strength).__name__})."
        )
        raise ArgumentError(msg)
    value = float(strength)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        msg = (
            f"negative_noise must be a finite number from 0 to 1 (0 turns the noise negative "
            f"off); got {value}."
        )
        raise ArgumentError(msg)
    return value


def _check_kind(kind: object) -> str:
    """``kind`` if it is one of :data:`NOISE_TYPES`."""
    if isinstance(kind, str) and kind in NOISE_TYPES:
        return kind
    allowed = ", ".join(repr(name) for name in NOISE_TYPES)
    msg = f"negative_noise_type must be one of {allowed}; got {kind!r} ({type(kind).__name__})."
    raise ArgumentError(msg)


def _check_seed(seed: object) -> int:
    """``seed`` as torch's generators take it: any integer, reduced modulo 2**64."""
    if isinstance(seed, (bool, np.bool_)):
        msg = f"The noise seed must be an integer; got {seed!r} (bool)."
        raise ArgumentError(msg)
    try:
        value = operator.index(seed)
    except TypeError as error:
        msg = f"The noise seed must be an integer; got {seed!r} ({type(seed).__name__})."
        raise ArgumentError(msg) from error
    # torch.Generator.manual_seed wraps negative seeds the same way and refuses values >= 2**64.
    return value % (1 << 64)


def _square_crop(pixels: np.ndarray) -> np.ndarray:
    """The centred square of an [H, W, 3] array, placed as torchvision's ``CenterCrop`` does."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    # Python's round (half to even), as torchvision computes the anchor: an odd margin of 1
    # keeps the extra pixel at the end, one of 3 at the start.
    top = round((height - side) / 2.0)
    left = round((width - side) / 2.0)
    return pixels[top : top + side, left : left + side]


def _base_image(image: Image.Image) -> torch.Tensor:
    """The node's base image: float32 [1, 3, 224, 224], not clamped (bicubic overshoots)."""
    rgb = image if image.mode == "RGB" and "transparency" not in image.info else to_rgb(image)
    # Crop the 8-bit pixels before converting: the float copy is then only the square. The
    # values equal ComfyUI's (``uint8 -> float32 / 255`` per pixel, then the crop).
    square = np.ascontiguousarray(_square_crop(np.asarray(rgb, dtype=np.uint8)))
    tensor = torch.from_numpy(square.astype(np.float32) / np.float32(255.0))
    tensor = tensor.permute(2, 0, 1).unsqueeze(0).contiguous()  # [1, 3, side, side]
    if tensor.shape[-1] == NOISE_SIZE:
        # torchvision's Resize returns an image of the requested size untouched.
        return tensor
    # torchvision v2 Resize on a float tensor is exactly this call, with no clamp afterwards.
    return F.interpolate(
        tensor,
        size=(NOISE_SIZE, NOISE_SIZE),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )


def _node_layout(height: int, width: int) -> _Layout:
    """The memory layout of the node's resized image, which fixes the order of its draws.

    ``rand_like``/``randn_like`` fill a tensor of the input's layout in memory order, so the
    layout decides which random number lands on which pixel channel. The node resizes an NCHW
    view of ComfyUI's NHWC image. A crop of the height (or no crop) leaves that view
    channels-last contiguous, and ``interpolate`` then returns a channels-last image: the
    numbers go pixel by pixel, R, G, B interleaved. A crop of the width leaves rows strided by
    the full width, and ``interpolate`` returns a channel-planar NCHW image: all R, then G,
    then B; except for a one-pixel-high image, whose single row makes the row stride
    irrelevant (still channels-last contiguous). Without a resize (the short side is already
    224) the cropped view is returned, and ``rand_like`` of a non-dense view falls back to a
    contiguous NHWC tensor: interleaved. Observed with torch 2.14 and torchvision 0.29.1; the
    tests compare against the node.
    """
    if width > height and height not in (1, NOISE_SIZE):
        return "planar"
    return "interleaved"


def _empty_nhwc(layout: _Layout) -> torch.Tensor:
    """An uninitialised [1, 224, 224, 3] float32 tensor in ``layout`` for the node's draws.

    ``normal_`` takes a different (vectorised) path for contiguous tensors than for strided
    ones, so the planar draws must go into the same NHWC view of NCHW memory as the node's,
    not into a contiguous NCHW tensor permuted afterwards.
    """
    if layout == "planar":
        return torch.empty((1, 3, NOISE_SIZE, NOISE_SIZE)).permute(0, 2, 3, 1)
    return torch.empty((1, NOISE_SIZE, NOISE_SIZE, 3))


def _uniform(layout: _Layout, generator: torch.Generator) -> torch.Tensor:
    """``torch.rand_like`` of the node's image, from ``generator``: NHWC [1, 224, 224, 3]."""
    return _empty_nhwc(layout).uniform_(0.0, 1.0, generator=generator)


def _normal(layout: _Layout, generator: torch.Generator) -> torch.Tensor:
    """``torch.randn_like`` of the node's image, from ``generator``: NHWC [1, 224, 224, 3]."""
    return _empty_nhwc(layout).normal_(0.0, 1.0, generator=generator)


def _gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel, computed its way (a softmax) for identical values."""
    limit = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-limit, limit, steps=size, dtype=torch.float32)
    return torch.softmax(x.div(sigma).pow(2).neg(), dim=0)


def _gaussian_blur(field: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` of a [1, 1, H, W] field: reflect padding, one conv2d."""
    kernel1d = _gaussian_kernel1d(size, sigma)
    kernel = (kernel1d.unsqueeze(-1) * kernel1d).expand(1, 1, size, size)
    half = size // 2
    padded = F.pad(field, [half, half, half, half], mode="reflect")
    return F.conv2d(padded, kernel, groups=1)


def _displacement_axis(sigma: float, extent: int, generator: torch.Generator) -> torch.Tensor:
    """One axis of torchvision's ``ElasticTransform`` displacement: [1, 1, 224, 224].

    Uniform in [-1, 1), blurred when sigma > 0, scaled by ``alpha / extent``: displacements in
    normalised grid units, where the image spans [-1, 1].
    """
    field = torch.rand(1, 1, NOISE_SIZE, NOISE_SIZE, generator=generator) * 2 - 1
    if sigma > 0.0:
        size = int(8 * sigma + 1)
        if size % 2 == 0:  # torchvision makes the kernel odd the same way
            size += 1
        field = _gaussian_blur(field, size, sigma)
    return field * _ELASTIC_ALPHA / extent


def _elastic(image: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision v2 ``ElasticTransform(alpha=75, sigma)`` of a [1, 3, 224, 224] image.

    Draw order as torchvision's: dx (then its blur), then dy. Sampling is bilinear with zeros
    outside, align_corners=False, on the identity grid plus the displacement.
    """
    dx = _displacement_axis(sigma, NOISE_SIZE, generator)
    dy = _displacement_axis(sigma, NOISE_SIZE, generator)
    displacement = torch.cat([dx, dy], 1).permute(0, 2, 3, 1)  # [1, H, W, 2]
    # torchvision's identity grid: pixel centres in normalised units.
    axis = torch.linspace((1 - NOISE_SIZE) / NOISE_SIZE, (NOISE_SIZE - 1) / NOISE_SIZE, NOISE_SIZE)
    grid = torch.empty(1, NOISE_SIZE, NOISE_SIZE, 2)
    grid[..., 0].copy_(axis)
    grid[..., 1].copy_(axis.unsqueeze(-1))
    grid.add_(displacement)
    # With its default fill of 0, torchvision samples a ones channel beside the image and
    # multiplies by it: pixels that sample partly outside the image are darkened twice, once
    # by the zeros padding and once by the mask. Done the same way for identical pixels.
    stacked = torch.cat((image, torch.ones(1, 1, NOISE_SIZE, NOISE_SIZE)), dim=1)
    sampled = F.grid_sample(
        stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    warped, mask = torch.tensor_split(sampled, indices=(-1,), dim=-3)
    return warped * mask.expand_as(warped)


def _shuffle(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """The node's shuffle of a [1, 3, 224, 224] image: NHWC [1, 224, 224, 3], not clamped."""
    warped = _elastic(image, (1 - strength) * _ELASTIC_MAX_SIGMA, generator)
    # RandomVerticalFlip(p=1) and RandomHorizontalFlip(p=1): each draws rand(1) before it
    # (always below p), which moves the random sequence on; the flips always apply.
    torch.rand(1, generator=generator)
    flipped = warped.flip(-2)
    torch.rand(1, generator=generator)
    flipped = flipped.flip(-1).permute(0, 2, 3, 1)
    # The flipped image is channel-planar whatever the input's layout (grid_sample's output).
    noise = _normal("planar", generator) * (strength * _SHUFFLE_NOISE_SCALE)
    return flipped * (1 - noise) + noise


def _noise_image(
    image: Image.Image, strength: float, kind: str, generator: torch.Generator
) -> Image.Image:
    """One noise image: the node's computation on ``image``, quantised to 8-bit RGB."""
    width, height = image.size
    base = _base_image(image)  # [1, 3, 224, 224]
    layout = _node_layout(height, width)
    x = base.permute(0, 2, 3, 1)  # NHWC, as the node computes
    if kind == "fade":
        noise = _uniform(layout, generator)
        out = x * (1 - strength) + noise * strength
    elif kind == "dissolve":
        mask = (_uniform(layout, generator) < strength).float()
        noise = _uniform(layout, generator)
        out = x * (1 - mask) + noise * mask
    elif kind == "gaussian":
        out = x + _normal(layout, generator) * strength
    else:  # "shuffle", checked by the caller
        out = _shuffle(base, strength, generator)
    # ComfyUI's clip_preprocess quantises the node's output this way: round(255 * x), half to
    # even, after the node's clamp to [0, 1].
    pixels = (out.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Image.fromarray(pixels[0].contiguous().numpy())  # [224, 224, 3] uint8: RGB


def noise_images(
    images: Sequence[Image.Image], strength: float, kind: str, seed: int
) -> tuple[Image.Image, ...]:
    """One 224x224 RGB noise image per image of ``images``, as the IPAdapterNoise node makes it.

    ``strength`` is the extension's ``negative_noise`` (0..1; 0 gives the cropped and resized
    image itself for fade, dissolve and gaussian, a warped and rotated one for shuffle) and
    ``kind`` its ``negative_noise_type`` (one of :data:`NOISE_TYPES`). Images of any size and
    mode are accepted (non-RGB ones go through :func:`lib_negip.images.to_rgb`). One CPU
    generator seeded with ``seed`` serves the images in order, so a call is deterministic for a
    seed; torch's global random state is not used. No images give an empty tuple.

    Raises :class:`~lib_negip.errors.ArgumentError` for a strength outside 0..1 or not finite,
    an unknown type or a seed that is not an integer.
    """
    value = _check_strength(strength)
    name = _check_kind(kind)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_check_seed(seed))
    outputs = []
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            msg = f"Noise images are made from PIL images; image {index} is {type(image).__name__}."
            raise TypeError(msg)
        outputs.append(_noise_image(image, value, name, generator))
    return tuple(outputs)
