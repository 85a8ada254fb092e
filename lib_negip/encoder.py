"""The CLIP image encoder: ViT-H-14 / ViT-bigG-14 vision towers on open_clip's VisionTransformer.

Published encoder files come in two layouts, both accepted:

- transformers ``CLIPVisionModelWithProjection`` (``vision_model.*`` + ``visual_projection.weight``;
  a full ``CLIPModel`` also has ``text_model.*``, ignored), the layout of h94/IP-Adapter's
  ``image_encoder``, ComfyUI's ``clip_vision`` files and the ControlNet extension's ``clip_h.pth``;
- open_clip (``visual.*`` of a full model, or the bare keys of a ``VisionTransformer``).

Everything about the architecture is read from tensor shapes (:func:`detect_encoder`); only the
head count and the activation, which no shape reveals, come from a ``config.json`` beside the
weights when there is one. The weights are converted to open_clip names and loaded strictly.

Shapes: ``B`` images, ``S`` image size, ``W`` hidden width, ``g`` patch grid side,
``T = 1 + g*g`` tokens, ``D`` projection width, ``M`` MLP width.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from PIL import Image
from torch import nn

from lib_negip import logger
from lib_negip.errors import ModelFileError, UnsupportedModelError
from lib_negip.files import SAFETENSORS_SUFFIXES, describe_state_dict, load_state_dict
from lib_negip.images import clip_preprocess

EncoderOutput = Literal["image_embeds", "penultimate"]

#: Architectures with a published IP-Adapter encoder: (width, layers, patch, image size, MLP width).
KNOWN_ARCHITECTURES: dict[str, tuple[int, int, int, int, int]] = {
    "ViT-H-14": (1280, 32, 14, 224, 5120),
    "ViT-bigG-14": (1664, 48, 14, 224, 8192),
}
#: Head counts of the known architectures (no tensor shape reveals them).
_KNOWN_HEADS = {"ViT-H-14": 16, "ViT-bigG-14": 16}

_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}

# transformers per-layer names -> open_clip names (q/k/v are concatenated separately).
_HF_LAYER_RENAMES = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_GLOBAL_RENAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
# Tensors a file may carry that the model does not need (transformers < 4.31 saved this buffer).
_HF_IGNORED = {"embeddings.position_ids"}

_HF_PREFIX = "vision_model."
_OPEN_CLIP_PREFIX = "visual."
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_OC_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.")


class EncoderShapeError(ModelFileError):
    """A CLIP vision state dict (or its config) that does not describe one consistent model:
    missing, extra or mis-shaped tensors, or a head count that does not divide the width."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a CLIP vision tower is, read from its tensor shapes (and config.json)."""

    width: int  # W: hidden width
    layers: int  # transformer blocks
    heads: int  # attention heads (config.json, else the known value, else W // 64)
    patch_size: int
    image_size: int  # S = patch_size * grid side of the positional embedding
    mlp_width: int  # M: hidden width of each block's MLP
    projection_dim: int | None  # D: width of image_embeds; None if the file has no projection
    activation: str  # "gelu" (LAION ViT-H/bigG) or "quick_gelu" (OpenAI CLIP)
    architecture: str  # "ViT-H-14", "ViT-bigG-14" or a descriptive "ViT-w256-L4-p14"
    layout: str  # layout of the file it came from: "transformers" or "open_clip"

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """T: hidden-state tokens per image (class token + patches), e.g. 257 for ViT-H-14."""
        return 1 + self.grid * self.grid

    @property
    def mlp_ratio(self) -> float:
        """The ratio open_clip takes: the smallest float with ``int(W * ratio) == M``."""
        ratio = self.mlp_width / self.width
        # open_clip truncates width * ratio; a ratio a hair low would lose one MLP unit.
        while int(self.width * ratio) < self.mlp_width:
            ratio = math.nextafter(ratio, math.inf)
        return ratio

    def describe(self) -> str:
        """One line for logs, model lists and messages."""
        projection = f"projection {self.projection_dim}" if self.projection_dim else "no projection"
        return (
            f"{self.architecture} (width {self.width}, {self.layers} layers, {self.heads} heads, "
            f"patch {self.patch_size}, {self.image_size} px, MLP {self.mlp_width}, {projection}, "
            f"{self.activation}; {self.layout} layout)"
        )


