"""The tiny-model writer: layouts that A1111, the IP-Adapter formats and transformers expect.

Runs the tool in-process into a temporary folder (a few seconds); needs no running A1111.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_models  # a script beside this file, not a package

# SD1.5's attn2 inner widths in IP-Adapter key order (ipadapter-formats.md), divided by 5:
# the tiny UNet's levels are 64/128/256/256 where SD1.5's are 320/640/1280/1280.
EXPECTED_INNER = [64, 64, 128, 128, 256, 256, 256, 256, 256, 128, 128, 128, 64, 64, 64, 256]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    assert make_tiny_models.main(["--out", str(root), "-q"]) == 0
    return root / "models"


def test_checkpoint_has_the_sd15_key_families_and_a_yaml_beside_it(models: Path) -> None:
    state = load_file(models / "Stable-diffusion" / "negip-tiny-sd15.safetensors")
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    emb = state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert tuple(emb.shape) == (49408, 64)
    assert tuple(state["model.diffusion_model.input_blocks.0.0.weight"].shape) == (64, 4, 3, 3)
    assert tuple(state["first_stage_model.quant_conv.weight"].shape) == (8, 8, 1, 1)
    yaml = (models / "Stable-diffusion" / "negip-tiny-sd15.yaml").read_text()
    version = yaml.split("version:")[1].strip().strip('"')
    assert (Path(version) / "config.json").is_file()
    assert (Path(version) / "vocab.json").is_file()


def test_every_parameter_is_random(models: Path) -> None:
    state = load_file(models / "Stable-diffusion" / "negip-tiny-sd15.safetensors")
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            assert tensor.std() > 0, key  # no constant norms, biases or zero-initialised outputs
    # layers that ldm initialises to zero or to identity were caught above; spot-check one of each
    assert state["model.diffusion_model.out.2.weight"].abs().min() > 0
    assert not torch.equal(
        state["model.diffusion_model.out.0.weight"],
        torch.ones_like(state["model.diffusion_model.out.0.weight"]),
    )


def test_adapters_fit_the_unet_and_the_encoder(models: Path) -> None:
    vision = json.loads((models / "clip_vision" / "negip-tiny-vit" / "config.json").read_text())
    base = load_file(models / "ipadapter" / "negip-tiny-ip-adapter_sd15.safetensors")
    plus = load_file(models / "ipadapter" / "negip-tiny-ip-adapter-plus_sd15.safetensors")
    for adapter in (base, plus):
        ip = {k[len("ip_adapter.") :]: v for k, v in adapter.items() if k.startswith("ip_adapter.")}
        assert sorted(ip) == sorted(
            f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(16) for kv in "kv"
        )
        inner = [ip[f"{2 * i + 1}.to_k_ip.weight"].shape[0] for i in range(16)]
        assert inner == EXPECTED_INNER
        assert {v.shape[1] for v in ip.values()} == {64}
    assert tuple(base["image_proj.proj.weight"].shape) == (4 * 64, vision["projection_dim"])
    assert tuple(base["image_proj.norm.weight"].shape) == (64,)
    assert tuple(plus["image_proj.latents"].shape) == (1, 16, 128)
    assert tuple(plus["image_proj.proj_in.weight"].shape) == (128, vision["hidden_size"])
    assert tuple(plus["image_proj.proj_out.weight"].shape) == (64, 128)
    assert plus["image_proj.layers.0.0.to_q.weight"].shape[0] % 64 == 0  # heads of 64
    assert {k.split(".")[2] for k in plus if k.startswith("image_proj.layers.")} == {
        "0",
        "1",
        "2",
        "3",
    }


def test_pickle_adapter_holds_the_base_adapter_nested(models: Path) -> None:
    nested = torch.load(
        models / "ipadapter" / "negip-tiny-ip-adapter_sd15-pickle.bin", weights_only=True
    )
    flat = load_file(models / "ipadapter" / "negip-tiny-ip-adapter_sd15.safetensors")
    assert sorted(nested) == ["image_proj", "ip_adapter"]
    assert {f"{group}.{key}" for group in nested for key in nested[group]} == set(flat)
    for group, tensors in nested.items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, flat[f"{group}.{key}"])


def test_vision_encoder_is_in_transformers_layout(models: Path) -> None:
    folder = models / "clip_vision" / "negip-tiny-vit"
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    width = config["hidden_size"]
    assert config["hidden_act"] == "gelu"
    assert tuple(state["vision_model.embeddings.position_embedding.weight"].shape) == (257, width)
    assert tuple(state["visual_projection.weight"].shape) == (config["projection_dim"], width)
    layers = {k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")}
    assert len(layers) == config["num_hidden_layers"]


def test_tokenizer_matches_open_clip(models: Path) -> None:
    from open_clip import tokenizer

    folder = models / "Stable-diffusion" / "negip-tiny-sd15-clip-text"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    reference = tokenizer.SimpleTokenizer()
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    for token, index in list(reference.encoder.items())[:49406]:
        assert vocab[token] == index, token
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(merges) == 1 + 48894
