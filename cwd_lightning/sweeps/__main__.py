"""``python -m cwd_lightning.sweeps experiments/tables/<name>.yaml [--jobs N] [--seeds ..] [--rows ..] [--dry_run]``,
or ``... --reproduce ROW --seeds K``: run one committed result again and compare it bit for bit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cwd_lightning.sweeps import __doc__ as description
from cwd_lightning.sweeps.markdown import write_markdown
from cwd_lightning.sweeps.runner import reproduce, run_table
from cwd_lightning.sweeps.spec import Table


def _from_environment(name: str, kind: type) -> list | None:
    text = os.environ.get(name, "").strip()
    return [kind(value) for value in text.split()] if text else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cwd_lightning.sweeps",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("table", help="a table file, e.g. experiments/tables/shapes.yaml")
    parser.add_argument("--experiments", default="experiments", help="folder of the experiment YAMLs")
    parser.add_argument("--runs_root", default="runs")
    parser.add_argument("--results", default="results")
    parser.add_argument("--dry_run", action="store_true", help="list what would run; run and write nothing")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("SWEEP_JOBS", "1")),
                        help="runs side by side, each with cores/jobs threads (default 1, or $SWEEP_JOBS)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=_from_environment("SWEEP_SEEDS", int),
                        help="only these of the table's seeds (default all, or $SWEEP_SEEDS: '0 1')")  # fmt: skip
    parser.add_argument("--rows", nargs="+", default=_from_environment("SWEEP_ROWS", str),
                        help="only these rows (default all, or $SWEEP_ROWS: 'baseline cwd')")  # fmt: skip
    parser.add_argument("--markdown_only", action="store_true", help="rewrite the table from the result files")
    parser.add_argument("--reproduce", metavar="ROW",
                        help="run ROW at the one seed given by --seeds again, in a temporary folder, and compare it "
                             "with its committed result (exit 1 unless equal bit for bit)")  # fmt: skip
    args = parser.parse_args(argv)
    table = Table.load(args.table)
    if args.reproduce:
        if not args.seeds or len(args.seeds) != 1:
            parser.error("--reproduce needs exactly one seed: --seeds K")
        outcome = reproduce(table, Path(args.experiments), Path(args.results), args.reproduce, args.seeds[0])
        print(json.dumps(outcome, indent=2))
        verdict = "equal bit for bit" if outcome["equal"] else "DIFFERENT"
        where = "at the committed result's commit" if outcome["same_commit"] else "at ANOTHER commit than the result's"
        print(f"{table.name}/{args.reproduce} seed {args.seeds[0]}: {verdict} ({where})")
        sys.exit(0 if outcome["equal"] else 1)
    if args.markdown_only:
        print(f"wrote {write_markdown(table, Path(args.results))}")
        return
    report = run_table(table, Path(args.experiments), Path(args.runs_root), Path(args.results), args.dry_run, args.jobs,
                       args.seeds, args.rows)  # fmt: skip
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
