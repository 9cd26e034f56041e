"""Comparison tables from many runs: ``python -m cwd_lightning.sweep experiments/tables/shapes.yaml``.

A table file names rows (an experiment YAML plus optional CLI arguments), seeds and the arguments every
row shares (e.g. a shorter schedule). Each (row, seed) is one ``fit`` in its own process, under
``runs/tables/<table>/<row>_seed<k>/``; when it finishes, a small result file
``results/<table>/<row>/seed<k>.json`` is written (best and last validation metric, wall time,
hardware, commit, teacher fingerprint, the digest of the resolved config). Runs whose result exists
for the same resolved config are skipped, so an interrupted sweep resumes, and a table can be filled
on several machines by committing the result files. The markdown table
``results/<table>_table.md`` (mean ± std over seeds, Δ vs the baseline row) and a W&B table are
written from the result files after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cwd_lightning.analysis.runs import load_run


@dataclass
class Row:
    name: str
    label: str
    config: str
    args: list[str] = field(default_factory=list)
    reuse: str | None = None  # "<table>/<row>": take that row's results when they have the same digest


@dataclass
class Table:
    name: str
    title: str
    seeds: list[int]
    rows: list[Row]
    args: list[str] = field(default_factory=list)
    baseline: str = "baseline"
    notes: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Table:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"table file {path} not found (tables live in experiments/tables/)")
        spec = yaml.safe_load(path.read_text()) or {}
        missing = [key for key in ("name", "seeds", "rows") if key not in spec]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        rows = []
        for index, row in enumerate(spec["rows"]):
            unknown = set(row) - {"name", "label", "config", "args", "reuse"}
            if unknown or "name" not in row or "config" not in row:
                raise ValueError(
                    f"{path}: row {index} needs name and config (and may set label, args, reuse), got {row}"
                )
            args = [str(a) for a in row.get("args", [])]
            rows.append(Row(row["name"], row.get("label", row["name"]), row["config"], args, row.get("reuse")))
        names = [row.name for row in rows]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: row names must be unique, got {names}")
        shared_args = [str(a) for a in spec.get("args", [])]
        table = cls(spec["name"], spec.get("title", spec["name"]), list(spec["seeds"]), rows, shared_args,
                    spec.get("baseline", "baseline"), spec.get("notes", ""))  # fmt: skip
        if table.baseline not in names:
            raise ValueError(f"{path}: baseline row {table.baseline!r} is not among the rows {names}")
        return table


# ---------------------------------------------------------------- facts recorded with every result
def hardware() -> str:
    """CPU model and cores (or the GPU), as a short string for the table."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores (CPU)"


def commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cwd_lightning", *args]


def resolved_config(row: Row, table: Table, experiments: Path) -> str:
    """The row's resolved config (as ``--print_config`` gives it, term overrides applied, in this process),
    the seed and run name left out: what the result's digest covers, so a changed YAML, default or
    argument re-runs the row."""
    from cwd_lightning.cli import DistillCLI

    args = ["fit", "--config", str(experiments / f"{row.config}.yaml"), *table.args, *row.args, "--print_config"]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            DistillCLI(args=args)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise RuntimeError(
                    f"table {table.name!r}, row {row.name!r}: the config does not resolve:\n{errors.getvalue()[-2000:]}"
                ) from None
    skipped = ("seed_everything:", "experiment:")
    return "\n".join(line for line in printed.getvalue().splitlines() if not line.startswith(skipped))


def _environment(threads: int | None = None) -> dict[str, str]:
    environment = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
                   "PYTHONUNBUFFERED": "1"}  # fmt: skip
    if threads is not None:  # several runs side by side: each gets its share of the cores
        environment["OMP_NUM_THREADS"] = str(threads)
    return environment


