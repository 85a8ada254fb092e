"""Write tiny random models that a real AUTOMATIC1111 (1.10) loads, for end-to-end tests.

Writes, under ``<root>/models/`` (``--webui`` is an A1111 checkout, ``--out`` any folder):

- ``Stable-diffusion/negip-tiny-sd15.safetensors`` + ``.yaml``: an SD1.5-shaped
  ``LatentDiffusion`` (UNet with SD1.5's block structure and 16 ``attn2`` layers, tiny widths;
  tiny VAE with 4 latent channels and factor 8; tiny CLIP text encoder of width 64), and the
  folder ``Stable-diffusion/negip-tiny-sd15-clip-text/`` (text encoder ``config.json`` plus CLIP
  tokenizer files) that the yaml's ``version:`` points at, so nothing is fetched from a hub.
- ``ipadapter/negip-tiny-ip-adapter_sd15.safetensors`` (base, 4 tokens),
  ``ipadapter/negip-tiny-ip-adapter-plus_sd15.safetensors`` (plus, 16 tokens) and
  ``ipadapter/negip-tiny-ip-adapter_sd15-pickle.bin`` (the base adapter's tensors, nested
  ``{"image_proj": ..., "ip_adapter": ...}`` torch pickle).
- ``clip_vision/negip-tiny-vit/`` ``model.safetensors`` + ``config.json``: a
  ``CLIPVisionModelWithProjection`` (hidden 96, 3 layers, 4 heads, patch 14, 224 px, projection 48).
- with ``--sdxl``: ``Stable-diffusion/negip-tiny-sdxl.safetensors`` + ``.yaml`` (sgm
  ``DiffusionEngine``, 70 ``attn2`` layers, text encoders of width 32 and 48, context 80) and
  ``ipadapter/negip-tiny-ip-adapter_sdxl.safetensors``; the tiny bigG text tower needs
  ``open_clip.add_model_config`` before the model loads (see ``tests/webui/README.md``).

Every tensor is random (numpy's PCG64 from ``--seed``), including the norms and the layers
that ldm initialises to zero: with those left at their defaults cross-attention has no effect
and A1111's prompt emphasis divides zero by zero. The UNet and VAE key names come from
instantiating the ``ldm`` (and, for SDXL, ``sgm``) classes that A1111 uses; they are imported
at run time from ``--ldm-path``/``--sgm-path``, the ``repositories/`` folder of ``--webui``, or
an installed package. Runtime needs: torch, safetensors, numpy, the standard library, the
ldm/sgm sources (which import einops, omegaconf and Pillow themselves; ``sgm`` also imports
pytorch_lightning, so ``--sdxl`` runs in A1111's venv) and open-clip-torch's BPE vocabulary
file (located, not imported). The same seed gives byte-identical files in A1111's venv and in
ours (numpy 1.26/2.x, safetensors 0.4/0.8).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import importlib.util
import io
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

LOGGER = logging.getLogger("negip.make_tiny_models")

SD15_ATTN2_LAYERS = 16
SDXL_ATTN2_LAYERS = 70

SD15_NAME = "negip-tiny-sd15"
SDXL_NAME = "negip-tiny-sdxl"
VISION_NAME = "negip-tiny-vit"
ADAPTER_BASE_NAME = "negip-tiny-ip-adapter_sd15"
ADAPTER_PLUS_NAME = "negip-tiny-ip-adapter-plus_sd15"
ADAPTER_PICKLE_NAME = "negip-tiny-ip-adapter_sd15-pickle"
ADAPTER_SDXL_NAME = "negip-tiny-ip-adapter_sdxl"

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48894 merges + 2 specials
CLIP_MERGES = 49152 - 256 - 2  # merges CLIP keeps from the BPE file
TEXT_CONTEXT = 77


@dataclass(frozen=True)
class TinySizes:
    """Widths of the tiny models; everything that has to agree is derived from here."""

    unet_channels: int = 64  # SD1.5: 320; levels are (1, 2, 4, 4) times this
    unet_heads: int = 4  # SD1.5: 8 heads at every level
    context_dim: int = 64  # SD1.5: 768 = text encoder width = IP-Adapter cross_dim
    text_layers: int = 3
    text_heads: int = 4
    vae_channels: int = 32  # ldm's GroupNorm has 32 groups: multiples of 32 only
    vision_hidden: int = 96  # ViT-H: 1280; the plus adapter's proj_in input
    vision_layers: int = 3
    vision_heads: int = 4
    vision_projection: int = 48  # ViT-H: 1024; the base adapter's proj input
    adapter_tokens: int = 4
    plus_tokens: int = 16
    plus_heads: int = 2  # heads of 64, as diffusers and ComfyUI read them (to_q rows // 64)
    plus_depth: int = 4


# --------------------------------------------------------------------------------------------
# Random tensors


class RandomTensors:
    """Draws float32 tensors from one numpy generator, so a seed gives the same files anywhere."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def normal(self, shape: Iterable[int], std: float, mean: float = 0.0) -> torch.Tensor:
        """A float32 tensor of ``shape`` with entries ~ N(mean, std^2)."""
        values = self._rng.standard_normal(tuple(shape), dtype=np.float32) * std + mean
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def weight(self, shape: Iterable[int]) -> torch.Tensor:
        """A Linear/Conv weight scaled by 1/sqrt(fan_in), so activations keep unit scale."""
        shape = tuple(shape)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return self.normal(shape, 1.0 / math.sqrt(fan_in))

    def bias(self, shape: Iterable[int]) -> torch.Tensor:
        """A bias: small, but far enough from zero that a dropped bias shows."""
        return self.normal(shape, 0.1)

    def norm_weight(self, shape: Iterable[int]) -> torch.Tensor:
        """A LayerNorm/GroupNorm scale around 1 (not exactly 1, so a missing scale shows)."""
        return self.normal(shape, 0.1, mean=1.0)

    def embedding(self, shape: Iterable[int]) -> torch.Tensor:
        """A token/position/class embedding."""
        return self.normal(shape, 0.5)


