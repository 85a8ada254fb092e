"""lib_negip.registry: scanning, naming, caching, hashing, resolving and describing models."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_adapters import PUBLISHED_SHAPES, make_adapter_state_dict, nest
from tiny_encoders import (
    TINY_BIGG,
    TINY_H,
    VIT_BIGG_14,
    VIT_H_14,
    hf_vision_config,
    hf_vision_state_dict,
)

from lib_negip import registry as registry_module
from lib_negip.errors import (
    ArgumentError,
    IncompatibleModelError,
    ModelFileError,
    UnsupportedModelError,
)
from lib_negip.files import set_torch_load
from lib_negip.registry import ModelFolder, ModelRegistry, is_skipped_name

# Tiny adapters that fit exactly one of the tiny encoders: base reads the projection dim,
# plus reads the hidden width (TINY_H: width 64, projection 32; TINY_BIGG: width 52, proj 40).
FITS_H_BASE = {"variant": "base", "encoder_dim": TINY_H["projection_dim"]}
FITS_H_PLUS = {"variant": "plus", "encoder_dim": TINY_H["width"]}
FITS_G_BASE = {"variant": "base", "encoder_dim": TINY_BIGG["projection_dim"]}
FITS_G_PLUS = {"variant": "plus", "encoder_dim": TINY_BIGG["width"]}


@pytest.fixture(autouse=True)
def _default_torch_load():
    set_torch_load(None)
    yield
    set_torch_load(None)


def adapter_sd(variant: str = "base", encoder_dim: int = 32, **kw) -> dict[str, torch.Tensor]:
    return make_adapter_state_dict(
        variant, encoder_dim=encoder_dim, layer_inner_dims=(16, 32), depth=1, **kw
    )


def save_adapter(path: Path, fmt: str = "safetensors", **kw) -> Path:
    """fmt: "safetensors", "zip" (torch.save, nested like the .bin releases) or "legacy"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = adapter_sd(**kw)
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(nest(sd), path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def save_encoder(path: Path, shape: dict | None = None, *, config: bool = False) -> Path:
    """A tiny transformers-layout encoder; ``config`` writes config.json beside it."""
    shape = shape or TINY_H
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = hf_vision_state_dict(**shape)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    if config:
        (path.parent / "config.json").write_text(json.dumps(hf_vision_config(**shape)))
    return path


def save_header_only(path: Path, meta: dict[str, torch.Tensor]) -> Path:
    """A safetensors file with the real header of ``meta``'s shapes and sparse (unwritten) data:
    real published shapes cost no disk, and only a header reader can be fast on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for key in sorted(meta):
        nbytes = meta[key].numel() * 2
        header[key] = {
            "dtype": "F16",
            "shape": list(meta[key].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def names(entries) -> list[str]:
    return [e.name for e in entries]


def by_name(entries, name):
    return next(e for e in entries if e.name == name)


# --- listing ---------------------------------------------------------------------------------


def test_lists_adapters_of_every_container_recursively(tmp_path: Path) -> None:
    root = tmp_path / "ipadapter"
    save_adapter(root / "a.safetensors", variant="base")
    save_adapter(root / "b.bin", "zip", variant="plus")
    save_adapter(root / "c.pth", "legacy", variant="full_face")
    save_adapter(root / "sd15" / "deep" / "d.pt", "zip", variant="base")
    (root / "notes.txt").write_text("not a model")
    (root / "e.ckpt").write_bytes(b"x")  # not an adapter container
    reg = ModelRegistry([root], [])
    entries = reg.adapters()
    assert names(entries) == ["a", "b", "c", "d"]
    assert [e.spec.variant for e in entries] == ["base", "plus", "full_face", "base"]
    assert all(e.error is None for e in entries)
    assert by_name(entries, "d").file_name == "d.pt"
    assert by_name(entries, "a").size == (root / "a.safetensors").stat().st_size
    assert reg.adapter_names() == ["auto", "a", "b", "c", "d"]


def test_controlnet_folders_list_only_ip_adapter_names(tmp_path: Path) -> None:
    controlnet = tmp_path / "ControlNet"
    for name in (
        "ip-adapter_sd15.safetensors",
        "IPAdapter_Plus.safetensors",
        "ip_adapter_x.safetensors",
    ):
        save_adapter(controlnet / name)
    save_adapter(controlnet / "control_v11p_sd15_canny.safetensors")  # filtered by name
    save_adapter(controlnet / "sub" / "my-ip-adapter.safetensors")
    own = tmp_path / "ipadapter"
    save_adapter(own / "plain_name.safetensors")  # the own folder is not filtered
    reg = ModelRegistry([own, ModelFolder(controlnet, only_ip_adapter_names=True)], [])
    assert names(reg.adapters()) == [
        "plain_name",
        "ip-adapter_sd15",
        "ip_adapter_x",
        "IPAdapter_Plus",  # ordered case-insensitively
        "my-ip-adapter",
    ]


def test_controlnet_folders_are_recognised_from_plain_paths(tmp_path: Path) -> None:
    install = tmp_path / "controlnet-fans" / "webui"  # such an install path filters nothing
    own = install / "models" / "ipadapter"
    shared = install / "models" / "ControlNet"
    extension = install / "extensions" / "sd-webui-controlnet-main"
    clip_vision = extension / "annotator" / "downloads" / "clip_vision"
    save_adapter(own / "renamed.safetensors")
    save_adapter(shared / "ip-adapter_a.safetensors")
    save_adapter(shared / "control_canny.safetensors")
    save_adapter(extension / "models" / "ip-adapter_b.safetensors")
    save_adapter(extension / "models" / "t2iadapter_style.safetensors")
    save_encoder(clip_vision / "clip_h.pth")  # encoder folders are never filtered by name
    reg = ModelRegistry([own, shared, extension / "models"], [clip_vision])
    assert names(reg.adapters()) == ["renamed", "ip-adapter_a", "ip-adapter_b"]
    assert names(reg.encoders()) == ["clip_h"]
    unfiltered = ModelRegistry([ModelFolder(shared, only_ip_adapter_names=False)], [])
    assert names(unfiltered.adapters()) == ["control_canny", "ip-adapter_a"]


def test_skips_hidden_temporary_and_partial_files(tmp_path: Path) -> None:
    root = tmp_path / "ipadapter"
    save_adapter(root / "good.safetensors")
    for name in (
        ".hidden.safetensors",
        "tmpx7f3_a9q.safetensors",  # Python's tempfile names: "tmp" and 8 characters
        "TMPAB12CD34.bin",
        "x.safetensors.part",
        "x.safetensors.tmp",
        "y.safetensors.partial",
        ".negip-0123456789ab-z.safetensors.part",
    ):
        save_adapter(root / name)
    save_adapter(root / ".cache" / "in_hidden_folder.safetensors")
    # A downloader writing into the final name leaves a twin beside it meanwhile.
    save_adapter(root / "downloading.safetensors")
    (root / "downloading.safetensors.aria2").write_bytes(b"\x00")
    save_adapter(root / "firefox.safetensors")
    (root / "firefox.safetensors.part").write_bytes(b"\x00")
    # Names that only start with "tmp" are models like any others (they were never listed).
    save_adapter(root / "tmp-style-adapter.safetensors")
    save_adapter(root / "tmpl.safetensors")
    reg = ModelRegistry([root], [])
    assert names(reg.adapters()) == ["good", "tmp-style-adapter", "tmpl"]
    assert is_skipped_name(".negip-x.part")
    assert not is_skipped_name("good.safetensors")


def test_unreadable_files_are_listed_with_their_error(tmp_path: Path) -> None:
    root = tmp_path / "ipadapter"
    good = save_adapter(root / "good.safetensors")
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "empty.bin").write_bytes(b"")
    (root / "page.safetensors").write_bytes(b"<!DOCTYPE html><html>login</html>")
    (root / "garbage.bin").write_bytes(b"\x00\x01garbage" * 10)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(root / "lora.safetensors"))
    save_file(
        make_adapter_state_dict("faceid", layer_inner_dims=(16, 32), faceid_id_dim=8),
        str(root / "faceid.safetensors"),
    )
    reg = ModelRegistry([root], [])
    entries = {e.name: e for e in reg.adapters()}
    assert set(entries) == {"empty", "faceid", "garbage", "good", "lora", "page", "truncated"}
    assert entries["good"].error is None
    for name in ("empty", "faceid", "garbage", "lora", "page", "truncated"):
        assert entries[name].spec is None
        assert entries[name].error, name
        assert str(tmp_path) not in entries[name].error  # no server paths in messages
    assert "truncated" in entries["truncated"].error
    assert "empty" in entries["empty"].error
    assert "web page" in entries["page"].error
    assert "LoRA" in entries["lora"].error
    assert "FaceID" in entries["faceid"].error
    # Chosen by name, a broken file raises its own error type, with its message.
    with pytest.raises(ModelFileError, match="truncated"):
        reg.resolve_adapter("truncated")
    with pytest.raises(UnsupportedModelError, match="FaceID"):
        reg.resolve_adapter("faceid")


def test_duplicate_names_are_qualified_deterministically(tmp_path: Path) -> None:
    own = tmp_path / "ipadapter"
    controlnet = tmp_path / "sd-webui-controlnet" / "models"
    extra = tmp_path / "extra"
    save_adapter(own / "ip-adapter_sd15.safetensors")
    save_adapter(own / "ip-adapter_sd15.bin", "zip")  # same folder, other container
    save_adapter(controlnet / "ip-adapter_sd15.safetensors")
    save_adapter(extra / "sub" / "ip-adapter_sd15.safetensors")
    save_adapter(extra / "None.safetensors")  # "None" is the UI's "no adapter"
    save_adapter(extra / "IP-ADAPTER_SD15.pth", "zip")  # differs only in case
    folders = [
        own,
        ModelFolder(controlnet, label="sd-webui-controlnet", only_ip_adapter_names=True),
        extra,
    ]
    expected = [
        "ip-adapter_sd15",
        "ip-adapter_sd15 (bin)",
        "ip-adapter_sd15 (sd-webui-controlnet)",
        "IP-ADAPTER_SD15 (extra)",
        "None (extra)",
        "ip-adapter_sd15 (sub)",
    ]
    assert names(ModelRegistry(folders, []).adapters()) == expected
    # Same names from a fresh registry, and after the files' mtimes change order.
    for i, path in enumerate(sorted(tmp_path.rglob("*.*"), reverse=True)):
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    assert names(ModelRegistry(folders, []).adapters()) == expected
    assert len({n.casefold() for n in expected}) == len(expected)


def test_the_same_file_through_two_folders_is_listed_once(tmp_path: Path) -> None:
    own = tmp_path / "ipadapter"
    save_adapter(own / "a.safetensors")
    link = tmp_path / "linked"
    link.symlink_to(own, target_is_directory=True)
    (own / "loop").symlink_to(own, target_is_directory=True)  # a symlink loop ends the walk
    (own / "broken.safetensors").symlink_to(tmp_path / "missing.safetensors")
    reg = ModelRegistry([own, link], [])
    assert names(reg.adapters()) == ["a", "broken"]  # the broken link once, with its error
    assert "not there" in reg.adapters()[1].error


def test_a_link_to_a_missing_file_is_listed_with_why(tmp_path: Path) -> None:
    """A model linked from a drive that is not mounted was neither listed nor explained, and
    naming it answered "put the file into models/ipadapter", where the user sees it."""
    own = tmp_path / "ipadapter"
    save_adapter(own / "a.safetensors")
    drive = tmp_path / "unmounted"
    (own / "on-external-disk.safetensors").symlink_to(drive / "x.safetensors")
    (tmp_path / "cv" / "ext-vit").mkdir(parents=True)
    (tmp_path / "cv" / "ext-vit" / "model.safetensors").symlink_to(drive / "vit.safetensors")
    (tmp_path / "cv" / "ext-vit" / "config.json").write_text(json.dumps(hf_vision_config(**TINY_H)))
    reg = ModelRegistry([own], [tmp_path / "cv"])
    broken = by_name(reg.adapters(), "on-external-disk")
    assert broken.spec is None
    assert "on-external-disk.safetensors is a link to a file that is not there" in broken.error
    assert str(tmp_path) not in broken.error  # no server paths in API answers
    assert "auto" not in [e.name for e in reg.adapters() if e.spec]
    with pytest.raises(ModelFileError, match="mount the drive or mend the link"):
        reg.resolve_adapter("on-external-disk")
    assert names(reg.encoders()) == ["ext-vit"]
    assert "ext-vit/model.safetensors is a link" in reg.encoders()[0].error
    assert reg.describe()["adapters"][1]["error"] == broken.error
    # The drive is mounted: the next scan reads the file.
    save_adapter(drive / "x.safetensors")
    save_encoder(drive / "vit.safetensors")
    reg.refresh()
    assert by_name(reg.adapters(), "on-external-disk").error is None
    assert reg.resolve_adapter("on-external-disk").spec.variant == "base"
    assert reg.encoders()[0].error is None
    assert reg.encoders()[0].spec.width == TINY_H["width"]


def test_missing_folders_are_fine(tmp_path: Path) -> None:
    reg = ModelRegistry([tmp_path / "nope"], [tmp_path / "nothing"])
    assert reg.adapters() == []
    assert reg.encoders() == []
    assert reg.adapter_names() == ["auto"]
    assert reg.encoder_names() == ["auto"]


# --- encoders ----------------------------------------------------------------------------------


def test_encoder_files_and_h94_folders(tmp_path: Path) -> None:
    clip_vision = tmp_path / "clip_vision"
    controlnet_clip = tmp_path / "annotator" / "downloads" / "clip_vision"
    save_encoder(clip_vision / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    save_encoder(clip_vision / "models" / "image_encoder" / "model.safetensors", config=True)
    save_encoder(
        clip_vision / "sdxl_models" / "image_encoder" / "model.safetensors", TINY_BIGG, config=True
    )
    # Both weight files of one h94 folder: one model, safetensors preferred.
    save_encoder(clip_vision / "image_encoder" / "model.safetensors", config=True)
    save_encoder(clip_vision / "image_encoder" / "pytorch_model.bin", config=True)
    save_encoder(clip_vision / "my_encoder" / "pytorch_model.bin", TINY_BIGG)
    save_encoder(controlnet_clip / "clip_h.pth")
    reg = ModelRegistry([], [clip_vision, controlnet_clip])
    entries = {e.name: e for e in reg.encoders()}
    assert list(entries) == [
        "CLIP-ViT-H-14-laion2B-s32B-b79K",
        "image_encoder",
        "image_encoder (models)",
        "my_encoder",
        "image_encoder (sdxl_models)",
        "clip_h",
    ]
    assert entries["image_encoder"].file_name == "model.safetensors"
    assert entries["my_encoder"].file_name == "pytorch_model.bin"
    assert entries["image_encoder (sdxl_models)"].spec.width == TINY_BIGG["width"]
    # config.json supplies the head count; without it a tiny (unknown) tower gets width // 64.
    assert entries["image_encoder (models)"].spec.heads == TINY_H["heads"]
    assert entries["CLIP-ViT-H-14-laion2B-s32B-b79K"].spec.heads == TINY_H["width"] // 64
    assert all(e.error is None for e in entries.values())
    assert reg.encoder_names()[0] == "auto"


def test_model_folder_given_directly_and_generic_name_qualified(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl_models" / "image_encoder"
    save_encoder(folder / "model.safetensors", TINY_BIGG, config=True)
    assert names(ModelRegistry([], [folder]).encoders()) == ["image_encoder (sdxl_models)"]
    labelled = ModelFolder(folder, label="bigG")
    assert names(ModelRegistry([], [labelled]).encoders()) == ["bigG"]


def test_broken_encoder_config_is_an_entry_error(tmp_path: Path) -> None:
    clip_vision = tmp_path / "clip_vision"
    save_encoder(clip_vision / "image_encoder" / "model.safetensors")
    (clip_vision / "image_encoder" / "config.json").write_text("{not json")
    (entry,) = ModelRegistry([], [clip_vision]).encoders()
    assert entry.spec is None
    assert "config" in entry.error
    assert str(tmp_path) not in entry.error


# --- reading without loading -------------------------------------------------------------------


def test_published_shapes_are_read_from_headers_only(tmp_path: Path, monkeypatch) -> None:
    # Sparse files with the real shapes: 2.5 GB of "weights" that are never read.
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    root = tmp_path / "ipadapter"
    for name in ("ip-adapter_sd15", "ip-adapter-full-face_sd15", "ip-adapter-plus_sdxl_vit-h"):
        save_header_only(root / f"{name}.safetensors", PUBLISHED_SHAPES[name]())
    clip_vision = tmp_path / "clip_vision"
    save_header_only(
        clip_vision / "CLIP-ViT-H-14-laion2B-s32B-b79K" / "model.safetensors",
        hf_vision_state_dict(device="meta", **VIT_H_14),
    )
    reg = ModelRegistry([root], [clip_vision])
    described = reg.describe()
    assert described["adapters"] == [
        {
            "name": "ip-adapter-full-face_sd15",
            "file_name": "ip-adapter-full-face_sd15.safetensors",
            "variant": "full_face",
            "family": "SD1.x",
            "tokens": 257,
            "encoder": "ViT-H-14",
            "layers": 16,
            "blocks": 16,
            "error": None,
        },
        {
            "name": "ip-adapter-plus_sdxl_vit-h",
            "file_name": "ip-adapter-plus_sdxl_vit-h.safetensors",
            "variant": "plus",
            "family": "SDXL",
            "tokens": 16,
            "encoder": "ViT-H-14",
            "layers": 70,
            "blocks": 11,
            "error": None,
        },
        {
            "name": "ip-adapter_sd15",
            "file_name": "ip-adapter_sd15.safetensors",
            "variant": "base",
            "family": "SD1.x",
            "tokens": 4,
            "encoder": "ViT-H-14",
            "layers": 16,
            "blocks": 16,
            "error": None,
        },
    ]
    assert described["encoders"] == [
        {
            "name": "CLIP-ViT-H-14-laion2B-s32B-b79K",
            "file_name": "model.safetensors",
            "architecture": "ViT-H-14",
            "width": 1280,
            "projection_dim": 1024,
            "error": None,
        }
    ]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_files_go_through_the_host_loader(tmp_path: Path, fmt: str) -> None:
    path = save_adapter(tmp_path / "a" / "x.bin", fmt, variant="plus")
    calls: list[dict] = []

    def host_load(*args, **kwargs):  # like A1111's unsafe_torch_load: the original torch.load
        calls.append(kwargs)
        return torch.load(*args, **kwargs)

    set_torch_load(host_load)
    spec = registry_module.read_adapter_spec(path)
    assert spec.variant == "plus"
    assert len(calls) == 1
    assert calls[0]["weights_only"] is True
    # A zip checkpoint is memory-mapped, not read; the legacy format cannot be.
    assert calls[0].get("mmap", False) is (fmt == "zip")


def test_host_loader_without_mmap_still_works(tmp_path: Path) -> None:
    path = save_adapter(tmp_path / "a" / "x.bin", "zip")

    def old_load(f, map_location=None, weights_only=False):  # torch < 2.1's signature
        return torch.load(f, map_location=map_location, weights_only=weights_only)

    set_torch_load(old_load)
    assert registry_module.read_adapter_spec(path).variant == "base"


def test_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "a" / "evil.bin"
    path.parent.mkdir()
    torch.save({"image_proj": Boom()}, path)
    (entry,) = ModelRegistry([tmp_path / "a"], []).adapters()
    assert entry.spec is None
    assert "pickled code" in entry.error


def test_listing_is_cached_by_path_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    reads: list[str] = []
    real_read = registry_module.read_adapter_spec

    def counting(path):
        reads.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(registry_module, "read_adapter_spec", counting)
    root = tmp_path / "ipadapter"
    save_adapter(root / "a.safetensors")
    b = save_adapter(root / "b.safetensors")
    reg = ModelRegistry([root], [])
    reg.refresh()
    assert sorted(reads) == ["a.safetensors", "b.safetensors"]
    reg.refresh()
    reg.adapters()
    assert len(reads) == 2  # nothing read again
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    save_adapter(root / "c.safetensors")
    reg.refresh()
    assert sorted(reads[2:]) == ["b.safetensors", "c.safetensors"]
    (root / "a.safetensors").unlink()
    reg.refresh()
    assert names(reg.adapters()) == ["b", "c"]
    assert len(reads) == 4


def test_a_file_replaced_with_the_same_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    """``cp -p``/``rsync -a`` of another file of the same size keeps the modification time: the
    old spec and hash were used on, and the infotext named a file no longer there."""
    hashed: list[str] = []

    def hash_file(path: Path) -> str:
        hashed.append(path.name)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    root = tmp_path / "ipadapter"
    path = save_adapter(root / "a.safetensors", variant="base")
    other = save_adapter(tmp_path / "elsewhere" / "a.safetensors", variant="base", weight_std=0.03)
    assert other.stat().st_size == path.stat().st_size
    assert other.read_bytes() != path.read_bytes()
    reg = ModelRegistry([root], [], hash_file=hash_file)
    (before,) = reg.adapters()
    old_hash = before.sha256
    stat = path.stat()
    tmp = root / ".copy.part"
    tmp.write_bytes(other.read_bytes())
    os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp, path)  # as cp -p or rsync -a leave it: same size, same mtime
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.size, before.mtime_ns)
    assert before.changed_on_disk()
    reg.refresh()
    (after,) = reg.adapters()
    assert after.sha256 == hashlib.sha256(other.read_bytes()).hexdigest() != old_hash
    assert hashed == ["a.safetensors", "a.safetensors"]


def test_encoder_cache_follows_config_json(tmp_path: Path, monkeypatch) -> None:
    reads: list[str] = []
    real_read = registry_module.read_encoder_spec
    monkeypatch.setattr(
        registry_module, "read_encoder_spec", lambda p: reads.append(p) or real_read(p)
    )
    weights = save_encoder(tmp_path / "cv" / "image_encoder" / "model.safetensors", config=True)
    reg = ModelRegistry([], [tmp_path / "cv"])
    assert reg.encoders()[0].spec.heads == TINY_H["heads"]
    reg.refresh()
    assert len(reads) == 1
    config = json.loads((weights.parent / "config.json").read_text())
    config["num_attention_heads"] = 2
    (weights.parent / "config.json").write_text(json.dumps(config, indent=1))
    reg.refresh()
    assert len(reads) == 2
    assert reg.encoders()[0].spec.heads == 2


# --- hashes --------------------------------------------------------------------------------


def test_short_hash_is_lazy_cached_and_a1111_style(tmp_path: Path) -> None:
    calls: list[Path] = []

    def hash_file(path: Path) -> str:
        calls.append(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    path = save_adapter(tmp_path / "ip" / "a.safetensors")
    reg = ModelRegistry([tmp_path / "ip"], [], hash_file=hash_file)
    (entry,) = reg.adapters()
    reg.describe()
    assert calls == []  # listing and describing never hash
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.short_hash == expected[:10]
    assert entry.infotext_name == f"a [{expected[:10]}]"
    reg.refresh()
    assert reg.adapters()[0].short_hash == expected[:10]
    assert len(calls) == 1  # cached across refreshes
    save_adapter(path, variant="plus")  # new content, new size
    (changed,) = (reg.refresh(), reg.adapters())[1]
    assert changed.short_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert len(calls) == 2


def test_default_hash_and_disabled_hashing(tmp_path: Path) -> None:
    path = save_adapter(tmp_path / "ip" / "a.safetensors")
    (entry,) = ModelRegistry([tmp_path / "ip"], []).adapters()
    assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    (entry,) = ModelRegistry([tmp_path / "ip"], [], hash_file=lambda p: None).adapters()
    assert entry.short_hash is None
    assert entry.infotext_name == "a"
    assert (
        ModelRegistry([tmp_path / "ip"], [], hash_file=lambda p: None).resolve_adapter(
            "a [0123456789]"
        )
        == entry
    )  # no hash to compare: resolved by name, not flagged


# --- resolving adapters ------------------------------------------------------------------------


@pytest.fixture
def two_folders(tmp_path: Path) -> ModelRegistry:
    save_adapter(tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors", variant="base")
    save_adapter(tmp_path / "ipadapter" / "other.bin", "zip", variant="plus")
    save_adapter(tmp_path / "ControlNet" / "ip-adapter_sd15.safetensors", variant="plus")
    (tmp_path / "outside.safetensors").write_bytes(
        (tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors").read_bytes()
    )
    return ModelRegistry(
        [tmp_path / "ipadapter", ModelFolder(tmp_path / "ControlNet", only_ip_adapter_names=True)],
        [],
    )


def test_resolve_by_name_file_name_and_infotext_form(two_folders: ModelRegistry) -> None:
    reg = two_folders
    first = reg.resolve_adapter("ip-adapter_sd15")
    assert first.spec.variant == "base"
    assert not first.hash_mismatch
    assert reg.resolve_adapter("ip-adapter_sd15.safetensors") == first  # first in listing order
    assert reg.resolve_adapter("  IP-Adapter_SD15 ") == first  # case and spaces forgiven
    assert reg.resolve_adapter("other.bin").name == "other"
    second = reg.resolve_adapter("ip-adapter_sd15 (ControlNet)")
    assert second.spec.variant == "plus"
    assert reg.resolve_adapter(first.infotext_name) == first
    # The hash picks the file among files of that stem: infotext made with the ControlNet copy.
    assert reg.resolve_adapter(f"ip-adapter_sd15 [{second.short_hash}]") == second


def test_a_file_put_back_since_the_last_scan_is_compared_as_it_is_now(
    tmp_path: Path, caplog
) -> None:
    """An infotext restored after the file it names was replaced and then put back: its hash
    was compared with the replacement's (the registry's last scan), and the console warned of
    a mismatch although the file now was the one named."""
    root = tmp_path / "ipadapter"
    path = root / "ip-adapter_sd15.safetensors"
    save_adapter(path, variant="base")
    original = path.read_bytes()
    save_adapter(tmp_path / "plus.safetensors", variant="plus")
    reg = ModelRegistry([root], [])
    label = reg.resolve_adapter("ip-adapter_sd15").infotext_name
    shutil.copyfile(tmp_path / "plus.safetensors", path)
    reg.refresh()
    assert reg.resolve_adapter("ip-adapter_sd15").spec.variant == "plus"
    path.write_bytes(original)  # put back; no scan since
    with caplog.at_level(logging.WARNING, logger="negip"):
        entry = reg.resolve_adapter(label)
    assert (entry.spec.variant, entry.hash_mismatch) == ("base", False)
    assert "has the hash" not in caplog.text


def test_resolve_flags_a_hash_mismatch(two_folders: ModelRegistry, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="negip"):
        entry = two_folders.resolve_adapter("other [deadbeef00]")
    assert entry.name == "other"
    assert entry.hash_mismatch
    assert "deadbeef00" in caplog.text
    assert "other" in caplog.text


def test_an_infotext_hash_picks_the_encoder_among_files_of_that_name(
    tmp_path: Path, caplog
) -> None:
    """The encoder's "name [hash]" was read as the name alone: a restore used the first encoder
    of that name although the one with the hash was installed (another picture, no warning)."""
    cv = tmp_path / "clip_vision"
    first = save_encoder(cv / "vit" / "model.safetensors", config=True)
    second = save_encoder(
        cv / "z" / "vit" / "model.safetensors", {**TINY_H, "seed": 3}, config=True
    )
    assert first.read_bytes() != second.read_bytes()
    reg = ModelRegistry([], [cv])
    assert names(reg.encoders()) == ["vit", "vit (z)"]
    spec = adapter_sd_spec()
    wanted = reg.resolve_encoder("vit (z)", spec)
    assert reg.resolve_encoder(f"vit [{wanted.short_hash}]", spec) == wanted
    assert not reg.resolve_encoder(reg.encoders()[0].infotext_name, spec).hash_mismatch
    with caplog.at_level(logging.WARNING, logger="negip"):
        mismatch = reg.resolve_encoder("vit [0123456789]", spec)
    assert mismatch.path == first
    assert mismatch.hash_mismatch
    assert "image encoder vit has the hash" in caplog.text
    assert "vit/model.safetensors" in caplog.text


def test_a_qualified_name_whose_twin_is_gone_is_found_by_its_hash(tmp_path: Path) -> None:
    """ "x (sub) [hash]" from an infotext, after the first "x" was removed (its file is listed as
    "x" now): refused before, although the file with that hash was there."""
    root = tmp_path / "ipadapter"
    save_adapter(root / "x.safetensors", variant="base")
    save_adapter(root / "sub" / "x.safetensors", variant="plus")
    cv = tmp_path / "cv"
    save_encoder(cv / "vit" / "model.safetensors", config=True)
    save_encoder(cv / "zz" / "vit" / "model.safetensors", {**TINY_H, "seed": 3}, config=True)
    reg = ModelRegistry([root], [cv])
    adapter_label = reg.resolve_adapter("x (sub)").infotext_name
    encoder_label = reg.resolve_encoder("vit (zz)", adapter_sd_spec()).infotext_name
    (root / "x.safetensors").unlink()
    shutil.rmtree(cv / "vit")
    reg.refresh()
    assert names(reg.adapters()) == ["x"]
    entry = reg.resolve_adapter(adapter_label)
    assert entry.name == "x"
    assert entry.spec.variant == "plus"
    assert not entry.hash_mismatch
    encoder = reg.resolve_encoder(encoder_label, adapter_sd_spec())
    assert encoder.name == "vit"
    assert not encoder.hash_mismatch
    # Without the hash, or with another one, the qualified name stays unknown.
    for label in ("x (sub)", "x (sub) [0123456789]"):
        with pytest.raises(ArgumentError, match="there is no IP-Adapter named"):
            reg.resolve_adapter(label)


def test_a_renamed_file_or_folder_is_found_by_its_hash(tmp_path: Path) -> None:
    """An infotext made before the adapter file or the encoder folder was renamed (h94's
    "image_encoder" folder given its own name, as README says) was refused, and the advice
    ("put the file into models/clip_vision") could not help: the file was there."""
    root, cv = tmp_path / "ipadapter", tmp_path / "clip_vision"
    save_adapter(root / "ip-adapter_sd15.safetensors", variant="base")
    save_adapter(root / "plus.safetensors", variant="plus")
    save_encoder(cv / "image_encoder" / "model.safetensors", config=True)
    reg = ModelRegistry([root], [cv])
    adapter_label = reg.resolve_adapter("ip-adapter_sd15").infotext_name
    encoder_label = reg.resolve_encoder("image_encoder", adapter_sd_spec()).infotext_name
    (root / "ip-adapter_sd15.safetensors").rename(root / "my_base.safetensors")
    (cv / "image_encoder").rename(cv / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    reg.refresh()
    entry = reg.resolve_adapter(adapter_label)
    assert (entry.name, entry.spec.variant, entry.hash_mismatch) == ("my_base", "base", False)
    encoder = reg.resolve_encoder(encoder_label, adapter_sd_spec())
    assert encoder.name == "CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert not encoder.hash_mismatch
    # A hash that no installed file has still names nothing.
    with pytest.raises(ArgumentError, match="there is no IP-Adapter named"):
        reg.resolve_adapter("ip-adapter_sd15 [0123456789]")


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/abs/path",
        "C:\\x",
        "C:x",
        "a/b",
        "a\\b",
        "name\x00",
        "..",
        ".",
        "~/x",
        "\\\\server\\share",
    ],
)
def test_path_like_names_are_refused(two_folders: ModelRegistry, name: str) -> None:
    for resolve in (
        two_folders.resolve_adapter,
        lambda n: two_folders.resolve_encoder(n, adapter_sd_spec()),
    ):
        with pytest.raises(ArgumentError, match="paths are not accepted"):
            resolve(name)


def test_listed_files_by_path_and_files_outside_are_refused(
    two_folders: ModelRegistry, tmp_path: Path
) -> None:
    listed = tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors"
    with pytest.raises(ArgumentError, match="paths are not accepted"):
        two_folders.resolve_adapter(str(listed))
    with pytest.raises(ArgumentError, match="paths are not accepted"):
        two_folders.resolve_adapter(str(tmp_path / "outside.safetensors"))
    for name in ("outside", "outside.safetensors", "ipadapter"):
        with pytest.raises(ArgumentError, match="no IP-Adapter named") as info:
            two_folders.resolve_adapter(name)
        message = str(info.value)
        assert "'ip-adapter_sd15'" in message
        assert "'other'" in message
        assert "models/ipadapter" in message
        assert message.endswith("models/ipadapter: the next request finds it")
        assert str(tmp_path) not in message


def test_none_and_empty_are_not_adapters(two_folders: ModelRegistry) -> None:
    for name in ("None", "", "  "):
        with pytest.raises(ArgumentError, match="no IP-Adapter was chosen"):
            two_folders.resolve_adapter(name)
    with pytest.raises(ArgumentError, match="must be a string"):
        two_folders.resolve_adapter(None)  # type: ignore[arg-type]


def test_unknown_name_rescans_once_for_new_files(tmp_path: Path) -> None:
    reg = ModelRegistry([tmp_path / "ip"], [])
    assert reg.adapters() == []
    with pytest.raises(ArgumentError, match="no IP-Adapter is installed"):
        reg.resolve_adapter("late")
    save_adapter(tmp_path / "ip" / "late.safetensors")
    assert reg.resolve_adapter("late").name == "late"


# --- resolving encoders --------------------------------------------------------------------


def adapter_sd_spec(**kw):
    from lib_negip.adapter import detect_adapter

    return detect_adapter(adapter_sd(**(kw or FITS_H_BASE)))


@pytest.fixture
def tiny_models(tmp_path: Path) -> ModelRegistry:
    ip = tmp_path / "ipadapter"
    for name, kw in (
        ("h_base", FITS_H_BASE),
        ("h_plus", FITS_H_PLUS),
        ("g_base", FITS_G_BASE),
        ("g_plus", FITS_G_PLUS),
    ):
        save_adapter(ip / f"{name}.safetensors", **kw)
    cv = tmp_path / "clip_vision"
    (cv / "0_broken.safetensors").parent.mkdir(parents=True)
    (cv / "0_broken.safetensors").write_bytes(b"\x00" * 16)  # listed first, never chosen
    save_encoder(cv / "image_encoder" / "model.safetensors", TINY_BIGG, config=True)
    save_encoder(cv / "z_h.safetensors", TINY_H)
    return ModelRegistry([ip], [cv])


def test_auto_picks_an_encoder_that_fits(tiny_models: ModelRegistry) -> None:
    reg = tiny_models
    picks = {
        name: reg.resolve_encoder("auto", reg.resolve_adapter(name)).name
        for name in ("h_base", "h_plus", "g_base", "g_plus")
    }
    assert picks == {
        "h_base": "z_h",
        "h_plus": "z_h",
        "g_base": "image_encoder",
        "g_plus": "image_encoder",
    }
    assert reg.resolve_encoder("AUTO", reg.resolve_adapter("h_base").spec).name == "z_h"


def test_named_encoder_that_does_not_fit(tiny_models: ModelRegistry) -> None:
    reg = tiny_models
    adapter = reg.resolve_adapter("h_plus")
    assert reg.resolve_encoder("z_h", adapter).name == "z_h"
    assert reg.resolve_encoder("z_h.safetensors", adapter).name == "z_h"
    with pytest.raises(IncompatibleModelError) as info:
        reg.resolve_encoder("image_encoder", adapter)
    message = str(info.value)
    assert "h_plus" in message
    assert "image_encoder" in message
    assert "width 52" in message
    assert "hidden width 64" in message
    with pytest.raises(ModelFileError):
        reg.resolve_encoder("0_broken", adapter)
    with pytest.raises(ArgumentError, match="no image encoder named 'nope'") as info:
        reg.resolve_encoder("nope", adapter)
    assert "models/clip_vision" in str(info.value)


def test_auto_without_a_fitting_encoder_says_what_to_install(tmp_path: Path) -> None:
    root = tmp_path / "ipadapter"
    save_header_only(root / "ip-adapter_sdxl.safetensors", PUBLISHED_SHAPES["ip-adapter_sdxl"]())
    save_header_only(
        root / "ip-adapter-plus_sd15.safetensors", PUBLISHED_SHAPES["ip-adapter-plus_sd15"]()
    )
    cv = tmp_path / "clip_vision"
    save_encoder(cv / "tiny.safetensors")
    reg = ModelRegistry([root], [cv])
    with pytest.raises(IncompatibleModelError) as info:
        reg.resolve_encoder("auto", reg.resolve_adapter("ip-adapter_sdxl"))
    message = str(info.value)
    assert "ip-adapter_sdxl needs the ViT-bigG-14 image encoder (projection dim 1280)" in message
    assert "tiny (" in message  # what is installed
    assert "CLIP-ViT-bigG-14-laion2B-39B-b160k" in message
    assert "sdxl_models/image_encoder" in message
    assert "models/clip_vision" in message
    assert "automatic download" in message
    with pytest.raises(
        IncompatibleModelError, match=r"ViT-H-14 image encoder \(hidden width 1280\)"
    ):
        reg.resolve_encoder("auto", reg.resolve_adapter("ip-adapter-plus_sd15"))
    empty = ModelRegistry([root], [])
    with pytest.raises(IncompatibleModelError, match="no image encoder is installed"):
        empty.resolve_encoder("auto", empty.resolve_adapter("ip-adapter_sdxl"))


def test_auto_with_real_architectures_prefers_the_trained_one(tmp_path: Path) -> None:
    """Both families with the published shapes (header-only files); an odd tower of the same
    width listed first loses to the architecture the adapter was trained with."""
    root = tmp_path / "ipadapter"
    for name in (
        "ip-adapter_sd15",
        "ip-adapter_sd15_vit-G",
        "ip-adapter_sdxl",
        "ip-adapter_sdxl_vit-h",
        "ip-adapter-plus_sdxl_vit-h",
    ):
        save_header_only(root / f"{name}.safetensors", PUBLISHED_SHAPES[name]())
    cv = tmp_path / "clip_vision"
    odd = {**VIT_H_14, "layers": 2}  # width 1280, projection 1024, but not ViT-H-14
    save_header_only(cv / "aaa_odd.safetensors", hf_vision_state_dict(device="meta", **odd))
    save_header_only(
        cv / "models" / "image_encoder" / "model.safetensors",
        hf_vision_state_dict(device="meta", **VIT_H_14),
    )
    save_header_only(
        cv / "sdxl_models" / "image_encoder" / "model.safetensors",
        hf_vision_state_dict(device="meta", **VIT_BIGG_14),
    )
    reg = ModelRegistry([root], [cv])
    assert names(reg.encoders())[0] == "aaa_odd"
    picks = {e.name: (e.spec.family, reg.resolve_encoder("auto", e).name) for e in reg.adapters()}
    assert picks == {
        "ip-adapter_sd15": ("SD1.x", "image_encoder (models)"),
        "ip-adapter_sd15_vit-G": ("SD1.x", "image_encoder (sdxl_models)"),
        "ip-adapter_sdxl": ("SDXL", "image_encoder (sdxl_models)"),
        "ip-adapter_sdxl_vit-h": ("SDXL", "image_encoder (models)"),
        "ip-adapter-plus_sdxl_vit-h": ("SDXL", "image_encoder (models)"),
    }
    # The odd tower still fits by its shapes, so it may be chosen by name.
    assert reg.resolve_encoder("aaa_odd", reg.resolve_adapter("ip-adapter_sd15")).name == "aaa_odd"


# --- describe ------------------------------------------------------------------------------


def test_describe_has_no_paths(tiny_models: ModelRegistry, tmp_path: Path) -> None:
    described = tiny_models.describe()
    text = json.dumps(described)
    assert str(tmp_path) not in text
    assert os.sep + "tmp" not in text
    assert [a["name"] for a in described["adapters"]] == ["g_base", "g_plus", "h_base", "h_plus"]
    assert set(described["adapters"][0]) == {
        "name",
        "file_name",
        "variant",
        "family",
        "tokens",
        "encoder",
        "layers",
        "blocks",
        "error",
    }
    encoders = {e["name"]: e for e in described["encoders"]}
    assert set(encoders["z_h"]) == {
        "name",
        "file_name",
        "architecture",
        "width",
        "projection_dim",
        "error",
    }
    assert encoders["z_h"]["width"] == TINY_H["width"]
    assert encoders["z_h"]["projection_dim"] == TINY_H["projection_dim"]
    assert encoders["0_broken"]["architecture"] is None
    assert "0_broken.safetensors" in encoders["0_broken"]["error"]
