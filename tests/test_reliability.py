"""The reliability and security catalogue: every bad input answered, every fault survived,
nothing left behind.

Each case runs through the A1111 stand-in (tests/webui_stub) the way a user meets it: the files
lie in the models folder and are picked by name, images and fields arrive as the API sends them,
faults happen in the middle of a real generation. A case that expects a refusal checks the
message the user gets (HTTP 422, the UI shows the same text, no server path in it). After EVERY
case the test checks that nothing is left behind:

- every module of both UNets (all ``attn2``, their ``to_q``/``to_out[0]``, the UNet itself) has
  no hooks and no instance ``forward``, the classes' ``forward`` are the originals, and every
  weight equals the copy saved before the first case;
- no generation state and no failure trap remain; the model caches are within their limits and
  hold no encoder left off the CPU;
- a clean generation afterwards equals, bit for bit, the one computed before any case ran.

``docs/reliability.md`` lists the catalogue (a test below keeps the two in step); the soak test
at the end runs 200 varied generations and watches memory, hooks and caches.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dataclasses
import functools
import gc
import io
import itertools
import json
import os
import pickle
import re
import resource
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import save, save_file
from tiny_adapters import make_adapter_state_dict
from tiny_encoders import hf_vision_config, hf_vision_state_dict
from tiny_unets import SD15, SDXL, TinyUNetConfig, make_ldm_unet
from webui_harness import (
    ENCODER_SHAPE,
    World,
    conditioning,
    loaded_model,
    picture,
    processing,
    script_callbacks,
    shared,
)

from lib_negip import files
from lib_negip.encoder import ImageEncoder
from lib_negip.errors import NegIPError
from lib_negip.hijack import AttentionHijack, _LayerHooks
from lib_negip.session import ImagePromptSession
from lib_negip.unet_layers import cross_attention_layers
from lib_negip.webui import backend, failures, generation, register, settings
from lib_negip.webui import models as webui_models
from lib_negip.wording import UI_FORBIDDEN, without_echoes

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "reliability.md"

# --------------------------------------------------------------------------------------------
# Inputs


def png(image: Image.Image, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with 100 bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


POSITIVE, NEGATIVE = picture(1), picture(2)


def reference_fields(model: str = "tiny-base_sd15", **overrides: Any) -> dict[str, Any]:
    """The API's dict form of the clean generation every case is compared against."""
    fields = {
        "model": model,
        "positive_images": [b64(png(POSITIVE))],
        "negative_images": [b64(png(NEGATIVE))],
        "positive_weight": 0.9,
        "negative_weight": 0.6,
        "positive_start": 0.0,
        "positive_end": 1.0,
        "negative_start": 0.0,
        "negative_end": 1.0,
    }
    fields.update(overrides)
    return fields


MODEL_FOR = {"sd15": "tiny-base_sd15", "sdxl": "tiny-base_sdxl"}
CONFIG_FOR = {"sd15": SD15, "sdxl": SDXL}

# A checkpoint of the SD2 kind: SD1.5's block layout (16 attn2 layers, the same inner widths) with
# a wider context (1024 against 768 at full size; 80 against 64 here).
SD2 = TinyUNetConfig(
    "sd15", model_channels=32, context_dim=80, heads=2, transformer_depth=(1, 1, 1, 1)
)


def adapter_state(
    unet: torch.nn.Module,
    context_dim: int,
    variant: str = "base",
    *,
    encoder_dim: int | None = None,
    seed: int = 11,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """A tiny IP-Adapter state dict for ``unet`` that the tiny encoder fits (unless told)."""
    if encoder_dim is None:
        encoder_dim = (
            ENCODER_SHAPE["projection_dim"] if variant == "base" else ENCODER_SHAPE["width"]
        )
    return make_adapter_state_dict(
        variant,
        cross_dim=context_dim,
        layer_inner_dims=[layer.inner_dim for layer in cross_attention_layers(unet)],
        encoder_dim=encoder_dim,
        num_tokens=4,
        resampler_dim=32,
        heads=1,
        weight_std=0.2,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# What must be the same after every case


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def residue(unet: torch.nn.Module) -> list[str]:
    """Everything installed on any module of ``unet``: hooks and instance ``forward``s."""
    found = []
    for name, module in unet.named_modules():
        for attribute in _HOOK_DICTS:
            if getattr(module, attribute, None):
                found.append(f"{name or 'unet'}.{attribute}")
        if "forward" in vars(module):
            found.append(f"{name or 'unet'}.forward (instance attribute)")
    return found


def attn2_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.module for layer in cross_attention_layers(unet)]


@dataclasses.dataclass
class Snapshot:
    """A UNet's weights and its classes' forwards, saved before any case runs."""

    unet: torch.nn.Module
    names: list[str]
    flat: torch.Tensor  # every parameter and buffer, flattened and concatenated
    forwards: dict[type, Any]

    @staticmethod
    def _tensors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        return dict(itertools.chain(unet.named_parameters(), unet.named_buffers()))

    @classmethod
    def of(cls, unet: torch.nn.Module) -> Snapshot:
        tensors = cls._tensors(unet)
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()])
        forwards = {type(m): type(m).__dict__.get("forward") for m in unet.modules()}
        assert residue(unet) == []
        return cls(unet, list(tensors), flat, forwards)

    def check(self) -> None:
        left = residue(self.unet)
        assert left == [], f"left behind: {left[:6]}"
        tensors = self._tensors(self.unet)
        assert list(tensors) == self.names
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()])
        assert torch.equal(flat, self.flat), "UNet weights changed"
        for kind, forward in self.forwards.items():
            assert kind.__dict__.get("forward") is forward, f"{kind.__name__}.forward replaced"


class Other:
    """Another AlwaysOn script in the same generation (A1111 calls every script's hooks)."""

    def process(self, p: Any, *args: Any) -> None:
        pass

    def post_sample(self, p: Any, ps: Any, *args: Any) -> None:
        pass

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        pass