def randomise_module_state(
    module: torch.nn.Module, rng: RandomTensors, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Return ``module``'s state dict (keys prefixed) with every parameter drawn at random.

    Norm layers get scales around 1 and random shifts; other weights are scaled by fan-in;
    layers that ldm initialises to zero are random like the rest. Buffers are kept as they are.
    Tensors are drawn in sorted key order, so construction order does not change the result.
    """
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    kinds: dict[str, str] = {}
    for module_name, sub in module.named_modules():
        for param_name, _ in sub.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(sub, norm_types):
                kinds[key] = "norm_weight" if param_name == "weight" else "bias"
            elif param_name == "bias":
                kinds[key] = "bias"
            else:
                kinds[key] = "weight"
    state = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        tensor = state[key]
        kind = kinds.get(key)
        if kind is None:  # a buffer
            value = tensor.detach().clone()
        elif kind == "norm_weight":
            value = rng.norm_weight(tensor.shape)
        elif kind == "bias":
            value = rng.bias(tensor.shape)
        else:
            value = rng.weight(tensor.shape)
        out[prefix + key] = value.contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Importing A1111's ldm / sgm sources


def import_from_source(package: str, source_dir: Path | None) -> None:
    """Make ``package`` importable, from ``source_dir`` when given, else as installed."""
    if source_dir is not None:
        if not (source_dir / package).is_dir():
            msg = f"{source_dir} has no {package}/ package folder; pass the folder that holds it"
            raise SystemExit(msg)
        sys.path.insert(0, str(source_dir))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "No module 'xformers'..."
            importlib.import_module(f"{package}.modules.diffusionmodules.model")
    except ImportError as error:
        msg = (
            f"cannot import {package!r} ({error}); pass --webui (an A1111 checkout with "
            f"repositories/) or the --{package}-path folder that holds {package}/"
        )
        raise SystemExit(msg) from error


class AutoencoderKLShape(torch.nn.Module):
    """The parameter layout of ldm's ``AutoencoderKL`` without pytorch_lightning."""

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, ddconfig: dict) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        z = ddconfig["z_channels"]
        self.quant_conv = torch.nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = torch.nn.Conv2d(z, z, 1)


def vae_ddconfig(sizes: TinySizes) -> dict:
    """A tiny VAE with SD's interface: RGB in/out, 4 latent channels, 3 downsamplings (x8)."""
    return {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": sizes.vae_channels,
        "ch_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def sd15_unet_params(sizes: TinySizes) -> dict:
    """UNetModel arguments: SD1.5's v1-inference.yaml with tiny widths."""
    return {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": sizes.unet_channels,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_heads": sizes.unet_heads,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": sizes.context_dim,
        "use_checkpoint": False,
        "legacy": False,
    }


def build_vae_state(rng: RandomTensors, sizes: TinySizes, module_root: str) -> dict:
    """The VAE's random state dict under ``first_stage_model.`` (ldm or sgm Encoder/Decoder)."""
    model_module = importlib.import_module(f"{module_root}.modules.diffusionmodules.model")
    ddconfig = vae_ddconfig(sizes)
    with contextlib.redirect_stdout(io.StringIO()):  # ldm prints what it builds
        encoder = model_module.Encoder(**ddconfig)
        decoder = model_module.Decoder(**ddconfig)
    vae = AutoencoderKLShape(encoder, decoder, ddconfig)
    return randomise_module_state(vae, rng, "first_stage_model.")


# --------------------------------------------------------------------------------------------
# CLIP text encoder and tokenizer (Hugging Face layout, written by key)


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) byte alphabet in vocabulary order: printable bytes first, then the rest."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def find_clip_bpe_file(explicit: Path | None) -> Path:
    """The BPE merges file that ships inside open-clip-torch (found without importing it)."""
    if explicit is not None:
        return explicit
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    msg = (
        "open_clip/bpe_simple_vocab_16e6.txt.gz not found: install open-clip-torch in this "
        "Python or pass --bpe-file"
    )
    raise SystemExit(msg)


