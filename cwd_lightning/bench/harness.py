"""One benchmark run: build the experiment, time and measure the three steps, the losses and the peer,
and assemble the JSON record (``run_benchmark``)."""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cwd_lightning.bench import peer
from cwd_lightning.bench.build import build_experiment
from cwd_lightning.bench.losses import CWD_TAU, PAPER_CASES, benchmark_losses
from cwd_lightning.bench.memory import PeakMemory, module_bytes
from cwd_lightning.bench.steps import (
    Precision,
    cache_read_step,
    cached_batch,
    cached_distillation_step,
    check_steps,
    distillation_step,
    release_gradients,
    student_only_step,
    teacher_forward_step,
)
from cwd_lightning.bench.teacher_precision import teacher_precision_effect
from cwd_lightning.bench.timing import Timing, summarize, time_interleaved, time_step
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.runs import provenance

#: the issue's targets
OVERHEAD_TARGET_PERCENT = 5.0
MEMORY_TARGET_RATIO = 1.10
CACHED_TARGET_RATIO = 1.03  # a step from the teacher cache costs ≤ 1.03 × the student's own step
REFERENCE_TARGET_RATIO = 1.0
PEER_TARGET_RATIO = 1.0  # our step no slower than torchdistill's on the same pair, paired per repetition


@dataclass
class Options:
    experiment: Path
    repeats: int = 20
    warmup: int = 3
    out: Path = Path("benchmarks")
    device: str = "auto"
    precision: Precision = "32"
    skip_peer: bool = False
    skip_losses: bool = False
    loss_scale: float = 1.0
    overwrite: bool = False
    extra_args: list[str] = field(default_factory=list)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    if choice not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be auto, cpu or cuda, got {choice!r}")
    return torch.device(choice)


def measure_phase(
    make_step: Callable[[], Callable[[], Any]], options: Options, device: torch.device, memory: PeakMemory
) -> tuple[Timing, dict[str, int]]:
    """Time a step and take the peak memory over its warm-up and repeats; the memory in use when the
    phase starts is kept too (the step's own share is peak − start)."""
    gc.collect()
    start = memory.current()
    memory.reset()
    step = make_step()
    timing = time_step(step, options.repeats, options.warmup, device)
    peak = memory.peak()
    del step  # its optimiser state goes with it
    gc.collect()
    return timing, {"peak_bytes": peak, "start_bytes": start}


def images_in(batch: Any, module: DistillationModule) -> tuple[int, list[int]]:
    """Batch size and the C×H×W of one input image."""
    inputs = module.task.batch_inputs(batch)
    first = inputs[0]
    return module.task.batch_size(batch), list(first.shape)


