"""Benchmark harness (``python -m cwd_lightning.bench experiments/<EXP>.yaml``): step times, the
distillation overhead, peak memory, a micro-benchmark of every distillation loss and a side-by-side
torchdistill step, written to ``benchmarks/<EXP>-<hardware>.json``."""