def write_clip_tokenizer(folder: Path, bpe_file: Path) -> None:
    """Write ``vocab.json``, ``merges.txt`` and tokenizer configs equal to OpenAI CLIP's."""
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # the first line is a version header
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [a + "</w>" for a in alphabet]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        msg = f"{bpe_file} gave {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}"
        raise SystemExit(msg)
    vocab = {token: index for index, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    tokenizer_config = {
        **specials,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TEXT_CONTEXT,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", tokenizer_config)


def clip_text_config(width: int, layers: int, heads: int, projection_dim: int) -> dict:
    """A ``CLIPTextModel`` config.json (OpenAI CLIP's tokenizer ids, quick_gelu)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": TEXT_CONTEXT,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": projection_dim,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def _clip_encoder_layers(
    rng: RandomTensors, prefix: str, width: int, intermediate: int, layers: int
) -> dict[str, torch.Tensor]:
    """Transformers' CLIP encoder layers (shared by the text and the vision tower)."""
    out: dict[str, torch.Tensor] = {}
    for index in range(layers):
        p = f"{prefix}encoder.layers.{index}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}self_attn.{proj}.weight"] = rng.weight((width, width))
            out[f"{p}self_attn.{proj}.bias"] = rng.bias((width,))
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{p}{norm}.weight"] = rng.norm_weight((width,))
            out[f"{p}{norm}.bias"] = rng.bias((width,))
        out[f"{p}mlp.fc1.weight"] = rng.weight((intermediate, width))
        out[f"{p}mlp.fc1.bias"] = rng.bias((intermediate,))
        out[f"{p}mlp.fc2.weight"] = rng.weight((width, intermediate))
        out[f"{p}mlp.fc2.bias"] = rng.bias((width,))
    return out


def build_clip_text_state(rng: RandomTensors, config: dict, prefix: str) -> dict:
    """A random ``CLIPTextModel`` state dict; keys start ``<prefix>text_model.``."""
    width = config["hidden_size"]
    p = f"{prefix}text_model."
    out = {
        f"{p}embeddings.token_embedding.weight": rng.embedding((config["vocab_size"], width)),
        f"{p}embeddings.position_embedding.weight": rng.embedding((TEXT_CONTEXT, width)),
        # int64, as in published SD1.5 checkpoints (transformers 4.30 saves this buffer)
        f"{p}embeddings.position_ids": torch.arange(TEXT_CONTEXT, dtype=torch.int64)[None],
    }
    out.update(
        _clip_encoder_layers(
            rng, p, width, config["intermediate_size"], config["num_hidden_layers"]
        )
    )
    out[f"{p}final_layer_norm.weight"] = rng.norm_weight((width,))
    # A1111's emphasis rescales by mean(z) / mean(emphasised z): keep mean(z) clearly off zero
    out[f"{p}final_layer_norm.bias"] = rng.normal((width,), 0.1, mean=0.3)
    return out


# --------------------------------------------------------------------------------------------
# CLIP vision encoder (Hugging Face CLIPVisionModelWithProjection layout)


def clip_vision_config(sizes: TinySizes) -> dict:
    """A ``CLIPVisionModelWithProjection`` config.json; LAION ViT-H/bigG use plain gelu."""
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": 4 * sizes.vision_hidden,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": sizes.vision_projection,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def build_clip_vision_state(rng: RandomTensors, config: dict) -> dict:
    """A random ``CLIPVisionModelWithProjection`` state dict (with ``position_ids``)."""
    width = config["hidden_size"]
    patch = config["patch_size"]
    positions = (config["image_size"] // patch) ** 2 + 1
    p = "vision_model."
    out = {
        f"{p}embeddings.class_embedding": rng.embedding((width,)),
        f"{p}embeddings.patch_embedding.weight": rng.weight((width, 3, patch, patch)),
        f"{p}embeddings.position_embedding.weight": rng.embedding((positions, width)),
        # published files saved by transformers < 4.31 carry this buffer; loaders drop it
        f"{p}embeddings.position_ids": torch.arange(positions, dtype=torch.int64)[None],
        f"{p}pre_layrnorm.weight": rng.norm_weight((width,)),
        f"{p}pre_layrnorm.bias": rng.bias((width,)),
    }
    out.update(
        _clip_encoder_layers(
            rng, p, width, config["intermediate_size"], config["num_hidden_layers"]
        )
    )
    out[f"{p}post_layernorm.weight"] = rng.norm_weight((width,))
    out[f"{p}post_layernorm.bias"] = rng.bias((width,))
    out["visual_projection.weight"] = rng.weight((config["projection_dim"], width))
    return out


# --------------------------------------------------------------------------------------------
# IP-Adapter files


def attn2_inner_dims(unet_state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Inner width of every ``attn2``, in IP-Adapter key order: input, output, then middle.

    Within a block, transformer blocks count up (``transformer_blocks.t``); the inner width is
    the row count of that layer's ``to_k`` weight, which is also ``to_k_ip``'s shape.
    """
    found: dict[tuple[int, int, int], int] = {}
    group_rank = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
    for key, tensor in unet_state.items():
        if not key.startswith(prefix) or not key.endswith(".attn2.to_k.weight"):
            continue
        parts = key[len(prefix) :].split(".")
        group = parts[0]
        block = int(parts[1]) if group != "middle_block" else 0
        t_index = int(parts[parts.index("transformer_blocks") + 1])
        found[(group_rank[group], block, t_index)] = tensor.shape[0]
    return [found[k] for k in sorted(found)]


def build_ip_layers(
    rng: RandomTensors, inner_dims: list[int], cross_dim: int
) -> dict[str, torch.Tensor]:
    """``ip_adapter`` part: ``{2i+1}.to_k_ip.weight`` / ``to_v_ip.weight`` [inner, cross]."""
    out: dict[str, torch.Tensor] = {}
    for index, inner in enumerate(inner_dims):
        out[f"{2 * index + 1}.to_k_ip.weight"] = rng.weight((inner, cross_dim))
        out[f"{2 * index + 1}.to_v_ip.weight"] = rng.weight((inner, cross_dim))
    return out


def build_base_projection(
    rng: RandomTensors, embed_dim: int, cross_dim: int, tokens: int
) -> dict[str, torch.Tensor]:
    """Base/light ``image_proj``: Linear(embed_dim -> tokens*cross_dim) + LayerNorm(cross_dim)."""
    return {
        "proj.weight": rng.weight((tokens * cross_dim, embed_dim)),
        "proj.bias": rng.bias((tokens * cross_dim,)),
        "norm.weight": rng.norm_weight((cross_dim,)),
        "norm.bias": rng.bias((cross_dim,)),
    }


def build_plus_projection(
    rng: RandomTensors, sizes: TinySizes, cross_dim: int
) -> dict[str, torch.Tensor]:
    """Plus ``image_proj`` (Perceiver Resampler): width = heads*64, as the published models."""
    dim = sizes.plus_heads * 64
    out: dict[str, torch.Tensor] = {
        "latents": rng.normal((1, sizes.plus_tokens, dim), 1.0 / math.sqrt(dim)),
        "proj_in.weight": rng.weight((dim, sizes.vision_hidden)),
        "proj_in.bias": rng.bias((dim,)),
        "proj_out.weight": rng.weight((cross_dim, dim)),
        "proj_out.bias": rng.bias((cross_dim,)),
        "norm_out.weight": rng.norm_weight((cross_dim,)),
        "norm_out.bias": rng.bias((cross_dim,)),
    }
    for layer in range(sizes.plus_depth):
        p = f"layers.{layer}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            out[f"{p}{norm}.weight"] = rng.norm_weight((dim,))
            out[f"{p}{norm}.bias"] = rng.bias((dim,))
        out[f"{p}0.to_q.weight"] = rng.weight((dim, dim))
        out[f"{p}0.to_kv.weight"] = rng.weight((2 * dim, dim))
        out[f"{p}0.to_out.weight"] = rng.weight((dim, dim))
        out[f"{p}1.1.weight"] = rng.weight((4 * dim, dim))
        out[f"{p}1.3.weight"] = rng.weight((dim, 4 * dim))
    return out


def flatten_adapter(
    image_proj: dict[str, torch.Tensor], ip_layers: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The ``.safetensors`` layout: flat keys prefixed ``image_proj.`` and ``ip_adapter.``."""
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_layers.items()})
    return flat


# --------------------------------------------------------------------------------------------
# Checkpoint configs (yaml text; A1111 reads them with OmegaConf)


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _yaml_block(params: dict, indent: int) -> str:
    pad = " " * indent
    return "".join(f"{pad}{key}: {_yaml_value(value)}\n" for key, value in params.items())


def sd15_yaml(sizes: TinySizes, text_encoder_dir: Path) -> str:
    """SD1.5's v1-inference.yaml with tiny widths and a local text encoder folder."""
    return (
        "# Tiny random SD1.5-shaped model for tests (written by make_tiny_models.py)\n"
        "model:\n"
        "  base_learning_rate: 1.0e-04\n"
        "  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
        "  params:\n"
        "    linear_start: 0.00085\n"
        "    linear_end: 0.0120\n"
        "    num_timesteps_cond: 1\n"
        "    log_every_t: 200\n"
        "    timesteps: 1000\n"
        '    first_stage_key: "jpg"\n'
        '    cond_stage_key: "txt"\n'
        "    image_size: 64\n"
        "    channels: 4\n"
        "    cond_stage_trainable: false\n"
        "    conditioning_key: crossattn\n"
        "    monitor: val/loss_simple_ema\n"
        "    scale_factor: 0.18215\n"
        "    use_ema: false\n"
        "    unet_config:\n"
        "      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n"
        "      params:\n" + _yaml_block(sd15_unet_params(sizes), 8) + "    first_stage_config:\n"
        "      target: ldm.models.autoencoder.AutoencoderKL\n"
        "      params:\n"
        "        embed_dim: 4\n"
        "        monitor: val/rec_loss\n"
        "        ddconfig:\n" + _yaml_block(vae_ddconfig(sizes), 10) + "        lossconfig:\n"
        "          target: torch.nn.Identity\n"
        "    cond_stage_config:\n"
        "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
        "      params:\n"
        f"        version: {json.dumps(str(text_encoder_dir))}\n"
    )


# --------------------------------------------------------------------------------------------
# SDXL (optional)


@dataclass(frozen=True)
class TinySdxlSizes:
    """Widths of the tiny SDXL: two text towers of different widths, concatenated context."""

    unet_channels: int = 32  # SDXL: 320, levels (1, 2, 4)
    unet_head_channels: int = 16  # SDXL: 64
    clip_l_width: int = 32  # SDXL: 768
    clip_l_layers: int = 3  # SDXL takes the penultimate layer (hidden_states[layers - 1])
    clip_l_heads: int = 2
    clip_g_width: int = 48  # SDXL: 1280
    clip_g_heads: int = 4
    clip_g_layers: int = 3
    adm_in_channels: int = 48 + 6 * 256  # pooled bigG (projected) + 6 size/crop embeddings

    @property
    def context_dim(self) -> int:
        return self.clip_l_width + self.clip_g_width


# open_clip builds only architectures it knows by name: the tiny bigG's config is written as
# <this name>.json and must be registered (open_clip.add_model_config) before A1111 builds the
# model; with --webui the tool writes a helper extension that does it.
SDXL_OPEN_CLIP_NAME = "negip-tiny-bigG"
HELPER_EXTENSION = "negip-tiny-open-clip-config"
HELPER_SCRIPT = """\
# Test helper written by sd-webui-negative-image-prompt's tests/webui/make_tiny_models.py; not
# part of that extension. Registers the tiny open_clip text tower that {yaml} names, before
# A1111 loads a model (extension scripts run before the model-loading thread starts).
import open_clip

open_clip.add_model_config({folder!r})
"""


def sdxl_open_clip_config(sizes: TinySdxlSizes) -> dict:
    """The open_clip model config of the tiny bigG text tower (vision part tiny, unused)."""
    return {
        "embed_dim": sizes.clip_g_width,
        "vision_cfg": {
            "image_size": 28,
            "layers": 1,
            "width": 32,
            "head_width": 32,
            "patch_size": 14,
        },
        "text_cfg": {
            "context_length": TEXT_CONTEXT,
            "vocab_size": CLIP_VOCAB_SIZE,
            "width": sizes.clip_g_width,
            "heads": sizes.clip_g_heads,
            "layers": sizes.clip_g_layers,
        },
    }


def sdxl_unet_params(sizes: TinySdxlSizes) -> dict:
    """sgm UNetModel arguments: sd_xl_base.yaml with tiny widths (70 attn2 layers)."""
    return {
        "adm_in_channels": sizes.adm_in_channels,
        "num_classes": "sequential",
        "use_checkpoint": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": sizes.unet_channels,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_head_channels": sizes.unet_head_channels,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10],
        "context_dim": sizes.context_dim,
        "spatial_transformer_attn_type": "softmax-xformers",
        "legacy": False,
    }


