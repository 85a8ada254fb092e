"""IP-Adapter models: what a state dict is (detected from its tensors) and the module it loads into.

A published IP-Adapter holds ``image_proj.*`` (encoder output -> image tokens, see
:mod:`lib_negip.projection`) and ``ip_adapter.{k}.to_k_ip.weight`` / ``to_v_ip.weight`` with
k = 2i+1 for the i-th cross-attention layer of the UNet. The variant, the widths and the image
encoder it needs are read from tensor shapes only, never from file names, and every tensor is
checked against the module it must load into, so a damaged file fails here with a message
rather than deep inside sampling.

Shapes: ``B`` images, ``T`` encoder tokens, ``E`` encoder width, ``N`` image tokens,
``C`` cross-attention width, ``I`` a layer's attention width.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from lib_negip import files, logger
from lib_negip.errors import IncompatibleModelError, ModelFileError, UnsupportedModelError
from lib_negip.projection import (
    RESAMPLER_HEAD_DIM,
    LinearProjectionConfig,
    MLPProjectionConfig,
    ProjectionConfig,
    ResamplerConfig,
    build_projection,
)

VARIANTS = ("base", "plus", "full_face")

_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def family_of(context_width: int) -> str:
    """The base-model family of a UNet context width, for messages: "SDXL (context width 2048)"."""
    family = _FAMILIES.get(context_width)
    if family is None:
        return f"a model family of context width {context_width}"
    return f"{family} (context width {context_width})"


# open_clip architecture by the width an adapter reads: projected embeds (base) or hidden states.
_ENCODER_BY_EMBED_DIM = {1024: "ViT-H-14", 1280: "ViT-bigG-14"}
_ENCODER_BY_HIDDEN_WIDTH = {1280: "ViT-H-14", 1664: "ViT-bigG-14"}

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")

_FACEID_ADVICE = (
    "FaceID adapters need face embeddings from insightface, which this extension does not "
    "provide: choose a non-FaceID IP-Adapter (e.g. ip-adapter-plus-face)"
)


class EncoderLike(Protocol):
    """What :meth:`AdapterSpec.check_encoder` reads from an image encoder's spec."""

    width: int  # hidden width of the vision transformer
    projection_dim: int | None  # width of the projected image embeds; None without a projection
    architecture: str  # open_clip name, e.g. "ViT-H-14"


