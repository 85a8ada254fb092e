"""Clocks and statistics for interleaved timing.

CPU: the process's CPU time (``time.process_time``) is the primary clock, because on a shared
machine it does not count the time our single thread waited for a core (wall time is recorded
too). CUDA: CUDA events around the step, after a synchronisation, so that each sample is the
GPU time of one step alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


class Clock:
    """Times one call of ``fn``: returns (primary seconds, wall seconds)."""

    name = "cpu process time"

    def time(self, fn: Callable[[], Any]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.process_time() - cpu, time.perf_counter() - wall


class CudaClock(Clock):
    name = "cuda events"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time(self, fn: Callable[[], Any]) -> tuple[float, float]:
        torch.cuda.synchronize(self.device)
        wall = time.perf_counter()
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0, time.perf_counter() - wall


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else Clock()


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float], digits: int = 6) -> dict[str, Any]:
    """median, quartiles, min, max and count."""
    if not values:
        return {"n": 0}
    return {
        "median": round(statistics.median(values), digits),
        "q1": round(quantile(values, 0.25), digits),
        "q3": round(quantile(values, 0.75), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two interleaved series."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]
