"""Stage "step": what the image prompts cost per sampling step.

One step is what A1111 does per denoiser call with ``batch_cond_uncond``: the extension's
``on_cfg_denoiser`` work (``ImagePromptSession.conditioning``: append the image blocks to the
cond and uncond conditioning), the batching of cond and uncond rows (``torch.cat``) and one call
of the UNet on 2 rows. The baseline does the same without the extension. Every variant runs on
the same UNet object; a variant's session (and so its hijack) is created and installed before
its sample and removed after it, outside the timed region, so that samples of different
variants can be interleaved (A B C ... in a new random order every round).

Variants: the class-level attention (ldm's own, or an SDPA forward as A1111's "sdp"
optimisation installs it) x (no extension, base adapter with 4 tokens, plus adapter with 16);
with SDPA also "hijack installed, step outside both windows" (nothing appended) and "base
adapter without the per-UNet-call verification".

Adapter weights are random at the published shapes (``to_k_ip``/``to_v_ip`` [inner, C] for
every ``attn2``); the image tokens are random N(0, 1) values, the scale of the adapters'
LayerNorm-ed tokens. Where the tokens come from does not change the cost of a step.
"""

from __future__ import annotations

import cProfile
import pstats
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.clock import clock_for, ratios, summary
from bench.unets import AttentionSwitch, build_unet, unet_inputs

ADAPTER_TOKENS = {"base": 4, "plus": 16}
NESTED = ("verify_blocks", "side_keys_values", "image_attention")


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str  # "stock" (ldm's forward) or "sdpa"
    adapter: str | None = None  # "base" / "plus"; None: no extension
    outside_windows: bool = False
    verify: bool = True
    hooks_without_block: bool = False  # hooks installed, context without our block


def variants_for(baselines: list[str]) -> list[Variant]:
    found: list[Variant] = []
    for attention in baselines:
        found += [
            Variant(attention, attention),
            Variant(f"{attention}+base", attention, "base"),
            Variant(f"{attention}+plus", attention, "plus"),
        ]
    sdpa_or_first = "sdpa" if "sdpa" in baselines else baselines[0]
    found += [
        Variant(f"{sdpa_or_first}+base outside windows", sdpa_or_first, "base", True),
        Variant(
            f"{sdpa_or_first}+base hooks, no block", sdpa_or_first, "base",
            hooks_without_block=True,
        ),
        Variant(f"{sdpa_or_first}+base verify off", sdpa_or_first, "base", verify=False),
    ]  # fmt: skip
    return found


def comparisons(baselines: list[str]) -> list[tuple[str, str, str, float | None]]:
    """(label, numerator, denominator, target) of the reported ratios."""
    found: list[tuple[str, str, str, float | None]] = []
    for attention in baselines:
        found += [
            (f"base adapter / none ({attention})", f"{attention}+base", attention, 1.02),
            (f"plus adapter / none ({attention})", f"{attention}+plus", attention, 1.03),
        ]
    first = "sdpa" if "sdpa" in baselines else baselines[0]
    found += [
        (f"outside windows / none ({first})", f"{first}+base outside windows", first, 1.005),
        (f"hooks, no block / none ({first})", f"{first}+base hooks, no block", first, 1.005),
        (f"verify on / off (base, {first})", f"{first}+base", f"{first}+base verify off", None),
    ]
    return found


