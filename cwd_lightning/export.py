"""Write a trained student alone: ``python -m cwd_lightning.export runs/<EXP> exports/<EXP>``.

The export folder holds ``student.pt`` (state_dict) and ``model.yaml`` (how to rebuild it: builder,
arguments, classes, input normalisation) for every student. A segmentation student is also written as
``student.pt2`` (plain PyTorch: ``torch.export.load(path).module()``) and ``student.onnx``: normalised
images ``(N, 3, H, W)`` in, logits ``(N, classes, H, W)`` out, for any batch size and any H, W that are
multiples of the encoder's stride (``model.yaml: export.input_multiple``). Each file is checked against
the PyTorch student on a batch of another size than the traced one before it is kept; the differences
are recorded in ``model.yaml``. Detection students keep the state_dict (torchvision detectors resize
and post-process inside the model, which ``torch.export`` does not trace as one graph).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from cwd_lightning.analysis.runs import build, load_run
from cwd_lightning.analysis.runs import load_student as load_trained_student
from cwd_lightning.models.portable import PortableSegmenter, input_stride, portable_segmenter
from cwd_lightning.models.pretrained import without_pretrained
from cwd_lightning.safe_load import load_weights_only

#: an exported file is kept when |exported − PyTorch| ≤ ATOL + RTOL·|PyTorch| everywhere
ATOL, RTOL = 1e-4, 1e-4


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
    if build(config["model"]["task"]).exports_graph:  # the task says whether its students export as a graph
        meta["export"] = export_segmenter(student, out_dir)
        (out_dir / "model.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        failed = [name for name, check in meta["export"]["files"].items() if not check.get("kept")]
        if failed:
            raise RuntimeError(f"{out_dir}: {', '.join(failed)} not written, see model.yaml (export.files); "
                               "student.pt and model.yaml are")  # fmt: skip
    else:
        print("note: a student of this task is exported as its state_dict (student.pt) and model.yaml")
    return out_dir


def export_segmenter(student: nn.Module, out_dir: Path) -> dict:
    """``student.pt2`` and ``student.onnx`` with dynamic batch, height and width, traced on a batch of 2 at
    4 strides and checked on a batch of 3 at 8 strides (a batch of 1 would fix the batch size)."""
    model, stride = portable_segmenter(student), input_stride(student)
    traced = torch.randn(2, 3, 4 * stride, 4 * stride, generator=torch.Generator().manual_seed(0))
    check = torch.randn(3, 3, 8 * stride, 8 * stride, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PortableSegmenter(student.eval())(check)  # the student as trained, torch's pooling
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    dims |= {axis: stride * torch.export.Dim(name, min=1, max=8192 // stride) for axis, name in ((2, "h"), (3, "w"))}
    report = {"input_multiple": stride, "checked_on": list(check.shape), "tolerance": {"atol": ATOL, "rtol": RTOL},
              "files": {}}  # fmt: skip
    try:
        program = torch.export.export(model, (traced,), dynamic_shapes=(dims,))
    except Exception as error:
        error_text = f"torch.export: {type(error).__name__}: {error}"[:500]
        report["files"]["student.pt2"] = {"kept": False, "error": error_text}
        return report
    with torch.no_grad():
        report["files"]["student.pt2"] = _keep_if_close(program.module()(check), expected, out_dir / "student.pt2",
                                                        lambda path: torch.export.save(program, path))  # fmt: skip
    report["files"]["student.onnx"] = _export_onnx(program, traced, check, expected, out_dir / "student.onnx")
    return report


def _export_onnx(program, traced: torch.Tensor, check: torch.Tensor, expected: torch.Tensor, path: Path) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return {"kept": False, "error": "onnx/onnxruntime are not installed: pip install -e '.[export]'"}
    try:
        onnx_program = torch.onnx.export(program, (traced,), dynamo=True, input_names=["images"],
                                         output_names=["logits"], verbose=False)  # fmt: skip
        temporary = path.with_suffix(".onnx.tmp")
        onnx_program.save(str(temporary))
        session = onnxruntime.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        output = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    except Exception as error:
        return {"kept": False, "error": f"ONNX export: {type(error).__name__}: {error}"[:500]}
    return _keep_if_close(output, expected, path, lambda final: temporary.replace(final), temporary)


def _keep_if_close(output: torch.Tensor, expected: torch.Tensor, path: Path, write: Callable[[Path], object],
                   temporary: Path | None = None) -> dict:  # fmt: skip
    difference = float((output - expected).abs().max()) if output.shape == expected.shape else float("inf")
    close = output.shape == expected.shape and bool(((output - expected).abs() <= ATOL + RTOL * expected.abs()).all())
    report: dict = {"kept": close, "max_abs_difference": difference}
    if close:
        try:
            write(path)
        except Exception as error:  # a half-written file is worse than none
            path.unlink(missing_ok=True)
            report = {**report, "kept": False, "error": f"writing {path.name}: {type(error).__name__}: {error}"[:500]}
    if temporary is not None:
        temporary.unlink(missing_ok=True)
    return report


def load_student(export_dir: str | Path) -> nn.Module:
    """Rebuild an exported student from ``model.yaml`` + ``student.pt`` (eval mode), offline: built without
    pretrained weights, which ``student.pt`` replaces."""
    export_dir = Path(export_dir)
    meta = yaml.safe_load((export_dir / "model.yaml").read_text())
    student = build(without_pretrained(meta["student"]))
    student.load_state_dict(load_weights_only(export_dir / "student.pt", "exported student"))
    return student.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="runs/<EXP>")
    parser.add_argument("out_dir", help="folder to create, e.g. exports/<EXP>")
    parser.add_argument("--checkpoint", default="best", help="best, last or a .ckpt path")
    args = parser.parse_args(argv)
    try:
        out = export_student(args.run_dir, args.out_dir, args.checkpoint)
    except (ValueError, FileNotFoundError) as error:  # a bad or missing file: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    print(f"exported student to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