def sdxl_yaml(sizes: TinySdxlSizes, clip_l_dir: Path, sd15_sizes: TinySizes) -> str:
    """sd_xl_base.yaml with tiny widths, a local CLIP-L folder and the tiny bigG config name."""
    embedder_params = "            params:\n              outdim: 256\n"
    return (
        "# Tiny random SDXL-shaped model for tests (written by make_tiny_models.py)\n"
        "model:\n"
        "  target: sgm.models.diffusion.DiffusionEngine\n"
        "  params:\n"
        "    scale_factor: 0.13025\n"
        "    disable_first_stage_autocast: True\n"
        "    denoiser_config:\n"
        "      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser\n"
        "      params:\n"
        "        num_idx: 1000\n"
        "        weighting_config:\n"
        "          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting\n"
        "        scaling_config:\n"
        "          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling\n"
        "        discretization_config:\n"
        "          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization\n"
        "    network_config:\n"
        "      target: sgm.modules.diffusionmodules.openaimodel.UNetModel\n"
        "      params:\n" + _yaml_block(sdxl_unet_params(sizes), 8) + "    conditioner_config:\n"
        "      target: sgm.modules.GeneralConditioner\n"
        "      params:\n"
        "        emb_models:\n"
        "          - is_trainable: False\n"
        "            input_key: txt\n"
        "            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder\n"
        "            params:\n"
        "              layer: hidden\n"
        f"              layer_idx: {sizes.clip_l_layers - 1}\n"
        f"              version: {json.dumps(str(clip_l_dir))}\n"
        "          - is_trainable: False\n"
        "            input_key: txt\n"
        "            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2\n"
        "            params:\n"
        f"              arch: {SDXL_OPEN_CLIP_NAME}\n"
        "              version: null\n"
        "              freeze: True\n"
        "              layer: penultimate\n"
        "              always_return_pooled: True\n"
        "              legacy: False\n"
        "          - is_trainable: False\n"
        "            input_key: original_size_as_tuple\n"
        "            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND\n"
        + embedder_params
        + "          - is_trainable: False\n"
        "            input_key: crop_coords_top_left\n"
        "            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND\n"
        + embedder_params
        + "          - is_trainable: False\n"
        "            input_key: target_size_as_tuple\n"
        "            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND\n"
        + embedder_params
        + "    first_stage_config:\n"
        "      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper\n"
        "      params:\n"
        "        embed_dim: 4\n"
        "        monitor: val/rec_loss\n"
        "        ddconfig:\n"
        + _yaml_block({**vae_ddconfig(sd15_sizes), "attn_type": "vanilla"}, 10)
        + "        lossconfig:\n"
        "          target: torch.nn.Identity\n"
    )


