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
with SDPA also "hijack installed, step outside both windows" (nothing appended), "hooks, no
block" (the hijack installed, a UNet call whose context has no block), "style" (both sides on
the "style" blocks only: the other layers at block weight 0 get no hooks) and "mask" (a mask
half white, half black on both sides).

Adapter weights are random at the published shapes (``to_k_ip``/``to_v_ip`` [inner, C] for
every ``attn2``); the image tokens are random N(0, 1) values, the scale of the adapters'
LayerNorm-ed tokens. Where the tokens come from does not change the cost of a step.

Besides whole steps: host time inside each of the engine's hooks (:func:`_hook_time`), one
``attn2`` layer called alone (:func:`_layer_calls`), the Python-level torch calls and hooks
the hijack adds per ``attn2`` call (:func:`_host_ops`) and a cProfile of one step.
"""

from __future__ import annotations

import cProfile
import pstats
import random
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bench.clock import clock_for, ratios, summary
from bench.unets import AttentionSwitch, build_unet, unet_inputs

ADAPTER_TOKENS = {"base": 4, "plus": 16}
#: Timed functions called inside other timed ones: a breakdown, not added to the total.
NESTED = ("read_rows", "entry", "image_term", "probabilities")
#: The engine's two forms of the image term (``lib_negip.hijack.BLOCK_DIAGONAL``).
FORMS = {"auto": "auto", "always": "block-diagonal", "never": "per-head"}


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str  # "stock" (ldm's forward) or "sdpa"
    adapter: str | None = None  # "base" / "plus"; None: no extension
    outside_windows: bool = False
    hooks_without_block: bool = False  # hooks installed, context without our block
    layers: str | None = None  # both sides' block weights ("style"); None: every block
    mask: bool = False  # both sides masked to the left half of the image
    form: str = "auto"  # lib_negip.hijack.BLOCK_DIAGONAL while the variant's entries are built


def variants_for(baselines: list[str]) -> list[Variant]:
    found: list[Variant] = []
    for attention in baselines:
        found += [
            Variant(attention, attention),
            Variant(f"{attention}+base", attention, "base"),
            Variant(f"{attention}+plus", attention, "plus"),
        ]
    first = "sdpa" if "sdpa" in baselines else baselines[0]
    found += [
        Variant(f"{first}+base outside windows", first, "base", outside_windows=True),
        Variant(f"{first}+base hooks, no block", first, "base", hooks_without_block=True),
        Variant(f"{first}+base style", first, "base", layers="style"),
        Variant(f"{first}+base mask", first, "base", mask=True),
    ]
    return found


def adapter_targets(family: str, device: str, tiny: bool) -> tuple[float | None, float | None]:
    """The step-ratio targets of the base and the plus adapter: round 1's on the CPU at full
    size; on a GPU 1.03 (SD1.5, 512 px) and 1.05 (SDXL, 1024 px); the tiny SDXL layout is the
    host-bound proxy (1.05); tiny SD1.5 has none."""
    if device != "cpu":
        return (1.05, 1.05) if family == "sdxl" else (1.03, 1.03)
    if tiny:
        return (1.05, 1.05) if family == "sdxl" else (None, None)
    return 1.02, 1.03


def comparisons(
    baselines: list[str], targets: tuple[float | None, float | None] = (1.02, 1.03)
) -> list[tuple[str, str, str, float | None]]:
    """(label, numerator, denominator, target) of the reported ratios."""
    found: list[tuple[str, str, str, float | None]] = []
    base_target, plus_target = targets
    for attention in baselines:
        found += [
            (f"base adapter / none ({attention})", f"{attention}+base", attention, base_target),
            (f"plus adapter / none ({attention})", f"{attention}+plus", attention, plus_target),
        ]
    first = "sdpa" if "sdpa" in baselines else baselines[0]
    found += [
        (f"outside windows / none ({first})", f"{first}+base outside windows", first, 1.005),
        (f"hooks, no block / none ({first})", f"{first}+base hooks, no block", first, 1.005),
        (f"style blocks / none (base, {first})", f"{first}+base style", first, None),
        (f"mask / none (base, {first})", f"{first}+base mask", first, None),
    ]
    return found


class StepBench:
    """One UNet, its inputs, the adapters' weights and image prompts, and the variants' steps."""

    def __init__(self, family: str, *, tiny: bool, latent: int, device: torch.device,
                 dtype: torch.dtype, batch: int = 1) -> None:  # fmt: skip
        from lib_negip.hijack import KeyValueWeights
        from lib_negip.unet_layers import cross_attention_layers

        self.family, self.device, self.dtype = family, device, dtype
        started = time.perf_counter()
        self.unet = build_unet(family, tiny=tiny, device=device, dtype=dtype)
        self.build_s = time.perf_counter() - started
        self.images = batch
        self.inputs = unet_inputs(
            family, tiny=tiny, latent=latent, device=device, dtype=dtype, batch=batch
        )
        self.layers = cross_attention_layers(self.unet)
        self.switch = AttentionSwitch()
        width = self.layers[0].context_dim
        # Drawn on the GPU where there is one: SDXL's two adapters hold ~680 M random values.
        generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(3)

        def random(*shape: int, scale: float = 1.0) -> torch.Tensor:
            values = torch.randn(shape, generator=generator, device=generator.device)
            return values.mul_(scale).to(device)

        self.weights: dict[str, list[Any]] = {}
        self.tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
            self.tokens[adapter] = (positive.to(dtype), negative.to(dtype))
        # Half white (left), half black, at the latent's size, as the session is given masks.
        self.mask = torch.ones(latent, latent)
        self.mask[:, latent // 2 :] = 0.0
        self.session: Any = None
        self.sessions: dict[str, Any] = {}
        self.append = True
        self.progress = 0.0

    def describe(self) -> dict[str, Any]:
        x = self.inputs["x"]
        return {
            "family": self.family,
            "latent": list(x.shape[2:]),
            "batch": x.shape[0],  # UNet rows: cond and uncond of each image
            "images": self.images,  # A1111's batch size
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

    def prompt(self, variant: Variant) -> Any:
        from lib_negip.blocks import parse_layers
        from lib_negip.prompt import ImagePrompt, SidePrompt, StepWindow

        assert variant.adapter is not None
        window = StepWindow(0.0, 0.5) if variant.outside_windows else StepWindow()
        layers = parse_layers("layers", variant.layers)
        mask = self.mask if variant.mask else None
        positive, negative = self.tokens[variant.adapter]
        return ImagePrompt(
            positive=SidePrompt(positive, 1.0, window, layers, mask),
            negative=SidePrompt(negative, 1.0, window, layers, mask),
        )

    # One sample: prepare (untimed), step (timed), finish (untimed).
    def prepare(self, variant: Variant) -> None:
        """Make ``variant`` the one the next steps run.

        Each variant keeps one session (one generation) for the whole benchmark, so its steps
        are steady-state steps: what a generation does once (installing the hijack, the first
        UNet call's check of which layers take the fast path, projecting the side tokens' keys
        and values, each layer's entry for the row layout) happens in a first step right after
        the session is made. Between samples of other variants its hooks are taken off the UNet.
        """
        from lib_negip import hijack
        from lib_negip.session import ImagePromptSession

        self.switch.use(variant.attention)
        hijack.BLOCK_DIAGONAL = variant.form  # read where a layer's entry is built
        self.session = None
        self.progress = 0.75 if variant.outside_windows else 0.0
        if variant.adapter is None:
            return
        session = self.sessions.get(variant.name)
        new = session is None
        if session is None:
            session = self.sessions[variant.name] = ImagePromptSession(
                self.prompt(variant), self.weights[variant.adapter]
            )
        self.session = session
        self.append = True
        if new:
            # The generation's first step (with the block even for "hooks, no block": a UNet
            # call without the block is only allowed after the block reached the UNet once).
            self.step()
        # The previous step's denoiser callback: it leaves the hooks as the timed step needs
        # them (installed in a window; off outside the windows).
        session.conditioning(
            self.unet, self.inputs["text_cond"], self.inputs["text_uncond"], progress=self.progress
        )
        # "hooks, no block": the hijack is on but this UNet call's context carries no block
        # (another extension's extra pass, a refiner): the step does not call the session.
        self.append = not variant.hooks_without_block
        if variant.hooks_without_block and session.hijack is not None:
            # Since c7b6050 the engine refuses such a call after one that carried the block
            # (another extension's own conditioning: UnreachedError); what is timed here is the
            # host cost of the hooks on a call they leave alone, so the hijack is told not to
            # expect the block, as before its owner's first callback (bench-only).
            session.hijack._expecting = False

    def context(self) -> torch.Tensor:
        """The denoiser callback's work and the batching of cond and uncond rows."""
        cond, uncond = self.inputs["text_cond"], self.inputs["text_uncond"]
        if self.session is not None and self.append:
            appended = self.session.conditioning(self.unet, cond, uncond, progress=self.progress)
            if appended is not None:
                cond, uncond = appended.cond, appended.uncond
        return torch.cat([cond, uncond])

    def unet_call(self, context: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs
        return self.unet(inputs["x"], inputs["timesteps"], context=context, y=inputs["y"])

    def step(self) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.unet_call(self.context())

    def finish(self) -> None:
        from lib_negip import hijack

        if self.session is not None:
            self.session._unhook()  # hooks off; the hijack keeps what it projected (bench-only)
            self.session = None
        hijack.BLOCK_DIAGONAL = "auto"

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
    batch: int = 1,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Interleaved rounds of every variant; ratios per round; hook-path time; a profile.
    ``batch``: images per step (A1111's batch size; the UNet runs twice as many rows).
    ``checkpoint(result)`` is called with what is measured so far after the ratios and after
    each later table (most important first), so that a stage killed at a time limit keeps
    them."""
    save = checkpoint or (lambda _: None)
    bench = StepBench(family, tiny=tiny, latent=latent, device=device, dtype=dtype, batch=batch)
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
        targets = adapter_targets(family, device.type, tiny)
        for label, numerator, denominator, target in comparisons(baselines, targets):
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
        save(result)
        baseline = "sdpa" if "sdpa" in baselines else baselines[0]
        baseline_step = result["variants"][baseline]["step_s"]["median"]
        result["host_ops_per_attn2_call"] = _host_ops(bench, baseline)
        save(result)
        result["hook_path"] = {
            v.name: _hook_time(bench, v, hook_steps, baseline_step)
            for v in variants
            if v.adapter is not None and v.attention == baseline
        }
        save(result)
        result["layer_calls"] = _layer_calls(bench, baseline, layer_calls, baseline_step)
        save(result)
        if tiny or device.type == "cuda":  # at full size on a CPU the text's keys/values
            # projections (77 tokens) dwarf a 1-token query's term: noise, not a host view
            result["layer_calls_host_only"] = _layer_calls(
                bench, baseline, max(layer_calls, 50), baseline_step, host_only=True,
                samples_per_layer=3,
            )  # fmt: skip
            save(result)
        result["profile"] = _profile(bench, Variant(f"{baseline}+plus", baseline, "plus"))
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
    """Host time spent in the extension's code per step (around each hook, the UNet hooks that
    read the rows and split the context, and the session's conditioning call; the thread's CPU
    time on the CPU, so that waiting for a core is not counted, wall time on a GPU machine).

    On the CPU this is the whole cost of the image prompts (the host's attention itself does
    the same work with or without us) except the hooks' dispatch by torch; on a GPU it is the
    host-side (launch) time, which the GPU's own work hides as long as the host runs ahead.
    """
    from lib_negip import hijack, session

    totals: dict[str, float] = {}
    patched: list[tuple[Any, str, Any]] = []
    targets = [
        (session.ImagePromptSession, "conditioning"),
        (hijack.AttentionHijack, "_before_unet"),
        (hijack.AttentionHijack, "_after_unet"),
        (hijack._LayerHooks, "capture_query"),
        (hijack._LayerHooks, "add_image_term"),
        (hijack._LayerHooks, "after_attention"),
        # Nested in the entry points above: a breakdown, not added to the total.
        (hijack, "read_rows"),
        (hijack.AttentionHijack, "entry"),
        (hijack._LayerHooks, "image_term"),
        (hijack._LayerHooks, "probabilities"),
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


# --------------------------------------------------------------------------------------------
# Python-level torch calls and hooks per attn2 call


class _TorchCalls(TorchFunctionMode):
    """Counts the Python-level torch calls (functions and tensor methods; nested calls made by
    torch itself are not seen) by the scope the code is in: "unet" (the hijack's UNet hooks),
    "layer" (its attn2 hooks) or "host" (everything else). Tensor attribute reads
    (``.shape``, ``.dtype``, ...) are counted apart: they launch nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.scope = "host"
        self.calls: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()
        self.names: Counter[tuple[str, str]] = Counter()
        self.hooks: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:  # fmt: skip
        name = getattr(func, "__name__", str(func))
        if name == "__get__":
            self.reads[self.scope] += 1
        else:
            self.calls[self.scope] += 1
            self.names[(self.scope, name)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _scoped_hooks(counter: list[_TorchCalls | None]) -> Iterator[None]:
    """While active, the engine's hooks (as they are registered from now on) tell the counter
    in ``counter[0]`` which scope its calls are in, and count their own calls."""
    from lib_negip import hijack

    targets = [
        (hijack.AttentionHijack, "_before_unet", "unet"),
        (hijack.AttentionHijack, "_after_unet", "unet"),
        (hijack._LayerHooks, "capture_query", "layer"),
        (hijack._LayerHooks, "add_image_term", "layer"),
        (hijack._LayerHooks, "after_attention", "layer"),
    ]
    patched = []

    def scoped(fn: Callable, scope: str, name: str) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            mode = counter[0]
            if mode is None:
                return fn(*args, **kwargs)
            mode.hooks[name] += 1
            outer, mode.scope = mode.scope, scope
            try:
                return fn(*args, **kwargs)
            finally:
                mode.scope = outer

        return wrapper

    for owner, name, scope in targets:
        original = getattr(owner, name, None)
        if original is not None:
            patched.append((owner, name, original))
            setattr(owner, name, scoped(original, scope, name))
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def _hooks_on(bench: StepBench) -> tuple[int, int]:
    """Forward hooks and instance forwards set on the attn2 modules (and their submodules), and
    forward hooks on the UNet."""
    layer_hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m))
        for layer in bench.layers
        for m in layer.module.modules()
    )
    unet = bench.unet
    return layer_hooks, len(unet._forward_hooks) + len(unet._forward_pre_hooks)


def _host_ops(bench: StepBench, attention: str) -> dict[str, Any]:
    """Python-level torch calls and hooks the image prompts add per ``attn2`` call, counted
    with a ``TorchFunctionMode`` around one steady-state UNet call (the session's
    ``conditioning`` and the cond/uncond batching outside it, counted apart).

    ``torch_calls``: (calls of the hijacked UNet call - calls of the plain one) / attn2 calls
    (every attn2 layer once per UNet call; the UNet-level work is shared out over them).
    ``hooks``: calls of the engine's attn2-level hooks / attn2 calls. ``per_unet_call``: what the
    UNet-level hooks do once per call. ``in_layer_hooks``: calls inside the attn2 hooks per
    attn2 call, by name. Variants: base and plus with the engine's own choice of form
    (``auto``: block-diagonal on GPUs; on the CPU only for tiny layers) and forced to each
    form; base with the style blocks and with masks.
    """
    from lib_negip import hijack

    counter: list[_TorchCalls | None] = [None]
    n_calls = len(bench.layers)

    def count(variant: Variant) -> tuple[_TorchCalls, _TorchCalls]:
        bench.prepare(variant)
        with torch.no_grad(), bench.autocast():
            bench.unet_call(bench.context())  # steady state: entries built, fallback hooks gone
            counter[0] = conditioning = _TorchCalls()
            with conditioning:
                context = bench.context()
            counter[0] = unet_call = _TorchCalls()
            with unet_call:
                bench.unet_call(context)
            counter[0] = None
        return conditioning, unet_call

    found: dict[str, Any] = {}
    with _scoped_hooks(counter):
        plain = Variant(attention, attention)
        _, plain_call = count(plain)
        plain_hooks = _hooks_on(bench)
        bench.finish()
        plain_total = sum(plain_call.calls.values())
        cases = []
        for adapter in ADAPTER_TOKENS:
            for form, label in FORMS.items():
                name = f"{attention}+{adapter}" + ("" if form == "auto" else f" {label}")
                cases.append(Variant(f"{name} [ops]", attention, adapter, form=form))
        for extra in ("style", "mask"):
            base = Variant(f"{attention}+base {extra} [ops]", attention, "base")
            cases.append(
                replace(base, layers="style") if extra == "style" else replace(base, mask=True)
            )
        for variant in cases:
            conditioning, call = count(variant)
            layer_hooks, unet_hooks = _hooks_on(bench)
            hijack_ = bench.session.hijack
            entries = [e for plan in hijack_._plans.values() for e in plan.entries if e is not None]
            block_diagonal = sum(1 for e in entries if getattr(e, "block_diagonal", False))
            skipped = sum(1 for e in entries if e is hijack._SKIP)
            # What the layers' entries of this row layout hold (keys, values, bias, mask).
            held = sum(
                t.numel() * t.element_size()
                for e in entries
                if e is not hijack._SKIP
                for t in (e.keys, e.values, e.bias, e.mask)
                if t is not None
            )
            bench.finish()
            total = sum(call.calls.values())
            hooks_fired = sum(
                n for name, n in call.hooks.items() if name not in ("_before_unet", "_after_unet")
            )
            in_layer = {
                name: round(n / n_calls, 2)
                for (scope, name), n in sorted(call.names.items())
                if scope == "layer"
            }
            found[variant.name.removesuffix(" [ops]")] = {
                "torch_calls": round((total - plain_total) / n_calls, 2),
                "hooks": round(hooks_fired / n_calls, 2),
                "form": variant.form,
                "layers_block_diagonal": f"{block_diagonal} of {len(entries) - skipped}",
                "entries_mib": round(held / 2**20, 2),
                "in_layer_hooks": {
                    "torch_calls": round(call.calls["layer"] / n_calls, 2),
                    "attribute_reads": round(call.reads["layer"] / n_calls, 2),
                    "by_name": in_layer,
                },
                "registered_hooks_per_attn2": round((layer_hooks - plain_hooks[0]) / n_calls, 2),
                "per_unet_call": {
                    "torch_calls": call.calls["unet"],
                    "attribute_reads": call.reads["unet"],
                    "hooks": unet_hooks - plain_hooks[1],
                    "by_name": {
                        name: n
                        for (scope, name), n in sorted(call.names.items())
                        if scope == "unet"
                    },
                    "host_code_difference": call.calls["host"] - plain_total,
                    "conditioning_and_batching_torch_calls": sum(conditioning.calls.values()),
                },
            }
    for entry in found.values():
        entry["attn2_calls_per_unet_call"] = n_calls
        entry["plain_unet_call_torch_calls"] = plain_total
    return found


@contextmanager
def _unet_call(
    bench: StepBench, context: torch.Tensor, latent: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """The start and end of a UNet call around layers called alone: the hijack's UNet pre-hook
    reads the rows and sets its plan (for the latent ``latent``, default the step's), and gives
    the text-only context the layers then see; the plan is cleared afterwards (the post-hook's
    bookkeeping is left out)."""
    hijack = bench.session.hijack if bench.session is not None else None
    if hijack is None or not hijack.installed:
        yield context
        return
    inputs = bench.inputs
    x = inputs["x"] if latent is None else latent
    changed = hijack._before_unet(
        bench.unet, (x, inputs["timesteps"]), {"context": context, "y": inputs["y"]}
    )
    try:
        yield context if changed is None else changed[1]["context"]
    finally:
        hijack.plan = None


def _captured_inputs(bench: StepBench, attention: str) -> dict[str, torch.Tensor]:
    """The input each attn2 layer receives in a step without the extension."""
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable:
        def hook(module: Any, args: tuple) -> None:
            captured.setdefault(name, args[0].detach().clone())

        return hook

    handles = [
        layer.module.register_forward_pre_hook(capture(layer.name)) for layer in bench.layers
    ]
    try:
        bench.prepare(Variant(attention, attention))
        bench.step()
        bench.finish()
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _layer_calls(
    bench: StepBench,
    attention: str,
    calls: int,
    baseline_step_s: float,
    *,
    host_only: bool = False,
    samples_per_layer: int = 5,
) -> dict[str, Any]:
    """One attn2 module called on its own, ``calls`` times per sample, interleaved: time per
    call without the extension, outside the windows, with its hooks installed but a context
    without our block, with the base and plus blocks (the engine's own choice of form, and
    base forced to each form), with the style blocks and with masks; every attn2 layer, on the
    inputs it receives in a step. The added time summed over the layers is the extension's
    cost per UNet call measured where it happens (the hooks' dispatch included, the once per
    UNet call work not: see the hook times), with far less noise than whole steps on a shared
    machine.

    Each sample emulates a UNet call: the hijack's UNet pre-hook sets its plan for the
    context, then the layer is called with the text-only context it would receive.

    ``host_only``: each layer gets the first query token of its input only (a 1x1 latent),
    so that the arithmetic of the image term is negligible and what is added is the host's
    cost per call (hooks, Python, torch dispatch): a CPU's view of what a fast GPU pays
    per call when the host sets the pace (so the engine's "auto" form is timed as it chooses
    on a GPU: per head).

    Per call = total / calls after a final synchronisation: on a GPU that is the host's
    launch time where the host is slower than the GPU (ldm's many small ops on a fast GPU),
    else the GPU's time.
    """
    from lib_negip import hijack as hijack_module

    layers = bench.layers
    captured = _captured_inputs(bench, attention)
    latent = None
    if host_only:
        captured = {name: x[:, :1].contiguous() for name, x in captured.items()}
        latent = bench.inputs["x"][..., :1, :1]
    auto = Variant(f"{attention}+base", attention, "base")
    variants = [
        Variant(attention, attention),
        Variant(f"{attention}+base outside windows", attention, "base", outside_windows=True),
        Variant(f"{attention}+base hooks, no block", attention, "base", hooks_without_block=True),
        auto,
        Variant(f"{attention}+plus", attention, "plus"),
        Variant(f"{attention}+base style", attention, "base", layers="style"),
        Variant(f"{attention}+base mask", attention, "base", mask=True),
        Variant(f"{attention}+base block-diagonal", attention, "base", form="always"),
        Variant(f"{attention}+base per-head", attention, "base", form="never"),
    ]
    if host_only:
        # Sessions of their own: the engine's form is chosen per plan as if on a GPU.
        variants = [
            v if v.adapter is None else replace(v, name=f"{v.name} [host only]") for v in variants
        ]
    cuda = bench.device.type == "cuda"
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(samples_per_layer):
        for layer in layers:
            x = captured[layer.name]
            for variant in variants:
                bench.prepare(variant)
                if host_only and variant.form == "auto":
                    hijack_module.BLOCK_DIAGONAL = "never"  # the auto choice on a GPU: per head
                with (
                    torch.no_grad(),
                    bench.autocast(),
                    _unet_call(bench, bench.context(), latent) as context,
                ):
                    layer.module(x, context=context)  # warm (the entry of a new session)
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
    out: dict[str, Any] = {
        "calls_per_sample": calls,
        "samples": samples_per_layer,
        "query_tokens": 1 if host_only else "as in a step",
        "layers": {},
    }
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
            "added_us_per_attn2_call": round(total / len(layers), 1),
            **(
                {}
                if host_only
                else {"estimated_ratio": round(1 + total / 1e6 / baseline_step_s, 4)}
            ),
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
