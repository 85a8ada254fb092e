"""A generation as A1111 runs it, reduced to what the extension sees.

``process_images`` calls every script's ``process`` (exceptions logged, not raised), then for
each of ``p.n_iter`` batches every script's ``before_process_batch``, ``p.sample``: the
sampling pass and, with hires fix, a second pass with ``p.is_hr_pass`` set (an exception from
``p.sample`` propagates, as in A1111), every script's ``post_sample``, the VAE (the loaded
model's ``decode_first_stage``, when it has one) and every script's ``postprocess_image``;
at the end every script's ``postprocess``. An exception from the UNet or the VAE propagates out and
``postprocess`` does not run; an interrupt ends sampling early and ``postprocess`` runs, as in
A1111.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from modules import script_callbacks, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser, InterruptedException

log = logging.getLogger("webui_stub")


class UNetWrapper:
    """Calls a model's UNet the way ldm's wrappers do: ``context=`` the crossattn. The model is
    the one the denoiser's ``model_wrap`` holds, as A1111's (set where a test makes A1111 keep
    a wrapper, e.g. its img2img sampler across batches), else the loaded one."""

    def __init__(self, denoiser=None):
        self.denoiser = denoiser

    def __call__(self, x, sigma, cond):
        context = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        timesteps = (sigma * 50).clamp(0, 999)
        wrap = getattr(self.denoiser, "model_wrap", None)
        model = wrap.inner_model if wrap is not None else shared.sd_model
        return model.model.diffusion_model(x, timesteps, context=context)


@dataclass
class Processing:
    cond: Any  # (conds_list, tensor)
    uncond: Any
    latent: torch.Tensor
    steps: int = 4
    sampler: str = "euler"  # or "heun" (second order)
    cfg_scale: float = 5.0
    s_min_uncond: float = 0.0
    enable_hr: bool = False
    hr_steps: int = 3
    hr_checkpoint_name: str | None = None  # A1111 resolves it only after the scripts' process
    image_cfg_scale: float | None = None
    scripts: list = field(default_factory=list)  # [(script, args)]
    extra_generation_params: dict = field(default_factory=dict)
    is_hr_pass: bool = False
    denoisers: list = field(default_factory=list)
    is_api: bool = True  # A1111 marks API requests; the UI's are False (answers in UI words)
    n_iter: int = 1  # batch count: the batches sample the same latent again
    init_images: Any = None  # img2img's pictures (A1111's img2img processing has them)
    firstpass_image: Any = None  # txt2img's upscale of a result (✨): the first pass is given
    params_txt: dict | None = None  # the infotext values A1111 would write to params.txt

    def sample(self, x):
        """What A1111's ``p.sample`` does here: the first pass (unless given), then hires
        fix's second."""
        if self.firstpass_image is None or not self.enable_hr:
            x = sample(self, self.steps, x)
        if self.enable_hr:
            self.is_hr_pass = True
            x = sample(self, self.hr_steps, x)
            self.is_hr_pass = False
        return x


def run_scripts(p, method, *extra, **kwargs):
    for script, args in p.scripts:
        try:
            getattr(script, method)(p, *extra, *args, **kwargs)
        except Exception as error:
            script_callbacks.errors.append(error)
            log.exception("Error running %s: %s", method, script)


def sigmas_for(steps):
    return torch.cat([torch.linspace(8.0, 0.5, steps), torch.zeros(1)])


def sample(p, steps, x):
    denoiser = CFGDenoiser(p, None)
    denoiser.inner_model = UNetWrapper(denoiser)
    p.denoisers.append(denoiser)
    second_order = p.sampler == "heun"
    denoiser.steps = steps
    denoiser.total_steps = steps * 2 if second_order else steps
    shared.state.sampling_steps = steps
    shared.state.sampling_step = 0
    sigmas = sigmas_for(steps)

    def model(x, sigma):
        s = sigma.expand(x.shape[0])
        return denoiser(x, s, p.uncond, p.cond, p.cfg_scale, p.s_min_uncond)

    try:
        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = (x - model(x, s)) / s
            if not second_order or s_next == 0:
                x = x + d * (s_next - s)
            else:
                x2 = x + d * (s_next - s)
                d2 = (x2 - model(x2, s_next)) / s_next
                x = x + (d + d2) / 2 * (s_next - s)
            shared.state.sampling_step = i
    except InterruptedException:
        pass
    return x


def process_images(p):
    """The last batch's result."""
    run_scripts(p, "process")
    x = None
    for batch_number in range(p.n_iter):
        if shared.state.interrupted or getattr(shared.state, "stopping_generation", False):
            break  # as A1111: no new image once Interrupt was pressed
        run_scripts(p, "before_process_batch", batch_number=batch_number)
        run_scripts(p, "process_batch", batch_number=batch_number)
        if batch_number == 0:  # A1111 writes params.txt here, before sampling
            p.params_txt = dict(p.extra_generation_params)
        x = p.sample(p.latent.clone())  # an exception here reaches the user, as in A1111
        run_scripts(p, "post_sample", None)
        decode = getattr(shared.sd_model, "decode_first_stage", None)
        if decode is not None:
            x = decode(x)
        run_scripts(p, "postprocess_image", x)
    run_scripts(p, "postprocess", None)
    return x
