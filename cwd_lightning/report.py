"""Results table and plots from finished runs: ``python -m cwd_lightning.report [--runs runs] [--out reports]``.

Reads ``runs/*/config.yaml`` and ``metrics.csv`` (no network). Per group of comparable runs (the config's
``group``: ``shapes_teacher``, ``shapes_student`` and ``shapes_cwd`` are ``shapes``) it writes the
validation-metric curves, per-class bars and the latest channel-distribution figure of the distilled run;
one markdown file holds the table and links them.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from cwd_lightning.analysis.render import new_figure
from cwd_lightning.analysis.runs import Run, find_runs, repeats_key
from cwd_lightning.analysis.tables import format_mean_std, markdown_table

_ORDER = {"teacher": 0, "student": 1, "distilled": 2}


def curves_figure(runs: list[Run], group: str, metric: str):
    figure = new_figure(figsize=(6, 3.6))
    axis = figure.subplots()
    for run in runs:
        steps, values = run.series(metric)
        axis.plot(steps, values, marker="o", markersize=3, label=f"{run.name} ({run.role})")
    axis.set_xlabel("training step")
    axis.set_ylabel(metric)
    axis.set_title(f"{group}: validation {metric.split('/')[-1]}", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def per_class_figure(runs: list[Run], group: str, prefix: str = "val/IoU/"):
    values = {run.name: run.last_values(prefix) for run in runs}
    classes = [name for name in next((v for v in values.values() if v), {})]
    figure = new_figure(figsize=(max(6, 0.55 * len(classes) * max(1, len(runs)) / 1.5), 3.6))
    axis = figure.subplots()
    width = 0.8 / max(1, len(runs))
    for index, run in enumerate(runs):
        heights = [values[run.name].get(name, np.nan) for name in classes]
        axis.bar(np.arange(len(classes)) + index * width, heights, width, label=run.name)
    axis.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("IoU (last validation)")
    axis.set_title(f"{group}: per-class IoU", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def latest_channel_figure(run: Run) -> Path | None:
    """The channel-distribution image the monitor logged last (highest step) in the run's W&B folder."""
    images = list(run.path.glob("wandb/*/files/media/images/channels/*/maps_*.png"))
    step = lambda path: int(re.search(r"maps_(\d+)_", path.name)[1])  # noqa: E731
    return max(images, key=step) if images else None


def _format(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "–"


def describe_terms(config: dict) -> tuple[str, str, str, str]:
    """(method, weight, τ, other loss settings) of a run's distillation terms; ``–`` for none."""
    terms = (config.get("model") or {}).get("terms") or []
    if not terms:
        return "–", "–", "–", ""
    methods, weights, taus, settings = [], [], [], []
    for term in terms:
        loss = term.get("loss") or {}
        args = dict(loss.get("init_args") or {})
        methods.append(loss.get("class_path", "?").rsplit(".", 1)[-1])
        weights.append(f"{float(term.get('weight', 1.0)):g}")
        taus.append(f"{float(args.pop('tau')):g}" if "tau" in args else "–")
        others = [f"{k}={v}" for k, v in args.items() if not isinstance(v, dict | list)]
        settings.append(" ".join([f"@{term.get('student')}", *others]))
    return " + ".join(methods), " + ".join(weights), " + ".join(taus), "; ".join(settings)


def seed_table(runs: list[Run]) -> list[str]:
    """Finished runs that differ only by seed (and name/folder) as one row: mean ± std of the best metric."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.finished and run.best() is not None:
            groups[repeats_key(run)].append(run)
    rows = []
    for members in groups.values():
        members.sort(key=lambda run: int(run.config.get("seed_everything") or 0))
        method, weight, tau, settings = describe_terms(members[0].config)
        if method == "–":
            method = f"none ({members[0].role})"
        seeds = ", ".join(str(run.config.get("seed_everything")) for run in members)
        names = ", ".join(run.name for run in members)
        best = f"{format_mean_std([run.best() for run in members])} ({members[0].metric})"
        rows.append([method, weight, tau, settings, seeds, best, names])
    columns = ["method", "weight", "τ", "settings", "seeds", "best mean ± std", "runs"]
    return markdown_table(columns, sorted(rows, key=lambda row: row[0]))


def write_report(runs_root: str | Path = "runs", out: str | Path = "reports") -> Path:
    runs = find_runs(runs_root)
    if not runs:
        raise FileNotFoundError(f"no runs with a config.yaml under {runs_root}/ (train one: make train)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    lines = ["# Results", "", f"From `{runs_root}/` (best and last validation of each run).", ""]
    for group, members in sorted(groups.items()):
        members.sort(key=lambda run: (_ORDER[run.role], run.name))
        metric = members[0].metric  # one task per group
        baseline = next((run.best(metric) for run in members if run.role == "student"), None)
        rows = []
        for run in members:
            steps = [int(row["step"]) for row in run.rows if row.get("step")]
            best = run.best(metric)
            delta = f"{best - baseline:+.4f}" if None not in (best, baseline) and run.role == "distilled" else ""
            rows.append([run.name, run.role, run.network(), steps[-1] + 1 if steps else 0, _format(best),
                         _format(run.final(metric)), delta])  # fmt: skip
        columns = ["run", "role", "network", "steps", f"best {metric}", f"last {metric}", "Δ vs baseline"]
        lines += [f"## {group}", "", *markdown_table(columns, rows)]
        for suffix, figure in (
            ("curves", curves_figure(members, group, metric)),
            ("per_class", per_class_figure(members, group)),
        ):
            figure.savefig(out / f"{group}_{suffix}.png", dpi=110)
            lines += ["", f"![{group} {suffix}]({group}_{suffix}.png)"]
        for run in members:
            channel_image = latest_channel_figure(run) if run.role == "distilled" else None
            if channel_image is not None:
                shutil.copyfile(channel_image, out / f"{run.name}_channels.png")
                lines += ["", f"Channel distributions of `{run.name}` at the end of training:", "",
                          f"![{run.name} channels]({run.name}_channels.png)"]  # fmt: skip
        lines.append("")
    every_run = find_runs(runs_root, recursive=True)
    lines += ["## Over seeds", "",
              f"Every finished run under `{runs_root}/` (sweeps included), runs that differ only by seed taken "
              "together.", "",
              *seed_table(every_run), ""]  # fmt: skip
    report = out / "results.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="reports")
    args = parser.parse_args(argv)
    report = write_report(args.runs, args.out)
    print(f"wrote {report} and {len(list(report.parent.glob('*.png')))} figures")


if __name__ == "__main__":
    main()