def run_benchmark(options: Options) -> tuple[dict[str, Any], Path]:
    """Run every measurement; write ``<out>/<experiment>-<hardware>.json``; return the record and its path."""
    device = resolve_device(options.device)
    load_at_start = provenance.load_average()  # before this process adds its own load
    if options.precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --precision bf16-mixed but this GPU has no bf16 support")
    built = build_experiment(options.experiment, options.extra_args, device)
    module, batch = built.module, built.batch
    if module.teacher is None or module.distiller is None:
        raise SystemExit(
            f"error: {options.experiment} has no teacher and terms: nothing to compare (a *_cwd experiment)"
        )
    batch_size, input_size = images_in(batch, module)
    memory = PeakMemory(device)
    teacher_bytes = module_bytes(module.teacher)

    # (a) the student alone; on a GPU the teacher leaves the device meanwhile, so the peak is the student's own
    if device.type == "cuda":
        module.teacher.to("cpu")
    student_timing, student_memory = measure_phase(
        lambda: student_only_step(module, batch, options.precision), options, device, memory
    )
    module.teacher.to(device)
    release_gradients(module)
    # (b) the teacher's forward alone
    teacher_timing = time_step(
        teacher_forward_step(module, batch, options.precision), options.repeats, options.warmup, device
    )
    # (c) the full distillation step, through DistillationModule.step_losses
    distill_timing, distill_memory = measure_phase(
        lambda: distillation_step(module, batch, options.precision), options, device, memory
    )
    release_gradients(module)
    # (d) the distillation step from a teacher cache: the student's step and the loss on a batch that carries
    # the teacher's tensors; and what a loader worker does per batch to read them (off the step)
    with tempfile.TemporaryDirectory(prefix="cwd_bench_cache_") as folder:
        with_entry, cache = cached_batch(module, batch, Path(folder) / "cache")
        cached_timing = time_step(
            cached_distillation_step(module, with_entry, options.precision), options.repeats, options.warmup, device
        )
        read_timing = time_step(cache_read_step(cache, batch_size), options.repeats, options.warmup, device)
    release_gradients(module)
    precision_effect = teacher_precision_effect(module, batch, options.repeats, options.warmup, device)
    checks = {
        name: time_step(step, options.repeats, options.warmup, device).as_dict()
        for name, step in check_steps(module, batch, options.precision).items()
    }
    release_gradients(module)
    per_step = checks["loss_per_step"]["median_ms"] + checks["gradients_per_step"]["median_ms"]
    checks["per_step_percent_of_distillation"] = 100.0 * per_step / distill_timing.median_ms

    overhead_ms = distill_timing.median_ms - student_timing.median_ms - teacher_timing.median_ms
    overhead_percent = 100.0 * overhead_ms / distill_timing.median_ms
    # the same, paired: (a), (b), (c) timed in turn in each repetition, the overhead taken per repetition
    module.teacher.to(device)
    paired = time_interleaved(
        {
            "student_only": student_only_step(module, batch, options.precision),
            "teacher_forward": teacher_forward_step(module, batch, options.precision),
            "distillation": distillation_step(module, batch, options.precision),
        },
        options.repeats,
        options.warmup,
        device,
    )
    release_gradients(module)
    per_repetition = [
        100.0 * (c - a - b) / c
        for a, b, c in zip(paired["student_only"], paired["teacher_forward"], paired["distillation"], strict=True)
    ]
    paired_overhead = summarize(per_repetition)
    # on a GPU the teacher left the device during (a); on the CPU its weights were resident in both phases
    teacher_outside = teacher_bytes if device.type == "cuda" else 0
    memory_ratio = distill_memory["peak_bytes"] / (student_memory["peak_bytes"] + teacher_outside)

    if options.skip_losses:
        losses: dict[str, Any] = {"skipped": "--skip-losses"}
        reference: list[dict[str, Any]] = []
    else:
        cases = tuple(case.scaled(options.loss_scale) for case in PAPER_CASES)
        rows, reference = benchmark_losses(cases, options.repeats, options.warmup, device)
        losses = {
            "what": "ms per forward + backward on random maps; own modules built from the shapes; random labels",
            "scale": options.loss_scale,
            "cases": [{"name": case.name, "kind": case.kind, "shape": list(case.shape)} for case in cases],
            "rows": rows,
        }
    if options.skip_peer:
        peer_result: dict[str, Any] = {"skipped": "--skip-peer"}
    else:  # our step timed in turn with the peer's in every repetition
        ours = distillation_step(module, batch, options.precision)
        peer_result = peer.compare(module, batch, options.repeats, options.warmup, options.precision, ours)

    description = provenance.hardware(device)
    record = {
        "experiment": options.experiment.stem,
        "config": str(options.experiment),
        "extra_args": options.extra_args,
        "hardware": description,
        "device": device.type,
        "versions": provenance.versions(),
        "git": dict(zip(("commit", "dirty"), provenance.git_state(), strict=True)),
        "precision": options.precision,
        "batch_size": batch_size,
        "input_size": input_size,
        "repeats": options.repeats,
        "warmup": options.warmup,
        "teacher_weights": built.teacher_weights,
        "load_average": {"start": load_at_start, "end": provenance.load_average(), "cores": provenance.cpu_cores()},
        "steps": {
            "student_only": student_timing.as_dict(images=batch_size),
            "teacher_forward": teacher_timing.as_dict(images=batch_size),
            "distillation": distill_timing.as_dict(images=batch_size),
            "distillation_from_cache": cached_timing.as_dict(images=batch_size),
            "cache_read_in_loader_worker": read_timing.as_dict(images=batch_size),
        },
        "cached_to_student_only": cached_timing.median_ms / student_timing.median_ms,
        "teacher_precision": precision_effect,
        "overhead": {
            "what": "distillation − student_only − teacher_forward (medians)",
            "ms": overhead_ms,
            "percent_of_distillation": overhead_percent,
            "paired_percent": {key.removesuffix("_ms"): value for key, value in paired_overhead.as_dict().items()},
            "paired_what": "(a), (b), (c) timed in turn in each repetition; median (IQR) over repetitions of "
            "100·(c − a − b)/c: a slow spell of the machine hits the three alike",
        },
        "memory": {
            "method": memory.method,
            "student_only": student_memory,
            "distillation": distill_memory,
            "teacher_weight_bytes": teacher_bytes,
            "ratio": memory_ratio,
            "what": "distillation peak / (student-only peak + teacher weights not resident during it); "
            + memory_note(device),
        },
        "non_finite_checks": {
            "what": "ms per check alone; the loss and gradient checks run every step (not under DDP), the "
            "weights/statistics check before each validation and checkpoint",
            **checks,
        },
        "losses": losses,
        "cwd_tau": CWD_TAU,
        "cwd_vs_reference": reference,
        "peer": peer_result,
    }
    record["targets"] = targets(record)
    suffix = "" if options.precision == "32" else f"-{options.precision}"
    if options.skip_losses or options.skip_peer or options.loss_scale != 1.0:
        suffix += "-partial"  # never mistaken for (or written over) a full record
    path = options.out / f"{record['experiment']}-{provenance.slug(description)}{suffix}.json"
    if path.exists() and not options.overwrite:  # a committed record is replaced only when asked
        path = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record, path


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "the teacher was moved off the GPU during the student-only phase"
    return (
        "on the CPU both peaks are of the whole process and both include the teacher's weights (built before "
        "either phase), so nothing is added: the ratio is distillation peak / student-only peak"
    )


def targets(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance checks as booleans (None where not measured)."""
    compared = [row for row in record["cwd_vs_reference"] if "ratio" in row]
    per_case = {row["case"]: row["ratio"] <= REFERENCE_TARGET_RATIO for row in compared}
    return {
        "overhead_le_5_percent": record["overhead"]["percent_of_distillation"] <= OVERHEAD_TARGET_PERCENT,
        "paired_overhead_le_5_percent": record["overhead"]["paired_percent"]["median"] <= OVERHEAD_TARGET_PERCENT,
        "cwd_le_reference": per_case,
        "cwd_le_reference_all": all(per_case.values()) if per_case else None,
        "memory_ratio_le_1_10": record["memory"]["ratio"] <= MEMORY_TARGET_RATIO,
        "cached_le_1_03_student_only": record["cached_to_student_only"] <= CACHED_TARGET_RATIO,
        "torchdistill_loss_equal": record["peer"]["loss_check"]["equal"] if "loss_check" in record["peer"] else None,
        "paired_ours_to_torchdistill_le_1_00": (
            record["peer"]["ratio_ours_to_torchdistill"] <= PEER_TARGET_RATIO
            if record["peer"].get("ratio_ours_to_torchdistill")
            else None
        ),
    }
