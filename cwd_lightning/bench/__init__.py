"""Benchmark harness (``python -m cwd_lightning.bench experiments/<EXP>.yaml``): step times, the
distillation overhead, peak memory, a micro-benchmark of every distillation loss and a side-by-side
torchdistill step, written to ``benchmarks/<EXP>-<hardware>.json``."""

from cwd_lightning.bench.harness import Options, run_benchmark
from cwd_lightning.bench.losses import benchmark_losses

__all__ = ["Options", "benchmark_losses", "run_benchmark"]