class Lab:
    """One case's view of the A1111 process; undoes what the case changed when it ends."""

    def __init__(
        self,
        world: World,
        references: dict[str, torch.Tensor],
        monkeypatch: Any,
        snapshots: list[Snapshot] | None = None,
    ) -> None:
        self.world = world
        self.references = references
        self.monkeypatch = monkeypatch
        self.snapshots = snapshots or []
        # Set by a case after which a Generation may outlive its sampling, with nothing installed.
        self.idle_generation = False
        from modules import paths

        self.models = Path(paths.models_path)
        self.created: list[Path] = []
        self.extra_unets: list[Snapshot] = []
        self.messages: list[str] = []
        self.ui_messages: list[str] = []

    # generations -------------------------------------------------------------------------

    def run(
        self,
        fields: dict[str, Any] | None = None,
        *,
        args: list[Any] | None = None,
        config: TinyUNetConfig = SD15,
        steps: int = 2,
        before: tuple[Any, ...] = (),
        after: tuple[Any, ...] = (),
        scripts: bool = True,
        latent_size: int = 8,
        **kwargs: Any,
    ) -> processing.Processing:
        """One generation with our script's ``args`` (default: ``[fields]``, the API's form);
        with ``scripts`` False one that runs no script at all (an extension's own pass)."""
        args = [fields if fields is not None else reference_fields()] if args is None else args
        sdxl = config.family == "sdxl"
        cond = ([[(0, 1.0)]], conditioning(1, config, seed=3, sdxl=sdxl))
        uncond = conditioning(1, config, seed=4, sdxl=sdxl)
        size = (1, 4, latent_size, latent_size)
        latent = torch.randn(*size, generator=torch.Generator().manual_seed(5))
        p = processing.Processing(cond=cond, uncond=uncond, latent=latent, steps=steps, **kwargs)
        p.scripts = [
            *((s, []) for s in before),
            (self.world.script, list(args)),
            *((s, []) for s in after),
        ]
        if not scripts:
            p.scripts = []
        p.result = processing.process_images(p)
        return p

    def result(self, fields: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        return self.run(fields, **kwargs).result

    def refused(self, fields: dict[str, Any] | None, match: str, **kwargs: Any) -> str:
        """The generation fails with HTTP 422 and a message matching ``match``; returns it."""
        with pytest.raises(NegIPError) as raised:
            self.run(fields, **kwargs)
        request = repr((fields, kwargs.get("args")))
        return self.answer(raised.value, match, request=request)

    def answer(self, error: BaseException, match: str, *, request: str = "") -> str:
        assert getattr(error, "status_code", None) == 422, f"not an HTTP 422 answer: {error!r}"
        message = str(error)
        assert message == error.detail  # the UI shows str(), the API the detail
        assert re_search(match, message), f"{match!r} not in {message!r}"
        # API answers never reveal the server's folders (a client's own string may come back).
        folder = str(self.models.parent)
        assert folder not in message or folder in request, message
        # Both audiences: the API's words (this answer) and the accordion's (the UI's answer).
        assert error.api_message == message
        ui = error.ui_message
        forbidden = UI_FORBIDDEN.search(without_echoes(ui))
        assert forbidden is None, f"API words {forbidden[0]!r} in the UI wording {ui!r}"
        assert folder not in ui or folder in request, ui
        self.messages.append(message)
        self.ui_messages.append(ui)
        return message

    def use(self, family: str) -> None:
        self.world.use(family)

    def use_unet(self, unet: torch.nn.Module, config: TinyUNetConfig) -> None:
        shared.sd_model = loaded_model(unet, config)

    def extra_unet(self, config: TinyUNetConfig, seed: int) -> torch.nn.Module:
        unet = make_ldm_unet(config, seed=seed)
        self.extra_unets.append(Snapshot.of(unet))
        return unet

    # files ---------------------------------------------------------------------------------

    def adapter_file(self, name: str, content: bytes | dict[str, Any]) -> Path:
        return self._write(self.models / "ipadapter" / name, content)

    def encoder_file(self, name: str, content: bytes | dict[str, Any]) -> Path:
        return self._write(self.models / "clip_vision" / name, content)

    def _write(self, path: Path, content: bytes | dict[str, Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif path.suffix == ".safetensors":
            save_file(content, path)
        else:
            torch.save(content, path)
        self.created.append(path)
        return path

    def remove_created(self) -> None:
        created, self.created = self.created, []
        for path in reversed(created):
            if path.is_dir() and not path.is_symlink():
                for child in sorted(path.rglob("*"), reverse=True):
                    child.rmdir() if child.is_dir() else child.unlink()
                path.rmdir()
            else:
                path.unlink(missing_ok=True)

    # callbacks ---------------------------------------------------------------------------------

    def callback(self, fn: Callable[[Any], None], *, after_ours: bool) -> None:
        """Another extension's ``on_cfg_denoiser`` callback, before or after ours."""
        entries = script_callbacks.callbacks["cfg_denoiser"]
        ours = next(i for i, e in enumerate(entries) if e.name == "negip")
        entry = SimpleNamespace(callback=fn, name="other")
        entries.insert(ours + 1 if after_ours else ours, entry)


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text, flags=re.DOTALL) is not None


# --------------------------------------------------------------------------------------------
# The catalogue


@dataclasses.dataclass(frozen=True)
class Case:
    category: str
    name: str
    run: Callable[[Lab], None]
    # Clean generations to compare with the references after the case (both UNets are always
    # checked for residue and weights).
    families: tuple[str, ...] = ("sd15",)

    @property
    def id(self) -> str:
        return f"{self.category}: {self.name}"


CATALOGUE: list[Case] = []


def case(category: str, name: str, *, families: tuple[str, ...] = ("sd15",)):
    def register(fn: Callable[[Lab], None]) -> Callable[[Lab], None]:
        CATALOGUE.append(Case(category, name, fn, families))
        return fn

    return register


MODEL = "Model files"
IMAGES = "Images"
API = "API"
FAULTS = "Faults"
COEXIST = "Coexistence"
CATEGORY_ORDER = (MODEL, IMAGES, API, FAULTS, COEXIST)  # as docs/reliability.md counts them


# --------------------------------------------------------------------------------------------
# Model files: the user puts a file into models/ipadapter (or clip_vision), picks it by name and
# generates.


def sd15_adapter(lab: Lab, **kwargs: Any) -> dict[str, torch.Tensor]:
    return adapter_state(lab.world.sd15, SD15.context_dim, **kwargs)


def pick(lab: Lab, name: str, match: str, **overrides: Any) -> str:
    return lab.refused(reference_fields(model=name, **overrides), match)


@case(MODEL, "empty .safetensors (0 bytes)")
def _(lab: Lab) -> None:
    lab.adapter_file("empty.safetensors", b"")
    pick(lab, "empty", r"empty.safetensors is empty \(0 bytes\).*download the model again")


@case(MODEL, "truncated .safetensors")
def _(lab: Lab) -> None:
    data = save(sd15_adapter(lab))
    lab.adapter_file("cut.safetensors", data[: len(data) * 2 // 3])
    pick(
        lab,
        "cut",
        r"cut.safetensors is truncated: its header describes \d+ bytes.*download it again",
    )


@case(MODEL, "corrupt .safetensors header")
def _(lab: Lab) -> None:
    junk = b'{"image_proj.proj.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0,'
    lab.adapter_file("junk.safetensors", struct.pack("<Q", len(junk)) + junk + b"\0" * 64)
    pick(lab, "junk", r"junk.safetensors has a corrupt safetensors header .*download it again")


@case(MODEL, "safetensors header claiming 2**62 bytes")
def _(lab: Lab) -> None:
    lab.adapter_file("huge.safetensors", struct.pack("<Q", 2**62) + b"{}" * 32)
    pick(lab, "huge", r"declares 4611686018427387904 header bytes in a file of 72 bytes")


@case(MODEL, "random bytes named .safetensors")
def _(lab: Lab) -> None:
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    lab.adapter_file("noise.safetensors", bytes(noise.to(torch.uint8).tolist()))
    pick(lab, "noise", r"noise.safetensors has a corrupt safetensors header")


@case(MODEL, "integer tensors")
def _(lab: Lab) -> None:
    state = {k: (v * 100).to(torch.int32) for k, v in sd15_adapter(lab).items()}
    lab.adapter_file("ints.safetensors", state)
    pick(lab, "ints", r"ints.safetensors has non-float tensors .*int32")


@case(MODEL, "missing key (one layer's to_v_ip)")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    del state["ip_adapter.3.to_v_ip.weight"]
    lab.adapter_file("missing.safetensors", state)
    pick(lab, "missing", r"has ip_adapter.3.to_k_ip.weight but no ip_adapter.3.to_v_ip.weight")


@case(MODEL, "missing key (image_proj.norm.bias)")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    del state["image_proj.norm.bias"]
    lab.adapter_file("nonorm.safetensors", state)
    pick(
        lab, "nonorm", r"does not match the layout its shapes imply .*missing image_proj.norm.bias"
    )


@case(MODEL, "extra key in image_proj")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    state["image_proj.extra.weight"] = torch.zeros(3)
    lab.adapter_file("extra.safetensors", state)
    pick(lab, "extra", r"unexpected image_proj.extra.weight")


@case(MODEL, "extra key in ip_adapter")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    state["ip_adapter.1.to_q_ip.weight"] = torch.zeros(3, 3)
    lab.adapter_file("extra_layer.safetensors", state)
    pick(lab, "extra_layer", r"unexpected ip_adapter keys: ip_adapter.1.to_q_ip.weight")


@case(MODEL, "layers numbered with a gap")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    for kind in ("to_k_ip", "to_v_ip"):
        state[f"ip_adapter.41.{kind}.weight"] = state.pop(f"ip_adapter.31.{kind}.weight")
    lab.adapter_file("gap.safetensors", state)
    pick(lab, "gap", r"numbers its ip_adapter layers .* unexpected \[41\], missing \[31\]")


@case(MODEL, "projection width contradicts the layers")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    state["image_proj.norm.weight"] = torch.ones(48)
    state["image_proj.norm.bias"] = torch.zeros(48)
    lab.adapter_file("widths.safetensors", state)
    pick(lab, "widths", r"makes tokens of width 48 .* layers read width 64; they must agree")


@case(MODEL, "projection rows not a whole number of tokens")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    state["image_proj.proj.weight"] = state["image_proj.proj.weight"][:-5]
    state["image_proj.proj.bias"] = state["image_proj.proj.bias"][:-5]
    lab.adapter_file("rows.safetensors", state)
    pick(lab, "rows", r"makes 251 values per image, not a whole number of tokens")


@case(MODEL, "layers with different context widths")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    for kind in ("to_k_ip", "to_v_ip"):
        state[f"ip_adapter.5.{kind}.weight"] = torch.zeros(64, 32)
    lab.adapter_file("mixed.safetensors", state)
    pick(lab, "mixed", r"ip_adapter.5.to_k_ip.weight reads cross-attention width 32, but")


@case(MODEL, "FaceID adapter (LoRA weights)")
def _(lab: Lab) -> None:
    lab.adapter_file("faceid.safetensors", sd15_adapter(lab, variant="faceid", faceid_id_dim=32))
    pick(lab, "faceid", r"faceid.safetensors is a FaceID IP-Adapter .*choose a non-FaceID")


@case(MODEL, "FaceID-plus adapter")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab, variant="faceid_plus", faceid_id_dim=32)
    lab.adapter_file("faceid_plus.safetensors", state)
    pick(lab, "faceid_plus", r"is a FaceID-plus IP-Adapter .*perceiver_resampler")


@case(MODEL, "a LoRA saved under an IP-Adapter name")
def _(lab: Lab) -> None:
    lora = {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}
    lab.adapter_file("ip-adapter-lora.safetensors", lora)
    pick(lab, "ip-adapter-lora", r"is not an IP-Adapter: .* looks like a LoRA")


@case(MODEL, "Git LFS pointer instead of the file")
def _(lab: Lab) -> None:
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 44642768\n"
    lab.adapter_file("lfs.safetensors", pointer)
    pick(lab, "lfs", r"lfs.safetensors is a Git LFS pointer .*download the real file")


@case(MODEL, "web page saved under the model's name")
def _(lab: Lab) -> None:
    lab.adapter_file("page.bin", b"<!DOCTYPE html><html><body>Sign in</body></html>")
    pick(lab, "page", r"page.bin is a web page .*download the model again")


@case(MODEL, ".bin whose pickle runs code (legacy format)")
def _(lab: Lab) -> None:
    marker = lab.models.parent / "PWNED-legacy"
    with io.BytesIO() as buffer:
        pickle.dump({"image_proj": Payload(marker)}, buffer, protocol=2)
        lab.adapter_file("evil-legacy.bin", buffer.getvalue())
    pick(lab, "evil-legacy", r"contains pickled code .*\(it refers to .*exec\); it was not loaded")
    assert not marker.exists()


@case(MODEL, ".bin whose pickle runs code (torch.save zip format)")
def _(lab: Lab) -> None:
    marker = lab.models.parent / "PWNED-zip"
    state = {"image_proj": {"proj.weight": torch.zeros(2)}, "ip_adapter": Payload(marker)}
    lab.adapter_file("evil-zip.bin", state)
    pick(lab, "evil-zip", r"contains pickled code .*\(it refers to .*exec\); it was not loaded")
    assert not marker.exists()


class Payload:
    """Unpickling this runs ``exec``, which would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@case(MODEL, "random bytes named .bin")
def _(lab: Lab) -> None:
    lab.adapter_file("noise.bin", b"GARBAGE!" + bytes(range(256)) * 8)
    pick(lab, "noise", r"noise.bin is not a readable torch file: it starts with b'GARB',")


@case(MODEL, "garbage after a pickle header (.bin)")
def _(lab: Lab) -> None:
    lab.adapter_file("mangled.bin", b"\x80\x02" + bytes([141, 7, 255, 13]) * 64)
    pick(
        lab,
        "mangled",
        r"mangled.bin is not a readable torch file: its data is damaged \(Unsupported operand 141",
    )


@case(MODEL, "truncated .bin (zip)")
def _(lab: Lab) -> None:
    buffer = io.BytesIO()
    torch.save(sd15_adapter(lab), buffer)
    data = buffer.getvalue()
    lab.adapter_file("cut.bin", data[: len(data) // 2])
    pick(lab, "cut", r"cut.bin could not be read as a torch file .*damaged or truncated")


@case(MODEL, "a folder named like a model (x.safetensors/)")
def _(lab: Lab) -> None:
    folder = lab.models / "ipadapter" / "folder.safetensors"
    folder.mkdir()
    lab.created.append(folder)
    pick(lab, "folder", r"folder.safetensors is a folder, not a model file")
    pick(lab, "folder.safetensors", r"folder.safetensors is a folder, not a model file")


@case(MODEL, "file deleted after it was listed")
def _(lab: Lab) -> None:
    path = lab.adapter_file("gone.safetensors", sd15_adapter(lab))
    assert "gone" in webui_models.adapter_choices(refresh=True)
    path.unlink()
    pick(lab, "gone", r"there is no IP-Adapter named 'gone' \(installed: ")


@case(MODEL, "file deleted while being loaded")
def _(lab: Lab) -> None:
    lab.adapter_file("vanishing.safetensors", sd15_adapter(lab))
    real = webui_models._file_key

    def vanished(path: Path) -> Any:  # removed between the listing's check and the load
        if path.name == "vanishing.safetensors":
            path.unlink()
        return real(path)

    lab.monkeypatch.setattr(webui_models, "_file_key", vanished)
    pick(lab, "vanishing", r"vanishing.safetensors was listed but cannot be opened now .*refresh")


@case(MODEL, "the encoder 'auto' chose was deleted: 'auto' takes another")
def _(lab: Lab) -> None:
    state = hf_vision_state_dict(**ENCODER_SHAPE, seed=5)
    lab.encoder_file("a-first-vit/model.safetensors", state)
    lab.encoder_file(
        "a-first-vit/config.json", json.dumps(hf_vision_config(**ENCODER_SHAPE)).encode()
    )
    webui_models.encoder_choices(refresh=True)
    lab.remove_created()
    assert torch.equal(lab.result(), lab.references["sd15"])


@case(MODEL, "file unreadable when listed, readable later")
def _(lab: Lab) -> None:
    from lib_negip import registry

    lab.adapter_file("locked.safetensors", sd15_adapter(lab))
    real = registry.read_adapter_spec

    def locked(path: Any) -> Any:
        if Path(path).name == "locked.safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    lab.monkeypatch.setattr(registry, "read_adapter_spec", locked)
    pick(lab, "locked", r"locked.safetensors cannot be read .*Permission denied")
    lab.monkeypatch.setattr(registry, "read_adapter_spec", real)  # permissions fixed
    webui_models.adapter_choices(refresh=True)  # the refresh button
    assert torch.isfinite(lab.result(reference_fields(model="locked"))).all()


@case(MODEL, "adapter weights with NaN")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    state["ip_adapter.7.to_v_ip.weight"][0, 0] = float("nan")
    lab.adapter_file("nan.safetensors", state)
    pick(lab, "nan", r"nan.safetensors has non-finite values .*ip_adapter.7.to_v_ip.weight")


@case(MODEL, "image encoder weights with NaN")
def _(lab: Lab) -> None:
    state = hf_vision_state_dict(**ENCODER_SHAPE, seed=5)
    state["vision_model.encoder.layers.1.mlp.fc2.weight"][3, 3] = float("nan")
    lab.encoder_file("nan-vit/model.safetensors", state)
    lab.encoder_file("nan-vit/config.json", json.dumps(hf_vision_config(**ENCODER_SHAPE)).encode())
    pick(
        lab,
        "tiny-base_sd15",
        r"tokens made with nan-vit and tiny-base_sd15 are not finite",
        image_encoder="nan-vit",
    )


FAMILY = (
    r"{name} is an IP-Adapter for .*context width {adapter}, but the loaded checkpoint is .*"
    r"context width {checkpoint}: the adapter is for another model family"
)


@case(MODEL, "adapter with one layer too few (same context width)")
def _(lab: Lab) -> None:
    state = sd15_adapter(lab)
    for kind in ("to_k_ip", "to_v_ip"):
        del state[f"ip_adapter.31.{kind}.weight"]
    lab.adapter_file("short.safetensors", state)
    pick(
        lab,
        "short",
        r"The IP-Adapter has 15 cross-attention layers but the loaded checkpoint's UNet has 16",
    )


@case(MODEL, "adapter for SDXL with an SD1.5 checkpoint")
def _(lab: Lab) -> None:
    pick(lab, "tiny-base_sdxl", FAMILY.format(name="tiny-base_sdxl", adapter=96, checkpoint=64))


@case(MODEL, "adapter for SD1.5 with an SDXL checkpoint", families=("sd15", "sdxl"))
def _(lab: Lab) -> None:
    lab.use("sdxl")
    lab.refused(
        reference_fields(model="tiny-base_sd15"),
        FAMILY.format(name="tiny-base_sd15", adapter=64, checkpoint=96),
        config=SDXL,
    )


@case(MODEL, "SD2-width adapter with an SD1.5 checkpoint")
def _(lab: Lab) -> None:
    sd2 = lab.extra_unet(SD2, seed=3)
    lab.adapter_file("wide.safetensors", adapter_state(sd2, SD2.context_dim))
    pick(lab, "wide", FAMILY.format(name="wide", adapter=80, checkpoint=64))


@case(MODEL, "SD2 checkpoint with its own (wider) adapter works")
def _(lab: Lab) -> None:
    sd2 = lab.extra_unet(SD2, seed=3)
    lab.adapter_file("wide.safetensors", adapter_state(sd2, SD2.context_dim))
    lab.use_unet(sd2, SD2)
    with_prompts = lab.result(reference_fields(model="wide"), config=SD2)
    without = lab.result(
        reference_fields(model="wide", positive_weight=0.0, negative_weight=0.0), config=SD2
    )
    assert torch.isfinite(with_prompts).all()
    assert (with_prompts - without).abs().max() > 1e-3  # the image prompts act
    lab.refused(
        reference_fields(),
        FAMILY.format(name="tiny-base_sd15", adapter=64, checkpoint=80),
        config=SD2,
    )


@case(MODEL, "encoder that does not fit the adapter (chosen by name)")
def _(lab: Lab) -> None:
    shape = {**ENCODER_SHAPE, "projection_dim": 24}
    lab.encoder_file("narrow/model.safetensors", hf_vision_state_dict(**shape, seed=6))
    lab.encoder_file("narrow/config.json", json.dumps(hf_vision_config(**shape)).encode())
    pick(
        lab,
        "tiny-base_sd15",
        r"needs an image encoder with projection dim 40 .* but narrow is .*projection dim 24",
        image_encoder="narrow",
    )


@case(MODEL, "no installed encoder fits ('auto')")
def _(lab: Lab) -> None:
    lab.adapter_file("odd.safetensors", sd15_adapter(lab, encoder_dim=36))
    pick(
        lab, "odd", r"odd needs an image encoder with projection dim 36, but none of the installed"
    )


@case(MODEL, "damaged encoder: named it fails, 'auto' passes over it")
def _(lab: Lab) -> None:
    data = save(hf_vision_state_dict(**ENCODER_SHAPE, seed=5))
    lab.encoder_file("broken/model.safetensors", data[: len(data) // 2])
    pick(lab, "tiny-base_sd15", r"broken/model.safetensors is truncated", image_encoder="broken")
    assert torch.equal(lab.result(), lab.references["sd15"])  # 'auto' takes tiny-vit


@case(MODEL, "encoder config.json that is not JSON")
def _(lab: Lab) -> None:
    lab.encoder_file("badconfig/model.safetensors", hf_vision_state_dict(**ENCODER_SHAPE, seed=5))
    lab.encoder_file("badconfig/config.json", b"{not json")
    pick(
        lab,
        "tiny-base_sd15",
        r"config .*cannot be read .*Fix or remove it",
        image_encoder="badconfig",
    )


# --------------------------------------------------------------------------------------------
# Images: sent through the API as base64 (the UI's raw bytes where the API cannot send them).
# An image that is fine must give exactly the generation of the RGB image a viewer shows.


def with_positive(*images: str) -> dict[str, Any]:
    return reference_fields(positive_images=list(images))


def same_as_rgb(lab: Lab, data: bytes, expected: Image.Image) -> None:
    """``data`` as an image prompt gives bit for bit the generation of ``expected`` (RGB)."""
    assert expected.mode == "RGB"
    got = lab.result(with_positive(b64(data)))
    assert torch.equal(got, lab.result(with_positive(b64(png(expected)))))
    assert not torch.equal(got, lab.references["sd15"])  # the image mattered


@case(IMAGES, "zero bytes (API: empty data URL)")
def _(lab: Lab) -> None:
    lab.refused(
        with_positive("data:image/png;base64,"),
        r"positive_images\[0\]: The image is an empty string",
    )


@case(IMAGES, "zero bytes (UI upload)")
def _(lab: Lab) -> None:
    args = [True, "tiny-base_sd15", "auto", [b""], []]
    lab.refused(None, r"positive_images\[0\]: The image has zero bytes", args=args)


@case(IMAGES, "truncated PNG")
def _(lab: Lab) -> None:
    data = png(picture(30, (64, 64)))
    lab.refused(
        with_positive(b64(data[: len(data) // 2])),
        r"positive_images\[0\]: The PNG file \(64x64, \d+ bytes\) is truncated",
    )


@case(IMAGES, "truncated JPEG")
def _(lab: Lab) -> None:
    data = encoded(picture(31, (64, 64)), "JPEG", quality=90)
    message = lab.refused(
        with_positive(b64(data[: len(data) // 2])),
        r"positive_images\[0\]: The JPEG file .* is truncated or corrupt",
    )
    assert "file paths" not in message  # its base64 starts with "/9j/", which is no path


@case(IMAGES, "1x1 pixel")
def _(lab: Lab) -> None:
    result = lab.result(with_positive(b64(png(Image.new("RGB", (1, 1), (200, 30, 90))))))
    assert torch.isfinite(result).all()
    assert not torch.equal(result, lab.references["sd15"])


@case(IMAGES, "decompression bomb: PNG claiming 100000x100000, refused before decoding")
def _(lab: Lab) -> None:
    bomb_refused_before_decoding(lab, 100_000, 100_000, r"too large to decode safely")


@case(IMAGES, "large image: 9000x9000 (81 MP) refused before decoding")
def _(lab: Lab) -> None:
    bomb_refused_before_decoding(
        lab, 9000, 9000, r"9000x9000 = 81,000,000 pixels; at most 67,108,864"
    )


def bomb_refused_before_decoding(lab: Lab, width: int, height: int, match: str) -> None:
    loads: list[Any] = []
    real_load = ImageFile.ImageFile.load

    def spy(image: Any) -> Any:
        loads.append(image.size)
        return real_load(image)

    lab.monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    lab.refused(with_positive(b64(png_claiming(width, height))), match)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert (width, height) not in loads  # no pixel was decoded
    assert elapsed < 2.0
    assert grown_mib < 64  # decoding would need width * height * 3 bytes


@case(IMAGES, "extreme strip (1x60000)")
def _(lab: Lab) -> None:
    lab.refused(
        with_positive(b64(png(Image.new("L", (1, 60000))))),
        r"^positive_images\[0\]: The image is 1x60000, a strip too thin for CLIP",
    )


@case(IMAGES, "animated GIF: the first frame")
def _(lab: Lab) -> None:
    frames = [picture(40, (32, 32)).quantize(64), picture(41, (32, 32)).quantize(64)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = Image.open(io.BytesIO(data)).convert("RGB")
    same_as_rgb(lab, data, first)


@case(IMAGES, "multi-page TIFF: the first page")
def _(lab: Lab) -> None:
    pages = [picture(43, (32, 32)), picture(44, (32, 32))]
    data = encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    same_as_rgb(lab, data, pages[0].convert("RGB"))


@case(IMAGES, "16-bit grey PNG")
def _(lab: Lab) -> None:
    values = torch.randint(0, 65536, (24, 32), generator=torch.Generator().manual_seed(42))
    image = Image.fromarray(values.numpy().astype("uint16"))
    data = png(image)
    eight_bit = ((values + 128) // 257).to(torch.uint8).numpy()
    same_as_rgb(lab, data, Image.fromarray(eight_bit).convert("RGB"))


@case(IMAGES, "CMYK JPEG")
def _(lab: Lab) -> None:
    data = encoded(picture(43, (40, 40)).convert("CMYK"), "JPEG", quality=95)
    same_as_rgb(lab, data, Image.open(io.BytesIO(data)).convert("RGB"))


@case(IMAGES, "palette with transparency: composited on white")
def _(lab: Lab) -> None:
    image = picture(44, (32, 32)).quantize(16)
    data = png(image, transparency=3)
    rgba = Image.open(io.BytesIO(data)).convert("RGBA")
    expected = Image.new("RGB", rgba.size, (255, 255, 255))
    expected.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    same_as_rgb(lab, data, expected)


@case(IMAGES, "grey with alpha (LA): composited on white")
def _(lab: Lab) -> None:
    grey = picture(45, (32, 24)).convert("L")
    alpha = picture(46, (32, 24)).convert("L")
    data = png(Image.merge("LA", (grey, alpha)))
    expected = Image.new("RGB", grey.size, (255, 255, 255))
    expected.paste(grey.convert("RGB"), mask=alpha)
    same_as_rgb(lab, data, expected)


@case(IMAGES, "EXIF-rotated JPEG: orientation applied")
def _(lab: Lab) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    data = encoded(picture(47, (48, 32)), "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(data)).convert("RGB")
    same_as_rgb(lab, data, stored.transpose(Image.Transpose.ROTATE_270))


@case(IMAGES, "not an image (text bytes)")
def _(lab: Lab) -> None:
    lab.refused(
        with_positive(b64(b"hello, this is text")),
        r"not an image file of a kind read here: 19 bytes starting b'hello, this '",
    )


@case(IMAGES, "PostScript (EPS): never handed to Ghostscript")
def _(lab: Lab) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    lab.refused(with_positive(b64(eps)), r"not an image file of a kind read here")


@case(IMAGES, "an icon (ICO) holding a picture: refused before decoding")
def _(lab: Lab) -> None:
    buffer = io.BytesIO()
    picture(49, (32, 32)).save(buffer, format="ICO", sizes=[(32, 32)])
    lab.refused(with_positive(b64(buffer.getvalue())), r"not an image file of a kind read here")


@case(IMAGES, "PNG with a corrupt data chunk")
def _(lab: Lab) -> None:
    data = bytearray(png(picture(48, (32, 32))))
    start = data.index(b"IDAT") + 40
    data[start : start + 16] = bytes(16)
    lab.refused(
        with_positive(b64(bytes(data))),
        r"positive_images\[0\]: The PNG file .* (truncated or corrupt|corrupt)",
    )


# --------------------------------------------------------------------------------------------
# API: alwayson_scripts["Negative Image Prompt"]["args"] as a client sends it.


@case(API, "invalid base64")
def _(lab: Lab) -> None:
    lab.refused(
        with_positive("not base64!"), r"positive_images\[0\]: The image is not valid base64"
    )


@case(API, "data URL: accepted, same as plain base64")
def _(lab: Lab) -> None:
    url = "data:image/png;base64," + b64(png(POSITIVE))
    assert torch.equal(lab.result(with_positive(url)), lab.references["sd15"])


@case(API, "data URL that is not base64")
def _(lab: Lab) -> None:
    lab.refused(
        with_positive("data:image/png,%89PNG"), r"data URL 'data:image/png' is not base64-encoded"
    )


@case(API, "an http URL instead of image data")
def _(lab: Lab) -> None:
    lab.refused(with_positive("https://example.com/cat.png"), r"given as a URL .* not downloaded")


@case(API, "a server file path as an image")
def _(lab: Lab) -> None:
    secret = lab.models.parent / "secret.png"
    secret.write_bytes(png(POSITIVE))
    lab.created.append(secret)
    message = lab.refused(with_positive(str(secret)), r"file paths are never opened")
    assert "secret" not in message or "base64" in message


@case(API, "a dict naming a file")
def _(lab: Lab) -> None:
    lab.refused(with_positive({"name": "/etc/passwd"}), r"Files named in a dict are never read")


@case(API, "wrong types: number as a string")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_weight="0.5"),
        r"positive_weight must be a number from -1 to 5; got '0.5' \(str\) \(send numbers as JSON numbers",
    )


@case(API, "wrong types: images not a list of strings")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(negative_images=[42]),
        r"negative_images\[0\]: an image must be a base64 string",
    )


@case(API, "wrong types: enabled as a string")
def _(lab: Lab) -> None:
    lab.refused(reference_fields(enabled="yes"), r"enabled must be true or false; got 'yes'")


@case(API, "NaN weight")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(negative_weight=float("nan")), r"negative_weight must be a finite number"
    )


@case(API, "infinite weight")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_weight=float("inf")),
        r"positive_weight must be a finite number .* got inf",
    )


@case(API, "integer too large for a float")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_weight=10**400), r"positive_weight must be a finite number"
    )


@case(API, "weight out of range")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_weight=6), r"positive_weight must be from -1 to 5; got 6.0"
    )


@case(API, "start after end")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(negative_start=0.8, negative_end=0.2),
        r"negative_start \(0.8\) must not be greater than negative_end \(0.2\)",
    )


@case(API, "unknown field")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positve_images=[]), r"Unknown field\(s\) 'positve_images'; the fields are"
    )


@case(API, "too many images")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_images=["x"] * 17), r"positive_images has 17 images; at most 16"
    )


@case(API, "enabled without any image")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_images=[], negative_images=[]),
        r"both empty, but image prompts are enabled",
    )


@case(API, "the dict in the wrong position of args")
def _(lab: Lab) -> None:
    lab.refused(
        None, r"model must be a model name .* got \{'model'", args=[True, reference_fields()]
    )


@case(API, "args sent as a text (A1111 splits it into characters)")
def _(lab: Lab) -> None:
    # It said "enabled must be true or false; got '{' (str)."
    text = '{"model": "tiny-base_sd15"}'
    lab.refused(
        None,
        r"^The script's args must be a list, not a text \(A1111 put its characters, "
        r"'\{\"model\": \"tiny-base_sd15\"\}' \(str\), one per value\): send \[\{",
        args=list(text),
    )


@case(API, "too many positional args (a caller other than the HTTP API; A1111 cuts the list to 20)")
def _(lab: Lab) -> None:
    lab.refused(None, r"The script's args have 30 values; at most 20", args=[True] + [None] * 29)


@case(API, "model name with ../")
def _(lab: Lab) -> None:
    pick(lab, "../ipadapter/tiny-base_sd15", r"looks like a file path, not a model name")


@case(API, "model name with a NUL byte")
def _(lab: Lab) -> None:
    pick(lab, "tiny-base_sd15\x00.txt", r"looks like a file path, not a model name")


@case(API, "image encoder given as an absolute path")
def _(lab: Lab) -> None:
    path = str(lab.models / "clip_vision" / "tiny-vit" / "model.safetensors")
    message = pick(lab, "tiny-base_sd15", r"looks like a file path", image_encoder=path)
    assert message  # the answer echoes the client's own string only


@case(API, "a valid adapter outside the model folders, by every name form")
def _(lab: Lab) -> None:
    outside = lab.models.parent / "outside"
    outside.mkdir(exist_ok=True)
    lab.created.append(outside)
    target = outside / "stray-adapter.safetensors"
    save_file(sd15_adapter(lab), target)
    opened: list[Path] = []
    real_check = files._check_path

    def spy(path: Path) -> None:
        opened.append(Path(path).resolve())
        real_check(path)

    lab.monkeypatch.setattr(files, "_check_path", spy)
    reads = webui_models.MODELS.file_reads
    relative = os.path.relpath(target, lab.models / "ipadapter")
    forms = [
        "stray-adapter",
        "stray-adapter.safetensors",
        "stray-adapter [0123456789]",
        relative,
        relative.replace("/", "\\"),
        str(target),
        target.as_uri(),
        "~/" + relative,
        f"C:\\{relative}",
        "tiny-base_sd15/../../outside/stray-adapter",
        "tiny-base_sd15\x00/../../outside/stray-adapter",
        "..%2F..%2Foutside%2Fstray-adapter",
    ]
    for form in forms:
        pick(lab, form, r"(looks like a file path|there is no IP-Adapter named)")
        pick(
            lab,
            "tiny-base_sd15",
            r"(looks like a file path|there is no image encoder named)",
            image_encoder=form,
        )
    assert webui_models.MODELS.file_reads == reads
    assert not any(path.is_relative_to(outside.resolve()) for path in opened), opened
    assert "stray-adapter" not in webui_models.adapter_choices(refresh=True)


@case(API, "block weights: an unknown preset")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_layers="styles"),
        r"positive_layers: 'styles' is neither a preset .* 'strong style'.*\"3:1, 6:0\.8\"",
    )


@case(API, "block weights: a block the loaded model does not have")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(negative_layers="3:1, 99:0.5"),
        r"negative_layers: block 99 does not exist; the loaded model is SD1\.x \(16 blocks, 0-15\)",
    )


@case(API, "blocks or a mask for a side without images")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(negative_images=[], negative_layers="16:1"),
        r"^negative_layers is '16:1', but the negative side has no images, so it would change "
        r"nothing \(a side without images follows the positive side's blocks and mask\)",
    )
    lab.refused(
        reference_fields(negative_images=[], negative_mask=b64(png(POSITIVE))),
        r"^negative_mask is given, but the negative side has no images",
    )


@case(API, "block weights: a malformed pair and a non-finite weight")
def _(lab: Lab) -> None:
    lab.refused(reference_fields(positive_layers="3=1"), r"positive_layers: '3=1' is neither")
    lab.refused(
        reference_fields(positive_layers="3:nan"),
        r"positive_layers: the weight of block 3 must be a finite number from -1 to 5",
    )


@case(API, "a mask that is not an image, and a list of masks")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(positive_mask="bm90IGFuIGltYWdl"), r"positive_mask: .*not an image"
    )
    lab.refused(
        reference_fields(negative_mask=[b64(png(POSITIVE))]), r"negative_mask must be one image"
    )


@case(API, "noise negative together with negative images")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(negative_noise=0.4),
        r"negative_noise and negative_images were both given",
    )


@case(API, "noise negative without positive images")
def _(lab: Lab) -> None:
    fields = reference_fields(negative_noise=0.4)
    fields["positive_images"] = []
    del fields["negative_images"]
    lab.refused(fields, r"negative_noise makes the negative side from the positive images")


@case(API, "unknown noise type")
def _(lab: Lab) -> None:
    fields = reference_fields(negative_noise=0.4, negative_noise_type="perlin")
    del fields["negative_images"]
    lab.refused(fields, r"negative_noise_type must be one of 'fade', 'dissolve'")


@case(IMAGES, "image prompts over the pixel budget of a generation")
def _(lab: Lab) -> None:
    from lib_negip import args as args_module

    lab.monkeypatch.setattr(args_module, "MAX_PIXELS_PER_GENERATION", 64 * 48 + 10)
    lab.refused(
        reference_fields(),
        r"negative_images\[0\]: the image prompts of this generation hold 6,144 pixels together; "
        r"at most 3,082 are accepted",
    )


class XYZCell(Other):
    """A1111's X/Y/Z plot: a [NegIP] axis sets ``p.negip_overrides`` before the scripts run."""

    def __init__(self, **overrides: Any) -> None:
        self.overrides = overrides

    def process(self, p: Any, *args: Any) -> None:
        from lib_negip.webui import xyz

        for field, value in self.overrides.items():
            xyz._override(field)(p, value, None)


@case(API, "an X/Y/Z axis of ours with the extension off")
def _(lab: Lab) -> None:
    lab.refused(
        None,
        r"the X/Y/Z plot sets Negative Image Prompt's negative_weight, but Negative Image Prompt "
        r"is not enabled",
        args=[False],
        before=(XYZCell(negative_weight=0.5),),
    )


@case(API, "an X/Y/Z axis value out of range (checked before the plot starts)")
def _(lab: Lab) -> None:
    from lib_negip.webui import xyz

    p = SimpleNamespace(is_api=True)  # what the plot's confirm reads of the request
    with pytest.raises(NegIPError) as raised:
        xyz._confirm("[NegIP] Negative noise", "negative_noise")(p, [0.0, 2.0])
    lab.answer(raised.value, r"X/Y/Z plot, axis \[NegIP\] Negative noise: negative_noise must be")


@case(API, "a null entry in an image list")
def _(lab: Lab) -> None:
    fields = reference_fields()
    fields["positive_images"] = [None, *fields["positive_images"]]
    lab.refused(fields, r"positive_images\[0\] is null: each entry must be an image")


@case(API, "a model name too long for the file system")
def _(lab: Lab) -> None:
    # The search for a folder of the name (an unpacked download) raised ENAMETOOLONG: a 422
    # "Negative Image Prompt failed: OSError" that showed the server's model folder.
    long_name = "a" * 300
    lab.refused(reference_fields(model=long_name), rf"there is no IP-Adapter named '{long_name}'")
    lab.refused(
        reference_fields(image_encoder=long_name),
        rf"there is no image encoder named '{long_name}'",
    )


@case(API, "an X/Y/Z cell refused for its checkpoint (stops the plot)")
def _(lab: Lab) -> None:
    from lib_negip.webui import xyz

    def draw_xyz_grid(models: list[str]) -> list[Any]:
        """As A1111's plot: a cell that raises is drawn empty; after an interrupt, none."""
        drawn = []
        for model in models:
            if shared.state.interrupted:
                break
            try:
                drawn.append(lab.run(reference_fields(model=model)).result)
            except Exception:
                drawn.append(None)
        return drawn

    # The stand-in's processing module plays the plot's: its cells call process_images.
    lab.monkeypatch.setattr(processing, "draw_xyz_grid", draw_xyz_grid, raising=False)
    lab.monkeypatch.setattr(processing, "Processed", lambda *_args: None, raising=False)
    assert xyz.CELL_REFUSALS.install(processing)
    try:
        with pytest.raises(NegIPError) as raised:
            processing.draw_xyz_grid(["tiny-base_sd15", "tiny-base_sdxl", "tiny-base_sd15"])
    finally:
        xyz.CELL_REFUSALS.remove()
        shared.state.interrupted = False
    lab.answer(
        raised.value,
        r"X/Y/Z plot: a cell cannot be made, so the plot was stopped: tiny-base_sdxl is an "
        r"IP-Adapter for a model family",
    )


@case(API, "a stored image prompt that was deleted (infotext restore)")
def _(lab: Lab) -> None:
    fields = reference_fields(infotext_images="positive images: 0123456789abcdef")
    del fields["positive_images"]  # taken from the store
    lab.refused(
        fields,
        r"stored image prompt 0123456789abcdef is not in the image prompt folder "
        r"\(outputs/negip-image-prompts\)",
    )


@case(API, "an empty side over the infotext's stored images (dict form)")
def _(lab: Lab) -> None:
    # It answered 200 with the stored images, as if the empty list had not been sent.
    fields = reference_fields(infotext_images="positive images: 0123456789abcdef")
    fields["positive_images"] = []
    lab.refused(
        fields,
        r"positive_images is empty, but the request's infotext names stored positive image\(s\) "
        r"\(0123456789abcdef\): leave positive_images out to use them, send the images to use "
        r"instead, or set positive_weight to 0 to draw without that side\.",
    )


@case(API, "an infotext made with storing off, restored without one side's images")
def _(lab: Lab) -> None:
    # It answered 200 with the negative side missing, under the infotext's settings.
    fields = reference_fields(infotext_images="not stored: 1 positive / 1 negative")
    fields["negative_images"] = []
    lab.refused(
        fields,
        r"The infotext was made with 1 negative image prompt\(s\), which were not stored "
        r"\(storing was off in Settings > Negative Image Prompt\), so it cannot give them back: "
        r"send them in negative_images, or set negative_weight to 0\.",
    )


@case(API, "an infotext with a NegIP value this version does not know")
def _(lab: Lab) -> None:
    # It was passed over: the restored image differed from the one the infotext describes.
    from lib_negip.webui import ui

    params = {"Steps": "4", "NegIP model": "tiny-base_sd15", "NegIP style strength": "0.5"}
    with pytest.raises(NegIPError) as raised:
        ui.infotext_switch(params)
    lab.answer(
        raised.value,
        r"^Infotext 'NegIP style strength': not a Negative Image Prompt value this version "
        r"knows \(a newer version's, or a typo\), so the image it describes cannot be made again "
        r"here\. Update the extension, or take the value out of the infotext\.$",
    )


@case(API, "malformed stored image references")
def _(lab: Lab) -> None:
    lab.refused(
        reference_fields(infotext_images="positive images: ../../etc/passwd"),
        r"infotext_images: '\.\./\.\./etc/passwd' is not a stored image reference",
    )


@case(MODEL, "model 'auto' with no adapter of the loaded checkpoint's family")
def _(lab: Lab) -> None:
    lab.use("sdxl")
    for name in ("tiny-base_sdxl.safetensors",):
        path = lab.models / "ipadapter" / name
        lab.monkeypatch.setattr(
            webui_models.MODELS, "registry", _without(webui_models.MODELS.registry, path)
        )
    lab.refused(
        reference_fields(model="auto"),
        r"no installed IP-Adapter fits the loaded checkpoint, which is a model family of context "
        r"width \d+ \(installed for other families: tiny-base_sd15",
        config=SDXL,
    )


def _without(registry: Callable[..., Any], path: Path) -> Callable[..., Any]:
    """The registry as if ``path`` were not installed."""

    def listing(*args: Any, **kwargs: Any) -> Any:
        found = registry(*args, **kwargs)
        real = found.adapters

        class Without:
            def __getattr__(self, name: str) -> Any:
                return getattr(found, name)

            def adapters(self) -> list[Any]:
                return [entry for entry in real() if Path(entry.path) != path]

        return Without()

    return listing


@case(FAULTS, "a web UI whose UNet is nowhere this extension knows")
def _(lab: Lab) -> None:
    unet = lab.world.sd15
    lab.monkeypatch.setattr(
        shared, "sd_model", SimpleNamespace(engine=SimpleNamespace(unet=unet), cond_stage_key="txt")
    )
    lab.refused(
        reference_fields(),
        r"cannot reach the UNet of the model loaded in .*: this web UI keeps it where this "
        r"extension does not know to look",
    )


@case(FAULTS, "a denoiser that feeds the UNet a conditioning without the image prompts")
def _(lab: Lab) -> None:
    def strip(params: Any) -> None:  # restores the conditioning as it was before ours
        layout_total = params.text_cond.shape[1] % 77
        if layout_total:
            params.text_cond = params.text_cond[:, :-layout_total]
            params.text_uncond = params.text_uncond[:, :-layout_total]

    lab.callback(strip, after_ours=True)
    lab.refused(
        reference_fields(),
        r"image prompts were added to the conditioning, but the UNet was called with a "
        r"conditioning without them",
    )


@case(FAULTS, "a web UI that samples without calling on_cfg_denoiser")
def _(lab: Lab) -> None:
    entries = script_callbacks.callbacks["cfg_denoiser"]
    saved = list(entries)
    entries[:] = [entry for entry in entries if entry.name != "negip"]
    try:
        lab.refused(reference_fields(), r"The UNet was called without the extension's conditioning")
    finally:
        entries[:] = saved


@case(FAULTS, "the image prompt folder cannot be written (disk full)")
def _(lab: Lab) -> None:
    from lib_negip import store

    def full(self: Any, image: Any) -> str:
        raise OSError(28, "No space left on device")

    lab.monkeypatch.setattr(store.ImageStore, "save", full)
    lab.refused(
        reference_fields(),
        r"image prompts cannot be stored in outputs/negip-image-prompts \(No space left on "
        r"device\): free disk space or choose another folder",
    )


@case(API, "override_settings cannot move the model folders")
def _(lab: Lab) -> None:
    labels = shared.opts.data_labels
    for key in (settings.OPT_ADAPTER_DIRS, settings.OPT_ENCODER_DIRS, settings.OPT_AUTO_DOWNLOAD):
        # A1111 1.10 (modules/options.py): Options.set(..., is_api=True) refuses these, which
        # is how both POST /sdapi/v1/options and a request's override_settings are applied.
        assert getattr(labels[key], "restrict_api", False), key


@case(API, "override_settings with absurd cache sizes")
def _(lab: Lab) -> None:
    shared.opts.negip_models_in_memory = 10**9
    shared.opts.negip_images_in_memory = "lots"
    assert torch.equal(lab.result(), lab.references["sd15"])
    assert webui_models.MODELS.adapters.limit == 8
    assert (
        webui_models.MODELS.features._features.limit
        == settings.DEFAULTS[settings.OPT_IMAGES_IN_MEMORY]
    )


# --------------------------------------------------------------------------------------------
# Faults in the middle of a generation.


def denoisers_seen(lab: Lab) -> list[Any]:
    """The CFG denoisers of the coming generations, recorded by a callback before ours."""
    seen: list[Any] = []

    def record(params: Any) -> None:
        if not seen or seen[-1] is not params.denoiser:
            seen.append(params.denoiser)

    lab.callback(record, after_ours=False)
    return seen


@case(FAULTS, "a callback after ours rescales the conditioning (ConditioningError)")
def _(lab: Lab) -> None:
    def rescale(params: Any) -> None:
        params.text_cond = params.text_cond * 1.5

    lab.callback(rescale, after_ours=True)
    lab.refused(
        reference_fields(), r"image-prompt tokens appended to the conditioning were changed"
    )


@case(FAULTS, "an error inside our attention hook")
def _(lab: Lab) -> None:
    real = _LayerHooks.add_image_term
    calls = {"n": 0}

    def failing(self: Any, module: Any, args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 20:  # the second UNet call, in the middle of the down blocks
            msg = "forced failure inside the image attention"
            raise RuntimeError(msg)
        return real(self, module, args)

    lab.monkeypatch.setattr(_LayerHooks, "add_image_term", failing)
    with pytest.raises(RuntimeError, match="forced failure inside the image attention"):
        lab.run()


@case(FAULTS, "an error in our on_cfg_denoiser callback: raised in the same denoiser call")
def _(lab: Lab) -> None:
    real = ImagePromptSession.conditioning
    calls = {"n": 0}

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            msg = "forced failure in the callback"
            raise RuntimeError(msg)
        return real(self, *args, **kwargs)

    lab.monkeypatch.setattr(ImagePromptSession, "conditioning", failing)
    seen = denoisers_seen(lab)
    lab.refused(None, r"Negative Image Prompt failed: RuntimeError: forced failure in the callback")
    (denoiser,) = seen
    assert len(denoiser.outputs) == 1  # the failing call never got a UNet output ...
    assert len(denoiser.calls) == 2  # ... because the UNet call it made raised at once


@case(FAULTS, "another extension's callback raises (A1111 only logs it)")
def _(lab: Lab) -> None:
    def failing(params: Any) -> None:
        msg = "another extension's callback failed"
        raise ValueError(msg)

    lab.callback(failing, after_ours=False)
    lab.callback(failing, after_ours=True)
    assert torch.equal(lab.result(), lab.references["sd15"])  # our prompts unaffected
    assert len(script_callbacks.errors) == 4  # two steps, two callbacks, each logged


@case(FAULTS, "another extension raises inside the UNet")
def _(lab: Lab) -> None:
    calls = {"n": 0}

    def failing(module: Any, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            msg = "another extension failed inside the UNet"
            raise RuntimeError(msg)

    handle = lab.world.sd15.register_forward_pre_hook(failing)
    try:
        with pytest.raises(RuntimeError, match="another extension failed inside the UNet"):
            lab.run()
    finally:
        handle.remove()  # the other extension's own cleanup; ours must have happened already


@case(FAULTS, "the VAE fails after sampling (postprocess never runs)")
def _(lab: Lab) -> None:
    def decode_first_stage(x: torch.Tensor) -> torch.Tensor:
        msg = "CUDA out of memory while decoding (the VAE)"
        raise torch.OutOfMemoryError(msg)

    plain = lab.run(scripts=False).result
    lab.monkeypatch.setattr(
        shared.sd_model, "decode_first_stage", decode_first_stage, raising=False
    )
    with pytest.raises(torch.OutOfMemoryError, match="the VAE"):
        lab.run()
    lab.monkeypatch.undo()
    for snapshot in lab.snapshots:  # the UNet is clean at once, not at the next process
        snapshot.check()
    # The generation outlived its sampling (A1111 skipped postprocess): a generation that does
    # not run our script (an extension's own pass) gets nothing from it.
    lab.idle_generation = True
    assert torch.equal(lab.run(scripts=False).result, plain)


@case(FAULTS, "interrupted mid-sampling")
def _(lab: Lab) -> None:
    interrupt_at_step(lab, "interrupted")


@case(FAULTS, "skipped mid-sampling")
def _(lab: Lab) -> None:
    interrupt_at_step(lab, "skipped")


@case(FAULTS, "interrupted while the image prompts are prepared")
def _(lab: Lab) -> None:
    # Interrupt waited until every image prompt was stored and encoded (15 s for 20 large ones).
    from lib_negip import store

    real_save = store.ImageStore.save
    saved: list[str] = []

    def save_then_interrupt(self: Any, image: Any, *args: Any, **kwargs: Any) -> str:
        saved.append(real_save(self, image, *args, **kwargs))
        shared.state.interrupted = True
        return saved[-1]

    lab.monkeypatch.setattr(store.ImageStore, "save", save_then_interrupt)
    fields = reference_fields(positive_images=[b64(png(POSITIVE)), b64(png(NEGATIVE))])
    seen = denoisers_seen(lab)
    try:
        p = lab.run(fields)
    finally:
        shared.state.interrupted = False
    assert p.result is None  # A1111 makes no image once Interrupt is pressed
    assert len(saved) == 1  # the next image was not stored (nor any encoded)
    assert seen == []


def interrupt_at_step(lab: Lab, flag: str) -> None:
    def press(params: Any) -> None:
        if params.denoiser.step == 1:
            setattr(shared.state, flag, True)

    lab.callback(press, after_ours=True)
    seen = denoisers_seen(lab)
    p = lab.run(steps=4)
    assert len(seen[0].outputs) == 2  # stopped before the third step; postprocess ran
    assert torch.isfinite(p.result).all()


def out_of_memory_while_encoding(lab: Lab, error: BaseException) -> None:
    shared.opts.negip_encoder_on_gpu = True  # the case where the encoder stays on the GPU
    moves: list[Any] = []
    real_to = ImageEncoder.to

    def to(self: Any, device: Any = None, dtype: Any = None) -> Any:
        moves.append(torch.device(device) if device is not None else None)
        return real_to(self, device=device, dtype=dtype)

    def encode(self: Any, pixel_values: torch.Tensor, output: str = "image_embeds") -> Any:
        raise error

    lab.monkeypatch.setattr(ImageEncoder, "to", to)
    lab.monkeypatch.setattr(ImageEncoder, "encode", encode)
    features = webui_models.MODELS.features._features.keys()
    fields = reference_fields(positive_images=[b64(png(picture(s))) for s in (60, 61, 62)])
    message = lab.refused(fields, r"ran out of GPU memory .*: use fewer images per side")
    assert "Keep the image encoder on the GPU" in message
    assert (
        webui_models.MODELS.features._features.keys() == features
    )  # nothing half-encoded was kept
    assert moves[-1] == torch.device("cpu")  # the encoder left the GPU despite the setting


@case(FAULTS, "torch.OutOfMemoryError while encoding the images")
def _(lab: Lab) -> None:
    out_of_memory_while_encoding(
        lab, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    )


@case(FAULTS, "RuntimeError('CUDA out of memory') while encoding the images")
def _(lab: Lab) -> None:
    out_of_memory_while_encoding(lab, RuntimeError("CUDA out of memory. Tried to allocate 1.5 GiB"))


@case(FAULTS, "MemoryError while decoding an image")
def _(lab: Lab) -> None:
    from lib_negip import images

    def decode_image(data: Any, **kwargs: Any) -> Any:
        raise MemoryError

    lab.monkeypatch.setattr(images, "decode_image", decode_image)
    lab.refused(reference_fields(), r"ran out of memory while preparing .*fewer or smaller images")


@case(FAULTS, "out of memory while loading an adapter")
def _(lab: Lab) -> None:
    lab.adapter_file("fresh.safetensors", sd15_adapter(lab))

    def load(path: Path) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    lab.monkeypatch.setattr(webui_models, "_load_adapter", load)
    lab.refused(
        reference_fields(model="fresh"), r"ran out of GPU memory .*Tried to allocate 20.00 MiB"
    )
    assert not any("fresh" in key[0] for key in webui_models.MODELS.adapters._items)


@case(FAULTS, "no checkpoint loaded when process runs; the error still reaches the user")
def _(lab: Lab) -> None:
    class LoadsTheCheckpoint(Other):  # A1111 loading the checkpoint after our process
        def process(self, p: Any, *args: Any) -> None:
            lab.use("sd15")

    shared.sd_model = None
    lab.refused(
        reference_fields(model="no-such-adapter"),
        r"there is no IP-Adapter named 'no-such-adapter'",
        after=(LoadsTheCheckpoint(),),
    )


@case(FAULTS, "checkpoint reloaded between process and the first step, an error pending")
def _(lab: Lab) -> None:
    reloaded = lab.extra_unet(SD15, seed=0)

    class Reloads(Other):
        def process(self, p: Any, *args: Any) -> None:
            lab.use_unet(reloaded, SD15)

    lab.refused(
        reference_fields(positive_weight="1"),
        r"positive_weight must be a number",
        after=(Reloads(),),
    )


@case(FAULTS, "checkpoint switched SD1.5 -> SDXL -> SD1.5", families=("sd15", "sdxl"))
def _(lab: Lab) -> None:
    assert torch.equal(lab.result(), lab.references["sd15"])
    lab.use("sdxl")
    lab.refused(
        reference_fields(),
        FAMILY.format(name="tiny-base_sd15", adapter=64, checkpoint=96),
        config=SDXL,
    )
    assert torch.equal(
        lab.result(reference_fields(model=MODEL_FOR["sdxl"]), config=SDXL), lab.references["sdxl"]
    )
    lab.use("sd15")
    assert torch.equal(lab.result(), lab.references["sd15"])


def refiner_at_step(lab: Lab, step: int, refiner: torch.nn.Module, config: TinyUNetConfig) -> None:
    """A1111's refiner switch: from ``step`` on another model samples, conds remade for it."""

    def switch(params: Any) -> None:
        if params.denoiser.step >= step:
            lab.use_unet(refiner, config)
            if config.context_dim != params.text_cond.shape[-1]:
                params.text_cond = conditioning(params.text_cond.shape[0], config, seed=8)
                params.text_uncond = conditioning(params.text_uncond.shape[0], config, seed=9)

    lab.callback(switch, after_ours=False)


@case(FAULTS, "refiner of another context width takes over mid-pass", families=("sd15", "sdxl"))
def _(lab: Lab) -> None:
    refiner_at_step(lab, 2, lab.world.sdxl, SDXL)
    seen = denoisers_seen(lab)
    lab.run(steps=4)
    lengths = [length for _, length in seen[0].calls]
    assert lengths[:2] != [77, 77]  # image tokens on the SD1.5 steps
    assert lengths[2:] == [77, 77]  # the refiner's steps untouched


@case(
    FAULTS,
    "refiner of another context width takes over before any step had the image prompts",
    families=("sd15", "sdxl"),
)
def _(lab: Lab) -> None:
    refiner_at_step(lab, 2, lab.world.sdxl, SDXL)
    # Both windows open after the switch: without the refusal no step would get them.
    late = {"positive_start": 0.5, "negative_start": 0.5}
    lab.refused(reference_fields(**late), r"no step before it had the image prompts", steps=4)


@case(
    FAULTS,
    "refiner of another context width takes over before one side's window opens",
    families=("sd15", "sdxl"),
)
def _(lab: Lab) -> None:
    refiner_at_step(lab, 2, lab.world.sdxl, SDXL)
    # The positive side acts before the switch; the negative one's steps are all the refiner's.
    lab.refused(
        reference_fields(negative_start=0.5),
        r"the negative image prompts' step window holds no step before it",
        steps=4,
    )


@case(FAULTS, "refiner of the same family takes over mid-pass")
def _(lab: Lab) -> None:
    refiner = lab.extra_unet(SD15, seed=1)
    refiner_at_step(lab, 2, refiner, SD15)
    seen = denoisers_seen(lab)
    lab.run(steps=4)
    assert all(length > 77 for _, length in seen[0].calls)  # the prompts follow the model


class Transfer(BaseHTTPRequestHandler):
    """Serves one body: whole, cut in half (the connection closes), or as a web page."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server: Any = self.server
        body = server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.mode == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            server.during()  # while the client holds half a file
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(body: bytes, mode: str, during: Callable[[], None] = lambda: None) -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Transfer)
    httpd.daemon_threads = True
    httpd.body, httpd.mode, httpd.during = body, mode, during  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def download_fails(lab: Lab, mode: str, body: bytes, match: str) -> None:
    from modules import modelloader

    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        lab.monkeypatch.delenv(name, raising=False)
    folder = lab.models / "ipadapter"
    before = sorted(p.name for p in folder.iterdir())
    listed_during: list[list[str]] = []

    def during() -> None:
        listed_during.append(webui_models.adapter_choices(refresh=True))

    shared.opts.negip_auto_download = True
    real_load = modelloader.load_file_from_url
    with serving(body, mode, during) as base:

        def load_file_from_url(url: str, **kwargs: Any) -> str:  # the network, on loopback
            return real_load(url.replace("https://huggingface.co", base), **kwargs)

        lab.monkeypatch.setattr(modelloader, "load_file_from_url", load_file_from_url)
        lab.refused(reference_fields(model="ip-adapter_sd15"), match)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing partial left behind
    assert "ip-adapter_sd15" not in webui_models.adapter_choices(refresh=True)
    assert all("ip-adapter_sd15" not in names for names in listed_during)
    assert len(listed_during) == (mode == "cut")


@case(FAULTS, "a download that breaks off (automatic download)")
def _(lab: Lab) -> None:
    body = save(sd15_adapter(lab))
    download_fails(
        lab,
        "cut",
        body,
        r"Downloading models/ipadapter/ip-adapter_sd15.safetensors .* failed: .*Nothing was saved",
    )


@case(FAULTS, "a download that returns a web page")
def _(lab: Lab) -> None:
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    download_fails(lab, "ok", page, r"the server sent a web page .*Nothing was saved")


# --------------------------------------------------------------------------------------------
# Coexistence with an extension that replaces attn2's forward per instance (as the ControlNet
# extension does for its own IP-Adapter) and restores it afterwards.


class ForwardWrapper:
    """Replaces every attn2 module's ``forward`` on the instance, keeping the previous one, and
    adds its own term; ``remove`` puts back exactly what was there."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.saved: list[tuple[torch.nn.Module, Any]] = []
        self.calls = 0
        self.context_lengths: set[int] = set()

    def install(self, unet: torch.nn.Module) -> None:
        for module in attn2_modules(unet):
            previous = module.forward
            self.saved.append((module, vars(module).get("forward")))

            def forward(
                x: torch.Tensor, context: Any = None, mask: Any = None, _previous: Any = previous
            ) -> Any:
                self.calls += 1
                self.context_lengths.add(context.shape[1])
                return _previous(x, context=context, mask=mask) + self.strength * torch.tanh(x)

            module.forward = forward

    def remove(self) -> None:
        for module, own in reversed(self.saved):
            if own is None:
                vars(module).pop("forward", None)  # (the extension may have taken it off)
            else:
                module.forward = own
        self.saved = []


class WrapperScript(Other):
    """The wrapping extension as A1111 runs it: installs at ``process`` (or, with
    ``at_first_step``, in an on_cfg_denoiser callback after ours), restores at ``postprocess``."""

    def __init__(self, lab: Lab, wrapper: ForwardWrapper, *, at_first_step: bool = False) -> None:
        self.lab, self.wrapper = lab, wrapper
        if at_first_step:
            lab.callback(self.first_step, after_ours=True)
        self.at_first_step = at_first_step

    def process(self, p: Any, *args: Any) -> None:
        if not self.at_first_step:
            self.wrapper.install(self.lab.world.unet)

    def first_step(self, params: Any) -> None:
        if not self.wrapper.saved:
            self.wrapper.install(self.lab.world.unet)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        self.wrapper.remove()


def coexist(lab: Lab, *, wrapper_first: bool, removed_first: bool) -> torch.Tensor:
    """A generation with a wrapper installed before (or after) our hijack and removed before (or
    after) ours; returns its result after checking that both effects were present."""
    wrapper = ForwardWrapper(0.05)
    script = WrapperScript(lab, wrapper, at_first_step=not wrapper_first)
    terms = {"n": 0}
    real = _LayerHooks.add_image_term

    def counting(self: Any, module: Any, args: Any) -> Any:
        added = real(self, module, args)
        terms["n"] += added is not None
        return added

    lab.monkeypatch.setattr(_LayerHooks, "add_image_term", counting)
    placement = {"before": (script,)} if removed_first else {"after": (script,)}
    result = lab.run(**placement).result
    layers = len(attn2_modules(lab.world.sd15))
    assert wrapper.calls == terms["n"] == 2 * layers  # both acted on every attn2 call
    assert wrapper.context_lengths == {77}  # our tokens were split off before its forward
    assert not torch.equal(result, lab.references["sd15"])
    lab.monkeypatch.setattr(_LayerHooks, "add_image_term", real)
    return result


@case(COEXIST, "a forward wrapper installed before ours, removed before ours")
def _(lab: Lab) -> None:
    coexist(lab, wrapper_first=True, removed_first=True)


@case(COEXIST, "a forward wrapper installed after ours, removed after ours")
def _(lab: Lab) -> None:
    coexist(lab, wrapper_first=False, removed_first=False)


@case(COEXIST, "installation order does not change the image; wrapper alone differs")
def _(lab: Lab) -> None:
    first = coexist(lab, wrapper_first=True, removed_first=False)
    script_callbacks.callbacks["cfg_denoiser"][:] = [
        e for e in script_callbacks.callbacks["cfg_denoiser"] if e.name != "other"
    ]
    second = coexist(lab, wrapper_first=False, removed_first=True)
    assert torch.equal(first, second)
    wrapper = ForwardWrapper(0.05)
    alone = lab.run(
        reference_fields(positive_weight=0.0, negative_weight=0.0),
        before=(WrapperScript(lab, wrapper),),
    ).result
    assert not torch.equal(alone, first)  # our term is part of the combined image


class BatchSplitter(ForwardWrapper):
    """Regional Prompter's Attention mode where the prompt and the negative prompt have
    different numbers of regions but share a UNet call: every attn2 runs on each half of the
    batch on its own (the cond rows, then the uncond rows)."""

    def install(self, unet: torch.nn.Module) -> None:
        for module in attn2_modules(unet):
            self.saved.append((module, vars(module).get("forward")))

            def forward(
                x: torch.Tensor,
                context: Any = None,
                mask: Any = None,
                _previous: Any = module.forward,
            ) -> Any:
                halves = zip(x.chunk(2), context.chunk(2), strict=True)
                return torch.cat([_previous(part, context=text) for part, text in halves])

            module.forward = forward


@case(COEXIST, "an extension that runs cross-attention on half the batch at a time")
def _(lab: Lab) -> None:
    alone_fields = reference_fields(positive_weight=0.0, negative_weight=0.0)
    alone = lab.run(alone_fields, before=(WrapperScript(lab, BatchSplitter(0.0)),)).result
    off = lab.run({"enabled": False}, before=(WrapperScript(lab, BatchSplitter(0.0)),)).result
    assert torch.equal(alone, off)  # weights 0: the other extension's image, bit for bit
    splitter = BatchSplitter(0.0)
    try:  # the refusal skips every script's postprocess, the other extension's too
        lab.refused(
            reference_fields(),
            r"Another extension runs the UNet's cross-attention on 1 of the 2 rows of the batch "
            r".*Regional Prompter's Attention mode",
            before=(WrapperScript(lab, splitter),),
        )
    finally:
        splitter.remove()


class NamedBatchSplitter(BatchSplitter):
    """:class:`BatchSplitter` whose forward comes from a file of another extension's, as the
    real NegPiP's and Regional Prompter's do."""

    def __init__(self, source_file: str) -> None:
        super().__init__(0.0)
        self.source_file = source_file

    def install(self, unet: torch.nn.Module) -> None:
        code = compile(
            "def make(previous, torch):\n"
            "    def forward(x, context=None, mask=None):\n"
            "        halves = zip(x.chunk(2), context.chunk(2))\n"
            "        return torch.cat([previous(part, context=text) for part, text in halves])\n"
            "    return forward\n",
            self.source_file,
            "exec",
        )
        namespace: dict[str, Any] = {}
        exec(code, namespace)  # the function's code then names that file, as an extension's
        for module in attn2_modules(unet):
            self.saved.append((module, vars(module).get("forward")))
            module.forward = namespace["make"](module.forward, torch)


@pytest.mark.parametrize(
    ("source_file", "expected"),
    [
        (
            "/webui/extensions/sd-webui-negpip/scripts/negpip.py",
            r"^NegPiP runs the UNet's cross-attention on 1 of the 2 rows .* Make one of them "
            r"longer than the other by a 75-token chunk .* NegPiP's hooks, which it removes only "
            r"when a generation finishes, were taken off with this refusal\.$",
        ),
        (
            "C:\\webui\\extensions\\sd-webui-regional-prompter\\scripts\\attention.py",
            r"^Regional Prompter runs the UNet's cross-attention on 1 of the 2 rows .* Use "
            r"Regional Prompter's Latent mode",
        ),
    ],
    ids=["NegPiP", "Regional Prompter"],
)
def test_the_refusal_of_a_batch_splitter_names_the_extension(
    process: Process, monkeypatch: pytest.MonkeyPatch, source_file: str, expected: str
) -> None:
    """NegPiP (any prompt weight below 0) splits the batch whenever the prompt and the negative
    prompt share a UNet call; the refusal blamed Regional Prompter's Attention mode."""
    reset(process)
    lab = Lab(process.world, process.references, monkeypatch)
    splitter = NamedBatchSplitter(source_file)
    try:
        message = lab.refused(reference_fields(), expected, before=(WrapperScript(lab, splitter),))
        # A1111 skips every postprocess of the refused generation, NegPiP's unhooking too:
        # its hooks (only its) are taken off with the refusal; left on, they split every later
        # generation, in both tabs, with the refused prompt's conditioning.
        left = [m for m in attn2_modules(lab.world.sd15) if "forward" in vars(m)]
        assert left == ([] if "negpip" in source_file else attn2_modules(lab.world.sd15))
    finally:
        splitter.remove()
    other = "Regional Prompter" if "negpip" in source_file else "NegPiP"
    assert other not in message  # the advice for the other extension does not apply


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"model": "no-such-adapter"}, "no-such-adapter"),
        ({"positive_layers": "3:1, 16:1"}, "positive_layers"),
    ],
    ids=["unknown model", "block out of range"],
)
def test_every_refusal_takes_negpips_hooks_off(
    process: Process, monkeypatch: pytest.MonkeyPatch, fields: dict, match: str
) -> None:
    """A refusal found in ``process`` is raised at the UNet's first call, after NegPiP's
    ``process_batch`` hooked the UNet; A1111 then skips NegPiP's ``postprocess``, the only place
    that unhooks. The hooks stayed and changed the other tab's plain pictures."""
    reset(process)
    lab = Lab(process.world, process.references, monkeypatch)
    splitter = NamedBatchSplitter("/webui/extensions/sd-webui-negpip/scripts/negpip.py")
    try:
        lab.refused({**reference_fields(), **fields}, match, before=(WrapperScript(lab, splitter),))
        assert [m for m in attn2_modules(lab.world.sd15) if "forward" in vars(m)] == []
    finally:
        splitter.remove()


class UNetCalls:
    """Another extension between the sampler and the UNet (as Tiled Diffusion wraps the
    model): ``tiles`` samples the latent in two halves, ``own_prompt`` also runs the UNet with
    a conditioning of its own (Tiled Diffusion's region prompts) after the sampler's call."""

    def __init__(self, lab: Lab, *, tiles: bool = False, own_prompt: bool = False) -> None:
        real = processing.UNetWrapper.__call__

        def call(wrapper: Any, x: torch.Tensor, sigma: Any, cond: Any) -> torch.Tensor:
            if tiles:
                out = torch.cat([real(wrapper, part, sigma, cond) for part in x.chunk(2, -1)], -1)
            else:
                out = real(wrapper, x, sigma, cond)
            if own_prompt:
                text = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
                region = real(wrapper, x, sigma, {"crossattn": text[:, :77]})
                out = out * 0.5 + region * 0.5
            return out

        lab.monkeypatch.setattr(processing.UNetWrapper, "__call__", call)


@case(COEXIST, "an extension that also runs the UNet with prompts of its own")
def _(lab: Lab) -> None:
    UNetCalls(lab, own_prompt=True)
    alone = lab.result(reference_fields(positive_weight=0.0, negative_weight=0.0))
    assert not torch.equal(alone, lab.references["sd15"])  # its own calls changed the image
    lab.refused(
        reference_fields(),
        r"another extension also calls the UNet with a conditioning of its own, without them "
        r"\(as Tiled Diffusion's region prompts do\)",
    )


@case(COEXIST, "a mask with an extension that samples in tiles")
def _(lab: Lab) -> None:
    UNetCalls(lab, tiles=True)
    # Without a mask the image prompts act on every tile (16x16 latent: two 16x8 tiles).
    tiled = lab.result(reference_fields(), latent_size=16)
    assert not torch.equal(
        tiled,
        lab.result(reference_fields(positive_weight=0.0, negative_weight=0.0), latent_size=16),
    )
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    lab.refused(
        reference_fields(positive_mask=b64(png(half))),
        r"A mask is set, but the UNet samples a 64x128 piece of the 128x128 picture at a time .*"
        r"Tiled Diffusion",
        latent_size=16,
    )


@case(COEXIST, "an extension's own UNet pass before sampling: weights 0 pass, others refused")
def _(lab: Lab) -> None:
    own = {"calls": 0}
    real = processing.Processing.sample

    def sample(p: Any, x: torch.Tensor) -> torch.Tensor:  # Tiled Diffusion's noise inversion
        own["calls"] += 1
        lab.world.unet(x, torch.full((1,), 500.0), context=p.uncond[:, :77])
        return real(p, x)

    lab.monkeypatch.setattr(processing.Processing, "sample", sample)
    lab.monkeypatch.setattr(backend, "host_kind", lambda: backend.A1111)
    zero = reference_fields(positive_weight=0.0, negative_weight=0.0)
    result = lab.result(zero)
    assert own["calls"] == 1
    assert torch.equal(result, lab.result(zero, scripts=False))
    lab.refused(reference_fields(), r"The UNet was called before sampling began")


# --------------------------------------------------------------------------------------------
# Running the catalogue


@dataclasses.dataclass
class Process:
    """The module's A1111 process: the world, its pristine state and the reference images."""

    world: World
    snapshots: list[Snapshot]
    references: dict[str, torch.Tensor]
    callbacks: list[Any]


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    world = World(tmp_path_factory.mktemp("a1111") / "models")
    # Only ours: the harness's recorder keeps a copy of every call, which the soak does not want.
    entries = script_callbacks.callbacks["cfg_denoiser"]
    entries[:] = [entry for entry in entries if entry.name == "negip"]
    snapshots = [Snapshot.of(world.sd15), Snapshot.of(world.sdxl)]
    lab = Lab(world, {}, None)
    references = {}
    for family in ("sd15", "sdxl"):
        world.use(family)
        fields = reference_fields(model=MODEL_FOR[family])
        references[family] = lab.result(fields, config=CONFIG_FOR[family])
        again = lab.result(fields, config=CONFIG_FOR[family])
        assert torch.equal(again, references[family])  # deterministic, so bit-exact checks hold
    world.use("sd15")
    yield Process(world, snapshots, references, list(entries))
    register.shutdown()
    script_callbacks.clear()


def reset(process: Process) -> None:
    """What A1111 looks like between two requests (the case may have changed any of it)."""
    shared.opts = shared.default_opts()
    for entry in script_callbacks.callbacks["ui_settings"]:
        entry.callback()
    shared.state.interrupted = shared.state.skipped = False
    script_callbacks.callbacks["cfg_denoiser"][:] = process.callbacks
    script_callbacks.errors.clear()
    process.world.use("sd15")


def check_nothing_left_behind(process: Process, lab: Lab, families: tuple[str, ...]) -> None:
    for snapshot in (*process.snapshots, *lab.extra_unets):
        snapshot.check()
    current = generation.Generation.current
    assert current is None or (lab.idle_generation and current.session._hijack is None)
    assert generation.Generation.trap is None
    assert getattr(generation.Generation, "failure", None) is None
    models = webui_models.MODELS
    assert len(models.adapters) <= models.adapters.limit
    assert len(models.encoders) <= models.encoders.limit
    assert len(models.features._features) <= models.features._features.limit
    for encoder in models.encoders._items.values():
        assert encoder.device == torch.device("cpu")
    # A clean generation afterwards is bit for bit the one made before any case ran.
    for family in families:
        process.world.use(family)
        fields = reference_fields(model=MODEL_FOR[family])
        result = lab.result(fields, config=CONFIG_FOR[family])
        assert torch.equal(result, process.references[family]), family
    for snapshot in process.snapshots:
        snapshot.check()


@pytest.mark.parametrize("entry", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_catalogue(process: Process, entry: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    reset(process)
    lab = Lab(process.world, process.references, monkeypatch, process.snapshots)
    try:
        entry.run(lab)
        monkeypatch.undo()  # the fault injections end with the case
        lab.remove_created()
        reset(process)
        check_nothing_left_behind(process, lab, entry.families)
    finally:
        monkeypatch.undo()
        lab.remove_created()
        reset(process)
        generation.Generation.end()
    api, ui = (
        documented_cells(lab.messages, lab.models),
        documented_cells(lab.ui_messages, lab.models),
    )
    if os.environ.get("NEGIP_RELIABILITY_MESSAGES"):
        with open(os.environ["NEGIP_RELIABILITY_MESSAGES"], "a", encoding="utf-8") as out:
            record = {"id": entry.id, "messages": lab.messages, "ui_messages": lab.ui_messages}
            out.write(json.dumps({**record, "api_cell": api, "ui_cell": ui}) + "\n")
    if lab.messages:  # the table shows each refusal as the API and the UI word it
        row = documented_rows().get(entry.id)
        assert row is not None, f"{entry.id} is not in docs/reliability.md"
        assert tuple(map(comparable, row)) == (comparable(api), comparable(ui)), (
            f"docs/reliability.md's row for {entry.id} does not show the messages; it should "
            f"read: | {entry.category} | {entry.name} | {api} | {ui} |"
        )


#: How long a message shown in the table may be before it is cut (with " …").
DOC_MESSAGE_CHARS = 230


def documented_cells(messages: list[str], models: Path) -> str:
    """A table cell for a case's messages: the first, quoted (cut at DOC_MESSAGE_CHARS), and how
    many more there were; the test's model folder shown as ``<models>``."""
    if not messages:
        return ""
    first = messages[0].replace(str(models), "<models>")
    if len(first) > DOC_MESSAGE_CHARS:
        first = first[:DOC_MESSAGE_CHARS].rstrip() + " …"
    more = f" (+{len(messages) - 1} more)" if len(messages) > 1 else ""
    return f"“{first}”{more}"


def comparable(cell: str) -> str:
    """A cell without what depends on the machine the test runs on: a refused string that is a
    path of the test's temporary folder is quoted by its length and first characters."""
    return re.sub(
        r"found \d+ characters starting '[^']*'", "found N characters starting '...'", cell
    )


@functools.cache
def documented_rows() -> dict[str, tuple[str, str]]:
    """The catalogue table of docs/reliability.md: case id -> (API cell, UI cell)."""
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4:
            rows[f"{cells[0]}: {cells[1]}"] = (cells[2], cells[3])
    return rows


def test_catalogue_size_and_docs() -> None:
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(CATALOGUE) >= 40
    table = DOCS.read_text(encoding="utf-8")
    missing = [c.id for c in CATALOGUE if f"| {c.category} | {c.name} |" not in table]
    assert missing == [], "cases missing from docs/reliability.md"
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| .*\|$", table, flags=re.MULTILINE)
    documented = {f"{category}: {name}" for category, name in rows if category != "category"}
    documented -= {row for row in documented if row.split(": ")[0] not in CATEGORY_ORDER}
    assert sorted(documented - set(ids)) == [], "rows of cases that no longer exist"
    counts = ", ".join(
        f"{category} {sum(c.category == category for c in CATALOGUE)}"
        for category in CATEGORY_ORDER
    )
    summary = f"{len(CATALOGUE)} cases: {counts}."
    assert summary in table, f"docs/reliability.md's summary line should read: {summary}"


# --------------------------------------------------------------------------------------------
# Soak


def resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hooked(modules: list[torch.nn.Module]) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m)) for m in modules
    )