def build_open_clip_text_state(
    rng: RandomTensors, sizes: TinySdxlSizes, prefix: str
) -> dict[str, torch.Tensor]:
    """open_clip text tower keys as SDXL checkpoints store them (``conditioner.embedders.1.model.``)."""
    width = sizes.clip_g_width
    out: dict[str, torch.Tensor] = {
        f"{prefix}token_embedding.weight": rng.embedding((CLIP_VOCAB_SIZE, width)),
        f"{prefix}positional_embedding": rng.embedding((TEXT_CONTEXT, width)),
        f"{prefix}ln_final.weight": rng.norm_weight((width,)),
        f"{prefix}ln_final.bias": rng.bias((width,)),
        f"{prefix}text_projection": rng.weight((width, width)),
        f"{prefix}logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for layer in range(sizes.clip_g_layers):
        p = f"{prefix}transformer.resblocks.{layer}."
        out[f"{p}attn.in_proj_weight"] = rng.weight((3 * width, width))
        out[f"{p}attn.in_proj_bias"] = rng.bias((3 * width,))
        out[f"{p}attn.out_proj.weight"] = rng.weight((width, width))
        out[f"{p}attn.out_proj.bias"] = rng.bias((width,))
        for norm in ("ln_1", "ln_2"):
            out[f"{p}{norm}.weight"] = rng.norm_weight((width,))
            out[f"{p}{norm}.bias"] = rng.bias((width,))
        out[f"{p}mlp.c_fc.weight"] = rng.weight((4 * width, width))
        out[f"{p}mlp.c_fc.bias"] = rng.bias((4 * width,))
        out[f"{p}mlp.c_proj.weight"] = rng.weight((width, 4 * width))
        out[f"{p}mlp.c_proj.bias"] = rng.bias((width,))
    return out


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class Written:
    """One written file and a one-line description for the summary."""

    path: Path
    description: str


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Save with only ``{"format": "pt"}`` as metadata (what transformers 4.30 requires).

    safetensors keeps metadata in a hash map whose order changes from run to run: with more
    than one entry the header, and so A1111's model hash, would differ on every run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_sd15(
    models: Path, rng: RandomTensors, sizes: TinySizes, bpe_file: Path
) -> tuple[list[Written], dict[str, torch.Tensor]]:
    """Write the SD1.5 checkpoint, its yaml and its text encoder folder; return the UNet state."""
    openaimodel = importlib.import_module("ldm.modules.diffusionmodules.openaimodel")
    with contextlib.redirect_stdout(io.StringIO()):  # ldm prints what it builds
        unet = openaimodel.UNetModel(**sd15_unet_params(sizes))
    unet_state = randomise_module_state(unet, rng, "model.diffusion_model.")
    del unet
    vae_state = build_vae_state(rng, sizes, "ldm")
    text_config = clip_text_config(
        sizes.context_dim, sizes.text_layers, sizes.text_heads, sizes.context_dim
    )
    text_state = build_clip_text_state(rng, text_config, "cond_stage_model.transformer.")

    folder = models / "Stable-diffusion"
    text_dir = (folder / f"{SD15_NAME}-clip-text").resolve()
    write_clip_tokenizer(text_dir, bpe_file)
    _write_json(text_dir / "config.json", text_config)
    checkpoint = folder / f"{SD15_NAME}.safetensors"
    _save_safetensors(checkpoint, {**unet_state, **vae_state, **text_state})
    yaml_path = folder / f"{SD15_NAME}.yaml"
    yaml_path.write_text(sd15_yaml(sizes, text_dir), encoding="utf-8")
    n_attn2 = len(attn2_inner_dims(unet_state, "model.diffusion_model."))
    if n_attn2 != SD15_ATTN2_LAYERS:
        msg = f"the ldm UNet built has {n_attn2} attn2 layers, SD1.5 has {SD15_ATTN2_LAYERS}"
        raise SystemExit(msg)
    written = [
        Written(
            checkpoint,
            f"SD1.5-shaped LatentDiffusion: UNet {sizes.unet_channels}x(1,2,4,4), "
            f"{n_attn2} attn2, context {sizes.context_dim}; VAE ch {sizes.vae_channels}; "
            f"CLIP text {sizes.context_dim} wide, {sizes.text_layers} layers",
        ),
        Written(yaml_path, "its ldm config (A1111 picks a .yaml of the same stem)"),
        Written(text_dir, "CLIPTextModel config.json + CLIP tokenizer (vocab.json, merges.txt)"),
    ]
    return written, unet_state


