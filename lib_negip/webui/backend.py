"""Which web UI this is, and where its UNet is.

AUTOMATIC1111 1.10 keeps the ldm/sgm UNet at ``sd_model.model.diffusion_model``. Forge keeps it
at ``sd_model.forge_objects.unet.model.diffusion_model`` (a UnetPatcher's model; every clone of
the patcher shares that module) and has no ``sd_model.model``; reForge aliases the A1111 path to
its own UNet. The hijack needs an ``nn.Module`` whose call receives the conditioning as
``context`` and whose ``attn2`` modules call ``to_q`` and ``to_out[0]``: every host above has
one. A host where none is found cannot be driven, and a generation there fails with
:func:`unsupported_message` instead of making an image without the image prompts.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from lib_negip import logger

A1111, FORGE, REFORGE, FORGE_CLASSIC, FORGE_NEO, UNKNOWN = (
    "AUTOMATIC1111",
    "Forge",
    "reForge",
    "Forge Classic",
    "Forge Neo",
    "an unknown web UI",
)

#: Hosts whose CFG denoiser pads cond and uncond to the same length when A1111's "Pad
#: prompt/negative prompt" options are on (the callback then pads first: see generation._append).
#: Forge keeps the option but never pads; an unknown host is treated like A1111.
PADDING_HOSTS = (A1111, REFORGE, FORGE_CLASSIC, UNKNOWN)

#: The hosts the image prompts were checked on, with the versions (README, "Hosts").
TESTED = (
    "AUTOMATIC1111 1.10.1",
    "Forge f2.0.1v1.10.1 (main dfdcbab, 2025-06-26)",
    "reForge (main 3b56b26, 2026-03-11)",
    "Forge Classic (classic 1f95d71, 2025-02-21)",
)


@functools.cache
def host_kind() -> str:
    """The web UI this process runs in, from what it ships (cached: it does not change)."""
    try:
        from modules_forge import forge_version  # type: ignore[import-not-found]
    except ImportError:
        try:
            import modules.sd_hijack  # noqa: F401  (A1111's and only A1111's)
        except ImportError:
            return UNKNOWN
        return A1111
    version = str(getattr(forge_version, "version", "")).lower()
    if version == "classic":
        return FORGE_CLASSIC
    if version == "neo":
        return FORGE_NEO
    if version.startswith("1.") or "v2-" in version:
        return REFORGE
    return FORGE


def _is_unet(module: Any) -> bool:
    return isinstance(module, nn.Module) and all(
        hasattr(module, name) for name in ("input_blocks", "middle_block", "output_blocks")
    )


def find_unet(sd_model: Any) -> nn.Module | None:
    """The UNet of ``sd_model`` that samples, or None where there is none this extension knows.

    A1111 and reForge: ``sd_model.model.diffusion_model``; Forge and its descendants:
    ``sd_model.forge_objects.unet.model.diffusion_model``.
    """
    if sd_model is None:
        return None
    candidates = (
        lambda: sd_model.model.diffusion_model,
        lambda: sd_model.forge_objects.unet.model.diffusion_model,
    )
    for candidate in candidates:
        try:
            unet = candidate()
        except AttributeError:
            continue
        if _is_unet(unet):
            return unet
    return None


def current_unet() -> nn.Module | None:
    """The UNet of the loaded checkpoint (None while none is loaded or on an unknown host)."""
    try:
        from modules import shared
    except ImportError:
        return None
    return find_unet(getattr(shared, "sd_model", None))


def sampling_unet(denoiser: Any) -> nn.Module | None:
    """The UNet ``denoiser`` calls: the model its wrapper holds, else the loaded checkpoint's.

    They differ where A1111 keeps a sampler across batches: img2img makes its sampler once, so
    after a refiner took over in the first batch the next batches sample with the refiner's
    UNet while ``shared.sd_model`` is the base checkpoint again (A1111 1.10.1 reloads it before
    each batch)."""
    wrapped = getattr(getattr(denoiser, "model_wrap", None), "inner_model", None)
    unet = find_unet(wrapped) if wrapped is not None else None
    return unet if unet is not None else current_unet()


#: The oldest torch the engine runs on: SDPA's ``scale`` and ``load_state_dict(assign=True)``
#: came with 2.1 (A1111 1.10 installs 2.1.2; an older venv kept through updates may have 2.0.1).
MIN_TORCH = (2, 1)


def old_torch_message(version: str | None = None) -> str | None:
    """Why this torch cannot run the image prompts, or None where it can."""
    import torch

    version = torch.__version__ if version is None else version
    try:
        major, minor = (int(part) for part in str(version).split("+")[0].split(".")[:2])
    except ValueError:  # a version we cannot read: let it try
        return None
    if (major, minor) >= MIN_TORCH:
        return None
    return (
        f"Negative Image Prompt needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer, but this web "
        f"UI runs torch {version}. Update torch: start A1111 once with --reinstall-torch in "
        "COMMANDLINE_ARGS (it installs the version the web UI asks for), or switch Negative Image "
        "Prompt off."
    )


def low_vram() -> bool:
    """Whether the web UI keeps the GPU nearly empty between uses: A1111 with --lowvram,
    --medvram or --medvram-sdxl for the loaded model (it marks the model ``lowvram``, keeps one
    of its parts on the GPU at a time and moves the others to the CPU)."""
    try:
        from modules import shared
    except ImportError:
        return False
    return getattr(getattr(shared, "sd_model", None), "lowvram", False) is True


def free_gpu_for_encoder() -> None:
    """Under :func:`low_vram`, put the model part A1111 holds on the GPU back on the CPU before
    the image encoder takes the GPU, as A1111 does before it loads another model."""
    try:
        from modules import lowvram
    except ImportError:
        return
    send = getattr(lowvram, "send_everything_to_cpu", None)
    if callable(send):
        send()


def unsupported_message() -> str:
    """Why image prompts cannot act here, and what to do."""
    tested = "; ".join(TESTED)
    return (
        f"Negative Image Prompt cannot reach the UNet of the model loaded in {host_kind()}: "
        "this web UI keeps it where this extension does not know to look, so the image would "
        f"be made without the image prompts. Supported: {tested}. Switch Negative Image "
        "Prompt off for this generation, or use a supported web UI."
    )


_warned = False


def warn_if_unsupported() -> str | None:
    """Once per process, log why image prompts cannot work on this host (an unknown web UI, a
    torch too old); the warning text (also shown in the accordion) or None where they work."""
    global _warned
    message = old_torch_message()
    if message is None:
        if host_kind() in (A1111, FORGE, REFORGE, FORGE_CLASSIC, FORGE_NEO):
            return None
        message = (
            f"Negative Image Prompt does not know this web UI ({host_kind()}): generations with "
            "image prompts will fail with a message rather than run without them. Tested on: "
            f"{'; '.join(TESTED)}."
        )
    if not _warned:
        _warned = True
        logger.warning(message)
    return message