# ---------------------------------------------------------------- running
def run_row(
    row: Row, seed: int, table: Table, digest: str, experiments: Path, runs: Path, results: Path, jobs: int = 1
) -> dict:
    run_dir = runs / f"{row.name}_seed{seed}"
    if run_dir.exists():  # an interrupted run: keep it aside, start this one clean
        aside = run_dir.with_name(f"{run_dir.name}.interrupted")
        number = 1
        while aside.exists():
            number += 1
            aside = run_dir.with_name(f"{run_dir.name}.interrupted{number}")
        run_dir.rename(aside)
    command = _cli("fit", "--config", str(experiments / f"{row.config}.yaml"), "--experiment", run_dir.name,
                   "--runs_root", str(runs), "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
                   *table.args, *row.args)  # fmt: skip
    print(f"[{table.name}] {row.name} seed {seed}: {' '.join(command[2:])}", flush=True)
    runs.mkdir(parents=True, exist_ok=True)
    code_version = commit()  # the code the run starts with
    start = time.perf_counter()
    with open(runs / f"{run_dir.name}.log", "w") as log:
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_environment(threads)).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(
            f"[{table.name}] {row.name} seed {seed} failed (exit {code}); see {runs / f'{run_dir.name}.log'}"
        )
    run = load_run(run_dir)
    checkpoint = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=True)
    best_checkpoint = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ModelCheckpoint"))
    metric = best_checkpoint["monitor"]
    result = {
        "table": table.name,
        "row": row.name,
        "label": row.label,
        "seed": seed,
        "metric": metric,
        "best": float(best_checkpoint["best_model_score"]),
        "last": run.final(metric),
        "steps": int(checkpoint.get("global_step", 0)),
        "wall_s": round(wall, 1),
        "hardware": hardware(),
        "runs_side_by_side": jobs,
        "torch": torch.__version__,
        "commit": code_version,
        "teacher_fingerprint": checkpoint.get("hyper_parameters", {}).get("teacher_fingerprint"),
        "config": row.config,
        "args": [*table.args, *row.args],
        "config_digest": digest,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_result(results / table.name / row.name / f"seed{seed}.json", result)
    return result


def _write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)  # a result file is whole or absent


