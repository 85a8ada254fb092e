"""Tiny random CLIP vision towers for tests, in both published layouts, plus references.

Every tensor is random, LayerNorms included: with default initialisation (LayerNorm 1/0, zero
biases) a wrong implementation could pass by accident. The conversions here are written
independently of ``lib_negip.encoder`` so that the tests check its conversion, not reuse it.

Shapes: ``W`` width, ``M`` MLP width, ``p`` patch, ``T`` tokens, ``D`` projection width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

#: Real shapes of the published encoders (transformers names).
VIT_H_14: dict[str, Any] = {
    "width": 1280,
    "layers": 32,
    "heads": 16,
    "patch": 14,
    "image_size": 224,
    "mlp_width": 5120,
    "projection_dim": 1024,
}
VIT_BIGG_14: dict[str, Any] = {
    "width": 1664,
    "layers": 48,
    "heads": 16,
    "patch": 14,
    "image_size": 224,
    "mlp_width": 8192,
    "projection_dim": 1280,
}
#: A ViT-H-like tower small enough for every test.
TINY_H: dict[str, Any] = {
    "width": 64,
    "layers": 4,
    "heads": 4,
    "patch": 14,
    "image_size": 56,
    "mlp_width": 256,
    "projection_dim": 32,
}
#: A bigG-like tower: MLP ratio 4.9231 as in bigG (8192 / 1664), not a multiple of the width.
TINY_BIGG: dict[str, Any] = {
    "width": 52,
    "layers": 3,
    "heads": 4,
    "patch": 14,
    "image_size": 42,
    "mlp_width": 256,
    "projection_dim": 40,
}


def _shapes_hf(
    width: int, layers: int, patch: int, image_size: int, mlp_width: int, projection_dim: int | None
) -> dict[str, tuple[int, ...]]:
    grid = image_size // patch
    w, m = width, mlp_width
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (w,),
        "vision_model.embeddings.patch_embedding.weight": (w, 3, patch, patch),
        "vision_model.embeddings.position_embedding.weight": (1 + grid * grid, w),
        "vision_model.pre_layrnorm.weight": (w,),
        "vision_model.pre_layrnorm.bias": (w,),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (w, w)
            shapes[f"{p}self_attn.{proj}.bias"] = (w,)
        shapes[f"{p}layer_norm1.weight"] = (w,)
        shapes[f"{p}layer_norm1.bias"] = (w,)
        shapes[f"{p}mlp.fc1.weight"] = (m, w)
        shapes[f"{p}mlp.fc1.bias"] = (m,)
        shapes[f"{p}mlp.fc2.weight"] = (w, m)
        shapes[f"{p}mlp.fc2.bias"] = (w,)
        shapes[f"{p}layer_norm2.weight"] = (w,)
        shapes[f"{p}layer_norm2.bias"] = (w,)
    shapes["vision_model.post_layernorm.weight"] = (w,)
    shapes["vision_model.post_layernorm.bias"] = (w,)
    if projection_dim is not None:
        shapes["visual_projection.weight"] = (projection_dim, w)
    return shapes


def _random(
    key: str, shape: tuple[int, ...], generator: torch.Generator, weight_std: float | None
) -> torch.Tensor:
    """A random tensor of a sensible scale for the role its name tells."""
    if "norm" in key or "layrnorm" in key:
        if key.endswith("weight"):
            return 1.0 + 0.2 * torch.randn(shape, generator=generator)
        return 0.2 * torch.randn(shape, generator=generator)
    if key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=generator)
    if "class_embedding" in key or "position_embedding" in key:
        return 0.5 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    std = weight_std if weight_std is not None else fan_in**-0.5
    return std * torch.randn(shape, generator=generator)


def hf_vision_state_dict(
    *,
    width: int = 64,
    layers: int = 4,
    patch: int = 14,
    image_size: int = 56,
    mlp_width: int = 256,
    projection_dim: int | None = 32,
    seed: int = 0,
    weight_std: float | None = None,
    device: str = "cpu",
    position_ids: bool = False,
    **_: Any,
) -> dict[str, torch.Tensor]:
    """A random transformers ``CLIPVisionModelWithProjection`` state dict.

    ``device="meta"`` gives shapes only (the real ViT-H/bigG sizes cost nothing then).
    ``weight_std`` None scales matrices by 1/sqrt(fan in); ``position_ids`` adds the buffer
    that transformers < 4.31 saved. Extra keyword arguments (``heads``) are ignored so that
    the shape dicts above can be passed with ``**``.
    """
    shapes = _shapes_hf(width, layers, patch, image_size, mlp_width, projection_dim)
    if device == "meta":
        out = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    else:
        generator = torch.Generator().manual_seed(seed)
        out = {k: _random(k, s, generator, weight_std) for k, s in shapes.items()}
    if position_ids:
        tokens = shapes["vision_model.embeddings.position_embedding.weight"][0]
        out["vision_model.embeddings.position_ids"] = torch.arange(tokens, device=device)[None]
    return out


def hf_vision_config(
    *,
    width: int = 64,
    layers: int = 4,
    heads: int = 4,
    patch: int = 14,
    image_size: int = 56,
    mlp_width: int = 256,
    projection_dim: int | None = 32,
    hidden_act: str = "gelu",
    **_: Any,
) -> dict[str, Any]:
    """The ``config.json`` of :func:`hf_vision_state_dict`'s model (transformers names)."""
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": mlp_width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "patch_size": patch,
        "image_size": image_size,
        "projection_dim": projection_dim if projection_dim is not None else 512,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "num_channels": 3,
    }


