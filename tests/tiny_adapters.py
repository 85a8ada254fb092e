"""Random IP-Adapter state dicts of every variant, in the published flat key layout.

``make_adapter_state_dict`` builds tiny (or any size) random adapters for tests;
``PUBLISHED_SHAPES`` gives ``meta``-tensor state dicts with the exact shapes of the published
models, so detection is tested on the real layouts without allocating them.

Every tensor is random, LayerNorm weights included, so an implementation that confuses two
parameters cannot pass by accident.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Attention width of the 16 SD1.x cross-attention layers, in adapter order (k = 2i+1).
SD15_INNER_DIMS: tuple[int, ...] = (
    *(320, 320, 640, 640, 1280, 1280),  # input_blocks.1, 2, 4, 5, 7, 8
    *(1280, 1280, 1280, 640, 640, 640, 320, 320, 320),  # output_blocks.3 .. 11
    1280,  # middle_block
)
#: The 70 SDXL cross-attention layers: down (4 + 20), up (30 + 6), middle (10).
SDXL_INNER_DIMS: tuple[int, ...] = (
    (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
)

PROJECTION_VARIANTS = ("base", "plus", "full_face", "faceid", "faceid_plus", "faceid_portrait")


def make_adapter_state_dict(
    variant: str,
    *,
    cross_dim: int = 32,
    layer_inner_dims: Sequence[int] = (16, 32, 32, 16, 32),
    encoder_dim: int = 48,
    num_tokens: int = 4,
    resampler_dim: int | None = None,
    depth: int = 2,
    heads: int = 1,
    ff_mult: int = 4,
    faceid: bool = False,
    faceid_id_dim: int = 512,
    lora_rank: int = 4,
    weight_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A random IP-Adapter state dict with keys ``image_proj.*`` and ``ip_adapter.*``.

    ``variant``: "base", "plus", "full_face", or the out-of-scope "faceid" (MLP projection +
    LoRA), "faceid_plus" (``perceiver_resampler``) and "faceid_portrait" (MLP projection, no
    LoRA). ``encoder_dim`` is the projected embed dim (base) or the encoder hidden width.
    The resampler has ``heads`` heads of 64 and width ``resampler_dim`` (default ``heads * 64``).
    ``faceid=True`` adds FaceID's LoRA keys to ``ip_adapter``. ``device="meta"`` gives shapes
    only. Without a ``generator`` the values are seeded (0) and so reproducible.
    """
    if variant not in PROJECTION_VARIANTS:
        msg = f"variant must be one of {PROJECTION_VARIANTS}, not {variant!r}"
        raise ValueError(msg)
    meta = torch.device(device).type == "meta"
    if generator is None and not meta:
        generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        if meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        # Drawn on the CPU so that one generator gives the same values for every device.
        t = torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean
        return t.to(device=device, dtype=dtype)

    sd: dict[str, torch.Tensor] = {}

    def linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> None:
        sd[f"{prefix}.weight"] = rand(n_out, n_in, std=weight_std)
        if bias:
            sd[f"{prefix}.bias"] = rand(n_out, std=0.05)

    def layer_norm(prefix: str, n: int) -> None:
        sd[f"{prefix}.weight"] = rand(n, std=0.1, mean=1.0)
        sd[f"{prefix}.bias"] = rand(n, std=0.1)

    def resampler(prefix: str, with_latents: bool) -> None:
        dim = resampler_dim or heads * 64
        inner = heads * 64
        if with_latents:
            sd[f"{prefix}latents"] = rand(1, num_tokens, dim, std=dim**-0.5)
        linear(f"{prefix}proj_in", encoder_dim, dim)
        linear(f"{prefix}proj_out", dim, cross_dim)
        layer_norm(f"{prefix}norm_out", cross_dim)
        for i in range(depth):
            layer_norm(f"{prefix}layers.{i}.0.norm1", dim)
            layer_norm(f"{prefix}layers.{i}.0.norm2", dim)
            linear(f"{prefix}layers.{i}.0.to_q", dim, inner, bias=False)
            linear(f"{prefix}layers.{i}.0.to_kv", dim, 2 * inner, bias=False)
            linear(f"{prefix}layers.{i}.0.to_out", inner, dim, bias=False)
            layer_norm(f"{prefix}layers.{i}.1.0", dim)
            linear(f"{prefix}layers.{i}.1.1", dim, dim * ff_mult, bias=False)
            linear(f"{prefix}layers.{i}.1.3", dim * ff_mult, dim, bias=False)

    def face_mlp() -> None:
        # FaceID's MLPProjModel: id embedding -> 2x -> tokens, then LayerNorm.
        linear("image_proj.proj.0", faceid_id_dim, 2 * faceid_id_dim)
        linear("image_proj.proj.2", 2 * faceid_id_dim, num_tokens * cross_dim)
        layer_norm("image_proj.norm", cross_dim)

    if variant == "base":
        linear("image_proj.proj", encoder_dim, num_tokens * cross_dim)
        layer_norm("image_proj.norm", cross_dim)
    elif variant == "plus":
        resampler("image_proj.", with_latents=True)
    elif variant == "full_face":
        linear("image_proj.proj.0", encoder_dim, encoder_dim)
        linear("image_proj.proj.2", encoder_dim, cross_dim)
        layer_norm("image_proj.proj.3", cross_dim)
    elif variant in ("faceid", "faceid_portrait"):
        face_mlp()
    else:  # faceid_plus
        face_mlp()
        resampler("image_proj.perceiver_resampler.", with_latents=False)

    with_lora = faceid or variant in ("faceid", "faceid_plus")
    for i, inner in enumerate(layer_inner_dims):
        if with_lora:
            # FaceID trains a LoRA on every attention processor: attn1 (even k) and attn2 (odd k).
            for k, context in ((2 * i, inner), (2 * i + 1, cross_dim)):
                for proj, n_in in (
                    ("to_q", inner),
                    ("to_k", context),
                    ("to_v", context),
                    ("to_out", inner),
                ):
                    sd[f"ip_adapter.{k}.{proj}_lora.down.weight"] = rand(
                        lora_rank, n_in, std=weight_std
                    )
                    sd[f"ip_adapter.{k}.{proj}_lora.up.weight"] = rand(
                        inner, lora_rank, std=weight_std
                    )
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rand(inner, cross_dim, std=weight_std)
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rand(inner, cross_dim, std=weight_std)
    return sd