@dataclass(frozen=True)
class AdapterSpec:
    """What an IP-Adapter state dict is, read from its tensor shapes."""

    variant: str  # "base" (also "light"), "plus" (also "plus-face") or "full_face"
    cross_attention_dim: int  # C: the UNet context width it was trained for
    # N image tokens per image; None for full-face, which makes one token per encoder token
    # (257 for ViT-H-14 at 224 px): see tokens_for().
    num_tokens: int | None
    encoder_output: str  # "image_embeds" (pooled, projected) or "penultimate" (hidden states)
    encoder_dim: int  # E: projection dim ("image_embeds") or hidden width ("penultimate")
    num_layers: int  # cross-attention layers it patches
    layer_inner_dims: tuple[int, ...]  # I per layer, layer i <-> key 2i+1
    projection: ProjectionConfig

    @property
    def family(self) -> str:
        """Base-model family, for messages only: the UNet's context width decides fits."""
        return _FAMILIES.get(self.cross_attention_dim, f"unknown ({self.cross_attention_dim})")

    @property
    def encoder_architecture(self) -> str | None:
        """The open_clip architecture of the published encoder it needs, if one is known."""
        table = (
            _ENCODER_BY_EMBED_DIM
            if self.encoder_output == "image_embeds"
            else _ENCODER_BY_HIDDEN_WIDTH
        )
        return table.get(self.encoder_dim)

    def tokens_for(self, encoder_tokens: int) -> int:
        """Image tokens per image when the encoder yields ``encoder_tokens`` hidden states."""
        return encoder_tokens if self.num_tokens is None else self.num_tokens

    def describe(self) -> str:
        """One line for logs, model lists and messages."""
        variant = {
            "base": "base/light (linear projection)",
            "plus": "plus (Perceiver resampler)",
            "full_face": "full-face (MLP projection)",
        }[self.variant]
        tokens = (
            "one token per encoder token"
            if self.num_tokens is None
            else f"{self.num_tokens} tokens"
        )
        return (
            f"{variant}, {self.family} (cross-attention {self.cross_attention_dim}), {tokens}, "
            f"{self.num_layers} layers, needs {self._encoder_requirement()}"
        )

    def fits_encoder(self, encoder: EncoderLike) -> bool:
        """Whether ``encoder`` (an ``EncoderSpec`` or alike) produces what this adapter reads."""
        if self.encoder_output == "image_embeds":
            return encoder.projection_dim == self.encoder_dim
        return encoder.width == self.encoder_dim

    def check_encoder(
        self,
        encoder: EncoderLike,
        *,
        adapter_name: str = "this IP-Adapter",
        encoder_name: str = "the image encoder",
    ) -> None:
        """Raise :class:`IncompatibleModelError` unless ``encoder`` fits this adapter."""
        if self.fits_encoder(encoder):
            return
        need = self._encoder_requirement()
        arch = self.encoder_architecture
        choose = (
            f"choose a {arch} encoder or 'auto'"
            if arch
            else "choose an encoder that fits or 'auto'"
        )
        if self.encoder_output == "image_embeds" and encoder.projection_dim is None:
            found = f"{encoder.architecture} without a visual projection (its file holds only the vision tower)"
        elif self.encoder_output == "image_embeds":
            found = f"{encoder.architecture} (projection dim {encoder.projection_dim})"
        else:
            found = f"{encoder.architecture} (width {encoder.width})"
        msg = f"{adapter_name} needs {need}, but {encoder_name} is {found}: {choose}"
        raise IncompatibleModelError(msg)

    def _encoder_requirement(self) -> str:
        arch = self.encoder_architecture or "no published encoder known"
        if self.encoder_output == "image_embeds":
            return f"an image encoder with projection dim {self.encoder_dim} ({arch})"
        return f"an image encoder with hidden width {self.encoder_dim} ({arch})"


