"""Stages "load" and "encode": model files, the model cache and the image-feature cache.

Files are written by the benchmark itself (stage "write") into a temporary folder, with the
published shapes and random values: ``ip-adapter_sd15`` (base, 4 tokens, float16 like the
published file), ``ip-adapter-plus_sd15`` (plus, 16 tokens, float16) and h94's ViT-H-14
``image_encoder`` folder (transformers layout, float32, ``config.json`` beside it).

Loading goes through ``lib_negip.webui.models.Models``, the cache A1111's generations share: its
``adapter(path)`` / ``encoder(path)`` and its ``file_reads`` counter. Resolving a model *name*
to a path (the registry, which needs A1111's ``modules``) is not part of what is timed.
Encoding goes through ``Models.features`` (a ``FeatureCache``), whose ``encoder_calls`` counter
proves a repeated request reaches no encoder.

Each stage runs in its own process (see ``bench.run``), so its peak resident memory
(``ru_maxrss``) is its own; the files were just written, so reads come from the page cache.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.clock import summary
from bench.env import ROOT

ADAPTER_FILES = {"base": "ip-adapter_sd15.safetensors", "plus": "ip-adapter-plus_sd15.safetensors"}
ENCODER_FOLDER = "clip_vision/image_encoder"


def _tests_on_path() -> None:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return round(pages * resource.getpagesize() / 2**20, 1)


_STATUS_FIELDS = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}


def memory_mib() -> dict[str, float]:
    """Resident memory now (``rss``, split into ``anon`` memory and ``file`` pages: a mapped
    file's pages count once touched) and its ``peak`` since the last :func:`reset_peak`, from
    /proc/self/status (Linux); {} elsewhere."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in _STATUS_FIELDS:
            found[_STATUS_FIELDS[name]] = round(int(value.split()[0]) / 1024, 1)
    return found


def reset_peak() -> bool:
    """Reset the peak resident memory (``VmHWM``) to the current one (Linux >= 4.0), so that
    the next :func:`memory_mib` reports the peak of what ran in between."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def tensor_mib(module: torch.nn.Module) -> float:
    """Size of a module's parameters and buffers (a tensor shared by two names once)."""
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict().values()}
    return round(sum(sizes.values()) / 2**20, 1)


class Phase:
    """Resident memory of one phase (a load, the first encode): at its start, its peak, and
    after it, once the phase's temporaries are gone (the steady increase is what stays)."""

    def __init__(self) -> None:
        self.peak_reset = reset_peak()
        self.start = memory_mib()
        self.result: dict[str, Any] = {}

    def end(self, tensors_mib: float | None = None) -> dict[str, Any]:
        peak = memory_mib().get("peak") if self.peak_reset else None
        gc.collect()
        after = memory_mib()
        result: dict[str, Any] = {"start": self.start, "after": after}
        if self.start and after:
            result["steady_increase_mib"] = round(after["rss"] - self.start["rss"], 1)
            result["anon_increase_mib"] = round(after["anon"] - self.start["anon"], 1)
            result["file_increase_mib"] = round(after["file"] - self.start["file"], 1)
            if peak is not None:
                result["peak_mib"] = peak
                result["peak_increase_mib"] = round(peak - self.start["rss"], 1)
        if tensors_mib:
            result["tensors_mib"] = tensors_mib
            if "steady_increase_mib" in result:
                result["steady_over_tensors"] = round(
                    result["steady_increase_mib"] / tensors_mib, 3
                )
        return result


def write_files(folder: Path, tiny: bool = False) -> dict[str, Any]:
    """The published-shape files (tiny ones with ``tiny``), random values; returns their sizes."""
    from safetensors.torch import save_file

    _tests_on_path()
    from tiny_adapters import SD15_INNER_DIMS, make_adapter_state_dict
    from tiny_encoders import TINY_H, VIT_H_14, hf_vision_config, hf_vision_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    encoder_shape = TINY_H if tiny else VIT_H_14
    shapes = {
        "base": {"encoder_dim": encoder_shape["projection_dim"], "num_tokens": 4},
        "plus": {"encoder_dim": encoder_shape["width"], "num_tokens": 16, "depth": 4,
                 "heads": 1 if tiny else 12},
    }  # fmt: skip
    sizes = {}
    for variant, name in ADAPTER_FILES.items():
        state_dict = make_adapter_state_dict(
            variant,
            cross_dim=64 if tiny else 768,
            layer_inner_dims=[d // 10 for d in SD15_INNER_DIMS] if tiny else SD15_INNER_DIMS,
            dtype=torch.float16,
            **shapes[variant],
        )
        save_file(state_dict, folder / name)
        sizes[name] = (folder / name).stat().st_size
    encoder_dir = folder / ENCODER_FOLDER
    encoder_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_vision_state_dict(**encoder_shape, seed=5), encoder_dir / "model.safetensors")
    (encoder_dir / "config.json").write_text(json.dumps(hf_vision_config(**encoder_shape)))
    sizes[f"{ENCODER_FOLDER}/model.safetensors"] = (
        (encoder_dir / "model.safetensors").stat().st_size
    )
    return {name: round(size / 2**20, 1) for name, size in sizes.items()}


def _import_loaders(encoder: bool) -> float:
    """Import what loading needs before timing it: in A1111 these are imported long before a
    generation (open_clip by A1111 itself), so import time is not load time. Returns seconds."""
    started = time.perf_counter()
    import safetensors.torch  # noqa: F401

    import lib_negip.adapter
    import lib_negip.webui.models

    if encoder:
        import open_clip.transformer  # noqa: F401

        import lib_negip.encoder  # noqa: F401
    # The first meta-device module made real (to_empty) imports torch._refs/_prims (~1 s, once
    # per process); the loaders build on the meta device, so the first load would pay it.
    torch.nn.Linear(1, 1, device="meta").to_empty(device="cpu")
    return round(time.perf_counter() - started, 2)


