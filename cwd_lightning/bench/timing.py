"""Repeated timing of one step: median and spread, in milliseconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Summary of ``repeats`` timed calls after warm-up (ms); the median is the figure we compare, the
    inter-quartile range and min/max say how far it can be trusted."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def as_dict(self, images: int | None = None) -> dict[str, Any]:
        out = asdict(self)
        if images is not None:
            out["images_per_s"] = images / (self.median_ms / 1000.0)
        return out


def summarize(samples_ms: list[float]) -> Timing:
    """Median, IQR (inclusive quartiles, so 2 or 3 samples still give one), min and max."""
    if not samples_ms:
        raise ValueError("no timed samples: repeats must be >= 1")
    if len(samples_ms) >= 2:
        first, _, third = statistics.quantiles(samples_ms, n=4, method="inclusive")
    else:
        first = third = samples_ms[0]
    return Timing(statistics.median(samples_ms), third - first, min(samples_ms), max(samples_ms), len(samples_ms))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for queued device work: CUDA kernels run asynchronously, so a step is only over when the
    device says so; on the CPU every op has finished when it returns."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_step(step: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> Timing:
    """Call ``step`` ``warmup`` times untimed (allocator, autotuning, lazy init), then time ``repeats`` calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    synchronize = synchronizer(device)
    for _ in range(warmup):
        step()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        samples.append((time.perf_counter() - start) * 1000.0)
    return summarize(samples)


def time_interleaved(steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
                     alternate: bool = False) -> dict:  # fmt: skip
    """Each repetition times every step once, in turn, so that a slow spell of the machine (another
    process, frequency scaling) hits all of them alike: per-repetition differences between the steps are
    then paired, and their median is far steadier than a difference of medians taken in separate blocks.
    ``alternate``: every other repetition runs them in reverse order, so neither always runs first (warm
    caches, the previous step's leftovers)."""
    synchronize = synchronizer(device)
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for repetition in range(repeats):
        order = list(steps.items())
        for name, step in reversed(order) if alternate and repetition % 2 else order:
            start = time.perf_counter()
            step()
            synchronize()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return samples
