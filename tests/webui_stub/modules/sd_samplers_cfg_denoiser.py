"""A1111's CFG denoiser, rewritten small: the callback, then one of its batching branches.

Conditioning as the denoiser receives it after A1111's schedule reconstruction:
``cond = (conds_list, tensor)`` where ``conds_list[i]`` lists ``(row, weight)`` of image i's cond
rows in ``tensor`` (several with AND prompts), and ``uncond`` has one row per image. Tensors are
[rows, tokens, C], or ``DictWithShape`` with ``crossattn`` (and ``vector``) for SDXL.
"""

import torch

from modules import script_callbacks, shared


class InterruptedException(BaseException):
    pass


class CFGDenoiserParams:
    def __init__(
        self,
        x,
        image_cond,
        sigma,
        sampling_step,
        total_sampling_steps,
        text_cond,
        text_uncond,
        denoiser,
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: value[a:b] for key, value in cond.items()}


def crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def with_crossattn(cond, tensor):
    if isinstance(cond, dict):
        cond = type(cond)(cond)
        cond["crossattn"] = tensor
        return cond
    return tensor


class CFGDenoiser:
    def __init__(self, p, inner_model):
        self.p = p
        self.inner_model = inner_model
        self.model_wrap = None  # A1111's: the wrapped model it samples with, made at first use
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.calls = []  # (rows, context length) of every UNet call, for the tests
        self.outputs = []  # x_out of every call, for the tests
        self.skipped = []  # whether the uncond rows were skipped in each call

    def pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        repeats = (crossattn(cond).shape[1] - crossattn(uncond).shape[1]) // empty.shape[1]

        def pad(c, n):
            t = crossattn(c)
            return with_crossattn(c, torch.cat([t, empty.repeat(t.shape[0], n, 1)], dim=1))

        if repeats < 0:
            cond = pad(cond, -repeats)
            self.padded_cond_uncond = True
        elif repeats > 0:
            uncond = pad(uncond, repeats)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        u, length = crossattn(uncond), crossattn(cond).shape[1]
        if u.shape[1] < length:
            u = torch.cat([u, u[:, -1:].repeat(1, length - u.shape[1], 1)], dim=1)
            self.padded_cond_uncond_v0 = True
        elif u.shape[1] > length:
            u = u[:, :length]
            self.padded_cond_uncond_v0 = True
        return cond, with_crossattn(uncond, u)

    def model(self, x, sigma, c):
        self.calls.append((x.shape[0], crossattn(c).shape[1]))
        if isinstance(c, dict):  # SDXL: A1111 merges the conditioning dict into the call's
            condition = {**c, "c_concat": [None]}
        else:
            condition = {"c_crossattn": [c], "c_concat": [None]}
        return self.inner_model(x, sigma, cond=condition)

    def __call__(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        if shared.state.interrupted or shared.state.skipped:
            raise InterruptedException

        edit = shared.sd_model.cond_stage_key == "edit" and self.image_cfg_scale not in (None, 1.0)
        conds_list, tensor = cond
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]
        rows = [x[i] for i, n in enumerate(repeats) for _ in range(n)]
        x_in = torch.cat([torch.stack(rows), x] + ([x] if edit else []))
        sigma_rows = [sigma[i] for i, n in enumerate(repeats) for _ in range(n)]
        sigma_in = torch.cat([torch.stack(sigma_rows), sigma] + ([sigma] if edit else []))

        params = CFGDenoiserParams(
            x_in,
            None,
            sigma_in,
            shared.state.sampling_step,
            shared.state.sampling_steps,
            tensor,
            uncond,
            self,
        )
        script_callbacks.cfg_denoiser_callback(params)
        x_in, sigma_in = params.x, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if (
            shared.opts.skip_early_cond
            and self.step / self.total_steps <= shared.opts.skip_early_cond
        ) or (
            (self.step % 2 or shared.opts.s_min_uncond_all)
            and s_min_uncond > 0
            and sigma[0] < s_min_uncond
            and not edit
        ):
            skip_uncond = True
        self.skipped.append(skip_uncond)
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        self.padded_cond_uncond = self.padded_cond_uncond_v0 = False
        if shared.opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif shared.opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            if edit:
                cond_in = catenate_conds([tensor, uncond, uncond])
            elif skip_uncond:
                cond_in = tensor
            else:
                cond_in = catenate_conds([tensor, uncond])
            if shared.opts.batch_cond_uncond:
                x_out = self.model(x_in, sigma_in, cond_in)
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.model(x_in[a:b], sigma_in[a:b], subscript_cond(cond_in, a, b))
        else:
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if shared.opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], step):
                b = min(a + step, tensor.shape[0])
                x_out[a:b] = self.model(x_in[a:b], sigma_in[a:b], subscript_cond(tensor, a, b))
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self.model(x_in[-n:], sigma_in[-n:], uncond)

        first_rows = [c[0][0] for c in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[i : i + 1] for i in first_rows])])
        self.outputs.append(x_out)

        if edit:
            out_cond, out_img_cond, out_uncond = x_out.chunk(3)
            denoised = (
                out_uncond
                + cond_scale * (out_cond - out_img_cond)
                + self.image_cfg_scale * (out_img_cond - out_uncond)
            )
        else:
            scale = 1.0 if skip_uncond else cond_scale
            uncond_out = x_out[-batch_size:]
            denoised = uncond_out.clone()
            for i, conds in enumerate(conds_list):
                for row, weight in conds:
                    denoised[i] += (x_out[row] - uncond_out[i]) * (weight * scale)
        self.step += 1
        return denoised
