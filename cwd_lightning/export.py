"""Write a trained student alone: ``python -m cwd_lightning.export runs/<EXP> exports/<EXP>``.

The export folder holds ``student.pt`` (state_dict), ``model.yaml`` (how to rebuild it: builder,
arguments, classes, input normalisation) and, where ``torch.export`` can trace the model,
``student.pt2``, which loads with plain PyTorch: ``torch.export.load(path).module()``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torch import nn

from cwd_lightning.analysis.runs import build, load_run
from cwd_lightning.analysis.runs import load_student as load_trained_student
from cwd_lightning.models.pretrained import without_pretrained


def export_student(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; nothing is overwritten")
    run = load_run(run_dir)
    config = run.config
    checkpoint_path = run.checkpoint(checkpoint)
    student_spec = config["model"]["student"]
    student = load_trained_student(run, checkpoint)

    data_args = (config.get("data") or {}).get("init_args", {})
    task_args = config["model"]["task"].get("init_args", {})
    meta = {
        "student": student_spec,
        "task": config["model"]["task"],
        "input": {
            "mean": data_args.get("mean"),
            "std": data_args.get("std"),
            "crop_size": data_args.get("crop_size"),
        },
        "class_names": task_args.get("class_names"),
        "source": {"run": str(run_dir), "checkpoint": str(checkpoint_path)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), out_dir / "student.pt")
    (out_dir / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    size = int(data_args.get("crop_size") or 64)
    try:
        program = torch.export.export(student, (torch.zeros(1, 3, size, size),))
        torch.export.save(program, out_dir / "student.pt2")
    except Exception as error:  # tracing support varies by architecture; the state_dict is the export
        print(f"note: torch.export could not trace this student ({type(error).__name__}); wrote state_dict only")
    return out_dir


def load_student(export_dir: str | Path) -> nn.Module:
    """Rebuild an exported student from ``model.yaml`` + ``student.pt`` (eval mode), offline: built without
    pretrained weights, which ``student.pt`` replaces."""
    export_dir = Path(export_dir)
    meta = yaml.safe_load((export_dir / "model.yaml").read_text())
    student = build(without_pretrained(meta["student"]))
    student.load_state_dict(torch.load(export_dir / "student.pt", map_location="cpu", weights_only=True))
    return student.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="runs/<EXP>")
    parser.add_argument("out_dir", help="folder to create, e.g. exports/<EXP>")
    parser.add_argument("--checkpoint", default="best", help="best, last or a .ckpt path")
    args = parser.parse_args(argv)
    out = export_student(args.run_dir, args.out_dir, args.checkpoint)
    print(f"exported student to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
