"""Run a table's (row, seed) pairs that have no current result, each as a ``fit`` in its own process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from cwd_lightning.analysis.runs import load_run
from cwd_lightning.distill.teacher import combined_fingerprint, fingerprint_file
from cwd_lightning.runs.identity import identity_digest
from cwd_lightning.runs.provenance import commit, hardware
from cwd_lightning.safe_load import load_weights_only
from cwd_lightning.sweeps.markdown import log_wandb_table, write_markdown
from cwd_lightning.sweeps.spec import Row, Table, check_same_recipe


def resolved_config(row: Row, table: Table, experiments: Path) -> dict:
    """The row's resolved config (as ``--print_config`` gives it, term overrides applied, in this process): a
    changed YAML, default or argument changes it, and so the digest of the run's identity."""
    from cwd_lightning.cli import DistillCLI

    args = ["fit", "--config", str(experiments / f"{row.config}.yaml"), *table.shared_args, *row.args,
            "--print_config"]  # fmt: skip
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            DistillCLI(args=args)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise RuntimeError(
                    f"table {table.name!r}, row {row.name!r}: the config does not resolve:\n{errors.getvalue()[-2000:]}"
                ) from None
    return yaml.safe_load(printed.getvalue())


def distils(resolved: dict) -> bool:
    """Whether a resolved config has distillation terms (a row without them trains the student alone)."""
    return bool((resolved.get("model") or {}).get("terms"))


def with_shared_cache(table: Table, resolved: dict[str, dict], resolve: Callable[[Row, Table], dict]) -> tuple:
    """The table with its shared teacher cache's arguments added to the rows that distil, and those rows' configs
    resolved again (``resolve(row, table)``); a table without ``teacher_cache`` and the other rows unchanged."""
    if table.teacher_cache is None:
        return table, resolved
    cached = {row.name for row in table.rows if distils(resolved[row.name])}
    rows = [replace(row, args=[*row.args, *table.teacher_cache.args()]) if row.name in cached else row
            for row in table.rows]  # fmt: skip
    table = replace(table, rows=rows)
    return table, {row.name: resolve(row, table) if row.name in cached else resolved[row.name] for row in rows}


def resolve_rows(table: Table, experiments: Path) -> tuple[Table, dict[str, dict]]:
    """Every row's resolved config, the table's shared cache (if any) added to the rows that distil."""
    resolved = {row.name: resolved_config(row, table, experiments) for row in table.rows}
    return with_shared_cache(table, resolved, lambda row, table: resolved_config(row, table, experiments))


def teacher_fingerprint(resolved: dict) -> str | None:
    """The fingerprint of the teachers a resolved config names (as the run will compute it), or None when one
    of them has no checkpoint file to read it from."""
    model = resolved.get("model") or {}
    checkpoints = {"teacher": model.get("teacher_checkpoint")} if model.get("teacher") else {}
    others = model.get("teacher_checkpoints") or {}
    checkpoints.update({name: others.get(name) for name in model.get("teachers") or {}})
    if not checkpoints or not all(path and Path(path).is_file() for path in checkpoints.values()):
        return None
    return combined_fingerprint({name: fingerprint_file(path) for name, path in checkpoints.items()})


def _environment(threads: int | None) -> dict[str, str]:
    environment = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
                   "PYTHONUNBUFFERED": "1"}  # fmt: skip
    if threads is not None:  # several runs side by side: each gets its share of the cores
        environment["OMP_NUM_THREADS"] = str(threads)
    return environment


