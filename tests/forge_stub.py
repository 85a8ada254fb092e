"""Forge's sampling, rewritten small, on the same stand-in modules as tests/webui_stub.

Forge (lllyasviel/stable-diffusion-webui-forge, main dfdcbab) keeps A1111's ``on_cfg_denoiser``
callback but samples with its own ``backend/sampling/sampling_function.py``; what matters to the
extension, as read from that code:

- ``shared.sd_model`` has no ``.model``; the UNet is
  ``sd_model.forge_objects.unet.model.diffusion_model`` and is called as
  ``diffusion_model(x, t, context=..., transformer_options={"cond_or_uncond": [...], ...})``;
- the callback gets ``params.x`` with one row per image (not cond + uncond rows), and whatever it
  leaves in ``text_cond`` / ``text_uncond`` is what the UNet gets;
- the UNet calls are planned afterwards: cond entries, then uncond entries, batched together in
  reverse order (uncond rows FIRST, ``cond_or_uncond == [1, 0]``) when their contexts can be
  concatenated, split into separate calls when free memory is short; contexts of different
  lengths are concatenated only if one repeats to the other's length at most 4 times (the shorter
  one is then repeated), else they go in separate calls;
- at CFG 1 (and on skipped-uncond steps) only the cond rows run (``[0]``);
- no padding of cond and uncond to the same length.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import torch
from webui_harness import processing, script_callbacks, shared

# The stand-in's modules are importable once webui_harness has put them on sys.path.
CFGDenoiserParams = importlib.import_module("modules.sd_samplers_cfg_denoiser").CFGDenoiserParams


def forge_model(unet: torch.nn.Module) -> SimpleNamespace:
    """``shared.sd_model`` as Forge has it: no ``.model``; the UNet behind ``forge_objects``."""
    patcher = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=patcher), cond_stage_key="txt")


def _crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _repeat_to(context: torch.Tensor, length: int) -> torch.Tensor:
    return context.repeat(1, length // context.shape[1], 1)


class ForgeDenoiser:
    """Forge's CFGDenoiser.forward + calc_cond_uncond_batch for one image per prompt."""

    def __init__(self, p, *, split: bool = False) -> None:
        self.p = p
        self.split = split  # "not enough free memory": cond and uncond in separate UNet calls
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.calls: list[list[int]] = []  # cond_or_uncond of every UNet call
        self.outputs: list[torch.Tensor] = []  # (the recorder of tests/webui_harness reads it)

    def unet(self, x, sigma, context, cond_or_uncond):
        self.calls.append(list(cond_or_uncond))
        timesteps = (sigma * 50).clamp(0, 999)
        return shared.sd_model.forge_objects.unet.model.diffusion_model(
            x,
            timesteps,
            context=context,
            transformer_options={"cond_or_uncond": list(cond_or_uncond)},
        )

    def __call__(self, x, sigma, uncond, cond, cond_scale):
        _conds_list, tensor = cond  # one prompt per image here
        params = CFGDenoiserParams(
            x,
            None,
            sigma,
            shared.state.sampling_step,
            shared.state.sampling_steps,
            tensor,
            uncond,
            self,
        )
        script_callbacks.cfg_denoiser_callback(params)
        cond_context = _crossattn(params.text_cond)
        # Forge's hires pass at its own CFG scale 1 has no uncond conditioning at all (None).
        run_uncond = cond_scale != 1.0 and params.text_uncond is not None
        uncond_context = _crossattn(params.text_uncond) if run_uncond else None
        out_cond = out_uncond = None
        if run_uncond and not self.split:
            a, b = uncond_context.shape[1], cond_context.shape[1]
            length = math.lcm(a, b)
            if length // min(a, b) <= 4:
                context = torch.cat(
                    [_repeat_to(uncond_context, length), _repeat_to(cond_context, length)]
                )
                both = self.unet(torch.cat([x, x]), torch.cat([sigma, sigma]), context, [1, 0])
                out_uncond, out_cond = both.chunk(2)
        if out_cond is None:
            if run_uncond:
                out_uncond = self.unet(x, sigma, uncond_context, [1])
            out_cond = self.unet(x, sigma, cond_context, [0])
        self.step += 1
        if not run_uncond:
            return out_cond
        return out_uncond + (out_cond - out_uncond) * cond_scale


class ForgeProcessing(processing.Processing):
    """A generation sampled the way Forge samples (see the module docstring)."""

    split: bool = False

    def sample(self, x):
        denoiser = ForgeDenoiser(self, split=self.split)
        self.denoisers.append(denoiser)
        denoiser.steps = denoiser.total_steps = self.steps
        shared.state.sampling_steps = self.steps
        sigmas = processing.sigmas_for(self.steps)
        for i in range(self.steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            denoised = denoiser(x, s.expand(x.shape[0]), self.uncond, self.cond, self.cfg_scale)
            x = x + (x - denoised) / s * (s_next - s)
            shared.state.sampling_step = i
        return x