def write_vision(models: Path, rng: RandomTensors, sizes: TinySizes) -> list[Written]:
    """Write the tiny CLIPVisionModelWithProjection folder."""
    folder = models / "clip_vision" / VISION_NAME
    config = clip_vision_config(sizes)
    _write_json(folder / "config.json", config)
    _save_safetensors(folder / "model.safetensors", build_clip_vision_state(rng, config))
    return [
        Written(
            folder / "model.safetensors",
            f"CLIPVisionModelWithProjection: hidden {sizes.vision_hidden}, "
            f"{sizes.vision_layers} layers, {sizes.vision_heads} heads, patch 14, 224 px, "
            f"projection {sizes.vision_projection}, gelu",
        ),
        Written(folder / "config.json", "its transformers config"),
    ]


def write_sd15_adapters(
    models: Path,
    rng: RandomTensors,
    sizes: TinySizes,
    unet_state: dict[str, torch.Tensor],
) -> list[Written]:
    """Write the base and plus adapters (.safetensors) and the base adapter as a .bin pickle."""
    inner_dims = attn2_inner_dims(unet_state, "model.diffusion_model.")
    cross = sizes.context_dim
    folder = models / "ipadapter"
    base_proj = build_base_projection(rng, sizes.vision_projection, cross, sizes.adapter_tokens)
    base_layers = build_ip_layers(rng, inner_dims, cross)
    plus_proj = build_plus_projection(rng, sizes, cross)
    plus_layers = build_ip_layers(rng, inner_dims, cross)

    base_path = folder / f"{ADAPTER_BASE_NAME}.safetensors"
    _save_safetensors(base_path, flatten_adapter(base_proj, base_layers))
    plus_path = folder / f"{ADAPTER_PLUS_NAME}.safetensors"
    _save_safetensors(plus_path, flatten_adapter(plus_proj, plus_layers))
    pickle_path = folder / f"{ADAPTER_PICKLE_NAME}.bin"
    torch.save({"image_proj": base_proj, "ip_adapter": base_layers}, pickle_path)
    layers = f"{len(inner_dims)} attn2 layers (keys 1..{2 * len(inner_dims) - 1})"
    return [
        Written(
            base_path,
            f"base: {sizes.adapter_tokens} tokens x {cross}, proj input {sizes.vision_projection} "
            f"(image_embeds), {layers}",
        ),
        Written(
            plus_path,
            f"plus: {sizes.plus_tokens} tokens, resampler {sizes.plus_heads}x64 wide, depth "
            f"{sizes.plus_depth}, proj_in input {sizes.vision_hidden} (penultimate hidden "
            f"states), {layers}",
        ),
        Written(pickle_path, "the base adapter's tensors as a nested torch pickle"),
    ]


