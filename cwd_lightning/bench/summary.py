"""The few lines a benchmark prints: the figures a reader compares, and whether each target is met."""

from __future__ import annotations

from typing import Any


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _step(label: str, step: dict[str, Any]) -> str:
    return (
        f"  {label:<16} {step['median_ms']:9.2f} ms  (IQR {step['iqr_ms']:.2f}, min {step['min_ms']:.2f}, "
        f"max {step['max_ms']:.2f})  {step['images_per_s']:8.1f} img/s"
    )


def teacher_precision_lines(effect: dict[str, Any]) -> list[str]:
    full = effect["32"].get("forward_ms")
    if not full:
        return [f"  teacher precision: fp32 forward not measured ({effect['32'].get('skipped', 'no figure')})"]
    lines = []
    for precision in ("bf16", "16"):
        low = effect[precision]
        if "skipped" in low:
            lines.append(f"  teacher in {precision}: skipped ({low['skipped']})")
            continue
        moved = ", ".join(f"{name} CWD {tensor['cwd_to_fp32']:.2e}" for name, tensor in low["tensors"].items())
        lines.append(f"  teacher in {precision}: forward {low['forward_ms']:.2f} ms ({low['forward_ms'] / full:.2f} × "
                     f"fp32); its targets vs fp32 at τ = {effect['tau']:g}: {moved or 'no 4-D tensor'}")  # fmt: skip
    return lines


def summary_lines(record: dict[str, Any], path: str) -> list[str]:
    steps, memory, targets, overhead = record["steps"], record["memory"], record["targets"], record["overhead"]
    mib = 2**20
    lines = [
        f"{record['experiment']} on {record['hardware']} ({record['device']}, precision {record['precision']}), "
        f"batch {record['batch_size']} × {'×'.join(map(str, record['input_size']))}, "
        f"{record['repeats']} repeats after {record['warmup']} warm-up; teacher weights: {record['teacher_weights']}",
        _step("student only", steps["student_only"]),
        _step("teacher forward", steps["teacher_forward"]),
        _step("distillation", steps["distillation"]),
        _step("from the cache", steps["distillation_from_cache"]),
        f"  cached / student-only step {record['cached_to_student_only']:.3f} "
        f"(target ≤ 1.03: {_yes(targets['cached_le_1_03_student_only'])}); the cache read of a batch, in the "
        f"loader's workers: {steps['cache_read_in_loader_worker']['median_ms']:.2f} ms",
        *teacher_precision_lines(record["teacher_precision"]),
        f"  overhead         {overhead['ms']:9.2f} ms = {overhead['percent_of_distillation']:.1f} % "
        f"of the distillation step (target ≤ 5 %: {_yes(targets['overhead_le_5_percent'])}); paired per "
        f"repetition: median {overhead['paired_percent']['median']:.1f} % (IQR "
        f"{overhead['paired_percent']['iqr']:.1f}; ≤ 5 %: {_yes(targets['paired_overhead_le_5_percent'])})",
        f"  peak memory      student {memory['student_only']['peak_bytes'] / mib:.0f} MiB, distillation "
        f"{memory['distillation']['peak_bytes'] / mib:.0f} MiB, teacher weights "
        f"{memory['teacher_weight_bytes'] / mib:.0f} MiB: ratio {memory['ratio']:.3f} "
        f"(target ≤ 1.10: {_yes(targets['memory_ratio_le_1_10'])})",
    ]
    checks = record["non_finite_checks"]
    lines.append(
        f"  non-finite checks loss {checks['loss_per_step']['median_ms']:.3f} ms + gradients "
        f"{checks['gradients_per_step']['median_ms']:.3f} ms per step "
        f"({checks['per_step_percent_of_distillation']:.2f} % of the step); weights and statistics "
        f"{checks['weights_and_statistics_per_validation']['median_ms']:.3f} ms per validation/checkpoint"
    )
    losses = record["losses"]
    if "rows" in losses:
        cases = [case["name"] for case in losses["cases"]]
        lines.append(f"  {'loss fwd+bwd (ms)':<31}" + " ".join(f"{case:>15}" for case in cases))
        for name in dict.fromkeys(row["loss"] for row in losses["rows"]):
            cells = {row["case"]: row for row in losses["rows"] if row["loss"] == name}
            text = [f"{cells[c]['median_ms']:15.2f}" if "median_ms" in cells[c] else f"{'skipped':>15}" for c in cases]
            lines.append(f"    {name:<29}" + " ".join(text))
    compared = [row for row in record["cwd_vs_reference"] if "ratio" in row]
    if compared:
        ratios = ", ".join(f"{row['case']} {row['ratio']:.2f}" for row in compared)
        lines.append(f"  CWD / reference  {ratios} (target ≤ 1: {_yes(targets['cwd_le_reference_all'])})")
    peer = record["peer"]
    if "step" in peer:
        check = peer["loss_check"]
        lines.append(
            f"  {peer['framework']}: {peer['step']['median_ms']:.2f} ms per step (ours "
            f"{peer['ours_step']['median_ms']:.2f} in the same repetitions), ours / theirs paired "
            f"{peer['ratio_ours_to_torchdistill']:.3f} (IQR {_number(peer['ratio_iqr'])}; ≤ 1.00: "
            f"{_yes(record['targets']['paired_ours_to_torchdistill_le_1_00'])}); "
            f"loss values equal: {_yes(check['equal'])} "
            f"(total {check['ours_total']:.6f} vs {check['torchdistill_total']:.6f})"
        )
    else:
        lines.append(f"  torchdistill     skipped: {peer['skipped']}")
    load = record["load_average"]
    if load["start"] is not None and load["start"] > 0.5 * load["cores"]:
        lines.append(
            f"  note: 1-minute load average {load['start']:.2f} on {load['cores']} cores when this run started: other "
            "processes may have competed for the CPU and inflated these times; rerun on an idle machine"
        )
    lines.append(f"  written to {path}")
    return lines