def hf_to_open_clip(
    state_dict: dict[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """transformers layout -> open_clip ``VisionTransformer`` names (test-side, independent)."""
    sd = {
        k[len("vision_model.") :]: v for k, v in state_dict.items() if k.startswith("vision_model.")
    }
    out = {
        "class_embedding": sd["embeddings.class_embedding"],
        "conv1.weight": sd["embeddings.patch_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_pre.weight": sd["pre_layrnorm.weight"],
        "ln_pre.bias": sd["pre_layrnorm.bias"],
        "ln_post.weight": sd["post_layernorm.weight"],
        "ln_post.bias": sd["post_layernorm.bias"],
    }
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [
                    sd[f"{src}self_attn.q_proj.{kind}"],
                    sd[f"{src}self_attn.k_proj.{kind}"],
                    sd[f"{src}self_attn.v_proj.{kind}"],
                ]
            )
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    if "visual_projection.weight" in state_dict:
        out["proj"] = state_dict["visual_projection.weight"].T.contiguous()
    return {prefix + k: v for k, v in out.items()}


def open_clip_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` names (bare) -> transformers layout (test-side)."""
    sd = state_dict
    out = {
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
    }
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)
            out[f"{dst}self_attn.q_proj.{kind}"] = q
            out[f"{dst}self_attn.k_proj.{kind}"] = k
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            out[f"{dst}self_attn.out_proj.{kind}"] = sd[f"{src}attn.out_proj.{kind}"]
            out[f"{dst}layer_norm1.{kind}"] = sd[f"{src}ln_1.{kind}"]
            out[f"{dst}layer_norm2.{kind}"] = sd[f"{src}ln_2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}mlp.c_fc.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}mlp.c_proj.{kind}"]
    if "proj" in sd:
        out["visual_projection.weight"] = sd["proj"].T.contiguous()
    return out


def open_clip_vision_state_dict(seed: int = 1, **shape: Any) -> dict[str, torch.Tensor]:
    """A random open_clip-layout (bare ``VisionTransformer``) state dict."""
    return hf_to_open_clip(hf_vision_state_dict(seed=seed, **shape))


def with_text_tower_hf(
    state_dict: dict[str, torch.Tensor], text_width: int = 48
) -> dict[str, torch.Tensor]:
    """A full transformers ``CLIPModel`` state dict: the vision tower plus random text keys."""
    g = torch.Generator().manual_seed(7)
    text = {
        "text_model.embeddings.token_embedding.weight": torch.randn(100, text_width, generator=g),
        "text_model.embeddings.position_embedding.weight": torch.randn(77, text_width, generator=g),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(
            text_width, text_width, generator=g
        ),
        "text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(
            4 * text_width, text_width, generator=g
        ),
        "text_model.final_layer_norm.weight": torch.randn(text_width, generator=g),
        "text_projection.weight": torch.randn(32, text_width, generator=g),
        "logit_scale": torch.tensor(4.6),
    }
    return {**state_dict, **text}


def with_text_tower_open_clip(
    visual: dict[str, torch.Tensor], text_width: int = 48
) -> dict[str, torch.Tensor]:
    """A full open_clip model state dict: ``visual.*`` plus a text tower whose bare keys
    (``positional_embedding``, ``transformer.*``) collide with the vision tower's names."""
    g = torch.Generator().manual_seed(8)
    text = {
        "positional_embedding": torch.randn(77, text_width, generator=g),
        "token_embedding.weight": torch.randn(100, text_width, generator=g),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(
            3 * text_width, text_width, generator=g
        ),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.randn(
            4 * text_width, text_width, generator=g
        ),
        "ln_final.weight": torch.randn(text_width, generator=g),
        "text_projection": torch.randn(text_width, 32, generator=g),
        "logit_scale": torch.tensor(4.6),
    }
    return {**{f"visual.{k}": v for k, v in visual.items()}, **text}


def random_pixels(batch: int, image_size: int, seed: int = 3) -> torch.Tensor:
    """Normalised-looking pixel values [B, 3, S, S]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=g)


def reference_forward(
    state_dict: dict[str, torch.Tensor],
    pixel_values: torch.Tensor,
    heads: int,
    hidden_act: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP vision forward with explicit matmuls in float64, from a transformers-layout dict.

    Returns (image_embeds [B, D], penultimate [B, T, W]); the reference where transformers
    cannot be imported (A1111's pins: transformers 5 refuses safetensors 0.4.2).
    """
    sd = {
        k: v.double() for k, v in state_dict.items() if k != "vision_model.embeddings.position_ids"
    }
    v = "vision_model."

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    patch_weight = sd[f"{v}embeddings.patch_embedding.weight"]  # [W, 3, p, p]
    width, patch = patch_weight.shape[0], patch_weight.shape[-1]
    x = pixel_values.double()
    batch, _, size, _ = x.shape
    grid = size // patch
    # patches as rows: [B, g*g, 3*p*p] in (channel, row, column) order, like the conv weight
    patches = x.reshape(batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, grid * grid, 3 * patch * patch)
    x = patches @ patch_weight.reshape(width, -1).T  # [B, g*g, W]
    cls = sd[f"{v}embeddings.class_embedding"].expand(batch, 1, width)
    x = torch.cat([cls, x], dim=1) + sd[f"{v}embeddings.position_embedding.weight"]
    x = norm(x, f"{v}pre_layrnorm")
    hidden = [x]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{v}encoder.layers."))
    head_width = width // heads
    for i in range(layers):
        p = f"{v}encoder.layers.{i}."
        h = norm(x, f"{p}layer_norm1")
        q, k, val = (
            linear(h, f"{p}self_attn.{n}_proj")
            .reshape(batch, -1, heads, head_width)
            .transpose(1, 2)
            for n in "qkv"
        )  # [B, H, T, d]
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_width), dim=-1)
        attended = (weights @ val).transpose(1, 2).reshape(batch, -1, width)
        x = x + linear(attended, f"{p}self_attn.out_proj")
        h = linear(norm(x, f"{p}layer_norm2"), f"{p}mlp.fc1")
        h = h * torch.sigmoid(1.702 * h) if hidden_act == "quick_gelu" else F.gelu(h)
        x = x + linear(h, f"{p}mlp.fc2")
        hidden.append(x)
    pooled = norm(x[:, 0], f"{v}post_layernorm")
    embeds = (
        pooled @ sd["visual_projection.weight"].T if "visual_projection.weight" in sd else pooled
    )
    return embeds, hidden[-2]
