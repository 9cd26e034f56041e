"""A table's markdown and W&B forms, from its result files."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from cwd_lightning.analysis.tables import duration, markdown_table, mean_std
from cwd_lightning.sweeps.spec import Table


def collect(table: Table, results: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in table.rows:
        files = sorted((results / table.name / row.name).glob("seed*.json"))
        found[row.name] = [json.loads(p.read_text()) for p in files if int(p.stem[4:]) in table.seeds]
    return found


def table_rows(table: Table, results: Path) -> list[dict[str, Any]]:
    """One dict per row: label, n, mean, std, Δ vs baseline, per-seed values, mean wall and CPU time."""
    found = collect(table, results)
    baseline = [r["best"] for r in found[table.baseline]]
    base_mean = mean_std(baseline)[0] if baseline else None
    rows = []
    for row in table.rows:
        done = found[row.name]
        values = [r["best"] for r in done]
        mean, std = mean_std(values) if values else (None, None)
        cpu = [r["cpu_s"] for r in done if "cpu_s" in r]
        per_step = [r["train_s"] / r["steps"] for r in done if r.get("train_s") and r.get("steps")]
        rows.append({
            "row": row.name, "label": row.label, "n": len(values), "mean": mean, "std": std,
            "delta": mean - base_mean if values and base_mean is not None and row.name != table.baseline else None,
            "values": values, "wall_s": statistics.fmean(r["wall_s"] for r in done) if done else None,
            "cpu_s": statistics.fmean(cpu) if cpu else None,
            "steps": statistics.fmean(r["steps"] for r in done) if done else None,
            "step_s": statistics.fmean(per_step) if per_step else None,
        })  # fmt: skip
    return rows


def write_markdown(table: Table, results: Path) -> Path:
    found = collect(table, results)
    everything = [r for rs in found.values() for r in rs]
    metric = everything[0]["metric"] if everything else "best metric"
    teachers = sorted({str(r["teacher_fingerprint"])[:12] for r in everything if r["teacher_fingerprint"]})
    side_by_side = sorted({str(r.get("runs_side_by_side", 1)) for r in everything})
    lines = [f"# {table.title}", ""]
    if table.notes:
        lines += [table.notes.strip(), ""]
    lines += [
        f"Best {metric} per run (the best of its validations), mean ± sample std over seeds {table.seeds}; "
        f"Δ = mean − mean of `{table.baseline}`. Written by `python -m cwd_lightning.sweeps` from "
        f"`results/{table.name}/*/seed*.json` ({len(everything)} of {len(table.rows) * len(table.seeds)} runs done).",
        "",
        f"- arguments shared by every row: `{' '.join(table.shared_args) or '(none)'}`",
        f"- commit(s): {', '.join(sorted({r['commit'] for r in everything})) or '–'}"
        + (" (a draft: runs from uncommitted code are marked +dirty)" if table.draft else ""),
        f"- hardware: {'; '.join(sorted({r['hardware'] for r in everything})) or '–'}",
        f"- runs side by side (each with cores/runs threads): {', '.join(side_by_side) or '–'}; "
        "wall times include that sharing, CPU times do not depend on it",
        f"- teacher fingerprint(s): {', '.join(teachers) or '–'}",
        "",
    ]  # fmt: skip
    cached = {r["row"]: (r.get("resolved_config") or {}).get("model", {}).get("teacher_cache") for r in everything}
    cached = {row: options for row, options in cached.items() if options}
    if cached:
        settings = sorted({f"K = {o['views']}, {o['dtype']}, view seed {o.get('seed', 0)}" for o in cached.values()})
        exact = all(o["views"] == "epochs" and o["dtype"] == "float32" for o in cached.values())
        protocol = (
            "one view per epoch in float32: the targets are the live teacher's on the same augmented views, bit for "
            "bit, so this is the live protocol with another augmentation draw"
            if exact
            else "K views replayed over the epochs: less augmentation diversity than a live teacher"
        )
        per_seed = any(o.get("seed") == "run" for o in cached.values())
        shared = ("each seed its own cache (views drawn from the run's seed), shared by the rows that distil the same "
                  "teacher tensors" if per_seed else "filled once and shared by their seeds and by the rows that "
                  "distil the same teacher tensors")  # fmt: skip
        rows_read = ", ".join(f"`{row}`" for row in cached)
        lines.insert(-1, f"- teacher cache: rows {rows_read} read the teacher's tensors from a cache "
                         f"({'; '.join(settings)}), {shared}; the other rows read none: {protocol}")  # fmt: skip
    budget = table.budget
    if budget is not None:
        lines[-1:-1] = [f"- equal compute: every row trains for {budget.seconds:g} s of its training loop "
                        f"({budget.clock} clock, measured by the run), its schedules over that budget; "
                        "the steps it reached and its training seconds per step are columns"]  # fmt: skip
    rows = []
    for row in table_rows(table, results):
        if not row["n"]:
            rows.append([row["label"], 0, *[None] * (7 if budget else 5)])
            continue
        delta = f"{row['delta']:+.4f}" if row["delta"] is not None else ""
        seeds = ", ".join(f"{v:.4f}" for v in row["values"])
        compute = [f"{row['steps']:.0f}", f"{row['step_s']:.3f} s" if row["step_s"] else None] if budget else []
        rows.append([row["label"], row["n"], f"{row['mean']:.4f} ± {row['std']:.4f}", delta, seeds, *compute,
                     duration(row["wall_s"]), duration(row["cpu_s"])])  # fmt: skip
    columns = ["method", "runs", f"{metric} mean ± std", "Δ vs baseline", "per seed",
               *(["steps reached", "training time / step"] if budget else []), "wall time / run",
               "CPU time / run"]  # fmt: skip
    lines += markdown_table(columns, rows)
    path = results / f"{table.name}_table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def log_wandb_table(table: Table, results: Path, runs: Path) -> None:
    """The same rows as a W&B table, in an offline run of its own (``runs/tables/<table>/wandb``)."""
    import wandb

    runs.mkdir(parents=True, exist_ok=True)
    columns = ["method", "runs", "mean", "std", "delta", "wall_s", "cpu_s"]
    data = [[r["label"], r["n"], r["mean"], r["std"], r["delta"], r["wall_s"], r["cpu_s"]]
            for r in table_rows(table, results)]  # fmt: skip
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cwd_lightning"), name=f"table_{table.name}",
                     job_type="table", group=table.name, dir=str(runs), mode=os.environ.get("WANDB_MODE", "offline"),
                     reinit="finish_previous")  # fmt: skip
    run.log({f"tables/{table.name}": wandb.Table(columns=columns, data=data)})
    run.finish()