def write_sdxl(
    models: Path,
    rng: RandomTensors,
    sizes: TinySizes,
    bpe_file: Path,
    extensions: Path | None,
) -> list[Written]:
    """Write the tiny SDXL checkpoint, its yaml, its text encoder configs and a base adapter.

    With ``extensions`` (an A1111 extensions folder), also write the helper extension that
    registers the tiny open_clip architecture.
    """
    xl = TinySdxlSizes()
    openaimodel = importlib.import_module("sgm.modules.diffusionmodules.openaimodel")
    # key names do not depend on the attention implementation; xformers may be absent here
    params = {k: v for k, v in sdxl_unet_params(xl).items() if k != "spatial_transformer_attn_type"}
    with contextlib.redirect_stdout(io.StringIO()):
        unet = openaimodel.UNetModel(**params)
    unet_state = randomise_module_state(unet, rng, "model.diffusion_model.")
    del unet
    vae_state = build_vae_state(rng, sizes, "sgm")
    clip_l_config = clip_text_config(
        xl.clip_l_width, xl.clip_l_layers, xl.clip_l_heads, xl.clip_l_width
    )
    clip_l_state = build_clip_text_state(rng, clip_l_config, "conditioner.embedders.0.transformer.")
    clip_g_state = build_open_clip_text_state(rng, xl, "conditioner.embedders.1.model.")

    folder = models / "Stable-diffusion"
    clip_l_dir = (folder / f"{SDXL_NAME}-clip-l").resolve()
    write_clip_tokenizer(clip_l_dir, bpe_file)
    _write_json(clip_l_dir / "config.json", clip_l_config)
    open_clip_dir = (folder / f"{SDXL_NAME}-open-clip").resolve()
    _write_json(open_clip_dir / f"{SDXL_OPEN_CLIP_NAME}.json", sdxl_open_clip_config(xl))
    checkpoint = folder / f"{SDXL_NAME}.safetensors"
    state = {**unet_state, **vae_state, **clip_l_state, **clip_g_state}
    _save_safetensors(checkpoint, state)
    yaml_path = folder / f"{SDXL_NAME}.yaml"
    yaml_path.write_text(sdxl_yaml(xl, clip_l_dir, sizes), encoding="utf-8")

    inner_dims = attn2_inner_dims(unet_state, "model.diffusion_model.")
    if len(inner_dims) != SDXL_ATTN2_LAYERS:
        msg = f"the sgm UNet built has {len(inner_dims)} attn2 layers, SDXL has {SDXL_ATTN2_LAYERS}"
        raise SystemExit(msg)
    adapter_path = models / "ipadapter" / f"{ADAPTER_SDXL_NAME}.safetensors"
    adapter = flatten_adapter(
        build_base_projection(rng, sizes.vision_projection, xl.context_dim, sizes.adapter_tokens),
        build_ip_layers(rng, inner_dims, xl.context_dim),
    )
    _save_safetensors(adapter_path, adapter)
    written = [
        Written(
            checkpoint,
            f"SDXL-shaped DiffusionEngine: UNet {xl.unet_channels}x(1,2,4), {len(inner_dims)} "
            f"attn2, context {xl.context_dim} (CLIP-L {xl.clip_l_width} + bigG {xl.clip_g_width})",
        ),
        Written(yaml_path, f"its sgm config (open_clip arch {SDXL_OPEN_CLIP_NAME!r})"),
        Written(clip_l_dir, "CLIP-L CLIPTextModel config.json + tokenizer"),
        Written(
            open_clip_dir,
            f"{SDXL_OPEN_CLIP_NAME}.json: open_clip config to register before loading",
        ),
        Written(
            adapter_path,
            f"SDXL base adapter: {sizes.adapter_tokens} tokens x {xl.context_dim}, proj input "
            f"{sizes.vision_projection}, {len(inner_dims)} attn2 layers",
        ),
    ]
    if extensions is not None:
        script = extensions / HELPER_EXTENSION / "scripts" / "register_open_clip_config.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(
            HELPER_SCRIPT.format(yaml=yaml_path.name, folder=str(open_clip_dir)), encoding="utf-8"
        )
        written.append(Written(script, "helper extension: open_clip.add_model_config(...)"))
    return written