def run_row(row: Row, seed: int, table: Table, digest: str, teacher: str | None, folders: dict[str, Path],
            jobs: int = 1, config: dict | None = None) -> dict:  # fmt: skip
    """One fit; its result file once it has finished (never a partial one)."""
    runs, results, experiments = folders["runs"], folders["results"], folders["experiments"]
    run_dir = runs / f"{row.name}_seed{seed}"
    if run_dir.exists():  # an interrupted run: keep it aside, start this one clean
        number = 1
        while (aside := run_dir.with_name(f"{run_dir.name}.interrupted{number}")).exists():
            number += 1
        run_dir.rename(aside)
    command = [sys.executable, "-m", "cwd_lightning", "fit", "--config", str(experiments / f"{row.config}.yaml"),
               "--experiment", run_dir.name, "--runs_root", str(runs), "--group", table.name,
               "--seed_everything", str(seed),
               "--trainer.enable_progress_bar", "false", *table.shared_args, *row.args]  # fmt: skip
    print(f"[{table.name}] {row.name} seed {seed}: {' '.join(command[2:])}", flush=True)
    runs.mkdir(parents=True, exist_ok=True)
    code_version = commit()  # the code the run starts with (a sweep's tree may have been edited since it started)
    check_clean_tree(table, code_version)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    start = time.perf_counter()
    with open(runs / f"{run_dir.name}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment(threads))
        _, status, usage = os.wait4(process.pid, 0)  # the run's own CPU time, its data workers included
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"[{table.name}] {row.name} seed {seed} failed (exit {process.returncode}); "
                           f"see {runs / f'{run_dir.name}.log'}")  # fmt: skip
    checkpoint = load_weights_only(run_dir / "best.ckpt", "run checkpoint")
    best = next(state for state in checkpoint["callbacks"].values() if state.get("monitor"))  # best.ckpt's callback
    final = load_weights_only(run_dir / "last.ckpt", "run checkpoint")  # where the run ended
    result = {
        "table": table.name,
        "row": row.name,
        "label": row.label,
        "seed": seed,
        "metric": best["monitor"],
        "best": float(best["best_model_score"]),
        "last": load_run(run_dir).final(best["monitor"]),
        "steps": int(final.get("global_step", 0)),
        "best_step": int(checkpoint.get("global_step", 0)),
        **({"train_s": round(final["time_budget"]["elapsed"], 2)} if "time_budget" in final else {}),
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "hardware": hardware(),
        "runs_side_by_side": jobs,
        "torch": torch.__version__,
        "commit": code_version,
        "teacher_fingerprint": checkpoint.get("teacher_fingerprint"),
        "config": row.config,
        "args": [*table.shared_args, *row.args],
        "config_digest": digest,
        "resolved_config": config,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if result["teacher_fingerprint"] != teacher:
        raise RuntimeError(f"[{table.name}] {row.name} seed {seed}: the run used teacher "
                           f"{result['teacher_fingerprint']}, expected {teacher}")  # fmt: skip
    write_result(results / table.name / row.name / f"seed{seed}.json", result)
    return result


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)  # a result file is whole or absent


