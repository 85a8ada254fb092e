"""The glue tests' world: the A1111 stand-in (tests/webui_stub), tiny model files on disk, the
tiny ldm UNets as the loaded checkpoint, and the extension's entry script loaded like A1111 does.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_adapters import make_adapter_state_dict
from tiny_encoders import hf_vision_config, hf_vision_state_dict
from tiny_unets import CHUNK, SD15, SDXL, TinyUNetConfig, make_ldm_unet

from lib_negip.unet_layers import cross_attention_layers

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import (  # noqa: E402 - the stand-in must be on sys.path first
    devices,
    paths,
    processing,
    prompt_parser,
    script_callbacks,
    shared,
)

ENCODER_SHAPE = {
    "width": 48,
    "layers": 2,
    "heads": 4,
    "mlp_width": 96,
    "projection_dim": 40,
    "image_size": 56,
}


def write_models(folder: Path, unet_sd15: torch.nn.Module, unet_sdxl: torch.nn.Module) -> None:
    """Tiny IP-Adapters for both tiny UNets and one tiny image encoder, as published files."""
    adapters = folder / "ipadapter"
    adapters.mkdir(parents=True, exist_ok=True)
    encoder_dir = folder / "clip_vision" / "tiny-vit"
    encoder_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_vision_state_dict(**ENCODER_SHAPE, seed=5), encoder_dir / "model.safetensors")
    (encoder_dir / "config.json").write_text(json.dumps(hf_vision_config(**ENCODER_SHAPE)))
    for name, unet, config, variant in (
        ("tiny-base_sd15", unet_sd15, SD15, "base"),
        ("tiny-plus_sd15", unet_sd15, SD15, "plus"),
        ("tiny-base_sdxl", unet_sdxl, SDXL, "base"),
    ):
        inner = [layer.inner_dim for layer in cross_attention_layers(unet)]
        encoder_dim = (
            ENCODER_SHAPE["projection_dim"] if variant == "base" else ENCODER_SHAPE["width"]
        )
        state = make_adapter_state_dict(
            variant,
            cross_dim=config.context_dim,
            layer_inner_dims=inner,
            encoder_dim=encoder_dim,
            num_tokens=4,
            resampler_dim=32,
            heads=1,
            weight_std=0.2,  # a visible effect, so routing mistakes show
            generator=torch.Generator().manual_seed(len(name)),
        )
        save_file(state, adapters / f"{name}.safetensors")


def loaded_model(unet: torch.nn.Module, config: TinyUNetConfig, *, edit: bool = False):
    """What ``shared.sd_model`` looks like to the extension."""
    empty = torch.randn(1, CHUNK, config.context_dim, generator=torch.Generator().manual_seed(77))
    return SimpleNamespace(
        model=SimpleNamespace(diffusion_model=unet, conditioning_key="crossattn"),
        cond_stage_key="edit" if edit else "txt",
        cond_stage_model_empty_prompt=empty,
    )


class FakeApp:
    def __init__(self) -> None:
        self.routes: dict[str, object] = {}

    def add_api_route(self, path, endpoint, methods=None, **kwargs):
        self.routes[path] = endpoint


class World:
    """One A1111 process: stand-in modules, models folder, both tiny checkpoints, our script."""

    def __init__(self, models: Path) -> None:
        self.sd15 = make_ldm_unet(SD15)
        self.sdxl = make_ldm_unet(SDXL)
        write_models(models, self.sd15, self.sdxl)
        paths.models_path = str(models)
        paths.script_path = str(models.parent)
        paths.data_path = str(models.parent)  # the stored image prompts go under it
        shared.opts = shared.default_opts()
        shared.state.interrupted = shared.state.skipped = False
        script_callbacks.clear()
        self.use("sd15")
        self.script_module = load_entry_script()
        self.script = self.script_module.NegativeImagePromptScript()
        for entry in script_callbacks.callbacks["ui_settings"]:
            entry.callback()
        # Runs before ours (ours registers at app start): sees each call as A1111 made it.
        self.calls: list[SimpleNamespace] = []
        script_callbacks.on_cfg_denoiser(self._record_before)
        self.app = FakeApp()
        script_callbacks.run("app_started", None, self.app)

    def _record_before(self, params) -> None:
        denoiser = params.denoiser
        self.calls.append(
            SimpleNamespace(
                x=params.x.clone(),
                sigma=params.sigma.clone(),
                cond=params.text_cond,
                uncond=params.text_uncond,
                denoiser=denoiser,
                index=len(denoiser.outputs),
                step=denoiser.step,
                hires=bool(denoiser.p.is_hr_pass),
                unet=self.unet,
            )
        )

    def use(self, family: str, *, edit: bool = False) -> None:
        unet, config = (self.sd15, SD15) if family == "sd15" else (self.sdxl, SDXL)
        shared.sd_model = loaded_model(unet, config, edit=edit)

    @property
    def unet(self) -> torch.nn.Module:
        return shared.sd_model.model.diffusion_model

    def generate(self, args, **fields) -> processing.Processing:
        """A generation with our script's arguments ``args`` (the UI's or the API's list)."""
        p = processing.Processing(**fields)
        p.scripts = [(self.script, list(args))]
        p.result = processing.process_images(p)
        return p


def load_entry_script():
    """Execute scripts/negative_image_prompt.py the way A1111 does (not put in sys.modules)."""
    path = ROOT / "scripts" / "negative_image_prompt.py"
    spec = importlib.util.spec_from_file_location("negative_image_prompt.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def b64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def conditioning(
    rows: int, config: TinyUNetConfig, chunks: int = 1, seed: int = 0, sdxl: bool = False
):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(rows, CHUNK * chunks, config.context_dim, generator=generator)
    if sdxl:
        return prompt_parser.DictWithShape({"crossattn": tensor, "vector": torch.randn(rows, 8)})
    return tensor


__all__ = [
    "World",
    "b64",
    "conditioning",
    "devices",
    "picture",
    "processing",
    "script_callbacks",
    "shared",
]
