"""Keep a teacher's run beside the results distilled from it: ``python scripts/record_teacher.py shapes_det_teacher
[--checkout .] [--flat_last 4 --flat_below 0.005]``.

The teacher's checkpoint is too large to commit; its run record is not. This copies ``runs/<exp>/config.yaml``
and ``metrics.csv`` from the checkout the run was made in to ``results/teachers/<exp>/`` and writes
``teacher.json``: the fingerprint of ``runs/<exp>/best.ckpt`` (the one every run distilled from it records), the
commit of that checkout, the machine, the monitored metric's best and the steps. With ``--flat_last N
--flat_below D`` it also records whether the validation curve had flattened, by a criterion stated before the
run ended: the best of the last N validations exceeds the best of those before them by less than D.
``tests/integration/test_results.py`` ties the record to the result files and to the curve docs/results.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from cwd_lightning.analysis.runs import load_run
from cwd_lightning.distill.teacher import fingerprint_file
from cwd_lightning.runs.provenance import commit, hardware

REPO = Path(__file__).resolve().parents[1]


def flattened(values: list[float], last: int, below: float) -> dict:
    """The criterion, its inputs and whether the curve meets it."""
    if len(values) <= last:
        raise ValueError(f"{len(values)} validations: the criterion needs more than the last {last}")
    gain = max(values[-last:]) - max(values[:-last])
    return {"last_validations": last, "below": below, "gain": gain, "flat": gain < below}


def record(experiment: str, checkout: Path, flat_last: int | None = None, flat_below: float | None = None) -> dict:
    if (flat_last is None) != (flat_below is None):
        raise ValueError("the flattening criterion needs both flat_last and flat_below")
    run_dir = checkout / "runs" / experiment
    run = load_run(run_dir)
    if not run.finished:
        raise ValueError(
            f"{run_dir}: the run has not finished (metrics.csv does not reach its max_steps, and no "
            "EarlyStopping callback ended it)"
        )
    steps, values = run.series(run.metric)
    teacher = {
        "experiment": experiment,
        "commit": commit(checkout),
        "hardware": hardware(),
        "fingerprint": fingerprint_file(run_dir / "best.ckpt"),
        "metric": run.metric,
        "steps": steps[-1] + 1,
        "stopped_early": run.stopped_early,  # by its EarlyStopping callback, before trainer.max_steps
        "best": run.best(),
    }
    if flat_last is not None:
        teacher["flattened"] = flattened(values, flat_last, flat_below)
    folder = REPO / "results" / "teachers" / experiment
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.csv"):
        shutil.copyfile(run_dir / name, folder / name)
    (folder / "teacher.json").write_text(json.dumps(teacher, indent=1) + "\n")
    return teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the teacher's experiment: its run is runs/<experiment>/")
    parser.add_argument("--checkout", type=Path, default=REPO, help="the clone the run was made in")
    parser.add_argument("--flat_last", type=int, help="validations at the end the flattening criterion looks at")
    parser.add_argument("--flat_below", type=float, help="their best may exceed the best before them by less")
    args = parser.parse_args()
    print(json.dumps(record(args.experiment, args.checkout.resolve(), args.flat_last, args.flat_below), indent=1))


if __name__ == "__main__":
    main()
