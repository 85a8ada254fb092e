"""Where a whole step's added time goes: ``python -m bench.anatomy [--family sdxl] [--full]``.

The per-layer tables of ``bench.run`` time one ``attn2`` module called many times in a row; in
a whole step each layer's hooks and kernels run once between the UNet's other work, and cost
more there (caches and branch predictors cold, the allocator's state). This script times whole
steps (paired, interleaved rounds, the process's CPU time; tiny models by default) with the
engine taken apart:

- ``none``: no extension;
- ``image prompts``: the engine as it runs (the form ``BLOCK_DIAGONAL = "auto"`` chooses);
- ``per head``: the same, every layer forced to the per-head form;
- ``as module hooks``: the same, its two calls per layer registered as module hooks on
  ``to_q`` and ``to_out[0]`` instead of set as their instance ``forward`` (what the engine did
  until the instance forwards replaced them);
- ``term computed, not added``: the image term computed as usual, the hidden states left as
  they are (the step's result is the plain one);
- ``hooks only``: every hook runs, the UNet's context is split, but no term is computed;
- ``hooks, no block``: the hooks installed, the context without our block.

So that (image prompts - term computed, not added) is the add, (term computed - hooks only) the
term's torch calls and kernels, (hooks only - none) the hooks and the once-per-UNet-call work.
The variants that change the engine's behaviour patch ``_LayerHooks.add_image_term`` for their
own steps only (a measurement, never a code path of the extension).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.run import MALLOC_CACHE_ENV
from bench.step import StepBench, Variant


def _hooks_only(original: Callable) -> Callable:
    def add_image_term(self: Any, module: Any, args: tuple) -> Any:
        if self.q is None:
            return None
        self.q = None
        self.added_serial = self.hijack.serial
        self.hijack.added += 1
        return None

    return add_image_term


def _not_added(original: Callable) -> Callable:
    def add_image_term(self: Any, module: Any, args: tuple) -> Any:
        original(self, module, args)
        return None

    return add_image_term


#: The engine as it runs, its two per-layer calls registered as module hooks instead of set as
#: the instance forwards of ``to_q`` and ``to_out[0]`` (``hijack.INSTANCE_FORWARDS`` False).
MODULE_HOOKS = "as module hooks"

VARIANTS: dict[str, tuple[Variant, Callable | None]] = {
    "none": (Variant("sdpa", "sdpa"), None),
    "image prompts": (Variant("sdpa+base", "sdpa", "base"), None),
    "per head": (Variant("sdpa+base per-head", "sdpa", "base", form="never"), None),
    MODULE_HOOKS: (Variant("sdpa+base module hooks", "sdpa", "base"), None),
    "term computed, not added": (Variant("sdpa+base not added", "sdpa", "base"), _not_added),
    "hooks only": (Variant("sdpa+base hooks only", "sdpa", "base"), _hooks_only),
    "hooks, no block": (
        Variant("sdpa+base hooks, no block", "sdpa", "base", hooks_without_block=True),
        None,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.anatomy", description=__doc__)
    parser.add_argument("--family", default="sdxl", choices=("sd15", "sdxl"))
    parser.add_argument("--full", action="store_true", help="full-size UNet (minutes)")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per sample")
    args = parser.parse_args()
    if any(os.environ.get(name) != value for name, value in MALLOC_CACHE_ENV.items()):
        print("(run as bench.run runs its children: " + " ".join(
            f"{name}={value}" for name, value in MALLOC_CACHE_ENV.items()
        ) + ")")  # fmt: skip
    torch.set_num_threads(1)
    from lib_negip import hijack

    original = hijack._LayerHooks.add_image_term
    bench = StepBench(
        args.family,
        tiny=not args.full,
        latent=args.latent,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for _ in range(args.rounds):
            names = list(VARIANTS)
            random.shuffle(names)
            for name in names:
                variant, patch = VARIANTS[name]
                hijack._LayerHooks.add_image_term = original if patch is None else patch(original)
                hijack.INSTANCE_FORWARDS = name != MODULE_HOOKS  # read where hooks go on
                bench.prepare(variant)
                bench.step()
                started = time.process_time()
                for _ in range(args.steps):
                    bench.step()
                samples[name].append((time.process_time() - started) / args.steps * 1e3)
                bench.finish()
    finally:
        hijack._LayerHooks.add_image_term = original
        hijack.INSTANCE_FORWARDS = True
        bench.close()
    layers = len(bench.layers)
    base = statistics.median(samples["none"])
    print(
        f"{args.family} ({'full size' if args.full else 'tiny'}, {layers} attn2, latent "
        f"{args.latent}, batch 2, CPU, 1 thread), {args.rounds} interleaved rounds:\n"
    )
    print(
        "| variant | step ms, median | / none | added us per attn2 call "
        "| / none, paired: median [IQR] of rounds |"
    )
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        median = statistics.median(values)
        added = (median - base) / layers * 1e3
        paired = _paired(values, samples["none"])
        print(f"| {name} | {median:.2f} | {median / base:.4f} | {added:+.1f} | {paired} |")
    print(
        f"\nimage prompts / {MODULE_HOOKS}, paired: "
        + _paired(samples["image prompts"], samples[MODULE_HOOKS])
    )


def _paired(values: list[float], baseline: list[float]) -> str:
    """Median and quartiles of the per-round ratios (the two samples of a round are seconds
    apart, so the machine's slower drifts cancel)."""
    ratios = [value / base for value, base in zip(values, baseline, strict=True)]
    if len(ratios) < 2:
        return f"{ratios[0]:.4f}"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.4f} [{low:.4f}-{high:.4f}]"


if __name__ == "__main__":
    main()
