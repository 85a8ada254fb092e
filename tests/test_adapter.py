"""lib_negip.adapter / lib_negip.projection: detection, validation, loading, reference equivalence."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import reference_library
from safetensors.torch import save_file
from tiny_adapters import (
    PUBLISHED_SHAPES,
    SD15_INNER_DIMS,
    SDXL_INNER_DIMS,
    make_adapter_state_dict,
    nest,
)

from lib_negip.adapter import (
    AdapterSpec,
    IPAdapter,
    adapter_from_state_dict,
    detect_adapter,
    load_adapter,
)
from lib_negip.errors import IncompatibleModelError, ModelFileError, UnsupportedModelError
from lib_negip.projection import LinearProjection, MLPProjection, Resampler


@dataclass(frozen=True)
class FakeEncoderSpec:
    """Duck-typed stand-in for lib_negip.encoder.EncoderSpec."""

    architecture: str
    width: int
    projection_dim: int | None


VIT_H = FakeEncoderSpec("ViT-H-14", 1280, 1024)
VIT_BIGG = FakeEncoderSpec("ViT-bigG-14", 1664, 1280)
VIT_H_NO_PROJ = FakeEncoderSpec("ViT-H-14", 1280, None)


# --- detection of the published layouts (meta tensors: exact shapes, no memory) ---------------

# name: variant, cross dim, tokens, encoder output, encoder dim, layers, encoder, family
PUBLISHED = {
    "ip-adapter_sd15": ("base", 768, 4, "image_embeds", 1024, 16, "ViT-H-14", "SD1.x"),
    "ip-adapter_sd15_light": ("base", 768, 4, "image_embeds", 1024, 16, "ViT-H-14", "SD1.x"),
    "ip-adapter_sd15_vit-G": ("base", 768, 4, "image_embeds", 1280, 16, "ViT-bigG-14", "SD1.x"),
    "ip-adapter-plus_sd15": ("plus", 768, 16, "penultimate", 1280, 16, "ViT-H-14", "SD1.x"),
    "ip-adapter-plus-face_sd15": ("plus", 768, 16, "penultimate", 1280, 16, "ViT-H-14", "SD1.x"),
    "ip-adapter-full-face_sd15": (
        "full_face",
        768,
        None,
        "penultimate",
        1280,
        16,
        "ViT-H-14",
        "SD1.x",
    ),
    "ip-adapter_sdxl": ("base", 2048, 4, "image_embeds", 1280, 70, "ViT-bigG-14", "SDXL"),
    "ip-adapter_sdxl_vit-h": ("base", 2048, 4, "image_embeds", 1024, 70, "ViT-H-14", "SDXL"),
    "ip-adapter-plus_sdxl_vit-h": ("plus", 2048, 16, "penultimate", 1280, 70, "ViT-H-14", "SDXL"),
    "ip-adapter-plus-face_sdxl_vit-h": (
        "plus",
        2048,
        16,
        "penultimate",
        1280,
        70,
        "ViT-H-14",
        "SDXL",
    ),
}
FACEID = [name for name in PUBLISHED_SHAPES if "faceid" in name]


def test_the_tables_cover_every_published_shape() -> None:
    assert set(PUBLISHED) | set(FACEID) == set(PUBLISHED_SHAPES)
    assert not set(PUBLISHED) & set(FACEID)
    assert len(SD15_INNER_DIMS) == 16
    assert len(SDXL_INNER_DIMS) == 70


def test_published_shapes_are_the_documented_ones() -> None:
    # Spot checks against reference/ipadapter-formats.md, so the helper itself is tested.
    sd = PUBLISHED_SHAPES["ip-adapter-plus_sd15"]()
    assert sd["image_proj.latents"].shape == (1, 16, 768)
    assert sd["image_proj.proj_in.weight"].shape == (768, 1280)
    assert sd["image_proj.layers.3.0.to_kv.weight"].shape == (1536, 768)
    assert sd["image_proj.layers.3.1.1.weight"].shape == (3072, 768)
    assert "image_proj.layers.4.0.to_q.weight" not in sd
    sd = PUBLISHED_SHAPES["ip-adapter-plus_sdxl_vit-h"]()
    assert sd["image_proj.proj_out.weight"].shape == (2048, 1280)
    assert sd["image_proj.layers.0.1.3.weight"].shape == (1280, 5120)
    assert sd["ip_adapter.139.to_v_ip.weight"].shape == (1280, 2048)
    sd = PUBLISHED_SHAPES["ip-adapter_sdxl"]()
    assert sd["image_proj.proj.weight"].shape == (8192, 1280)
    assert sd["ip_adapter.1.to_k_ip.weight"].shape == (640, 2048)
    sd = PUBLISHED_SHAPES["ip-adapter-full-face_sd15"]()
    assert sd["image_proj.proj.0.weight"].shape == (1280, 1280)
    assert sd["image_proj.proj.3.weight"].shape == (768,)
    assert all(t.device.type == "meta" for t in sd.values())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_detects_published_models(name: str) -> None:
    variant, cross, tokens, output, encoder_dim, n_layers, encoder, family = PUBLISHED[name]
    spec = detect_adapter(PUBLISHED_SHAPES[name](), name=name)
    assert spec.variant == variant
    assert spec.cross_attention_dim == cross
    assert spec.num_tokens == tokens
    assert spec.encoder_output == output
    assert spec.encoder_dim == encoder_dim
    assert spec.num_layers == n_layers
    assert spec.layer_inner_dims == (SD15_INNER_DIMS if n_layers == 16 else SDXL_INNER_DIMS)
    assert spec.encoder_architecture == encoder
    assert spec.family == family
    assert spec.tokens_for(257) == (257 if tokens is None else tokens)
    assert encoder in spec.describe()
    if variant == "plus":
        assert spec.projection.heads == (12 if family == "SD1.x" else 20)
        assert spec.projection.depth == 4
    # The module the spec describes takes the published tensors strictly (shapes only).
    with torch.device("meta"):
        IPAdapter(spec).load_published_state_dict(PUBLISHED_SHAPES[name]())


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (
            "ip-adapter-faceid_sd15",
            "is a FaceID IP-Adapter (it has LoRA weights such as ip_adapter.0.",
        ),
        (
            "ip-adapter-faceid_sdxl",
            "is a FaceID IP-Adapter (it has LoRA weights such as ip_adapter.0.",
        ),
        (
            "ip-adapter-faceid-plusv2_sd15",
            "is a FaceID-plus IP-Adapter (image_proj.perceiver_resampler.*)",
        ),
        (
            "ip-adapter-faceid-portrait_sd15",
            "has a FaceID-style projection (image_proj.proj.0/proj.2/norm, input width 512)",
        ),
    ],
)
def test_rejects_faceid(name: str, kind: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        detect_adapter(PUBLISHED_SHAPES[name](), name=f"{name}.bin")
    message = str(info.value)
    assert message.startswith(f"{name}.bin {kind}")
    assert "face embeddings from insightface, which this extension does not provide" in message
    assert "choose a non-FaceID IP-Adapter" in message


def test_faceid_lora_on_any_projection_is_rejected() -> None:
    sd = make_adapter_state_dict("plus", faceid=True)
    with pytest.raises(UnsupportedModelError, match="is a FaceID IP-Adapter"):
        detect_adapter(sd)


def test_detection_ignores_file_names(tmp_path: Path) -> None:
    path = tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors"
    save_file(make_adapter_state_dict("base"), str(path))
    assert load_adapter(path).spec.variant == "base"


# --- validation ---------------------------------------------------------------------------


def tiny(variant: str = "plus", **kwargs) -> dict[str, torch.Tensor]:
    return make_adapter_state_dict(variant, **kwargs)


def _without(sd: dict[str, torch.Tensor], *keys: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k not in keys}


def _renamed(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {(new if k == old else k): v for k, v in sd.items()}


@pytest.mark.parametrize(
    ("keys", "looks_like"),
    [
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x"],
            "a Stable Diffusion checkpoint",
        ),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA"),
        (
            ["vision_model.embeddings.class_embedding", "visual_projection.weight"],
            "an image encoder (CLIP vision model)",
        ),
        (
            ["conv1.weight", "class_embedding", "ln_pre.weight"],
            "an image encoder (CLIP vision model)",
        ),
        (["control_model.input_hint_block.0.weight"], "a ControlNet model"),
        (
            ["image_proj_model.proj.weight", "adapter_modules.1.to_k_ip.weight"],
            "an IP-Adapter training checkpoint",
        ),
    ],
)
def test_not_an_adapter_says_what_it_looks_like(keys: list[str], looks_like: str) -> None:
    sd = {k: torch.zeros(2, 2) for k in keys}
    with pytest.raises(ModelFileError) as info:
        detect_adapter(sd, name="picked.safetensors")
    message = str(info.value)
    assert message.startswith(
        "picked.safetensors is not an IP-Adapter: it has no image_proj.* or ip_adapter.* keys"
    )
    assert f"looks like {looks_like}" in message
    assert "choose an IP-Adapter model file" in message
    # An encoder in the adapters' folder (h94's whole repository put there) is told where it goes.
    encoder = looks_like.startswith("an image encoder")
    assert ("move this one into models/clip_vision" in message) == encoder


def test_not_an_adapter_unrecognised_lists_keys() -> None:
    with pytest.raises(
        ModelFileError,
        match=r"no image_proj\.\* or ip_adapter\.\* keys \(it holds 1 tensors \(float32 x1\): foo \[3\]\)",
    ):
        detect_adapter({"foo": torch.zeros(3)}, name="x.bin")


def _err(exc: type[Exception], sd: dict[str, torch.Tensor], pattern: str) -> None:
    with pytest.raises(exc) as info:
        detect_adapter(sd, name="a.safetensors")
    message = str(info.value)
    assert message.startswith("a.safetensors"), message
    assert re.search(pattern, message), message


def test_incomplete_files() -> None:
    sd = tiny()
    _err(
        ModelFileError,
        {k: v for k, v in sd.items() if k.startswith("ip_adapter.")},
        r"is incomplete: it has ip_adapter\.\* keys but no image_proj\.\* keys; .*download the complete file",
    )
    _err(
        ModelFileError,
        {k: v for k, v in sd.items() if k.startswith("image_proj.")},
        r"is incomplete: it has image_proj\.\* keys but no ip_adapter\.\* keys",
    )


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda sd: _renamed(
                _renamed(sd, "ip_adapter.3.to_k_ip.weight", "ip_adapter.4.to_k_ip.weight"),
                "ip_adapter.3.to_v_ip.weight",
                "ip_adapter.4.to_v_ip.weight",
            ),
            r"numbers its ip_adapter layers 1, 4, 5, 7, 9; expected 1, 3, 5, 7, 9 .*unexpected \[4\], missing \[3\]",
        ),
        (
            lambda sd: _without(sd, "ip_adapter.3.to_k_ip.weight", "ip_adapter.3.to_v_ip.weight"),
            r"numbers its ip_adapter layers 1, 5, 7, 9; expected 1, 3, 5, 7 .*missing \[3\]",
        ),
        (
            lambda sd: {
                (
                    re.sub(
                        r"ip_adapter\.(\d+)\.", lambda m: f"ip_adapter.{int(m.group(1)) - 1}.", k
                    )
                ): v
                for k, v in sd.items()
            },
            r"numbers its ip_adapter layers 0, 2, 4, 6, 8; expected 1, 3, 5, 7, 9",
        ),
        (
            lambda sd: _without(sd, "ip_adapter.5.to_v_ip.weight"),
            r"has ip_adapter\.5\.to_k_ip\.weight but no ip_adapter\.5\.to_v_ip\.weight; every layer needs both",
        ),
        (
            lambda sd: _without(sd, "ip_adapter.5.to_k_ip.weight"),
            r"has ip_adapter\.5\.to_v_ip\.weight but no ip_adapter\.5\.to_k_ip\.weight",
        ),
        (
            lambda sd: {**sd, "ip_adapter.1.to_q.weight": torch.zeros(2, 2)},
            r"has unexpected ip_adapter keys: ip_adapter\.1\.to_q\.weight; expected only",
        ),
        (
            lambda sd: {
                **sd,
                "ip_adapter.7.to_k_ip.weight": torch.zeros(32, 40),
                "ip_adapter.7.to_v_ip.weight": torch.zeros(32, 40),
            },
            r"ip_adapter\.7\.to_k_ip\.weight reads cross-attention width 40, but ip_adapter\.1 reads 32",
        ),
        (
            lambda sd: {**sd, "ip_adapter.7.to_v_ip.weight": torch.zeros(8, 32)},
            r"ip_adapter\.7\.to_k_ip\.weight is \[16, 32\] and to_v_ip\.weight is \[8, 32\]; expected two equal",
        ),
        (
            lambda sd: {**sd, "image_proj.proj_out.bias": torch.zeros(32, dtype=torch.int64)},
            r"has non-float tensors where weights are expected: image_proj\.proj_out\.bias \(torch\.int64\)",
        ),
        (
            lambda sd: _without(sd, "image_proj.layers.1.0.norm2.weight"),
            r"does not match the layout .*: missing image_proj\.layers\.1\.0\.norm2\.weight",
        ),
        (
            lambda sd: {**sd, "image_proj.pos_emb.weight": torch.zeros(257, 64)},
            r"does not match the layout .*: unexpected image_proj\.pos_emb\.weight",
        ),
        (
            lambda sd: {**sd, "image_proj.layers.1.0.to_kv.weight": torch.zeros(64, 64)},
            r"wrong shapes image_proj\.layers\.1\.0\.to_kv\.weight \[64, 64\] \(expected \[128, 64\]\)",
        ),
        (
            lambda sd: {**sd, "image_proj.proj_out.weight": torch.zeros(40, 64)},
            r"makes tokens of width 40 \(image_proj\.proj_out\.weight\), but its ip_adapter layers read width 32",
        ),
        (
            lambda sd: {**sd, "image_proj.layers.0.0.to_q.weight": torch.zeros(48, 64)},
            r"attention width 48 .* is not a multiple of the head width 64",
        ),
        (
            lambda sd: _without(sd, "image_proj.proj_in.weight"),
            r"lacks image_proj\.proj_in\.weight, which its projection needs",
        ),
        (
            lambda sd: {**sd, "image_proj.latents": torch.zeros(4, 64)},
            r"image_proj\.latents has shape \[4, 64\]; expected 3 dimensions",
        ),
    ],
    ids=[
        "layer-number-even",
        "layer-gap",
        "zero-based",
        "k-without-v",
        "v-without-k",
        "extra-layer-key",
        "cross-dims-differ",
        "k-v-shapes-differ",
        "integer-dtype",
        "missing-proj-key",
        "extra-proj-key",
        "wrong-proj-shape",
        "proj-vs-layers",
        "odd-heads",
        "missing-needed-key",
        "wrong-ndim",
    ],
)
def test_validation_plus(edit, pattern: str) -> None:
    _err(
        ModelFileError if "multiple of" not in pattern else UnsupportedModelError,
        edit(tiny("plus")),
        pattern,
    )


def test_validation_base_and_full_face() -> None:
    base = tiny("base")
    _err(
        ModelFileError,
        {**base, "image_proj.norm.weight": torch.ones(48), "image_proj.norm.bias": torch.ones(48)},
        r"makes tokens of width 48 \(image_proj\.norm\.weight\), but its ip_adapter layers read width 32",
    )
    _err(
        ModelFileError,
        {**base, "image_proj.proj.weight": torch.zeros(100, 48)},
        r"image_proj\.proj\.weight makes 100 values per image, not a whole number of tokens of the "
        r"cross-attention width 32",
    )
    _err(
        ModelFileError,
        {**base, "image_proj.proj.bias": torch.zeros(64)},
        r"wrong shapes image_proj\.proj\.bias \[64\] \(expected \[128\]\)",
    )
    full = tiny("full_face")
    _err(
        ModelFileError,
        {**full, "image_proj.proj.2.weight": torch.zeros(40, 48)},
        r"makes tokens of width 40 \(image_proj\.proj\.2\.weight\)",
    )
    _err(
        ModelFileError,
        {**full, "image_proj.proj.3.weight": torch.ones(40)},
        r"wrong shapes image_proj\.proj\.3\.weight \[40\] \(expected \[32\]\)",
    )
    _err(
        UnsupportedModelError,
        {
            **{k: v for k, v in base.items() if k.startswith("ip_adapter.")},
            "image_proj.something.weight": torch.zeros(2, 2),
        },
        r"has an image projection this extension does not know \(1 tensors .*image_proj\.something\.weight "
        r"\[2, 2\]\); expected a base, plus or full-face IP-Adapter",
    )


# --- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", "plus", "full_face"])
def test_safetensors_and_bin_load_to_identical_modules(tmp_path: Path, variant: str) -> None:
    sd = tiny(variant, generator=torch.Generator().manual_seed(7))
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save(nest(sd), tmp_path / "a.bin")
    from_st, from_bin = load_adapter(tmp_path / "a.safetensors"), load_adapter(tmp_path / "a.bin")
    assert from_st.spec == from_bin.spec
    st_sd, bin_sd = from_st.state_dict(), from_bin.state_dict()
    assert list(st_sd) == list(bin_sd)
    assert all(torch.equal(st_sd[k], bin_sd[k]) for k in st_sd)
    for adapter in (from_st, from_bin):
        assert not adapter.training
        assert all(
            p.dtype == torch.float32 and p.device.type == "cpu" for p in adapter.parameters()
        )
        assert not any(p.requires_grad for p in adapter.parameters())
    # Layer i holds key 2i+1, in order.
    for i, layer in enumerate(from_st.layers):
        assert torch.equal(layer.to_k_ip.weight, sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(layer.to_v_ip.weight, sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])
    assert [k.shape[0] for k, _ in from_st.layer_weights()] == [16, 32, 32, 16, 32]
    image_proj = from_st.image_proj.state_dict()
    assert all(torch.equal(image_proj[k], v) for k, v in _image_proj(sd).items())


def test_half_precision_file_loads_as_float32() -> None:
    sd = {k: v.half() for k, v in tiny("base").items()}
    adapter = adapter_from_state_dict(sd)
    assert adapter.image_proj.proj.weight.dtype == torch.float32
    assert torch.equal(adapter.image_proj.proj.weight, sd["image_proj.proj.weight"].float())


@pytest.mark.parametrize(
    ("variant", "shape", "out"),
    [
        ("base", (3, 48), (3, 4, 32)),
        ("plus", (3, 9, 48), (3, 4, 32)),
        ("full_face", (3, 9, 48), (3, 9, 32)),
    ],
)
def test_project(variant: str, shape: tuple[int, ...], out: tuple[int, ...]) -> None:
    adapter = adapter_from_state_dict(tiny(variant))
    tokens = adapter.project(torch.randn(shape, dtype=torch.float64))
    assert tokens.shape == out
    assert tokens.dtype == torch.float32
    assert tokens.is_inference()
    assert adapter.spec.tokens_for(9) == out[1]
    wrong = (3, 50) if variant == "base" else (3, 48)
    with pytest.raises(
        IncompatibleModelError, match=r"got encoder output of shape \[3, (50|48)\]; expected"
    ):
        adapter.project(torch.randn(wrong))


def test_project_in_bfloat16_stays_close() -> None:
    # The resampler's softmax runs in float32 even for half-precision modules.
    sd = tiny("plus", weight_std=0.2)
    adapter = adapter_from_state_dict(sd)
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(3))
    full = adapter.project(x)
    half = adapter.to(torch.bfloat16).project(x)
    assert half.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: up to ~5 % of the largest value over 30 seeds here.
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


# --- encoder fit --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_encoder_fit_both_ways(name: str) -> None:
    spec = detect_adapter(PUBLISHED_SHAPES[name]())
    right, wrong = (
        (VIT_H, VIT_BIGG) if spec.encoder_architecture == "ViT-H-14" else (VIT_BIGG, VIT_H)
    )
    assert spec.fits_encoder(right)
    spec.check_encoder(right)
    assert not spec.fits_encoder(wrong)
    with pytest.raises(IncompatibleModelError):
        spec.check_encoder(wrong)
    # Hidden-state adapters need no projection; pooled-embed adapters do.
    assert spec.fits_encoder(VIT_H_NO_PROJ) == (
        spec.encoder_output == "penultimate" and right is VIT_H
    )


def test_encoder_fit_messages() -> None:
    plus = detect_adapter(PUBLISHED_SHAPES["ip-adapter-plus_sdxl_vit-h"]())
    with pytest.raises(IncompatibleModelError) as info:
        plus.check_encoder(
            VIT_BIGG, adapter_name="ip-adapter-plus_sdxl_vit-h", encoder_name="clip_g.pth"
        )
    assert str(info.value) == (
        "ip-adapter-plus_sdxl_vit-h needs an image encoder with hidden width 1280 (ViT-H-14), "
        "but clip_g.pth is ViT-bigG-14 (width 1664): choose a ViT-H-14 encoder or 'auto'"
    )
    base = detect_adapter(PUBLISHED_SHAPES["ip-adapter_sdxl"]())
    with pytest.raises(IncompatibleModelError) as info:
        base.check_encoder(VIT_H, adapter_name="ip-adapter_sdxl", encoder_name="clip_h.pth")
    assert str(info.value) == (
        "ip-adapter_sdxl needs an image encoder with projection dim 1280 (ViT-bigG-14), "
        "but clip_h.pth is ViT-H-14 (projection dim 1024): choose a ViT-bigG-14 encoder or 'auto'"
    )
    base = detect_adapter(PUBLISHED_SHAPES["ip-adapter_sd15"]())
    with pytest.raises(IncompatibleModelError) as info:
        base.check_encoder(
            VIT_H_NO_PROJ, adapter_name="ip-adapter_sd15", encoder_name="vit-h.safetensors"
        )
    assert str(info.value) == (
        "ip-adapter_sd15 needs an image encoder with projection dim 1024 (ViT-H-14), but "
        "vit-h.safetensors is ViT-H-14 without a visual projection (its file holds only the vision "
        "tower): choose a ViT-H-14 encoder or 'auto'"
    )
    odd = detect_adapter(tiny("plus"))
    with pytest.raises(IncompatibleModelError) as info:
        odd.check_encoder(VIT_H)
    assert str(info.value) == (
        "this IP-Adapter needs an image encoder with hidden width 48 (no published encoder known), "
        "but the image encoder is ViT-H-14 (width 1280): choose an encoder that fits or 'auto'"
    )
    assert odd.family == "unknown (32)"


def test_spec_is_frozen_and_hashable() -> None:
    spec = detect_adapter(tiny("plus"))
    assert isinstance(spec, AdapterSpec)
    with pytest.raises(AttributeError):
        spec.variant = "base"  # type: ignore[misc]
    assert hash(spec) == hash(detect_adapter(tiny("plus")))


# --- reference equivalence against diffusers --------------------------------------------


def _diffusers():
    # Skipped only in the A1111-pins run (diffusers needs a newer safetensors); a missing
    # reference in the normal run is an error.
    reference_library("diffusers", "UNet2DConditionModel")
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin
    from diffusers.models import embeddings

    return embeddings, UNet2DConditionLoadersMixin


def _image_proj(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("image_proj."): v for k, v in sd.items() if k.startswith("image_proj.")}


def _to_diffusers_plus(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published resampler keys -> IPAdapterPlusImageProjection keys, for any depth."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"layers\.(\d+)\.(0|1)\.(.+)", key)
        if m is None:
            out[key] = value
            continue
        i, part, rest = m.groups()
        if part == "1":
            ff = {
                "0.weight": "ff.0.weight",
                "0.bias": "ff.0.bias",
                "1.weight": "ff.1.net.0.proj.weight",
            }
            out[f"layers.{i}.{ff.get(rest, 'ff.1.net.2.weight')}"] = value
        elif rest.startswith("norm1"):
            out[f"layers.{i}.ln0.{rest.split('.')[1]}"] = value
        elif rest.startswith("norm2"):
            out[f"layers.{i}.ln1.{rest.split('.')[1]}"] = value
        elif rest == "to_kv.weight":
            k, v = value.chunk(2, dim=0)
            out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = k, v
        elif rest == "to_out.weight":
            out[f"layers.{i}.attn.to_out.0.weight"] = value
        else:
            out[f"layers.{i}.attn.{rest}"] = value
    return out


CONVERTER_CASES = {
    "base": {"variant": "base", "num_tokens": 4, "encoder_dim": 48},
    "plus-depth4-2heads": {"variant": "plus", "depth": 4, "heads": 2, "num_tokens": 6},
    "plus-depth4-wide": {"variant": "plus", "depth": 4, "resampler_dim": 96, "num_tokens": 3},
    "full_face": {"variant": "full_face", "encoder_dim": 40},
}


@pytest.mark.parametrize("case", sorted(CONVERTER_CASES))
def test_projection_matches_diffusers_with_its_own_converter(case: str) -> None:
    """The published keys converted by diffusers' own IP-Adapter loader, same random weights."""
    _, loaders = _diffusers()
    kwargs = dict(CONVERTER_CASES[case])
    variant = kwargs.pop("variant")
    sd = tiny(variant, weight_std=0.2, generator=torch.Generator().manual_seed(3), **kwargs)
    ours = adapter_from_state_dict(sd)
    # self is only used on its low_cpu_mem_usage path.
    reference = loaders._convert_ip_adapter_image_proj_to_diffusers(
        None, _image_proj(sd), low_cpu_mem_usage=False
    )
    reference = reference.float().eval()
    x = torch.randn(
        (2, 48) if variant == "base" else (2, 11, ours.spec.encoder_dim),
        generator=torch.Generator().manual_seed(4),
    )
    with torch.no_grad():
        expected = reference(x)
    got = ours.project(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert expected.std() > 0.1  # not a degenerate comparison


def test_projection_matches_diffusers_at_other_sizes() -> None:
    """Sizes the converter hard-codes (4 base tokens, 4 layers, ff x4), mapped by hand."""
    embeddings, _ = _diffusers()
    gen = torch.Generator().manual_seed(5)

    sd = tiny("base", num_tokens=7, weight_std=0.2, generator=gen)
    ours = adapter_from_state_dict(sd)
    reference = embeddings.ImageProjection(
        image_embed_dim=48, cross_attention_dim=32, num_image_text_embeds=7
    )
    reference.load_state_dict(
        {k.replace("proj", "image_embeds"): v for k, v in _image_proj(sd).items()}, strict=True
    )
    x = torch.randn(3, 48, generator=gen)
    with torch.no_grad():
        assert (ours.project(x) - reference(x)).abs().max().item() <= 1e-5

    sd = tiny(
        "plus",
        depth=6,
        heads=2,
        resampler_dim=80,
        ff_mult=2,
        num_tokens=5,
        weight_std=0.2,
        generator=gen,
    )
    ours = adapter_from_state_dict(sd)
    assert isinstance(ours.image_proj, Resampler)
    assert ours.spec.projection.depth == 6
    reference = embeddings.IPAdapterPlusImageProjection(
        embed_dims=48, output_dims=32, hidden_dims=80, depth=6, heads=2, num_queries=5, ffn_ratio=2
    )
    reference.load_state_dict(_to_diffusers_plus(_image_proj(sd)), strict=True)
    x = torch.randn(2, 13, 48, generator=gen)
    with torch.no_grad():
        expected = reference.eval()(x)
    assert (ours.project(x) - expected).abs().max().item() <= 1e-5
    assert expected.std() > 0.1


def test_projection_modules_by_variant() -> None:
    assert isinstance(adapter_from_state_dict(tiny("base")).image_proj, LinearProjection)
    assert isinstance(adapter_from_state_dict(tiny("plus")).image_proj, Resampler)
    assert isinstance(adapter_from_state_dict(tiny("full_face")).image_proj, MLPProjection)