def _architecture_name(width: int, layers: int, patch: int, image_size: int, mlp: int) -> str:
    for name, shape in KNOWN_ARCHITECTURES.items():
        if shape == (width, layers, patch, image_size, mlp):
            return name
    size = "" if image_size == 224 else f"-{image_size}px"
    return f"ViT-w{width}-L{layers}-p{patch}{size}"


def _split_layout(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    """The layout and the vision tower's own tensors, prefix removed (text tower dropped)."""
    keys = list(state_dict)
    found: dict[str, torch.Tensor]
    if any(k.startswith(_HF_PREFIX) for k in keys):
        cut = len(_HF_PREFIX)
        found = {k[cut:]: v for k, v in state_dict.items() if k.startswith(_HF_PREFIX)}
        if "visual_projection.weight" in state_dict:
            found["visual_projection.weight"] = state_dict["visual_projection.weight"]
        return "transformers", found
    if "embeddings.patch_embedding.weight" in state_dict:  # a bare CLIPVisionTransformer
        return "transformers", dict(state_dict)
    if any(k.startswith(_OPEN_CLIP_PREFIX) for k in keys):
        # A full open_clip model: the text tower's bare keys (transformer.*, positional_embedding)
        # would collide with the vision tower's, so only the visual.* subtree is read.
        cut = len(_OPEN_CLIP_PREFIX)
        return "open_clip", {
            k[cut:]: v for k, v in state_dict.items() if k.startswith(_OPEN_CLIP_PREFIX)
        }
    if "conv1.weight" in state_dict:
        return "open_clip", dict(state_dict)
    msg = (
        "This file is not a CLIP vision encoder: expected transformers keys "
        "('vision_model.embeddings.patch_embedding.weight', ...) or open_clip keys "
        f"('visual.conv1.weight' / 'conv1.weight', ...); found {describe_state_dict(state_dict)}. "
        "Choose an image encoder file such as h94/IP-Adapter's image_encoder/model.safetensors."
    )
    raise ModelFileError(msg)


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _require(tensors: Mapping[str, Any], key: str, layout: str) -> Any:
    if key not in tensors:
        msg = (
            f"The CLIP vision encoder ({layout} layout) has no '{key}' tensor; found "
            f"{describe_state_dict(tensors)}. The file is incomplete or not an image encoder: "
            "download it again."
        )
        raise EncoderShapeError(msg)
    return tensors[key]


def _layer_count(tensors: Mapping[str, Any], pattern: re.Pattern[str], layout: str) -> int:
    indices = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    if not indices:
        msg = (
            f"The CLIP vision encoder ({layout} layout) has no transformer layers; found "
            f"{describe_state_dict(tensors)}. The file is incomplete: download it again."
        )
        raise EncoderShapeError(msg)
    # The highest index counts: a gap then shows up as that layer's missing tensors.
    return max(indices) + 1


def _expected_shapes(
    layout: str, width: int, layers: int, patch: int, tokens: int, mlp: int, projection: int | None
) -> dict[str, tuple[int, ...]]:
    """Every tensor a consistent vision tower of these sizes has, in the file's own names."""
    w = width
    if layout == "transformers":
        shapes = {
            "embeddings.class_embedding": (w,),
            "embeddings.patch_embedding.weight": (w, 3, patch, patch),
            "embeddings.position_embedding.weight": (tokens, w),
            "pre_layrnorm.weight": (w,),
            "pre_layrnorm.bias": (w,),
            "post_layernorm.weight": (w,),
            "post_layernorm.bias": (w,),
        }
        for i in range(layers):
            p = f"encoder.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{p}self_attn.{name}.weight"] = (w, w)
                shapes[f"{p}self_attn.{name}.bias"] = (w,)
            for name in ("layer_norm1", "layer_norm2"):
                shapes[f"{p}{name}.weight"] = (w,)
                shapes[f"{p}{name}.bias"] = (w,)
            shapes[f"{p}mlp.fc1.weight"] = (mlp, w)
            shapes[f"{p}mlp.fc1.bias"] = (mlp,)
            shapes[f"{p}mlp.fc2.weight"] = (w, mlp)
            shapes[f"{p}mlp.fc2.bias"] = (w,)
        if projection is not None:
            shapes["visual_projection.weight"] = (projection, w)
        return shapes
    shapes = {
        "class_embedding": (w,),
        "conv1.weight": (w, 3, patch, patch),
        "positional_embedding": (tokens, w),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
        "ln_post.weight": (w,),
        "ln_post.bias": (w,),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes[f"{p}attn.in_proj_weight"] = (3 * w, w)
        shapes[f"{p}attn.in_proj_bias"] = (3 * w,)
        shapes[f"{p}attn.out_proj.weight"] = (w, w)
        shapes[f"{p}attn.out_proj.bias"] = (w,)
        for name in ("ln_1", "ln_2"):
            shapes[f"{p}{name}.weight"] = (w,)
            shapes[f"{p}{name}.bias"] = (w,)
        shapes[f"{p}mlp.c_fc.weight"] = (mlp, w)
        shapes[f"{p}mlp.c_fc.bias"] = (mlp,)
        shapes[f"{p}mlp.c_proj.weight"] = (w, mlp)
        shapes[f"{p}mlp.c_proj.bias"] = (w,)
    if projection is not None:
        shapes["proj"] = (w, projection)
    return shapes


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_tensors(
    tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], layout: str, sizes: str
) -> None:
    """Raise :class:`EncoderShapeError` for missing, extra or mis-shaped tensors."""
    ignored = _HF_IGNORED if layout == "transformers" else set()
    missing = [k for k in expected if k not in tensors]
    extra = sorted(k for k in tensors if k not in expected and k not in ignored)
    wrong = [
        f"'{k}' is {list(_shape(tensors[k]))}, expected {list(shape)}"
        for k, shape in expected.items()
        if k in tensors and _shape(tensors[k]) != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({_listed(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({'; '.join(wrong[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors ({_listed(extra)})")
    if problems:
        msg = (
            f"The CLIP vision encoder ({layout} layout) is inconsistent: its embeddings describe "
            f"{sizes}, but it has {'; '.join(problems)}. The file is damaged or of an unsupported "
            "variant: download the image encoder again."
        )
        raise EncoderShapeError(msg)
    not_float = sorted(k for k in expected if not torch.is_floating_point(tensors[k]))
    if not_float:
        msg = (
            f"The CLIP vision encoder has non-float tensors ({_listed(not_float)}, e.g. "
            f"{tensors[not_float[0]].dtype}); quantised encoders are not supported. Use a "
            "float32/float16/bfloat16 image encoder file."
        )
        raise UnsupportedModelError(msg)


def _vision_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The vision part of a transformers or open_clip config, in transformers' key names."""
    if not config:
        return {}
    if isinstance(config.get("vision_config"), Mapping):  # a full transformers CLIPConfig
        return dict(config["vision_config"])
    model_cfg = config.get("model_cfg", config)  # open_clip_config.json nests model_cfg
    vision_cfg = model_cfg.get("vision_cfg") if isinstance(model_cfg, Mapping) else None
    if isinstance(vision_cfg, Mapping):  # open_clip: heads = width / head_width
        out: dict[str, Any] = {}
        if "width" in vision_cfg:
            out["hidden_size"] = vision_cfg["width"]
            if "head_width" in vision_cfg:
                out["num_attention_heads"] = vision_cfg["width"] // vision_cfg["head_width"]
        if "layers" in vision_cfg:
            out["num_hidden_layers"] = vision_cfg["layers"]
        out["hidden_act"] = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        return out
    return dict(config)


def detect_encoder(
    state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> EncoderSpec:
    """Read a CLIP vision tower's architecture from its tensor shapes (works on ``meta`` tensors).

    ``config`` is the ``config.json`` beside the weights, if any: it supplies the head count
    (``num_attention_heads``) and activation (``hidden_act``), which shapes cannot tell.
    Raises :class:`ModelFileError` (:class:`EncoderShapeError` for inconsistent tensors).
    """
    layout, tensors = _split_layout(state_dict)
    if layout == "transformers":
        patch_key, pos_key, fc_key = (
            "embeddings.patch_embedding.weight",
            "embeddings.position_embedding.weight",
            "encoder.layers.0.mlp.fc1.weight",
        )
        proj_key, pattern = "visual_projection.weight", _HF_LAYER
    else:
        patch_key, pos_key, fc_key = (
            "conv1.weight",
            "positional_embedding",
            "transformer.resblocks.0.mlp.c_fc.weight",
        )
        proj_key, pattern = "proj", _OC_LAYER

    patch_weight = _require(tensors, patch_key, layout)  # [W, 3, p, p]
    if (
        patch_weight.ndim != 4
        or patch_weight.shape[1] != 3
        or patch_weight.shape[2] != patch_weight.shape[3]
    ):
        msg = (
            f"The patch embedding '{patch_key}' of the CLIP vision encoder is "
            f"{list(_shape(patch_weight))}; expected [width, 3, patch, patch]. The file is not a "
            "CLIP ViT image encoder."
        )
        raise EncoderShapeError(msg)
    width, patch = int(patch_weight.shape[0]), int(patch_weight.shape[2])
    positions = _require(tensors, pos_key, layout)  # [T, W]
    tokens = int(positions.shape[0]) if positions.ndim == 2 else 0
    grid = math.isqrt(max(tokens - 1, 0))
    if positions.ndim != 2 or tokens < 2 or grid * grid != tokens - 1:
        msg = (
            f"The positional embedding '{pos_key}' of the CLIP vision encoder is "
            f"{list(_shape(positions))}; expected [1 + grid*grid, {width}] for a square image. "
            "The file is not a supported CLIP ViT image encoder."
        )
        raise EncoderShapeError(msg)
    layers = _layer_count(tensors, pattern, layout)
    fc = _require(tensors, fc_key, layout)  # [M, W]
    mlp = int(fc.shape[0])
    projection = None
    if proj_key in tensors:
        proj = tensors[proj_key]  # transformers [D, W]; open_clip [W, D]
        projection = int(proj.shape[0] if layout == "transformers" else proj.shape[-1])
    image_size = patch * grid
    sizes = (
        f"width {width}, patch {patch}, {tokens} tokens ({image_size} px), MLP {mlp}, "
        f"{layers} layers"
    )
    expected = _expected_shapes(layout, width, layers, patch, tokens, mlp, projection)
    _check_tensors(tensors, expected, layout, sizes)

    architecture = _architecture_name(width, layers, patch, image_size, mlp)
    vision_config = _vision_config(config)
    _check_config_agrees(vision_config, width, layers, mlp, patch, image_size)
    heads = _heads(vision_config, architecture, width)
    activation = _activation(vision_config)
    return EncoderSpec(
        width=width,
        layers=layers,
        heads=heads,
        patch_size=patch,
        image_size=image_size,
        mlp_width=mlp,
        projection_dim=projection,
        activation=activation,
        architecture=architecture,
        layout=layout,
    )


def _check_config_agrees(
    config: Mapping[str, Any], width: int, layers: int, mlp: int, patch: int, image_size: int
) -> None:
    """A config.json written for other weights would give wrong heads: refuse it."""
    found = {
        "hidden_size": width,
        "num_hidden_layers": layers,
        "intermediate_size": mlp,
        "patch_size": patch,
        "image_size": image_size,
    }
    disagree = [
        f"{key} {config[key]} (tensors: {value})"
        for key, value in found.items()
        if key in config and config[key] != value
    ]
    if disagree:
        msg = (
            f"The config.json beside the image encoder does not describe its weights: it says "
            f"{', '.join(disagree)}. Put the config.json that came with these weights beside them, "
            "or remove it."
        )
        raise EncoderShapeError(msg)


def _heads(config: Mapping[str, Any], architecture: str, width: int) -> int:
    if "num_attention_heads" in config:
        heads = config["num_attention_heads"]
        source = "config.json"
    elif architecture in _KNOWN_HEADS:
        heads, source = _KNOWN_HEADS[architecture], f"the {architecture} default"
    else:
        # Most CLIP ViTs use 64-wide heads; without a config this is the best guess there is.
        heads, source = max(width // 64, 1), "a head width of 64 (no config.json)"
        logger.warning(
            "Image encoder of width %d has no config.json: assuming %d attention heads",
            width,
            heads,
        )
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or width % heads:
        msg = (
            f"The image encoder's head count {heads!r} (from {source}) does not divide its width "
            f"{width}: expected a positive divisor such as {max(width // 64, 1)}. Fix "
            "num_attention_heads in the config.json beside the weights."
        )
        raise EncoderShapeError(msg)
    return heads


def _activation(config: Mapping[str, Any]) -> str:
    act = config.get("hidden_act", "gelu")  # the LAION ViT-H/bigG encoders use plain GELU
    if act not in _ACTIVATIONS:
        msg = (
            f"The image encoder's config.json sets hidden_act {act!r}; supported are "
            f"{sorted(_ACTIVATIONS)}. Use a CLIP image encoder with one of those activations."
        )
        raise UnsupportedModelError(msg)
    return _ACTIVATIONS[act]


def to_open_clip_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors in open_clip ``VisionTransformer`` names (float32, contiguous).

    Accepts either layout; the result may share memory with ``state_dict``. Validate with
    :func:`detect_encoder` first: this function assumes a complete, consistent state dict.
    """
    layout, tensors = _split_layout(state_dict)
    return {
        name: _assembled([tensors[key] for key in keys], transpose)
        for name, (keys, transpose) in _open_clip_sources(layout, tensors).items()
    }


def _open_clip_sources(
    layout: str, tensors: Mapping[str, Any]
) -> dict[str, tuple[tuple[str, ...], bool]]:
    """open_clip name -> (the vision tower's tensors it is made of, concatenated along the
    first dimension; whether it is their transpose)."""
    if layout == "open_clip":
        return {key: ((key,), False) for key in tensors}
    sources: dict[str, tuple[tuple[str, ...], bool]] = {}
    for key in tensors:
        if key in _HF_IGNORED:
            continue
        if key in _HF_GLOBAL_RENAMES:
            sources[_HF_GLOBAL_RENAMES[key]] = ((key,), False)
        elif key == "visual_projection.weight":
            sources["proj"] = ((key,), True)  # Linear [D, W] -> open_clip x @ proj, [W, D]
        elif match := _HF_LAYER.match(key):
            rest = key[match.end() :]
            prefix = f"transformer.resblocks.{match.group(1)}."
            if rest in _HF_LAYER_RENAMES:
                sources[prefix + _HF_LAYER_RENAMES[rest]] = ((key,), False)
            elif rest.startswith("self_attn.q_proj."):
                # nn.MultiheadAttention packs the three input projections as [q; k; v].
                kind = rest.rsplit(".", 1)[1]  # weight or bias
                base = f"encoder.layers.{match.group(1)}.self_attn."
                parts = tuple(f"{base}{n}_proj.{kind}" for n in "qkv")
                sources[f"{prefix}attn.in_proj_{kind}"] = (parts, False)
    return sources


def _assembled(parts: Sequence[torch.Tensor], transpose: bool) -> torch.Tensor:
    """One open_clip weight, float32 and contiguous, from its parts (shared where it can)."""
    if len(parts) == 1:
        return _as_weight(parts[0].t() if transpose else parts[0])
    # Concatenated straight into the float32 result: no concatenated copy in the file's dtype.
    out = torch.empty(_stacked_shape(parts, transpose), dtype=torch.float32)
    for target, part in zip(_rows(out, parts, transpose), parts, strict=True):
        target.copy_(part.t() if transpose else part)
    return out


def _stacked_shape(parts: Sequence[Any], transpose: bool) -> tuple[int, ...]:
    shapes = [tuple(part.shape[::-1] if transpose else part.shape) for part in parts]
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def _rows(out: torch.Tensor, parts: Sequence[Any], transpose: bool) -> list[torch.Tensor]:
    """The slices of ``out`` (along its first dimension) that the parts fill, in order."""
    return list(out.split([int(part.shape[-1 if transpose else 0]) for part in parts]))


def _as_weight(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def _quick_gelu_layer() -> type[nn.Module]:
    from open_clip.transformer import QuickGELU  # both open_clip 2.20 and 3.x have it

    return QuickGELU


def _build_vision_transformer(spec: EncoderSpec) -> nn.Module:
    """An empty (``meta``) open_clip VisionTransformer of ``spec``'s shape."""
    from open_clip.transformer import VisionTransformer  # imported when a model is built

    act_layer = nn.GELU if spec.activation == "gelu" else _quick_gelu_layer()
    # meta: no memory and no random init for weights that load_state_dict replaces right away
    with torch.device("meta"):
        # keyword arguments that open-clip-torch 2.20.0 (A1111's pin) and 3.x both accept
        module = VisionTransformer(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            width=spec.width,
            layers=spec.layers,
            heads=spec.heads,
            mlp_ratio=spec.mlp_ratio,
            output_dim=spec.projection_dim or spec.width,
            act_layer=act_layer,
        )
    if spec.projection_dim is None:
        module.proj = None  # both versions skip a None projection
    return module


class ImageEncoder:
    """A CLIP vision tower that gives pooled projected embeds or penultimate hidden states."""

    def __init__(self, module: nn.Module, spec: EncoderSpec) -> None:
        self.module = module  # open_clip.transformer.VisionTransformer, eval, no grad
        self.spec = spec
        attention = module.transformer.resblocks[0].attn
        # open_clip 2.20 runs its blocks sequence-first [T, B, W]; 3.x batch-first [B, T, W].
        # The attention module itself knows which, in every version.
        self._batch_first = bool(
            getattr(attention, "batch_first", getattr(module.transformer, "batch_first", False))
        )

    def __repr__(self) -> str:
        return f"ImageEncoder({self.spec.describe()}, {self.device}, {self.dtype})"

    @property
    def device(self) -> torch.device:
        return self.module.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.conv1.weight.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ImageEncoder:
        """Move/cast the weights in place; returns ``self``."""
        self.module.to(device=device, dtype=dtype)
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP pixel values for this encoder's input size: float32 [B, 3, S, S] on the CPU."""
        return clip_preprocess(images, size=self.spec.image_size)

    def encode(
        self, pixel_values: torch.Tensor, output: EncoderOutput = "image_embeds"
    ) -> torch.Tensor:
        """Encode normalised pixel values [B, 3, S, S] (moved to this encoder's device/dtype).

        ``"image_embeds"``: [B, D], the class token after ``ln_post`` times the projection.
        ``"penultimate"``: [B, T, W], the output of the second-to-last block before ``ln_post``
        (transformers' ``hidden_states[-2]``); the last block is not run.
        Results are inference tensors: clone before modifying them in place outside
        ``torch.inference_mode()``.
        """
        if output not in ("image_embeds", "penultimate"):
            msg = f"output must be 'image_embeds' or 'penultimate'; found {output!r}."
            raise ValueError(msg)
        size = self.spec.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            msg = (
                f"pixel_values must be [B, 3, {size}, {size}] for this encoder; found "
                f"{list(pixel_values.shape)}. Use ImageEncoder.preprocess()."
            )
            raise ValueError(msg)
        if output == "image_embeds" and self.module.proj is None:
            msg = (
                f"The image encoder {self.spec.architecture} has no visual projection, so it "
                "cannot produce image_embeds (needed by base/light IP-Adapters). Use an image "
                "encoder file that includes visual_projection.weight (CLIPVisionModelWithProjection)."
            )
            raise UnsupportedModelError(msg)

        module = self.module
        with torch.inference_mode():
            x = pixel_values.to(device=self.device, dtype=self.dtype)
            x = module.conv1(x)  # [B, W, g, g]
            x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
            cls = module.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
            x = torch.cat([cls, x], dim=1) + module.positional_embedding.to(x.dtype)  # [B, T, W]
            if hasattr(module, "patch_dropout"):
                x = module.patch_dropout(x)  # identity in eval; kept for fidelity
            x = module.ln_pre(x)

            blocks = module.transformer.resblocks
            run = blocks[:-1] if output == "penultimate" else blocks
            if not self._batch_first:
                x = x.transpose(0, 1)  # [T, B, W]
            for block in run:
                x = block(x)
            if not self._batch_first:
                x = x.transpose(0, 1)  # [B, T, W]
            if output == "penultimate":
                return x.contiguous()
            pooled = module.ln_post(x[:, 0])  # [B, W]
            return pooled @ module.proj  # [B, D]


def encoder_from_state_dict(
    state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> ImageEncoder:
    """Build an :class:`ImageEncoder` (CPU, float32, eval, no grad) from either layout.

    The encoder may share memory with ``state_dict`` (float32 tensors are used as they are).
    """
    spec = detect_encoder(state_dict, config)
    weights = to_open_clip_state_dict(state_dict)
    return _encoder_from_weights(spec, {k: v.to("cpu") for k, v in weights.items()})


def _encoder_from_weights(spec: EncoderSpec, weights: dict[str, torch.Tensor]) -> ImageEncoder:
    """The encoder of ``spec`` holding ``weights`` (open_clip names) themselves, not copies."""
    module = _build_vision_transformer(spec)
    # strict: a name the conversion got wrong fails here instead of leaving a weight random
    module.load_state_dict(weights, strict=True, assign=True)
    left_empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_empty:
        msg = f"Internal error: the image encoder has unloaded tensors {_listed(left_empty)}."
        raise RuntimeError(msg)
    module.eval()
    module.requires_grad_(False)
    return ImageEncoder(module, spec)


def _encoder_from_safetensors(
    file: Path, meta: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None
) -> ImageEncoder:
    """Build the encoder from a safetensors file whose tensors ``meta`` describes, reading each
    weight from the file straight into the float32 tensor the encoder keeps.

    Resident memory then grows by the weights' size and no more. safetensors' own loader maps
    the file instead: the tensors used as they are stay views of that mapping, whose pages
    count as resident once touched (and stay while any view lives), and the q/k/v projections
    that open_clip packs into one ``in_proj`` would be resident twice, in the mapping and in
    the packed copy (ViT-H-14 in transformers layout: 2.4 GiB of weights took 3.0 GiB).
    """
    spec = detect_encoder(meta, config)
    layout, tensors = _split_layout(meta)
    file_key = {id(tensor): key for key, tensor in meta.items()}
    offsets, data_start = _safetensors_offsets(file)
    weights: dict[str, torch.Tensor] = {}
    with file.open("rb") as f:
        for name, (keys, transpose) in _open_clip_sources(layout, tensors).items():
            parts = [tensors[key] for key in keys]
            out = torch.empty(_stacked_shape(parts, transpose), dtype=torch.float32)
            for target, part in zip(_rows(out, parts, transpose), parts, strict=True):
                begin, end = offsets[file_key[id(part)]]
                if part.dtype == torch.float32 and not transpose:
                    _read_into(f, target, data_start + begin, end - begin)
                else:  # converted (and transposed) from a buffer of one tensor's size
                    raw = torch.empty(part.shape, dtype=part.dtype)
                    _read_into(f, raw, data_start + begin, end - begin)
                    target.copy_(raw.t() if transpose else raw)
            weights[name] = out
    return _encoder_from_weights(spec, weights)


def _safetensors_offsets(file: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Each tensor's (begin, end) in a safetensors file's data, and where the data begins
    (the header was checked by ``registry.read_meta_state_dict``)."""
    with file.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len).decode("utf-8"))
    offsets = {
        key: (int(info["data_offsets"][0]), int(info["data_offsets"][1]))
        for key, info in header.items()
        if key != "__metadata__"
    }
    return offsets, 8 + header_len


def _read_into(f: BinaryIO, tensor: torch.Tensor, offset: int, size: int) -> None:
    """Read ``size`` bytes at ``offset`` into the contiguous CPU ``tensor`` (raw, the file's
    byte order: safetensors is little-endian, as the hosts this path runs on)."""
    if size != tensor.numel() * tensor.element_size():
        msg = f"a tensor of {list(tensor.shape)} {tensor.dtype} has {size} bytes in the file"
        raise EncoderShapeError(msg)
    if size == 0:
        return
    buffer = memoryview((ctypes.c_ubyte * size).from_address(tensor.data_ptr())).cast("B")
    f.seek(offset)
    done = 0
    while done < size:
        count = f.readinto(buffer[done:])
        if not count:
            msg = "The file ended before its last tensor: it is truncated; download it again."
            raise ModelFileError(msg)
        done += count


_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
CONFIG_NAMES = ("config.json", "open_clip_config.json")


def read_encoder_config(folder: Path) -> dict[str, Any] | None:
    """The ``config.json`` (or ``open_clip_config.json``) in ``folder``, as read beside the
    weights; None without one."""
    for name in CONFIG_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            msg = f"The image encoder config {path} cannot be read ({error}). Fix or remove it."
            raise ModelFileError(msg) from error
        if not isinstance(config, dict):
            msg = f"The image encoder config {path} is not a JSON object. Fix or remove it."
            raise ModelFileError(msg)
        return config
    return None


def load_image_encoder(path: str | Path) -> ImageEncoder:
    """Load an image encoder file, or a folder with ``model.safetensors``/``pytorch_model.bin``.

    A ``config.json`` beside the weights (h94's ``image_encoder/`` folder) supplies the head
    count and activation.
    """
    path = Path(path)
    if path.is_dir():
        file = next((path / n for n in _WEIGHT_NAMES if (path / n).is_file()), None)
        if file is None:
            found = sorted(p.name for p in path.iterdir())[:8]
            msg = (
                f"The image encoder folder {path} holds neither {' nor '.join(_WEIGHT_NAMES)}; "
                f"found {found}. Point at the weights file itself or at a folder holding one."
            )
            raise ModelFileError(msg)
    else:
        file = path
    config = read_encoder_config(file.parent)
    build: Callable[[], ImageEncoder]
    if file.suffix.lower() in SAFETENSORS_SUFFIXES and sys.byteorder == "little":
        from lib_negip.registry import read_meta_state_dict  # the registry imports this module

        meta = read_meta_state_dict(file)  # names, shapes and dtypes; its errors name the file
        build = partial(_encoder_from_safetensors, file, meta, config)
    else:
        state_dict = load_state_dict(file)
        build = partial(encoder_from_state_dict, state_dict, config)
    try:
        encoder = build()
    except (ModelFileError, UnsupportedModelError) as error:
        msg = f"{file}: {error}"
        raise type(error)(msg) from error
    logger.info("Loaded image encoder %s from %s", encoder.spec.describe(), file)
    return encoder