def run_load_adapter(folder: Path, variant: str, repeats: int) -> dict[str, Any]:
    """First load of an adapter file through ``webui.models.Models``, then cached uses."""
    import_s = _import_loaders(encoder=False)
    from lib_negip.webui.models import Models

    rss_start = current_rss_mib()
    models = Models()
    path = folder / ADAPTER_FILES[variant]
    load_phase = Phase()
    started = time.perf_counter()
    loaded = models.adapter(path)
    first_s = time.perf_counter() - started
    load_memory = load_phase.end()
    reads_after_first = models.file_reads
    peak_after_load = peak_rss_mib()
    again = []
    for _ in range(repeats):
        started = time.perf_counter()
        again_loaded = models.adapter(path)
        again.append(time.perf_counter() - started)
        if again_loaded is not loaded:
            msg = "the second use did not return the cached adapter"
            raise AssertionError(msg)
    spec = loaded.spec
    generator = torch.Generator().manual_seed(0)
    if spec.encoder_output == "image_embeds":
        embeds = torch.randn(1, spec.encoder_dim, generator=generator)
    else:
        embeds = torch.randn(1, 257, spec.encoder_dim, generator=generator)  # ViT-H's tokens
    project = []
    for _ in range(max(repeats, 3)):
        started = time.perf_counter()
        tokens = loaded.adapter.project(embeds)
        project.append(time.perf_counter() - started)
    return {
        "file": path.name,
        "file_mib": round(path.stat().st_size / 2**20, 1),
        "adapter": spec.describe(),
        "tokens": list(tokens.shape),
        "imports_before_s": import_s,
        "first_load_s": round(first_s, 4),
        "cached_use_s": summary(again),
        "file_reads_after_first": reads_after_first,
        "file_reads_after_cached_uses": models.file_reads,
        "project_tokens_s": summary(project),
        "rss_after_imports_mib": rss_start,
        "peak_rss_after_load_mib": peak_after_load,
        "memory": {"load": load_memory},
        "peak_rss_mib": peak_rss_mib(),
    }


def _random_images(count: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB")
        for _ in range(count)
    ]


def run_encoder(folder: Path, repeats: int) -> dict[str, Any]:
    """First load of the ViT-H-14 folder, a cached use, then encoding through the feature cache:
    per-image encoder time (cache misses) and the same request again (hits, zero encoder calls).
    """
    import_s = _import_loaders(encoder=True)
    from lib_negip.webui.models import Models

    rss_start = current_rss_mib()
    models = Models()
    path = folder / ENCODER_FOLDER
    load_phase = Phase()
    started = time.perf_counter()
    encoder, key = models.encoder(path)
    first_s = time.perf_counter() - started
    load_memory = load_phase.end(tensor_mib(encoder.module))
    reads_after_first = models.file_reads
    peak_after_load = peak_rss_mib()
    started = time.perf_counter()
    encoder_again, _ = models.encoder(path)
    cached_s = time.perf_counter() - started
    if encoder_again is not encoder:
        msg = "the second use did not return the cached encoder"
        raise AssertionError(msg)

    cache = models.features
    result: dict[str, Any] = {
        "encoder": encoder.spec.describe(),
        "file_mib": round((path / "model.safetensors").stat().st_size / 2**20, 1),
        "imports_before_s": import_s,
        "first_load_s": round(first_s, 3),
        "cached_use_s": round(cached_s, 6),
        "file_reads_after_first": reads_after_first,
        "file_reads_after_cached_use": models.file_reads,
        "rss_after_imports_mib": rss_start,
        "peak_rss_after_load_mib": peak_after_load,
        "memory": {"load": load_memory},
        "outputs": {},
    }
    images = _random_images(repeats, seed=7)
    for output, adapter in (("image_embeds", "base"), ("penultimate", "plus")):
        misses, hits = [], []
        calls_before = cache.encoder_calls
        for index, image in enumerate(images):
            # The first encode of each output kind, alone: its peak and what stays after it.
            phase = Phase() if index == 0 else None
            started = time.perf_counter()
            features = cache.features(encoder, key, output, [image])
            misses.append(time.perf_counter() - started)
            if phase is not None:
                result["memory"][f"first encode ({output})"] = phase.end()
        calls_after_misses = cache.encoder_calls
        for image in images:
            # The same content in a new PIL object, as the next generation would send it.
            same = image.copy()
            started = time.perf_counter()
            cache.features(encoder, key, output, [same])
            hits.append(time.perf_counter() - started)
        result["outputs"][output] = {
            "adapter": adapter,
            "shape": list(features.shape),
            "images": len(images),
            "encode_per_image_s": summary(misses),
            "first_encode_s": round(misses[0], 3),  # includes faulting in what the load left
            "encoder_calls_for_new_images": calls_after_misses - calls_before,
            "cache_hit_per_image_s": summary(hits),
            "encoder_calls_for_repeated_images": cache.encoder_calls - calls_after_misses,
        }
    result["peak_rss_mib"] = peak_rss_mib()
    gc.collect()
    end = memory_mib()
    if end and load_memory.get("start"):
        # What a first generation leaves resident: the load and every encode since.
        result["memory"]["load and encodes"] = {
            "start": load_memory["start"],
            "after": end,
            "steady_increase_mib": round(end["rss"] - load_memory["start"]["rss"], 1),
            "tensors_mib": load_memory.get("tensors_mib"),
        }
    return result
