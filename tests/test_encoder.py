"""lib_negip.encoder: detection from tensor shapes, both layouts, and equivalence with references.

References: transformers' ``CLIPVisionModelWithProjection`` in the normal run; in the run against
A1111's pins (``NEGIP_A1111_PINS=1``: open-clip-torch 2.20.0, safetensors 0.4.2, ...) transformers
5 refuses to import, so an explicit float64 forward (``tiny_encoders.reference_forward``) stands
in; the normal run checks that stand-in against transformers too. Every test model is random in
every parameter.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_encoders import (
    TINY_BIGG,
    TINY_H,
    VIT_BIGG_14,
    VIT_H_14,
    hf_to_open_clip,
    hf_vision_config,
    hf_vision_state_dict,
    open_clip_to_hf,
    open_clip_vision_state_dict,
    random_pixels,
    reference_forward,
    with_text_tower_hf,
    with_text_tower_open_clip,
)

from lib_negip import encoder as encoder_module
from lib_negip.encoder import (
    EncoderShapeError,
    EncoderSpec,
    ImageEncoder,
    detect_encoder,
    encoder_from_state_dict,
    load_image_encoder,
    to_open_clip_state_dict,
)
from lib_negip.errors import ModelFileError, UnsupportedModelError

A1111_PINS = os.environ.get("NEGIP_A1111_PINS") == "1"
TOLERANCE = 1e-5
TINY_H_224 = {**TINY_H, "image_size": 224, "layers": 2}
POSITION_IDS = "vision_model.embeddings.position_ids"


def _transformers() -> Any:
    if A1111_PINS:
        pytest.skip(
            "transformers 5 does not import beside A1111's pinned safetensors 0.4.2; this run "
            "compares against the explicit float64 reference instead (test_matches_reference)"
        )
    import transformers

    return transformers


@pytest.fixture
def needs_transformers() -> None:
    """Skip before any work in the pins run (the full-size test would build 2.5 GB first)."""
    _transformers()


def transformers_forward(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_embeds, hidden_states[-2]) of transformers' model with these weights."""
    transformers = _transformers()
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**kwargs))
    weights = {k: v for k, v in state_dict.items() if k != POSITION_IDS}
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    return out.image_embeds, out.hidden_states[-2]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def both_outputs(encoder: ImageEncoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return encoder.encode(pixels, "image_embeds"), encoder.encode(pixels, "penultimate")


# Each layout variant turns a transformers-layout state dict into what a published file holds.
LAYOUTS = {
    "transformers": lambda sd: sd,
    "transformers+position_ids": lambda sd: {
        **sd,
        POSITION_IDS: torch.arange(
            sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        )[None],
    },
    "transformers-full-CLIPModel": with_text_tower_hf,
    "open_clip-bare": hf_to_open_clip,
    "open_clip-visual": lambda sd: hf_to_open_clip(sd, prefix="visual."),
    "open_clip-full-model": lambda sd: with_text_tower_open_clip(hf_to_open_clip(sd)),
}
SHAPES = {"tiny-H": TINY_H, "tiny-bigG": TINY_BIGG, "tiny-H-224": TINY_H_224}


@pytest.fixture(scope="module")
def tiny_h() -> dict[str, torch.Tensor]:
    return hf_vision_state_dict(**TINY_H)


# --- equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.usefixtures("needs_transformers")
def test_matches_transformers(shape_name: str, layout: str) -> None:
    shape = SHAPES[shape_name]
    hf = hf_vision_state_dict(**shape, seed=11)
    config = hf_vision_config(**shape)
    pixels = random_pixels(2, shape["image_size"])
    ref_embeds, ref_penultimate = transformers_forward(hf, config, pixels)

    encoder = encoder_from_state_dict(LAYOUTS[layout](hf), config)
    embeds, penultimate = both_outputs(encoder, pixels)

    assert embeds.shape == (2, shape["projection_dim"])
    grid = shape["image_size"] // shape["patch"]
    assert penultimate.shape == (2, 1 + grid * grid, shape["width"])
    assert max_diff(embeds, ref_embeds) <= TOLERANCE
    assert max_diff(penultimate, ref_penultimate) <= TOLERANCE
    assert encoder.spec.layout == (
        "open_clip" if layout.startswith("open_clip") else "transformers"
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_matches_reference(shape_name: str, layout: str) -> None:
    """The same check against the explicit reference: runs with A1111's pins too."""
    shape = SHAPES[shape_name]
    hf = hf_vision_state_dict(**shape, seed=12)
    pixels = random_pixels(2, shape["image_size"])
    ref_embeds, ref_penultimate = reference_forward(hf, pixels, heads=shape["heads"])

    encoder = encoder_from_state_dict(LAYOUTS[layout](hf), hf_vision_config(**shape))
    embeds, penultimate = both_outputs(encoder, pixels)

    assert max_diff(embeds, ref_embeds) <= TOLERANCE
    assert max_diff(penultimate, ref_penultimate) <= TOLERANCE


@pytest.mark.usefixtures("needs_transformers")
def test_reference_agrees_with_transformers() -> None:
    """The pins run's stand-in reference is itself checked against transformers."""
    hf = hf_vision_state_dict(**TINY_BIGG, seed=13)
    pixels = random_pixels(2, TINY_BIGG["image_size"])
    for act in ("gelu", "quick_gelu"):
        config = hf_vision_config(**TINY_BIGG, hidden_act=act)
        hf_embeds, hf_penultimate = transformers_forward(hf, config, pixels)
        embeds, penultimate = reference_forward(hf, pixels, TINY_BIGG["heads"], hidden_act=act)
        assert max_diff(embeds, hf_embeds) <= TOLERANCE
        assert max_diff(penultimate, hf_penultimate) <= TOLERANCE


@pytest.mark.usefixtures("needs_transformers")
def test_genuine_open_clip_state_dict_matches_transformers() -> None:
    """An open_clip-layout dict made on the open_clip side, converted to HF by the test."""
    oc = open_clip_vision_state_dict(seed=21, **TINY_BIGG)
    hf = open_clip_to_hf(oc)
    pixels = random_pixels(3, TINY_BIGG["image_size"])
    config = hf_vision_config(**TINY_BIGG)
    ref_embeds, ref_penultimate = transformers_forward(hf, config, pixels)
    embeds, penultimate = both_outputs(encoder_from_state_dict(oc, config), pixels)
    assert max_diff(embeds, ref_embeds) <= TOLERANCE
    assert max_diff(penultimate, ref_penultimate) <= TOLERANCE


def _randomised_open_clip_module(spec: EncoderSpec) -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    module = VisionTransformer(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        width=spec.width,
        layers=spec.layers,
        heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        output_dim=spec.projection_dim,
        act_layer=torch.nn.GELU,
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.endswith("weight") and param.ndim == 1:  # LayerNorm gains
                param.copy_(1 + 0.2 * noise)
            elif param.ndim >= 2 and "positional" not in name:
                param.copy_(
                    noise * param.shape[-1] ** -0.5
                    if name == "proj"
                    else noise * param[0].numel() ** -0.5
                )
            else:
                param.copy_(0.2 * noise)
    return module.eval()


def test_matches_open_clip_own_forward() -> None:
    """Our embedding steps and block loop equal the installed open_clip's own forward."""
    spec = detect_encoder(
        hf_vision_state_dict(**TINY_BIGG, device="meta"), hf_vision_config(**TINY_BIGG)
    )
    module = _randomised_open_clip_module(spec)
    captured: list[torch.Tensor] = []
    # the input of the last block is the penultimate hidden state (sequence-first on 2.20)
    module.transformer.resblocks[-1].register_forward_pre_hook(
        lambda _m, args: captured.append(args[0])
    )
    pixels = random_pixels(2, spec.image_size)
    with torch.no_grad():
        ref_embeds = module(pixels)
    ref_penultimate = captured[0]
    if ref_penultimate.shape[0] != 2:  # [T, B, W] on open-clip-torch 2.x
        ref_penultimate = ref_penultimate.transpose(0, 1)

    encoder = encoder_from_state_dict(module.state_dict(), hf_vision_config(**TINY_BIGG))
    embeds, penultimate = both_outputs(encoder, pixels)
    assert max_diff(embeds, ref_embeds) <= TOLERANCE
    assert max_diff(penultimate, ref_penultimate) <= TOLERANCE


def test_installed_open_clip_version_and_sequence_order(tiny_h: dict[str, torch.Tensor]) -> None:
    """The pins run really runs open-clip-torch 2.20.0, whose blocks are sequence-first."""
    from open_clip.version import __version__

    encoder = encoder_from_state_dict(tiny_h, hf_vision_config(**TINY_H))
    major = int(__version__.split(".")[0])
    if A1111_PINS:
        assert __version__ == "2.20.0"
    assert encoder._batch_first is (major >= 3)


def test_penultimate_does_not_run_the_last_block(tiny_h: dict[str, torch.Tensor]) -> None:
    broken = dict(tiny_h)
    last = f"vision_model.encoder.layers.{TINY_H['layers'] - 1}."
    for key in [k for k in broken if k.startswith(last)]:
        broken[key] = torch.full_like(broken[key], float("nan"))
    config = hf_vision_config(**TINY_H)
    pixels = random_pixels(1, TINY_H["image_size"])
    good = encoder_from_state_dict(tiny_h, config).encode(pixels, "penultimate")
    encoder = encoder_from_state_dict(broken, config)
    assert torch.equal(encoder.encode(pixels, "penultimate"), good)
    assert torch.isnan(encoder.encode(pixels, "image_embeds")).all()


@pytest.mark.usefixtures("needs_transformers")
def test_quick_gelu_from_config_matches_transformers() -> None:
    hf = hf_vision_state_dict(**TINY_H, seed=31)
    config = hf_vision_config(**TINY_H, hidden_act="quick_gelu")
    pixels = random_pixels(2, TINY_H["image_size"])
    encoder = encoder_from_state_dict(hf, config)
    assert encoder.spec.activation == "quick_gelu"
    embeds, penultimate = both_outputs(encoder, pixels)
    ref_embeds, ref_penultimate = transformers_forward(hf, config, pixels)
    assert max_diff(embeds, ref_embeds) <= TOLERANCE
    assert max_diff(penultimate, ref_penultimate) <= TOLERANCE


def test_quick_gelu_matches_reference_and_differs_from_gelu() -> None:
    hf = hf_vision_state_dict(**TINY_H, seed=31)
    pixels = random_pixels(2, TINY_H["image_size"])
    quick = encoder_from_state_dict(hf, hf_vision_config(**TINY_H, hidden_act="quick_gelu"))
    plain = encoder_from_state_dict(hf, hf_vision_config(**TINY_H))
    ref_embeds, _ = reference_forward(hf, pixels, TINY_H["heads"], hidden_act="quick_gelu")
    assert max_diff(quick.encode(pixels), ref_embeds) <= TOLERANCE
    # the activation matters: a wrong one is a real error, not noise
    assert max_diff(quick.encode(pixels), plain.encode(pixels)) > 1e-3


def test_heads_come_from_config(tiny_h: dict[str, torch.Tensor]) -> None:
    pixels = random_pixels(2, TINY_H["image_size"])
    for heads in (2, 4, 8):
        config = hf_vision_config(**{**TINY_H, "heads": heads})
        encoder = encoder_from_state_dict(tiny_h, config)
        assert encoder.spec.heads == heads
        ref_embeds, ref_penultimate = reference_forward(tiny_h, pixels, heads=heads)
        assert max_diff(encoder.encode(pixels), ref_embeds) <= TOLERANCE
        assert max_diff(encoder.encode(pixels, "penultimate"), ref_penultimate) <= TOLERANCE
    # without a config an unknown width gets 64-wide heads (one here), which changes the result
    default = encoder_from_state_dict(tiny_h)
    assert default.spec.heads == 1
    assert default.spec.activation == "gelu"
    ref_one_head, _ = reference_forward(tiny_h, pixels, heads=1)
    assert max_diff(default.encode(pixels), ref_one_head) <= TOLERANCE
    assert max_diff(default.encode(pixels), encoder.encode(pixels)) > 1e-3


def test_heads_from_full_clip_and_open_clip_configs() -> None:
    meta = hf_vision_state_dict(**TINY_H, device="meta")
    full = {
        "model_type": "clip",
        "vision_config": {"num_attention_heads": 8, "hidden_act": "quick_gelu"},
    }
    spec = detect_encoder(meta, full)
    assert (spec.heads, spec.activation) == (8, "quick_gelu")
    open_clip_config = {"model_cfg": {"vision_cfg": {"width": 64, "layers": 4, "head_width": 16}}}
    spec = detect_encoder(meta, open_clip_config)
    assert (spec.heads, spec.activation) == (4, "gelu")
    spec = detect_encoder(meta, {"quick_gelu": True, "vision_cfg": {"width": 64, "head_width": 32}})
    assert (spec.heads, spec.activation) == (2, "quick_gelu")


# --- detection with the real published shapes (meta tensors: nothing allocated) ---------------

REAL = {"ViT-H-14": VIT_H_14, "ViT-bigG-14": VIT_BIGG_14}
META_LAYOUTS = {
    "transformers": lambda sd: sd,
    "transformers-full-CLIPModel": lambda sd: {
        **sd,
        "text_model.embeddings.token_embedding.weight": torch.empty(49408, 1024, device="meta"),
    },
    "open_clip-bare": hf_to_open_clip,
    "open_clip-visual": lambda sd: hf_to_open_clip(sd, prefix="visual."),
}


@pytest.mark.parametrize("layout", list(META_LAYOUTS))
@pytest.mark.parametrize("name", list(REAL))
def test_detects_real_shapes_on_meta(name: str, layout: str) -> None:
    shape = REAL[name]
    state_dict = META_LAYOUTS[layout](
        hf_vision_state_dict(**shape, device="meta", position_ids=True)
    )
    spec = detect_encoder(state_dict)
    assert spec.architecture == name
    assert spec.width == shape["width"]
    assert spec.layers == shape["layers"]
    assert spec.heads == 16
    assert spec.patch_size == 14
    assert spec.image_size == 224
    assert spec.tokens == 257
    assert spec.mlp_width == shape["mlp_width"]
    assert spec.projection_dim == shape["projection_dim"]
    assert spec.activation == "gelu"
    assert spec.layout == layout.split("-")[0]


@pytest.mark.parametrize("name", list(REAL))
def test_real_shapes_build_on_the_installed_open_clip(name: str) -> None:
    """The MLP ratio survives open_clip's int(width * ratio) (bigG: 8192 / 1664 = 4.923...)."""
    spec = detect_encoder(hf_vision_state_dict(**REAL[name], device="meta"))
    module = encoder_module._build_vision_transformer(spec)  # on meta: costs nothing
    assert module.transformer.resblocks[0].mlp.c_fc.out_features == spec.mlp_width
    assert module.proj.shape == (spec.width, spec.projection_dim)
    assert len(module.transformer.resblocks) == spec.layers


def test_h94_sdxl_config_on_meta() -> None:
    config = hf_vision_config(**VIT_BIGG_14)
    spec = detect_encoder(hf_vision_state_dict(**VIT_BIGG_14, device="meta"), config)
    assert spec.describe().startswith("ViT-bigG-14 (width 1664, 48 layers, 16 heads")


def test_descriptive_name_for_unknown_shapes() -> None:
    spec = detect_encoder(hf_vision_state_dict(**{**TINY_H, "image_size": 224}, device="meta"))
    assert spec.architecture == "ViT-w64-L4-p14"
    assert (
        detect_encoder(hf_vision_state_dict(**TINY_H, device="meta")).architecture
        == "ViT-w64-L4-p14-56px"
    )


def test_spec_is_frozen() -> None:
    spec = detect_encoder(hf_vision_state_dict(**TINY_H, device="meta"))
    with pytest.raises(AttributeError):
        spec.width = 3  # type: ignore[misc]


def test_conversion_names_load_strictly_and_keep_values(tiny_h: dict[str, torch.Tensor]) -> None:
    converted = to_open_clip_state_dict(tiny_h)
    expected = hf_to_open_clip(tiny_h)
    assert sorted(converted) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


# --- without a projection -------------------------------------------------------------------


def test_tower_without_projection(tiny_h: dict[str, torch.Tensor]) -> None:
    no_proj = {k: v for k, v in tiny_h.items() if k != "visual_projection.weight"}
    encoder = encoder_from_state_dict(no_proj, hf_vision_config(**TINY_H))
    assert encoder.spec.projection_dim is None
    pixels = random_pixels(1, TINY_H["image_size"])
    _, ref_penultimate = reference_forward(tiny_h, pixels, TINY_H["heads"])
    assert max_diff(encoder.encode(pixels, "penultimate"), ref_penultimate) <= TOLERANCE
    with pytest.raises(UnsupportedModelError, match="no visual projection"):
        encoder.encode(pixels, "image_embeds")


# --- dtypes, devices, preprocessing ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu(tiny_h: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    encoder = encoder_from_state_dict(tiny_h, hf_vision_config(**TINY_H))
    pixels = random_pixels(2, TINY_H["image_size"])
    full_embeds, full_penultimate = both_outputs(encoder, pixels)
    assert encoder.to(dtype=dtype) is encoder
    assert encoder.dtype == dtype
    assert encoder.device == torch.device("cpu")
    embeds, penultimate = both_outputs(encoder, pixels)  # float32 input is cast
    assert embeds.dtype == dtype
    assert penultimate.dtype == dtype
    scale = 0.05 if dtype == torch.bfloat16 else 0.01
    assert max_diff(embeds, full_embeds) <= scale * full_embeds.abs().max().item()
    assert max_diff(penultimate, full_penultimate) <= scale * full_penultimate.abs().max().item()
    # back to float32: works, with the weights now rounded to the low precision
    assert encoder.to(dtype=torch.float32).dtype == torch.float32
    back = encoder.encode(pixels)
    assert back.dtype == torch.float32
    assert max_diff(back, full_embeds) <= scale * full_embeds.abs().max().item()


def test_loads_as_cpu_float32_eval_without_grad(tiny_h: dict[str, torch.Tensor]) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_h.items()}
    encoder = encoder_from_state_dict(half, hf_vision_config(**TINY_H))
    assert encoder.dtype == torch.float32
    assert encoder.device == torch.device("cpu")
    assert not encoder.module.training
    assert not any(p.requires_grad for p in encoder.module.parameters())
    assert "ViT-w64-L4-p14-56px" in repr(encoder)


def test_preprocess_uses_the_encoder_size(tiny_h: dict[str, torch.Tensor]) -> None:
    encoder = encoder_from_state_dict(tiny_h, hf_vision_config(**TINY_H))
    images = [Image.new("RGB", (80, 60), (200, 10, 30)), Image.new("L", (20, 90), 128)]
    pixels = encoder.preprocess(images)
    assert pixels.shape == (2, 3, 56, 56)
    assert encoder.encode(pixels).shape == (2, TINY_H["projection_dim"])


def test_rejects_wrong_pixel_shapes_and_outputs(tiny_h: dict[str, torch.Tensor]) -> None:
    encoder = encoder_from_state_dict(tiny_h, hf_vision_config(**TINY_H))
    with pytest.raises(ValueError, match=r"\[B, 3, 56, 56\].*\[1, 3, 224, 224\]"):
        encoder.encode(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="'last'"):
        encoder.encode(torch.zeros(1, 3, 56, 56), "last")  # type: ignore[arg-type]


# --- files ------------------------------------------------------------------------------------


def test_load_safetensors_file(tmp_path, tiny_h: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "clip_vision_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_h.items()}, str(path))
    encoder = load_image_encoder(path)  # no config.json: 64-wide heads, GELU
    assert encoder.spec.heads == 1
    pixels = random_pixels(1, TINY_H["image_size"])
    ref_embeds, _ = reference_forward(tiny_h, pixels, heads=1)
    assert max_diff(encoder.encode(pixels), ref_embeds) <= TOLERANCE


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_load_h94_style_folder(
    tmp_path, tiny_h: dict[str, torch.Tensor], weights_name: str
) -> None:
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    config = hf_vision_config(**TINY_H)
    (folder / "config.json").write_text(json.dumps(config))
    if weights_name.endswith(".safetensors"):
        save_file(tiny_h, str(folder / weights_name))
    else:
        torch.save(tiny_h, folder / weights_name)
    pixels = random_pixels(2, TINY_H["image_size"])
    ref_embeds, ref_penultimate = reference_forward(tiny_h, pixels, heads=TINY_H["heads"])
    for path in (folder, folder / weights_name):
        encoder = load_image_encoder(path)
        assert encoder.spec.heads == TINY_H["heads"]  # from config.json
        assert max_diff(encoder.encode(pixels), ref_embeds) <= TOLERANCE
        assert max_diff(encoder.encode(pixels, "penultimate"), ref_penultimate) <= TOLERANCE


def test_folder_without_weights(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        ModelFileError, match=r"neither model\.safetensors nor pytorch_model\.bin.*config\.json"
    ):
        load_image_encoder(tmp_path)


def test_broken_config_json(tmp_path, tiny_h: dict[str, torch.Tensor]) -> None:
    save_file(tiny_h, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"config\.json cannot be read"):
        load_image_encoder(tmp_path)


def test_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(
        ModelFileError, match=r"ip-adapter\.safetensors: This file is not a CLIP vision encoder"
    ):
        load_image_encoder(path)


# --- errors -----------------------------------------------------------------------------------


def test_not_a_clip_vision_state_dict() -> None:
    adapter = {
        "image_proj.proj.weight": torch.zeros(3072, 1024),
        "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768),
    }
    with pytest.raises(ModelFileError, match="not a CLIP vision encoder") as info:
        detect_encoder(adapter)
    assert "image_proj.proj.weight [3072, 1024]" in str(info.value)  # lists what it found
    assert "vision_model.embeddings.patch_embedding.weight" in str(
        info.value
    )  # and what it expected


def test_missing_layer_tensor(tiny_h: dict[str, torch.Tensor]) -> None:
    broken = {k: v for k, v in tiny_h.items() if k != "vision_model.encoder.layers.2.mlp.fc2.bias"}
    with pytest.raises(
        EncoderShapeError, match=r"1 tensors missing \('encoder\.layers\.2\.mlp\.fc2\.bias'\)"
    ):
        detect_encoder(broken)


def test_missing_whole_layer(tiny_h: dict[str, torch.Tensor]) -> None:
    broken = {k: v for k, v in tiny_h.items() if ".layers.1." not in k}
    with pytest.raises(EncoderShapeError, match=r"16 tensors missing \('encoder\.layers\.1\."):
        detect_encoder(broken)


def test_missing_open_clip_tensor(tiny_h: dict[str, torch.Tensor]) -> None:
    oc = hf_to_open_clip(tiny_h, prefix="visual.")
    del oc["visual.ln_post.bias"]
    with pytest.raises(EncoderShapeError, match=r"open_clip layout.*'ln_post\.bias'"):
        detect_encoder(oc)


def test_inconsistent_widths(tiny_h: dict[str, torch.Tensor]) -> None:
    broken = dict(tiny_h)
    broken["vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(200, 64)
    broken["vision_model.encoder.layers.3.self_attn.k_proj.weight"] = torch.zeros(64, 48)
    with pytest.raises(EncoderShapeError) as info:
        detect_encoder(broken)
    message = str(info.value)
    assert "width 64" in message
    assert "'encoder.layers.1.mlp.fc1.weight' is [200, 64], expected [256, 64]" in message
    assert "'encoder.layers.3.self_attn.k_proj.weight' is [64, 48], expected [64, 64]" in message


def test_inconsistent_position_embedding(tiny_h: dict[str, torch.Tensor]) -> None:
    broken = {**tiny_h, "vision_model.embeddings.position_embedding.weight": torch.zeros(20, 64)}
    with pytest.raises(EncoderShapeError, match=r"\[20, 64\]; expected \[1 \+ grid\*grid, 64\]"):
        detect_encoder(broken)
    broken = {**tiny_h, "vision_model.embeddings.position_embedding.weight": torch.zeros(17, 32)}
    with pytest.raises(EncoderShapeError, match=r"\[17, 32\]"):
        detect_encoder(broken)


def test_extra_tensors(tiny_h: dict[str, torch.Tensor]) -> None:
    extra = {**tiny_h, "vision_model.encoder.layers.0.self_attn.rel_pos": torch.zeros(3)}
    with pytest.raises(
        EncoderShapeError,
        match=r"1 unexpected tensors \('encoder\.layers\.0\.self_attn\.rel_pos'\)",
    ):
        detect_encoder(extra)


def test_heads_must_divide_width() -> None:
    meta = hf_vision_state_dict(**TINY_H, device="meta")
    with pytest.raises(
        EncoderShapeError, match=r"head count 5 \(from config\.json\) does not divide its width 64"
    ):
        detect_encoder(meta, {"num_attention_heads": 5})
    with pytest.raises(EncoderShapeError, match="head count 0"):
        detect_encoder(meta, {"num_attention_heads": 0})


def test_config_that_describes_other_weights() -> None:
    meta = hf_vision_state_dict(**TINY_H, device="meta")
    with pytest.raises(
        EncoderShapeError,
        match=r"hidden_size 1280 \(tensors: 64\).*num_hidden_layers 32 \(tensors: 4\)",
    ):
        detect_encoder(meta, hf_vision_config(**VIT_H_14))


def test_unsupported_activation() -> None:
    meta = hf_vision_state_dict(**TINY_H, device="meta")
    with pytest.raises(UnsupportedModelError, match=r"hidden_act 'relu'.*\['gelu', 'quick_gelu'\]"):
        detect_encoder(meta, {"hidden_act": "relu"})


def test_non_float_tensors(tiny_h: dict[str, torch.Tensor]) -> None:
    quantised = {
        **tiny_h,
        "vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(256, 64, dtype=torch.int8),
    }
    with pytest.raises(UnsupportedModelError, match="non-float tensors"):
        detect_encoder(quantised)


# --- full size (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("needs_transformers")
def test_full_size_vit_h_matches_transformers(record_property: Any) -> None:
    """A random ViT-H-14 of the real size (632M parameters) against transformers, one image."""
    started = time.perf_counter()
    hf = hf_vision_state_dict(**VIT_H_14, seed=99, weight_std=0.02)
    config = hf_vision_config(**VIT_H_14)
    pixels = random_pixels(1, 224)
    encoder = encoder_from_state_dict(hf, config)
    assert encoder.spec.architecture == "ViT-H-14"
    embeds, penultimate = both_outputs(encoder, pixels)
    ref_embeds, ref_penultimate = transformers_forward(hf, config, pixels)
    embeds_diff = max_diff(embeds, ref_embeds)
    penultimate_diff = max_diff(penultimate, ref_penultimate)
    report = (
        f"ViT-H-14 full size: image_embeds max|diff| {embeds_diff:.3g} (max |value| "
        f"{ref_embeds.abs().max():.3g}), penultimate max|diff| {penultimate_diff:.3g} (max |value| "
        f"{ref_penultimate.abs().max():.3g}), {time.perf_counter() - started:.1f} s"
    )
    logging.getLogger(__name__).info(report)  # shown with -rP or --log-cli-level=INFO
    record_property("full_size_vit_h", report)
    assert embeds_diff <= 1e-4
    assert penultimate_diff <= 1e-4