def current_result(path: Path, digest: str, teacher: str | None, set_aside: bool) -> dict | None:
    """The result at ``path`` if it was made with the same run identity (``runs/identity.py``) and teacher.
    An outdated one is moved to ``stale/`` (kept, not overwritten) when ``set_aside``, so the run is repeated."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("config_digest") == digest and result.get("teacher_fingerprint") == teacher:
        return result
    if set_aside:
        stale = path.parent / "stale" / f"{path.stem}.{result.get('finished', 'old').replace(' ', '_')}.json"
        stale.parent.mkdir(exist_ok=True)
        path.rename(stale.with_name(stale.name.replace(":", "")))
        print(f"{path}: made with another config or teacher; kept under {stale.parent}, running again", flush=True)
    return None


def check_clean_tree(table: Table, code_version: str) -> None:
    """A table's results must come from code a user can check out: refused from a tree with uncommitted changes
    (``+dirty``) or outside git, unless the table is marked ``draft: true``."""
    if table.draft or not (code_version.endswith("+dirty") or code_version == "unknown"):
        return
    state = "has uncommitted changes" if code_version.endswith("+dirty") else "is not a git checkout"
    raise RuntimeError(
        f"table {table.name!r}: the code {state} ({code_version}), so its results could not be reproduced from a "
        "commit: commit (or stash) the changes first, or mark the table `draft: true` to try it out"
    )


def run_table(table: Table, experiments: Path, runs_root: Path, results: Path, dry_run: bool = False,
              jobs: int = 1, seeds: list[int] | None = None, rows: list[str] | None = None) -> Path:  # fmt: skip
    """Run every (row, seed) without a current result, ``jobs`` at a time, seed-major (an interrupted sweep
    has every row at its first seeds), only ``seeds`` and ``rows`` if given. A failed run does not stop the others; all
    failures are listed at the end. ``dry_run`` lists what would run and writes nothing."""
    unknown = sorted(set(rows or []) - {row.name for row in table.rows})
    if unknown:
        raise ValueError(f"table {table.name!r} has no row(s) {unknown}; its rows: {[row.name for row in table.rows]}")
    table, resolved = resolve_rows(table, experiments)
    check_same_recipe(table, resolved)
    digests = {name: identity_digest(config) for name, config in resolved.items()}
    teachers = {name: teacher_fingerprint(config) for name, config in resolved.items()}
    pending = []
    for seed in [seed for seed in table.seeds if seeds is None or seed in seeds]:
        for row in [row for row in table.rows if rows is None or row.name in rows]:
            digest, teacher = digests[row.name], teachers[row.name]
            path = results / table.name / row.name / f"seed{seed}.json"
            if current_result(path, digest, teacher, set_aside=not dry_run) is not None:
                print(f"[{table.name}] {row.name} seed {seed}: done ({path})", flush=True)
            elif row.reuse and (shared := current_result(results / row.reuse / f"seed{seed}.json", digest, teacher,
                                                         set_aside=False)):  # fmt: skip
                if not dry_run:
                    write_result(path, {**shared, "table": table.name, "row": row.name, "label": row.label,
                                        "reused_from": row.reuse})  # fmt: skip
                print(f"[{table.name}] {row.name} seed {seed}: the same run as {row.reuse}", flush=True)
            else:
                print(f"[{table.name}] {row.name} seed {seed}: to run", flush=True)
                pending.append((row, seed, digests[row.name], teacher))
    if dry_run:
        return results / f"{table.name}_table.md"
    check_clean_tree(table, commit())
    folders = {"runs": runs_root / "tables" / table.name, "results": results, "experiments": experiments}
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_row, row, seed, table, digest, teacher, folders, jobs, resolved[row.name]):
                   (row.name, seed) for row, seed, digest, teacher in pending}  # fmt: skip
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as error:  # keep the others going; report every failure at the end
                failures.append(f"{futures[future][0]} seed {futures[future][1]}: {error}")
                print(f"[{table.name}] FAILED {failures[-1]}", flush=True)
            write_markdown(table, results)
    report = write_markdown(table, results)
    log_wandb_table(table, results, folders["runs"])
    if failures:
        raise RuntimeError(f"table {table.name!r}: {len(failures)} run(s) failed:\n  " + "\n  ".join(failures))
    return report


#: what a re-run must give bit for bit: the metric's best and last values and where the run stopped and peaked
REPRODUCED_KEYS = ("best", "last", "steps", "best_step")


def reproduce(table: Table, experiments: Path, results: Path, row_name: str, seed: int) -> dict:
    """Run (``row_name``, ``seed``) again in a temporary folder and compare it with its committed result file:
    ``{"equal": bool, "same_commit": bool, "committed": {...}, "rerun": {...}}`` over ``REPRODUCED_KEYS`` plus
    the commit and hardware of each. The run gets the committed run's share of the cores (``runs_side_by_side``);
    bit-for-bit equality is expected at the result's commit on the same kind of machine; the file is only read."""
    rows = {row.name: row for row in table.rows}
    if row_name not in rows:
        raise ValueError(f"table {table.name!r} has no row {row_name!r}; its rows: {list(rows)}")
    if seed not in table.seeds:
        raise ValueError(f"table {table.name!r} has no seed {seed}; its seeds: {table.seeds}")
    table, resolved = resolve_rows(table, experiments)
    row = next(row for row in table.rows if row.name == row_name)
    digest, teacher = identity_digest(resolved[row_name]), teacher_fingerprint(resolved[row_name])
    path = results / table.name / row_name / f"seed{seed}.json"
    committed = current_result(path, digest, teacher, set_aside=False)
    if committed is None:
        raise FileNotFoundError(f"{path}: no result of this row's current config and teacher to compare with")
    with tempfile.TemporaryDirectory(prefix=f"reproduce_{table.name}_") as folder:
        folders = {"runs": Path(folder) / "runs", "results": Path(folder) / "results", "experiments": experiments}
        # as many threads as the committed run had (its runs side by side shared the cores): results depend on them
        jobs = int(committed.get("runs_side_by_side", 1))
        rerun = run_row(row, seed, table, digest, teacher, folders, jobs, resolved[row_name])

    def summary(result: dict) -> dict:
        return {**{key: result.get(key) for key in REPRODUCED_KEYS},
                **{key: result.get(key) for key in ("commit", "hardware", "wall_s", "cpu_s")}}  # fmt: skip

    return {
        "equal": all(committed.get(key) == rerun.get(key) for key in REPRODUCED_KEYS),
        "same_commit": committed["commit"] == rerun["commit"],
        "committed": summary(committed),
        "rerun": summary(rerun),
    }