class StepBench:
    """One UNet, its inputs, the adapters' weights and image prompts, and the variants' steps."""

    def __init__(self, family: str, *, tiny: bool, latent: int, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        from lib_negip.hijack import KeyValueWeights
        from lib_negip.prompt import ImagePrompt, SidePrompt, StepWindow
        from lib_negip.unet_layers import cross_attention_layers

        self.family, self.device, self.dtype = family, device, dtype
        started = time.perf_counter()
        self.unet = build_unet(family, tiny=tiny, device=device, dtype=dtype)
        self.build_s = time.perf_counter() - started
        self.inputs = unet_inputs(family, tiny=tiny, latent=latent, device=device, dtype=dtype)
        self.layers = cross_attention_layers(self.unet)
        self.switch = AttentionSwitch()
        width = self.layers[0].context_dim
        # Drawn on the GPU where there is one: SDXL's two adapters hold ~680 M random values.
        generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(3)

        def random(*shape: int, scale: float = 1.0) -> torch.Tensor:
            values = torch.randn(shape, generator=generator, device=generator.device)
            return values.mul_(scale).to(device)

        self.weights: dict[str, list[Any]] = {}
        self.prompts: dict[tuple[str, bool], Any] = {}
        for adapter, n_tokens in ADAPTER_TOKENS.items():
            # float32 masters, as host.Models keeps them; KeyValueWeights caches the cast copy.
            self.weights[adapter] = [
                KeyValueWeights(
                    random(layer.inner_dim, width, scale=width**-0.5),
                    random(layer.inner_dim, width, scale=width**-0.5),
                )
                for layer in self.layers
            ]
            positive, negative = random(n_tokens, width), random(n_tokens, width)
            for outside in (False, True):
                window = StepWindow(0.0, 0.5) if outside else StepWindow()
                self.prompts[(adapter, outside)] = ImagePrompt(
                    positive=SidePrompt(positive.to(dtype), 1.0, window),
                    negative=SidePrompt(negative.to(dtype), 1.0, window),
                )
        self.session: Any = None
        self.sessions: dict[str, Any] = {}
        self.append = True

    def describe(self) -> dict[str, Any]:
        x = self.inputs["x"]
        return {
            "family": self.family,
            "latent": list(x.shape[2:]),
            "batch": x.shape[0],
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attn2_layers": len(self.layers),
            "unet_parameters_m": round(sum(p.numel() for p in self.unet.parameters()) / 1e6, 1),
            "build_s": round(self.build_s, 2),
            "autocast": self.dtype != torch.float32,
        }

    def autocast(self) -> Any:
        """A1111 samples a half-precision model inside ``torch.autocast`` (devices.autocast)."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    # One sample: prepare (untimed), step (timed), finish (untimed).
    def prepare(self, variant: Variant) -> None:
        """Make ``variant`` the one the next steps run.

        Each variant keeps one session (one generation) for the whole benchmark, so its steps
        are steady-state steps: what a generation does once (installing the hijack, projecting
        the side tokens' keys and values, building the blocks) happens in its first step, a
        warm-up step. Between samples of other variants its hooks are taken off the UNet.
        """
        from lib_negip.session import ImagePromptSession

        self.switch.use(variant.attention)
        self.session = None
        self.progress = 0.75 if variant.outside_windows else 0.0
        if variant.adapter is None:
            return
        session = self.sessions.get(variant.name)
        if session is None:
            session = self.sessions[variant.name] = ImagePromptSession(
                self.prompts[(variant.adapter, variant.outside_windows)],
                self.weights[variant.adapter],
                verify=variant.verify,
            )
        # The previous step's denoiser callback: it leaves the hooks as the timed step needs
        # them (installed in a window; off outside the windows).
        session.conditioning(
            self.unet, self.inputs["text_cond"], self.inputs["text_uncond"], progress=self.progress
        )
        self.session = session
        # "hooks, no block": the hijack is on but this UNet call's context carries no block
        # (another extension's extra pass, a refiner): the step does not call the session.
        self.append = not variant.hooks_without_block

    def step(self) -> torch.Tensor:
        inputs = self.inputs
        cond, uncond = inputs["text_cond"], inputs["text_uncond"]
        with torch.no_grad(), self.autocast():
            if self.session is not None and self.append:
                appended = self.session.conditioning(
                    self.unet, cond, uncond, progress=self.progress
                )
                if appended is not None:
                    cond, uncond = appended.cond, appended.uncond
            context = torch.cat([cond, uncond])
            return self.unet(inputs["x"], inputs["timesteps"], context=context, y=inputs["y"])

    def finish(self) -> None:
        if self.session is not None:
            self.session._unhook()  # hooks off; the hijack keeps what it projected (bench-only)
            self.session = None

    def close(self) -> None:
        self.finish()
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()
        self.switch.restore()


def run_step_stage(
    family: str,
    *,
    tiny: bool,
    latent: int,
    device: torch.device,
    dtype: torch.dtype,
    baselines: list[str],
    warmup: int,
    rounds: int,
    min_rounds: int,
    budget_s: float,
    hook_steps: int,
    layer_calls: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Interleaved rounds of every variant; ratios per round; hook-path time; a profile."""
    bench = StepBench(family, tiny=tiny, latent=latent, device=device, dtype=dtype)
    clock = clock_for(device)
    variants = variants_for(baselines)
    result: dict[str, Any] = {**bench.describe(), "clock": clock.name}
    print(f"[step {family}] {result}", flush=True)
    try:
        peaks = _warm_up(bench, variants, warmup, clock)
        if device.type == "cuda":
            result["synchronisations_per_step"] = _count_synchronisations(bench, variants)
        pairs = [
            (numerator, denominator) for _, numerator, denominator, _ in comparisons(baselines)
        ]
        samples, walls, paired, done, elapsed = _interleave(
            bench, variants, pairs, clock, rounds, min_rounds, budget_s, seed
        )
        result.update(rounds=done, warmup_rounds=warmup, interleaved_s=round(elapsed, 1))
        result["variants"] = {
            v.name: {
                "step_s": summary(samples[v.name]),
                "wall_s": summary(walls[v.name]),
                **({"peak_gpu_mib": peaks[v.name]} if v.name in peaks else {}),
            }
            for v in variants
        }
        result["comparisons"] = []
        for label, numerator, denominator, target in comparisons(baselines):
            (num, den), (num_wall, den_wall) = paired[(numerator, denominator)]
            per_round = ratios(num, den)
            entry = {
                "label": label,
                "numerator": numerator,
                "denominator": denominator,
                "ratio": summary(per_round, 4),
                "wall_ratio": summary(ratios(num_wall, den_wall), 4),
                "ratio_of_medians": round(
                    result["variants"][numerator]["step_s"]["median"]
                    / result["variants"][denominator]["step_s"]["median"],
                    4,
                ),
                "target": target,
            }
            if target is not None and per_round:
                entry["meets_target"] = entry["ratio"]["median"] <= target
            result["comparisons"].append(entry)
        baseline = "sdpa" if "sdpa" in baselines else baselines[0]
        baseline_step = result["variants"][baseline]["step_s"]["median"]
        result["hook_path"] = {
            v.name: _hook_time(bench, v, hook_steps, baseline_step)
            for v in variants
            if v.adapter is not None and v.attention == baseline
        }
        result["profile"] = _profile(bench, Variant("profile", baseline, "plus"))
        result["layer_calls"] = _layer_calls(bench, baseline, layer_calls, baseline_step)
    finally:
        bench.close()
    return result


def _warm_up(
    bench: StepBench, variants: list[Variant], warmup: int, clock: Any
) -> dict[str, float]:
    peaks: dict[str, float] = {}
    cuda = bench.device.type == "cuda"
    for _ in range(max(warmup, 1)):
        for variant in variants:
            bench.prepare(variant)
            if cuda:
                torch.cuda.synchronize(bench.device)
                torch.cuda.reset_peak_memory_stats(bench.device)
            clock.time(bench.step)
            if cuda:
                peak = torch.cuda.max_memory_allocated(bench.device) / 2**20
                peaks[variant.name] = round(max(peak, peaks.get(variant.name, 0.0)), 1)
            bench.finish()
    return peaks


def _count_synchronisations(bench: StepBench, variants: list[Variant]) -> dict[str, int]:
    """Device synchronisations in one steady-state step of each variant (CUDA's sync debug
    mode reports each one as a warning)."""
    counts = {}
    for variant in variants:
        bench.prepare(variant)
        torch.cuda.synchronize(bench.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                bench.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        bench.finish()
        counts[variant.name] = sum("synchroniz" in str(w.message).lower() for w in caught)
    return counts


def _interleave(
    bench: StepBench,
    variants: list[Variant],
    pairs: list[tuple[str, str]],
    clock: Any,
    rounds: int,
    min_rounds: int,
    budget_s: float,
    seed: int,
) -> tuple[dict, dict, dict, int, float]:
    """Rounds of adjacent pairs: every compared pair once per round, pairs in a new random
    order, the two steps of a pair back to back in random order, so each ratio compares two
    steps a few seconds apart (the load of a shared machine drifts on longer scales)."""
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    walls: dict[str, list[float]] = {v.name: [] for v in variants}
    paired = {pair: (([], []), ([], [])) for pair in pairs}
    by_name = {v.name: v for v in variants}
    order = list(pairs)
    rng = random.Random(seed)
    started = time.perf_counter()
    done = 0
    for done in range(1, rounds + 1):
        rng.shuffle(order)
        for pair in order:
            sequence = [0, 1] if rng.random() < 0.5 else [1, 0]
            for index in sequence:
                name = pair[index]
                bench.prepare(by_name[name])
                primary, wall = clock.time(bench.step)
                bench.finish()
                samples[name].append(primary)
                walls[name].append(wall)
                paired[pair][0][index].append(primary)
                paired[pair][1][index].append(wall)
        elapsed = time.perf_counter() - started
        if done % 5 == 0 or done == rounds:
            print(f"[step {bench.family}] round {done}/{rounds}, {elapsed:.0f} s", flush=True)
        if done >= min_rounds and elapsed > budget_s:
            print(f"[step {bench.family}] time budget reached after {done} rounds", flush=True)
            break
    return samples, walls, paired, done, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Where the time of the hook path goes


def _timed(fn: Callable, totals: dict[str, float], key: str, now: Callable[[], float]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = now()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + now() - started

    return wrapper


def _hook_time(
    bench: StepBench, variant: Variant, steps: int, baseline_step_s: float
) -> dict[str, Any]:
    """Host time spent in the extension's code per step (around each hook, the session's
    conditioning call and the per-UNet-call verification; the thread's CPU time on the CPU,
    so that waiting for a core is not counted, wall time on a GPU machine).

    On the CPU this is the whole cost of the image prompts (the host's attention itself does
    the same work with or without us); on a GPU it is the host-side (launch) time, which the
    GPU's own work hides as long as the host runs ahead.
    """
    from lib_negip import hijack, session

    totals: dict[str, float] = {}
    patched: list[tuple[Any, str, Any]] = []
    targets = [
        (hijack._LayerHooks, "before_attention"),
        (hijack._LayerHooks, "capture_query"),
        (hijack._LayerHooks, "add_image_term"),
        (hijack._LayerHooks, "after_attention"),
        (session.ImagePromptSession, "conditioning"),
        # Nested in the entry points above: a breakdown, not added to the total.
        (hijack, "verify_blocks"),
        (hijack._LayerHooks, "side_keys_values"),
        (hijack._LayerHooks, "image_attention"),
    ]
    cuda = bench.device.type == "cuda"
    now = time.perf_counter if cuda else time.thread_time
    for owner, name in targets:
        original = getattr(owner, name, None)
        if original is None:  # the engine was refactored: time what still exists
            continue
        patched.append((owner, name, original))
        setattr(owner, name, _timed(original, totals, name, now))
    try:
        bench.prepare(variant)  # after patching: the hooks are registered as patched methods
        bench.step()
        totals.clear()
        started = time.perf_counter()
        for _ in range(steps):
            bench.step()
        if cuda:
            torch.cuda.synchronize(bench.device)
        step_s = (time.perf_counter() - started) / steps
        bench.finish()
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    per_step_ms = {k: round(v / steps * 1e3, 4) for k, v in totals.items()}
    extension_ms = sum(v for k, v in per_step_ms.items() if k not in NESTED)
    return {
        "steps": steps,
        "per_step_ms": per_step_ms,
        "extension_ms_per_step": round(extension_ms, 4),
        "instrumented_step_s": round(step_s, 6),
        "share_of_baseline_step": round(extension_ms / 1e3 / baseline_step_s, 5),
    }


def _layer_calls(
    bench: StepBench, attention: str, calls: int, baseline_step_s: float
) -> dict[str, Any]:
    """One attn2 module called on its own, ``calls`` times per sample, interleaved: time per
    call without the extension, outside the windows, with its hooks installed but a context
    without our block, and with the base and plus blocks; every attn2 layer, on the inputs
    it receives in a step. The added time summed over the layers is the extension's cost per
    UNet call measured where it happens (indirect costs of the hooks included), with far less
    noise than whole steps on a shared machine.

    Per call = total / calls after a final synchronisation: on a GPU that is the host's
    launch time where the host is slower than the GPU (ldm's many small ops on a fast GPU),
    else the GPU's time.
    """
    layers = bench.layers
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable:
        def hook(module: Any, args: tuple) -> None:
            captured.setdefault(name, args[0].detach().clone())

        return hook

    handles = [layer.module.register_forward_pre_hook(capture(layer.name)) for layer in layers]
    try:
        bench.prepare(Variant(attention, attention))
        bench.step()
        bench.finish()
    finally:
        for handle in handles:
            handle.remove()
    variants = [
        Variant(attention, attention),
        Variant(f"{attention}+base outside windows", attention, "base", True),
        Variant(f"{attention}+base hooks, no block", attention, "base", hooks_without_block=True),
        Variant(f"{attention}+base", attention, "base"),
        Variant(f"{attention}+plus", attention, "plus"),
    ]
    inputs = bench.inputs
    cuda = bench.device.type == "cuda"
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(5):
        for layer in layers:
            x = captured[layer.name]
            for variant in variants:
                bench.prepare(variant)
                cond, uncond = inputs["text_cond"], inputs["text_uncond"]
                if bench.session is not None and bench.append:
                    appended = bench.session.conditioning(
                        bench.unet, cond, uncond, progress=bench.progress
                    )
                    if appended is not None:
                        cond, uncond = appended.cond, appended.uncond
                context = torch.cat([cond, uncond])
                with torch.no_grad(), bench.autocast():
                    layer.module(x, context=context)  # warm (first split of this context)
                    if cuda:
                        torch.cuda.synchronize(bench.device)
                    started = time.perf_counter()
                    for _ in range(calls):
                        layer.module(x, context=context)
                    if cuda:
                        torch.cuda.synchronize(bench.device)
                    per_call = (time.perf_counter() - started) / calls
                bench.finish()
                samples.setdefault((layer.name, variant.name), []).append(per_call)
    out: dict[str, Any] = {"calls_per_sample": calls, "samples": 5, "layers": {}}
    totals = {v.name: 0.0 for v in variants[1:]}
    for layer in layers:
        x = captured[layer.name]
        base = statistics.median(samples[(layer.name, variants[0].name)])
        entry: dict[str, Any] = {"x": list(x.shape), "heads": layer.module.heads, "us": {}}
        for variant in variants:
            median = statistics.median(samples[(layer.name, variant.name)])
            entry["us"][variant.name] = round(median * 1e6, 1)
        entry["added_us"] = {
            v.name: round((statistics.median(samples[(layer.name, v.name)]) - base) * 1e6, 1)
            for v in variants[1:]
        }
        for name, added in entry["added_us"].items():
            totals[name] += added
        out["layers"][layer.name] = entry
    out["per_unet_call"] = {
        name: {
            "added_ms": round(total / 1e3, 3),
            "estimated_ratio": round(1 + total / 1e6 / baseline_step_s, 4),
        }
        for name, total in totals.items()
    }
    out["shown"] = [layers[0].name, layers[-1].name]  # first (largest query) and middle block
    return out


def _profile(bench: StepBench, variant: Variant, top: int = 14) -> dict[str, Any]:
    """cProfile of one step: the calls made from lib_negip's code, by cumulative time."""
    bench.prepare(variant)
    bench.step()
    profiler = cProfile.Profile()
    profiler.enable()
    bench.step()
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)
    profiler.disable()
    bench.finish()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def label(func: tuple[str, int, str]) -> str:
        filename, line, name = func
        if filename == "~":
            return name
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        return f"{short}:{line}({name})"

    edges = []
    for callee, (_cc, _nc, _tt, _ct, callers) in stats.items():
        for caller, edge in callers.items():
            if "lib_negip" in caller[0] and "lib_negip" not in callee[0]:
                calls, _prim, tottime, cumtime = edge
                edges.append((cumtime, tottime, calls, label(caller), label(callee)))
    edges.sort(reverse=True)
    entry_points = {}
    for func, (_cc, nc, tt, ct, _callers) in stats.items():
        if "lib_negip" in func[0]:
            entry_points[label(func)] = {"calls": nc, "self_ms": round(tt * 1e3, 3),
                                         "cumulative_ms": round(ct * 1e3, 3)}  # fmt: skip
    ranked = sorted(entry_points.items(), key=lambda item: -item[1]["cumulative_ms"])[:top]
    return {
        "variant": f"{variant.attention}+{variant.adapter}",
        "note": "one step under cProfile (its overhead inflates Python-heavy calls)",
        "lib_negip_functions": dict(ranked),
        "calls_out_of_lib_negip": [
            {
                "caller": caller,
                "callee": callee,
                "calls": calls,
                "cumulative_ms": round(cum * 1e3, 3),
                "self_ms": round(tot * 1e3, 3),
            }
            for cum, tot, calls, caller, callee in edges[:top]
        ],
    }
