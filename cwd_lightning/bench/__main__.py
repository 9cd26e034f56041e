"""``python -m cwd_lightning.bench experiments/<EXP>.yaml [options] [-- <experiment CLI args>]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cwd_lightning.bench.harness import Options, run_benchmark
from cwd_lightning.bench.summary import summary_lines


def parse(argv: list[str]) -> Options:
    # everything after "--" goes to the experiment's CLI untouched (argparse would take its --options)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m cwd_lightning.bench",
        description="Time and measure an experiment's distillation step against the student alone and the "
        "teacher's forward, benchmark every distillation loss and compare with torchdistill.",
        epilog="Arguments after -- go to the experiment's CLI, e.g. -- --data.init_args.batch_size 8",
    )
    parser.add_argument("experiment", type=Path, help="experiments/<EXP>.yaml (a distillation experiment)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder of the JSON (default benchmarks/)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32", help="bf16-mixed: torch.autocast")
    parser.add_argument("--skip-peer", action="store_true", help="no torchdistill comparison")
    parser.add_argument("--skip-losses", action="store_true", help="no loss micro-benchmark")
    parser.add_argument(
        "--loss-scale", type=float, default=1.0, help="scale H and W of the loss sizes (< 1 for a quick smoke run)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing record of the same name")
    args = parser.parse_args(own)
    if args.repeats < 1 or args.warmup < 0 or args.loss_scale <= 0:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --loss-scale > 0")
    return Options(
        experiment=args.experiment,
        repeats=args.repeats,
        warmup=args.warmup,
        out=args.out,
        device=args.device,
        precision=args.precision,
        skip_peer=args.skip_peer,
        skip_losses=args.skip_losses,
        loss_scale=args.loss_scale,
        overwrite=args.overwrite,
        extra_args=extra,
    )


def main(argv: list[str] | None = None) -> Path:
    os.environ.setdefault("WANDB_MODE", "offline")  # the CLI builds no logger here, but never go online
    record, path = run_benchmark(parse(list(sys.argv[1:] if argv is None else argv)))
    print("\n".join(summary_lines(record, str(path))), flush=True)
    return path


if __name__ == "__main__":
    main()