def _describe(written: Iterable[Written], root: Path) -> Iterator[str]:
    for item in written:
        try:
            shown = item.path.relative_to(root)
        except ValueError:
            shown = item.path
        if item.path.is_file():
            size = f"{item.path.stat().st_size / 2**20:7.2f} MiB"
        else:
            size = "  (folder)  "
        yield f"  {size}  {shown}: {item.description}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write tiny random SD1.5 / IP-Adapter / CLIP vision models for A1111 tests.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--webui", type=Path, help="A1111 checkout: writes into its models/")
    where.add_argument("--out", type=Path, help="folder to write models/ into")
    parser.add_argument(
        "--ldm-path",
        type=Path,
        help="folder holding the ldm/ package (default: <webui>/repositories/"
        "stable-diffusion-stability-ai, else the installed ldm)",
    )
    parser.add_argument(
        "--sgm-path",
        type=Path,
        help="folder holding the sgm/ package, for --sdxl (default: <webui>/repositories/"
        "generative-models, else the installed sgm)",
    )
    parser.add_argument("--bpe-file", type=Path, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--unet-channels",
        type=int,
        default=TinySizes.unet_channels,
        help="UNet model_channels, a multiple of 32 (default %(default)s: widths 64/128/256/256)",
    )
    parser.add_argument("--sdxl", action="store_true", help="also write the tiny SDXL model")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary")
    args = parser.parse_args(argv)
    if args.unet_channels % 32 or args.unet_channels % TinySizes.unet_heads:
        parser.error("--unet-channels must be a multiple of 32 (ldm's GroupNorm has 32 groups)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: write the models and print what was written."""
    args = parse_args(argv)
    if not LOGGER.handlers:  # our own logger only: main() also runs inside pytest
        LOGGER.addHandler(logging.StreamHandler())
        LOGGER.propagate = False
    LOGGER.setLevel(logging.WARNING if args.quiet else logging.INFO)
    root = (args.webui or args.out).resolve()
    models = root / "models"
    repositories = root / "repositories" if args.webui else None

    ldm_path = args.ldm_path
    if ldm_path is None and repositories is not None:
        ldm_path = repositories / "stable-diffusion-stability-ai"
    import_from_source("ldm", ldm_path)
    if args.sdxl:  # before writing anything
        sgm_path = args.sgm_path
        if sgm_path is None and repositories is not None:
            sgm_path = repositories / "generative-models"
        import_from_source("sgm", sgm_path)
    bpe_file = find_clip_bpe_file(args.bpe_file)

    torch.manual_seed(args.seed)  # ldm's own initialisation is overwritten; keep runs identical
    sizes = TinySizes(unet_channels=args.unet_channels)
    rng = RandomTensors(args.seed)
    written, unet_state = write_sd15(models, rng, sizes, bpe_file)
    written += write_vision(models, rng, sizes)
    written += write_sd15_adapters(models, rng, sizes, unet_state)
    if args.sdxl:
        extensions = root / "extensions" if args.webui else None
        written += write_sdxl(models, rng, sizes, bpe_file, extensions)

    LOGGER.info("wrote under %s:\n%s", root, "\n".join(_describe(written, root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