def existing_result(path: Path, digest: str, set_aside: bool = True) -> dict | None:
    """The result at ``path`` if it was made with the same resolved config; an outdated one is moved to
    ``stale/`` (kept, not overwritten) so the run is repeated, unless ``set_aside`` is False."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("config_digest") == digest:
        return result
    if not set_aside:
        return None
    stale = (
        path.parent / "stale" / f"{path.stem}.{result.get('finished', 'old').replace(' ', '_').replace(':', '')}.json"
    )
    stale.parent.mkdir(exist_ok=True)
    path.rename(stale)
    print(f"{path}: made with another config; kept as {stale}, running again", flush=True)
    return None


def run_table(
    table: Table, experiments: Path, runs_root: Path, results: Path, dry_run: bool = False, jobs: int = 1
) -> Path:
    """Run every (row, seed) without a current result, ``jobs`` at a time, seed-major (an interrupted
    sweep has every row at its first seeds); the markdown table is rewritten after each run."""
    runs = runs_root / "tables" / table.name
    digests = {row.name: hashlib.sha256(resolved_config(row, table, experiments).encode()).hexdigest()[:16]
               for row in table.rows}  # fmt: skip
    pending = []
    for seed in table.seeds:
        for row in table.rows:
            digest = digests[row.name]
            path = results / table.name / row.name / f"seed{seed}.json"
            if existing_result(path, digest) is not None:
                print(f"[{table.name}] {row.name} seed {seed}: done ({path})", flush=True)
            elif row.reuse and (shared := existing_result(results / row.reuse / f"seed{seed}.json", digest, False)):
                _write_result(path, {**shared, "table": table.name, "row": row.name, "label": row.label,
                                     "reused_from": row.reuse})  # fmt: skip
                print(f"[{table.name}] {row.name} seed {seed}: the same run as {row.reuse}", flush=True)
            else:
                print(f"[{table.name}] {row.name} seed {seed}: to run", flush=True)
                pending.append((row, seed, digest))
    if not dry_run and pending:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run_row, row, seed, table, digest, experiments, runs, results, jobs)
                       for row, seed, digest in pending]  # fmt: skip
            for future in as_completed(futures):
                future.result()
                write_markdown(table, results)
    report = write_markdown(table, results)
    if not dry_run:
        log_wandb_table(table, results, runs)
    return report


# ---------------------------------------------------------------- the table
def collect(table: Table, results: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in table.rows:
        files = sorted((results / table.name / row.name).glob("seed*.json"))
        found[row.name] = [json.loads(p.read_text()) for p in files if int(p.stem[4:]) in table.seeds]
    return found


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(table: Table, results: Path) -> list[dict[str, Any]]:
    """One dict per row: label, n, mean, std, Δ vs baseline, per-seed values, mean wall time."""
    found = collect(table, results)
    baseline = [r["best"] for r in found[table.baseline]]
    base_mean = _stats(baseline)[0] if baseline else None
    rows = []
    for row in table.rows:
        values = [r["best"] for r in found[row.name]]
        mean, std = _stats(values) if values else (None, None)
        rows.append({
            "row": row.name, "label": row.label, "n": len(values), "mean": mean, "std": std,
            "delta": mean - base_mean if values and base_mean is not None and row.name != table.baseline else None,
            "values": values, "wall_s": statistics.fmean(r["wall_s"] for r in found[row.name]) if values else None,
        })  # fmt: skip
    return rows


def write_markdown(table: Table, results: Path) -> Path:
    found = collect(table, results)
    everything = [r for rs in found.values() for r in rs]
    rows = table_rows(table, results)
    metric = everything[0]["metric"] if everything else "val/mIoU"
    done, total = len(everything), len(table.rows) * len(table.seeds)
    teachers = {str(r["teacher_fingerprint"])[:12] for r in everything if r["teacher_fingerprint"]}
    lines = [f"# {table.title}", ""]
    if table.notes:
        lines += [table.notes.strip(), ""]
    lines += [
        f"Best {metric} per run (the best of its validations), mean ± sample std over seeds {table.seeds}; "
        f"Δ = mean − mean of `{table.baseline}`. Written by `python -m cwd_lightning.sweep` from "
        f"`results/{table.name}/*/seed*.json` ({done} of {total} runs done).",
        "",
        f"- arguments shared by every row: `{' '.join(table.args) or '(none)'}`",
        f"- commit(s): {', '.join(sorted({r['commit'] for r in everything})) or '–'}",
        f"- hardware: {'; '.join(sorted({r['hardware'] for r in everything})) or '–'}",
        f"- runs side by side (each on cores/runs threads; wall times include the sharing): "
        f"{', '.join(str(j) for j in sorted({r.get('runs_side_by_side', 1) for r in everything})) or '–'}",
        f"- teacher fingerprint(s): {', '.join(sorted(teachers)) or '–'}",
        "",
        f"| method | runs | {metric} mean ± std | Δ vs baseline | per seed | wall time / run |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        if not row["n"]:
            lines.append(f"| {row['label']} | 0 | – | – | – | – |")
            continue
        delta = f"{row['delta']:+.4f}" if row["delta"] is not None else ""
        seeds = ", ".join(f"{v:.4f}" for v in row["values"])
        minutes, seconds = divmod(int(row["wall_s"]), 60)
        lines.append(f"| {row['label']} | {row['n']} | {row['mean']:.4f} ± {row['std']:.4f} | {delta} | {seeds} | "
                     f"{minutes} min {seconds:02d} s |")  # fmt: skip
    path = results / f"{table.name}_table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def log_wandb_table(table: Table, results: Path, runs: Path) -> None:
    """The same rows as a W&B table, in an offline run of its own (``runs/tables/<table>/wandb``)."""
    import wandb

    runs.mkdir(parents=True, exist_ok=True)
    columns = ["method", "runs", "mean", "std", "delta", "wall_s"]
    data = [[r["label"], r["n"], r["mean"], r["std"], r["delta"], r["wall_s"]] for r in table_rows(table, results)]
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cwd_lightning"), name=f"table_{table.name}",
                     job_type="table", group=table.name, dir=str(runs), mode=os.environ.get("WANDB_MODE", "offline"),
                     reinit="finish_previous")  # fmt: skip
    run.log({f"tables/{table.name}": wandb.Table(columns=columns, data=data)})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a table file, e.g. experiments/tables/shapes.yaml")
    parser.add_argument("--experiments", default="experiments", help="folder of the experiment YAMLs")
    parser.add_argument("--runs_root", default="runs")
    parser.add_argument("--results", default="results")
    parser.add_argument("--dry_run", action="store_true", help="list what would run; run nothing")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("SWEEP_JOBS", "1")),
                        help="runs side by side, each with cores/jobs threads (default 1, or $SWEEP_JOBS)")  # fmt: skip
    parser.add_argument("--markdown_only", action="store_true", help="rewrite the table from the result files")
    args = parser.parse_args(argv)
    table = Table.load(args.table)
    if args.markdown_only:
        print(f"wrote {write_markdown(table, Path(args.results))}")
        return
    report = run_table(table, Path(args.experiments), Path(args.runs_root), Path(args.results), args.dry_run, args.jobs)
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