SOAK_GENERATIONS = int(os.environ.get("NEGIP_SOAK_GENERATIONS", "200"))
SOAK_WARM_UP = 40


@pytest.mark.slow  # about 70 s on two busy cores
def test_soak(process: Process, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 generations in a row, alternating models, images and settings."""
    reset(process)
    world = process.world
    lab = Lab(world, process.references, monkeypatch)
    lab.adapter_file(
        "tiny-plus_sdxl.safetensors", adapter_state(world.sdxl, SDXL.context_dim, "plus")
    )
    shared.opts.negip_models_in_memory = 2  # four adapters in turn: loads and evictions
    shared.opts.negip_images_in_memory = 16  # 40 different images in turn: evictions
    watched = {
        unet: [unet] + [m for a in attn2_modules(unet) for m in (a, a.to_q, a.to_out[0])]
        for unet in (world.sd15, world.sdxl)
    }
    # An SDXL generation costs three SD1.5 ones here: one in four is SDXL.
    plan = [
        ("sd15", "tiny-base_sd15"),
        ("sd15", "tiny-plus_sd15"),
        ("sdxl", "tiny-base_sdxl"),
        ("sd15", "tiny-plus_sd15"),
        ("sd15", "tiny-base_sd15"),
        ("sd15", "tiny-plus_sd15"),
        ("sdxl", "tiny-plus_sdxl"),
        ("sd15", "tiny-base_sd15"),
    ]
    samples: list[int] = []  # resident memory after every SOAK_WARM_UP generations
    try:
        start = time.perf_counter()
        for i in range(SOAK_GENERATIONS):
            family, model = plan[i % len(plan)]
            world.use(family)
            fields = reference_fields(
                model=model,
                positive_images=[b64(png(picture(100 + i % 40)))] * (1 + i % 2),
                negative_images=[] if i % 5 == 0 else [b64(png(picture(200 + i % 7)))],
                positive_weight=0.5 + (i % 4) * 0.25,
                negative_end=[1.0, 0.5][i % 2],
                combine=["average", "concat"][i % 3 == 0],
            )
            result = lab.result(fields, config=CONFIG_FOR[family])
            assert torch.isfinite(result).all()
            for modules in watched.values():
                assert hooked(modules) == 0, i
            models = webui_models.MODELS
            assert len(models.adapters) <= 2
            assert len(models.encoders) <= 2
            assert len(models.features._features) <= 16
            assert generation.Generation.current is None
            if (i + 1) % SOAK_WARM_UP == 0:
                gc.collect()
                samples.append(resident_bytes())
        elapsed = time.perf_counter() - start
    finally:
        lab.remove_created()
        reset(process)
    warm, end = samples[0], samples[-1]
    mib = ", ".join(f"{sample / 2**20:.1f}" for sample in samples)
    print(
        f"\nsoak: {SOAK_GENERATIONS} generations in {elapsed:.1f} s; resident MiB every {SOAK_WARM_UP}: {mib}"
    )
    assert end - warm < 24 * 2**20  # no growth beyond allocator noise
    for snapshot in process.snapshots:
        snapshot.check()


# --------------------------------------------------------------------------------------------
# A real GPU: the out-of-memory errors above are simulated on the CPU; here CUDA raises them.


class _Attention(torch.nn.Module):
    """An ldm-shaped cross-attention (to_q/to_k/to_v/to_out, heads) that can exhaust the GPU."""

    def __init__(self, explode: bool) -> None:
        super().__init__()
        self.heads, self.explode = 4, explode
        self.to_q = torch.nn.Linear(64, 64, bias=False)
        self.to_k = torch.nn.Linear(32, 64, bias=False)
        self.to_v = torch.nn.Linear(32, 64, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(64, 64), torch.nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: Any = None, mask: Any = None) -> torch.Tensor:
        if self.explode:
            torch.empty(10**15, dtype=torch.uint8, device=x.device)  # far beyond any GPU
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](torch.softmax(q @ k.transpose(1, 2) / 8, dim=-1) @ v)


class _UNet(torch.nn.Module):
    """The smallest module tree with an ldm UNet's attn2 naming."""

    def __init__(self, explode: bool) -> None:
        super().__init__()
        block = torch.nn.Module()
        block.attn2 = _Attention(explode)
        self.input_blocks = torch.nn.ModuleList(
            [torch.nn.ModuleList([torch.nn.Identity(), torch.nn.ModuleList([block])])]
        )

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.input_blocks[0][1][0].attn2(x, context=context)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_out_of_memory() -> None:
    from lib_negip.conditioning import TokenLayout, append_blocks, make_block
    from lib_negip.errors import ResourceError

    cuda = torch.device("cuda")
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        torch.empty(10**15, dtype=torch.uint8, device=cuda)
    answer = failures.explain_out_of_memory(raised.value)
    assert isinstance(answer, ResourceError)
    assert "ran out of GPU memory" in str(answer)

    # A module whose move to the GPU fails half way goes back to the CPU, its memory freed.
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)])  # 8 x 64 MiB
    base = torch.cuda.memory_allocated()
    filler = torch.empty(torch.cuda.mem_get_info()[0] - 200 * 2**20, dtype=torch.uint8, device=cuda)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.to(cuda)
    assert {p.device.type for p in model.parameters()} == {"cpu", "cuda"}
    model.to("cpu")
    del filler
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == base

    # A real OOM inside the UNet, and a rescaled block: the hijack is gone at once, both times.
    layout = TokenLayout.for_tokens(4)
    for explode in (True, False):
        unet = _UNet(explode).to(cuda)
        aborted: list[int] = []
        hijack = AttentionHijack(
            unet,
            [(torch.randn(64, 32, device=cuda), torch.randn(64, 32, device=cuda))],
            layout,
            on_abort=lambda aborted=aborted: aborted.append(1),
            raise_as=lambda error: ValueError(f"as 422: {error}"),
        )
        hijack.install()
        text = torch.randn(2, 77, 32, device=cuda)
        block = make_block(torch.randn(4, 32, device=cuda), 1.0, layout)
        cond, _ = append_blocks(text, text, block, block)
        expected = torch.cuda.OutOfMemoryError if explode else ValueError
        with pytest.raises(expected):
            unet(torch.randn(2, 16, 64, device=cuda), context=cond if explode else cond * 1.5)
        assert residue(unet) == []
        assert aborted == [1]