def detect_adapter(
    state_dict: Mapping[str, torch.Tensor], *, name: str = "this IP-Adapter"
) -> AdapterSpec:
    """Read an IP-Adapter's spec from a flat published state dict (``meta`` tensors work).

    ``name`` (usually the file name) appears in the error messages. Raises
    :class:`UnsupportedModelError` for FaceID adapters and unknown projections, and
    :class:`ModelFileError` for anything damaged or not an IP-Adapter.
    """
    image_proj = _strip_prefix(state_dict, "image_proj.")
    layers = _strip_prefix(state_dict, "ip_adapter.")
    if not image_proj and not layers:
        msg = f"{name} is not an IP-Adapter: it has no image_proj.* or ip_adapter.* keys"
        kind = _guess_file_kind(state_dict.keys())
        msg += (
            f" and looks like {kind}"
            if kind
            else f" (it holds {files.describe_state_dict(state_dict)})"
        )
        msg += ": choose an IP-Adapter model file (ip-adapter*.safetensors or .bin)"
        if kind and kind.startswith("an image encoder"):
            msg += (
                ", and move this one into models/clip_vision (a folder of its own, with its "
                "config.json), where image encoders belong"
            )
        raise ModelFileError(msg)
    _reject_faceid(image_proj, layers, name)
    if not image_proj or not layers:
        present, absent = ("ip_adapter", "image_proj") if layers else ("image_proj", "ip_adapter")
        msg = (
            f"{name} is incomplete: it has {present}.* keys but no {absent}.* keys; a published "
            "IP-Adapter has both: download the complete file again"
        )
        raise ModelFileError(msg)
    not_float = [f"{k} ({v.dtype})" for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        msg = (
            f"{name} has non-float tensors where weights are expected: {', '.join(not_float[:4])}"
            f"{' ...' if len(not_float) > 4 else ''}; it is not a usable IP-Adapter: download it again"
        )
        raise ModelFileError(msg)

    cross_dim, inner_dims = _read_layers(layers, name)
    variant, config = _read_projection(image_proj, cross_dim, name)
    _check_projection_shapes(image_proj, config, name)
    if isinstance(config, LinearProjectionConfig):
        num_tokens: int | None = config.num_tokens
        encoder_output, encoder_dim = "image_embeds", config.embed_dim
    elif isinstance(config, ResamplerConfig):
        num_tokens = config.num_queries
        encoder_output, encoder_dim = "penultimate", config.embed_width
    else:
        num_tokens = None
        encoder_output, encoder_dim = "penultimate", config.width
    spec = AdapterSpec(
        variant=variant,
        cross_attention_dim=cross_dim,
        num_tokens=num_tokens,
        encoder_output=encoder_output,
        encoder_dim=encoder_dim,
        num_layers=len(inner_dims),
        layer_inner_dims=inner_dims,
        projection=config,
    )
    logger.debug("%s: %s", name, spec.describe())
    return spec


class AdapterLayer(nn.Module):
    """The image key/value projections of one cross-attention layer."""

    def __init__(self, cross_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, inner_dim, bias=False)  # [B, N, C] -> [B, N, I]
        self.to_v_ip = nn.Linear(cross_dim, inner_dim, bias=False)


class IPAdapter(nn.Module):
    """An IP-Adapter: ``image_proj`` makes image tokens, ``layers[i]`` serves UNet layer i."""

    def __init__(self, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.image_proj = build_projection(spec.projection)
        self.layers = nn.ModuleList(
            AdapterLayer(spec.cross_attention_dim, inner) for inner in spec.layer_inner_dims
        )

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Encoder output -> image tokens [B, N, C], in this module's dtype and device.

        ``embeds`` is [B, E] image embeds (base) or [B, T, E] penultimate hidden states (plus,
        full-face). Runs under ``torch.inference_mode``: the result is an inference tensor.
        """
        spec = self.spec
        want_ndim = 2 if spec.encoder_output == "image_embeds" else 3
        if embeds.ndim != want_ndim or embeds.shape[-1] != spec.encoder_dim:
            layout = "[B, E]" if want_ndim == 2 else "[B, T, E]"
            msg = (
                f"the IP-Adapter ({spec.describe()}) got encoder output of shape "
                f"{list(embeds.shape)}; expected {spec.encoder_output} {layout} with "
                f"E = {spec.encoder_dim}: choose an image encoder that fits or 'auto'"
            )
            raise IncompatibleModelError(msg)
        weight = next(self.image_proj.parameters())
        with torch.inference_mode():
            return self.image_proj(embeds.to(device=weight.device, dtype=weight.dtype))

    def layer_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(to_k_ip, to_v_ip)`` weights [I, C] per layer, in adapter order (for the hijack)."""
        return [(layer.to_k_ip.weight, layer.to_v_ip.weight) for layer in self.layers]

    def load_published_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load published keys (``image_proj.*``, ``ip_adapter.{2i+1}.*``) strictly."""
        self.load_state_dict(_to_module_keys(state_dict), strict=True)


def adapter_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, name: str = "this IP-Adapter"
) -> IPAdapter:
    """Detect, build and load an :class:`IPAdapter`: CPU, float32, eval, no gradients."""
    spec = detect_adapter(state_dict, name=name)
    _check_finite(state_dict, name)
    # Building on meta skips initialising weights that the load overwrites anyway.
    with torch.device("meta"):
        adapter = IPAdapter(spec)
    adapter = adapter.to_empty(device="cpu").to(torch.float32)
    adapter.load_published_state_dict(state_dict)
    adapter.eval().requires_grad_(False)
    return adapter


def load_adapter(path: str | Path) -> IPAdapter:
    """Read an IP-Adapter file (``.safetensors`` preferred, ``.bin`` safely) into an :class:`IPAdapter`."""
    path = Path(path)
    adapter = adapter_from_state_dict(files.load_state_dict(path), name=path.name)
    logger.info("loaded IP-Adapter %s: %s", path.name, adapter.spec.describe())
    return adapter


def _check_finite(state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Damaged data behind a sound header shows as NaN or infinity; refuse it here, where the
    file can be named, not as an all-NaN image (A1111 would blame the checkpoint or the VAE)."""
    bad = sorted(k for k, v in state_dict.items() if not bool(torch.isfinite(v).all()))
    if bad:
        msg = (
            f"{name} has non-finite values (NaN or infinity) in {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}: the file is damaged; download it again"
        )
        raise ModelFileError(msg)


def _to_module_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("image_proj."):
            converted[key] = value
            continue
        match = _LAYER_KEY.match(key.removeprefix("ip_adapter."))
        if key.startswith("ip_adapter.") and match:
            index = (int(match.group(1)) - 1) // 2
            converted[f"layers.{index}.{match.group(2)}.weight"] = value
        else:
            converted[key] = value  # left for strict loading to report
    return converted


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _guess_file_kind(keys: Iterable[str]) -> str | None:
    """A name for what a non-IP-Adapter file looks like, so the user knows what they picked."""
    names = [str(k) for k in keys]

    def some(*parts: str) -> bool:
        return any(part in k for k in names for part in parts)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in names)

    if starts("image_proj_model.") and starts("adapter_modules."):
        return (
            "an IP-Adapter training checkpoint (image_proj_model.*, adapter_modules.*); convert it "
            "to image_proj/ip_adapter keys as the IP-Adapter README describes"
        )
    if starts("lora_unet_", "lora_te") or some("lora_down", "lora_up", ".lora_A.", ".lora.down."):
        return "a LoRA"
    if starts("control_model.") or some("input_hint_block", "controlnet_cond_embedding"):
        return "a ControlNet model"
    if starts("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."):
        return "a Stable Diffusion checkpoint"
    if starts("vision_model.", "visual.", "visual_projection.") or {
        "conv1.weight",
        "class_embedding",
    } <= set(names):
        return "an image encoder (CLIP vision model)"
    if starts("text_model.", "transformer.resblocks."):
        return "a text encoder"
    if starts("encoder.down.", "decoder.up.", "quant_conv."):
        return "a VAE"
    if starts("down_blocks.", "mid_block.", "up_blocks."):
        return "a diffusers UNet"
    return None


def _reject_faceid(
    image_proj: Mapping[str, torch.Tensor], layers: Mapping[str, torch.Tensor], name: str
) -> None:
    if any(k.startswith("perceiver_resampler.") for k in image_proj):
        msg = f"{name} is a FaceID-plus IP-Adapter (image_proj.perceiver_resampler.*). {_FACEID_ADVICE}"
        raise UnsupportedModelError(msg)
    lora = sorted(k for k in layers if "_lora." in k)
    if lora:
        msg = f"{name} is a FaceID IP-Adapter (it has LoRA weights such as ip_adapter.{lora[0]}). {_FACEID_ADVICE}"
        raise UnsupportedModelError(msg)
    if (
        "proj.0.weight" in image_proj
        and "norm.weight" in image_proj
        and "proj.3.weight" not in image_proj
    ):
        width = image_proj["proj.0.weight"].shape[-1]
        msg = (
            f"{name} has a FaceID-style projection (image_proj.proj.0/proj.2/norm, input width "
            f"{width}). {_FACEID_ADVICE}"
        )
        raise UnsupportedModelError(msg)


def _read_layers(layers: Mapping[str, torch.Tensor], name: str) -> tuple[int, tuple[int, ...]]:
    """The cross-attention width and the per-layer attention widths of ``ip_adapter.*``."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in layers.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            unknown.append(f"ip_adapter.{key}")
            continue
        found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if unknown:
        msg = (
            f"{name} has unexpected ip_adapter keys: {', '.join(sorted(unknown)[:4])}"
            f"{' ...' if len(unknown) > 4 else ''}; expected only ip_adapter.<k>.to_k_ip.weight "
            "and ip_adapter.<k>.to_v_ip.weight: this is not a supported IP-Adapter layout"
        )
        raise ModelFileError(msg)
    for k, pair in sorted(found.items()):
        for have, lack in (("to_k_ip", "to_v_ip"), ("to_v_ip", "to_k_ip")):
            if have in pair and lack not in pair:
                msg = (
                    f"{name} has ip_adapter.{k}.{have}.weight but no ip_adapter.{k}.{lack}.weight; "
                    "every layer needs both: the file is damaged, download it again"
                )
                raise ModelFileError(msg)
    indices = sorted(found)
    expected = list(range(1, 2 * len(indices), 2))
    if indices != expected:
        odd_ones = [i for i in indices if i not in expected][:4]
        missing = [i for i in expected if i not in found][:4]
        msg = (
            f"{name} numbers its ip_adapter layers {_summarise(indices)}; expected "
            f"{_summarise(expected)} (k = 2i+1 for {len(indices)} layers; unexpected {odd_ones}, "
            f"missing {missing}): the file is damaged or not a published IP-Adapter"
        )
        raise ModelFileError(msg)

    first_k = indices[0]
    cross_dim = -1
    inner_dims: list[int] = []
    for k in indices:
        k_shape, v_shape = tuple(found[k]["to_k_ip"].shape), tuple(found[k]["to_v_ip"].shape)
        if len(k_shape) != 2 or k_shape != v_shape:
            msg = (
                f"{name}: ip_adapter.{k}.to_k_ip.weight is {list(k_shape)} and to_v_ip.weight is "
                f"{list(v_shape)}; expected two equal [inner, cross] matrices: the file is damaged"
            )
            raise ModelFileError(msg)
        if cross_dim < 0:
            cross_dim = k_shape[1]
        elif k_shape[1] != cross_dim:
            msg = (
                f"{name}: ip_adapter.{k}.to_k_ip.weight reads cross-attention width {k_shape[1]}, "
                f"but ip_adapter.{first_k} reads {cross_dim}; all layers must agree: the file is "
                "damaged or mixes models"
            )
            raise ModelFileError(msg)
        inner_dims.append(k_shape[0])
    return cross_dim, tuple(inner_dims)


def _summarise(indices: list[int]) -> str:
    if len(indices) <= 6:
        return ", ".join(map(str, indices)) or "(none)"
    return f"{', '.join(map(str, indices[:4]))}, ..., {indices[-1]}"


def _shape(
    image_proj: Mapping[str, torch.Tensor], key: str, ndim: int, name: str
) -> tuple[int, ...]:
    tensor = image_proj.get(key)
    if tensor is None:
        msg = (
            f"{name} lacks image_proj.{key}, which its projection needs "
            f"(it has {', '.join(sorted(image_proj)[:6])}): the file is damaged or of an unknown layout"
        )
        raise ModelFileError(msg)
    if tensor.ndim != ndim:
        msg = f"{name}: image_proj.{key} has shape {list(tensor.shape)}; expected {ndim} dimensions: the file is damaged"
        raise ModelFileError(msg)
    return tuple(tensor.shape)


def _read_projection(
    image_proj: Mapping[str, torch.Tensor], cross_dim: int, name: str
) -> tuple[str, ProjectionConfig]:
    """The variant and projection config, from a few shapes; the rest is checked afterwards."""
    config: ProjectionConfig
    if "proj.3.weight" in image_proj:
        variant, out_key = "full_face", "proj.2.weight"
        width = _shape(image_proj, "proj.0.weight", 2, name)[1]
        out_dim = _shape(image_proj, out_key, 2, name)[0]
        config = MLPProjectionConfig(width=width, cross_dim=out_dim)
    elif "latents" in image_proj:
        variant, out_key = "plus", "proj_out.weight"
        _, queries, dim = _shape(image_proj, "latents", 3, name)
        out_dim = _shape(image_proj, out_key, 2, name)[0]
        inner = _shape(image_proj, "layers.0.0.to_q.weight", 2, name)[0]
        if inner % RESAMPLER_HEAD_DIM:
            msg = (
                f"{name}: its resampler's attention width {inner} (image_proj.layers.0.0.to_q) is "
                f"not a multiple of the head width {RESAMPLER_HEAD_DIM}; this projection is not supported"
            )
            raise UnsupportedModelError(msg)
        depth = 1 + max(int(k.split(".")[1]) for k in image_proj if re.match(r"layers\.\d+\.", k))
        config = ResamplerConfig(
            embed_width=_shape(image_proj, "proj_in.weight", 2, name)[1],
            dim=dim,
            cross_dim=out_dim,
            num_queries=queries,
            depth=depth,
            inner_dim=inner,
            ff_dim=_shape(image_proj, "layers.0.1.1.weight", 2, name)[0],
        )
    elif "proj.weight" in image_proj:
        variant, out_key = "base", "norm.weight"
        rows, embed_dim = _shape(image_proj, "proj.weight", 2, name)
        if rows % cross_dim:
            msg = (
                f"{name}: image_proj.proj.weight makes {rows} values per image, not a whole number "
                f"of tokens of the cross-attention width {cross_dim} read from ip_adapter: the "
                "projection and the layers contradict each other; the file is damaged or mixes models"
            )
            raise ModelFileError(msg)
        out_dim = _shape(image_proj, "norm.weight", 1, name)[0]
        config = LinearProjectionConfig(
            embed_dim=embed_dim, cross_dim=cross_dim, num_tokens=rows // cross_dim
        )
    else:
        msg = (
            f"{name} has an image projection this extension does not know "
            f"({files.describe_state_dict({f'image_proj.{k}': v for k, v in image_proj.items()})}); "
            "expected a base, plus or full-face IP-Adapter"
        )
        raise UnsupportedModelError(msg)
    if out_dim != cross_dim:
        msg = (
            f"{name}: its image projection makes tokens of width {out_dim} (image_proj.{out_key}), "
            f"but its ip_adapter layers read width {cross_dim}; they must agree: the file is "
            "damaged or mixes models"
        )
        raise ModelFileError(msg)
    return variant, config


def _check_projection_shapes(
    image_proj: Mapping[str, torch.Tensor], config: ProjectionConfig, name: str
) -> None:
    """Compare every tensor with the module it must load into (built on meta: no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_projection(config).state_dict().items()}
    missing = sorted(set(expected) - set(image_proj))
    extra = sorted(set(image_proj) - set(expected))
    wrong = [
        f"image_proj.{k} {list(image_proj[k].shape)} (expected {list(shape)})"
        for k, shape in expected.items()
        if k in image_proj and tuple(image_proj[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {', '.join(f'image_proj.{k}' for k in missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    if extra:
        problems.append(
            f"unexpected {', '.join(f'image_proj.{k}' for k in extra[:4])}{' ...' if len(extra) > 4 else ''}"
        )
    if wrong:
        problems.append(f"wrong shapes {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
    if problems:
        msg = (
            f"{name}: its image projection does not match the layout its shapes imply "
            f"({config}): {'; '.join(problems)}; the file is damaged or of an unsupported layout"
        )
        raise ModelFileError(msg)