def nest(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The ``.bin`` layout: ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        top, rest = key.split(".", 1)
        nested.setdefault(top, {})[rest] = value
    return nested


def _published(
    variant: str, family: str, encoder_dim: int, **kwargs: object
) -> Callable[[], dict[str, torch.Tensor]]:
    sd15 = family == "sd15"
    layout: dict[str, object] = {
        "cross_dim": 768 if sd15 else 2048,
        "layer_inner_dims": SD15_INNER_DIMS if sd15 else SDXL_INNER_DIMS,
        "encoder_dim": encoder_dim,
        "device": "meta",
    }
    if variant == "plus":
        layout.update(num_tokens=16, depth=4, heads=12 if sd15 else 20)
    elif variant == "faceid_plus":  # its MLP makes 4 tokens; the resampler refines them
        layout.update(depth=4, heads=12 if sd15 else 20)
    layout.update(kwargs)
    return lambda: make_adapter_state_dict(variant, **layout)  # type: ignore[arg-type]


#: Name -> function returning a ``meta`` state dict with the published model's exact shapes.
PUBLISHED_SHAPES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "ip-adapter_sd15": _published("base", "sd15", 1024),
    "ip-adapter_sd15_light": _published("base", "sd15", 1024),
    "ip-adapter_sd15_vit-G": _published("base", "sd15", 1280),
    "ip-adapter-plus_sd15": _published("plus", "sd15", 1280),
    "ip-adapter-plus-face_sd15": _published("plus", "sd15", 1280),
    "ip-adapter-full-face_sd15": _published("full_face", "sd15", 1280),
    "ip-adapter_sdxl": _published("base", "sdxl", 1280),
    "ip-adapter_sdxl_vit-h": _published("base", "sdxl", 1024),
    "ip-adapter-plus_sdxl_vit-h": _published("plus", "sdxl", 1280),
    "ip-adapter-plus-face_sdxl_vit-h": _published("plus", "sdxl", 1280),
    # Out of scope, rejected with a message: LoRA + MLP; LoRA + perceiver_resampler; MLP only.
    "ip-adapter-faceid_sd15": _published("faceid", "sd15", 1280, lora_rank=128),
    "ip-adapter-faceid-plusv2_sd15": _published("faceid_plus", "sd15", 1280, lora_rank=128),
    "ip-adapter-faceid_sdxl": _published("faceid", "sdxl", 1280, lora_rank=128),
    "ip-adapter-faceid-portrait_sd15": _published("faceid_portrait", "sd15", 1280, num_tokens=16),
}
