"""The CLI end to end: a teacher, a CWD student and a detection student fit, log, resume, validate and export
in their run folders, with W&B offline."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
import yaml
from PIL import Image

from cwd_lightning.export import load_student
from tests.helpers import REPO, run_cli, tiny_overrides


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def test_fit_writes_the_run_folder_with_logged_metrics(teacher_run):
    _, run_dir, _, result = teacher_run
    for name in ("last.ckpt", "best.ckpt", "config.yaml", "metrics.csv", "wandb_id"):
        assert (run_dir / name).is_file(), name
    # the checkpoint before the last is kept: a crash while writing last.ckpt leaves one to resume from
    assert torch.load(run_dir / "last.prev.ckpt", weights_only=True)["global_step"] == 2
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 4
    rows = _metrics(run_dir)
    assert len(_column(rows, "train/loss_task")) == 4
    assert all(v > 0 for v in _column(rows, "train/loss_task"))
    assert len(_column(rows, "val/mIoU")) == 2 and all(0 <= v <= 1 for v in _column(rows, "val/mIoU"))
    assert _column(rows, "val/IoU/circle")
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    run_id = (run_dir / "wandb_id").read_text().strip()
    record = wandb_runs[0] / f"run-{run_id}.wandb"
    assert record.is_file() and b"val/mIoU" in record.read_bytes() and b"train/loss_task" in record.read_bytes()
    assert b"params/student" in record.read_bytes()  # parameter counts and config reach W&B too
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["experiment"] == "tiny_teacher"
    assert f"best checkpoint: {run_dir.resolve() / 'best.ckpt'}" in result.stdout


def test_refuses_to_overwrite_a_run_and_resumes_from_last(teacher_run):
    work, run_dir, args, _ = teacher_run
    last_before = (run_dir / "last.ckpt").read_bytes()
    again = run_cli(*args, cwd=work)
    assert again.returncode != 0 and "already holds a run" in again.stderr and "make resume" in again.stderr
    assert (run_dir / "last.ckpt").read_bytes() == last_before  # nothing saved was touched

    resumed = run_cli("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last",
                   "--trainer.max_steps", "6", cwd=work)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 6
    steps = [int(row["step"]) for row in _metrics(run_dir) if row.get("train/loss_task")]
    assert steps == [0, 1, 2, 3, 4, 5]  # the first run's rows are kept, the resumed run continues at 4
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{(run_dir / 'wandb_id').read_text().strip()}"))) >= 1


def test_a_distilled_run_resumes_and_validates_from_an_explicit_checkpoint_path(cwd_run, tmp_path):
    """Lightning's merge of a checkpoint's hyperparameters refused ours ('fit' does not accept option
    'model.teacher_fingerprint') whenever ckpt_path was a path rather than 'last'."""
    import shutil

    work, run_dir = cwd_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    validated = run_cli("validate", "--config", str(copy / "config.yaml"), "--runs_root", str(tmp_path / "runs"),
                        "--ckpt_path", str(copy / "best.ckpt"), cwd=work)  # fmt: skip
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "val/mIoU" in validated.stdout
    # the run is finished (2 of 2 steps): the resume reads the checkpoint, says so and changes nothing
    record = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    resumed = run_cli("fit", "--config", str(copy / "config.yaml"), "--runs_root", str(tmp_path / "runs"),
                      "--ckpt_path", str(copy / "last.ckpt"), cwd=work)  # fmt: skip
    assert resumed.returncode != 0 and "does not accept option" not in resumed.stderr
    assert "is at step 2: the run already finished (trainer.max_steps = 2)" in resumed.stderr
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == record


def test_cwd_student_through_the_cli_and_export(cwd_run):
    work, run_dir = cwd_run
    rows = _metrics(run_dir)
    assert all(v >= 0 for v in _column(rows, "train/distill/cwd_logits")) and _column(rows, "train/distill/cwd_logits")
    assert _column(rows, "train/distill_to_task") and _column(rows, "val/distill/cwd_logits")
    _assert_monitor_media(run_dir)
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    assert len(checkpoint["teacher_fingerprint"]) == 64 and not checkpoint.get("hyper_parameters")

    out = work / "exports" / "shapes_cwd"
    export_cmd = [sys.executable, "-m", "cwd_lightning.export", str(run_dir), str(out)]
    export = subprocess.run([*export_cmd, "--checkpoint", "last"], cwd=work, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-3000:]
    student = load_student(out)
    expected = {k[len("student.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in expected.items())
    # plain PyTorch and onnxruntime, no project code: a batch of 3 at twice the training size (32)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(student(images), size=(64, 64), mode="bilinear")
        program = torch.export.load(out / "student.pt2").module()
        assert (program(images) - expected).abs().max() <= 1e-4
    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert (torch.from_numpy(session.run(None, {"images": images.numpy()})[0]) - expected).abs().max() <= 1e-4
    meta = yaml.safe_load((out / "model.yaml").read_text())["export"]
    assert meta["input_multiple"] == 8 and meta["checked_on"] == [3, 3, 64, 64]
    assert all(check["kept"] and check["max_abs_difference"] <= 1e-4 for check in meta["files"].values())
    again = subprocess.run(export_cmd, cwd=work, capture_output=True, text=True)
    assert again.returncode != 0 and "nothing is overwritten" in again.stderr


def _assert_monitor_media(run_dir: Path) -> None:
    """The offline W&B run holds the channel maps, KL table/histogram, overlays, IoU table, confusion."""
    (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
    media = wandb_run / "files" / "media"
    for pattern in ("images/channels/cwd_logits/maps_*.png", "images/predictions/overlays_*.png",
                    "images/predictions/confusion_*.png"):  # fmt: skip
        (path,) = list(media.glob(pattern))
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) >= 200, path
    (kl_table,) = list(media.glob("table/channels/cwd_logits/kl_table_*.table.json"))
    table = json.loads(kl_table.read_text())
    assert table["columns"] == ["channel", "name", "kl", "entropy_teacher", "entropy_student"]
    assert [row[1] for row in table["data"]][:3] == ["background", "circle", "square"] and len(table["data"]) == 11
    assert all(row[2] >= 0 for row in table["data"])
    (iou_table,) = list(media.glob("table/predictions/per_class_iou_*.table.json"))
    assert len(json.loads(iou_table.read_text())["data"]) == 11
    record = next(wandb_run.glob("run-*.wandb")).read_bytes()
    assert b"channels/cwd_logits/kl_hist" in record and b"predictions/per_class_iou_bar" in record
    overhead = json.loads((run_dir / "ChannelDistributionMonitor.json").read_text())
    assert overhead["calls"] >= 1 and overhead["seconds"] > 0


@pytest.mark.parametrize(("experiment", "term", "levels"), [
    ("shapes_det_cwd", "cwd_fpn", ["0", "1", "2"]),
    ("shapes_det_fgd", "fgd_fpn", ["0", "1", "2"]),
    ("shapes_det_crosskd", "crosskd_reg", [f"call{k}" for k in range(5)]),
    ("methods/shapes_det_pkd_fpn", "pkd_fpn", ["0", "1", "2"]),
])  # fmt: skip
def test_detection_distillation_through_the_cli_logs_every_fpn_level(tmp_path, experiment, term, levels):
    """shapes_det_cwd (CWD), shapes_det_fgd (FGD, which reads the boxes), shapes_det_crosskd (CrossKD, which runs
    the teacher's head on the student's features) and methods/shapes_det_pkd_fpn (PKD) shrunk to 2 steps: a teacher
    from a state_dict file (the student's architecture, to keep it small); CWD, FGD and PKD over the FPN levels
    P3-P5, CrossKD's head on P3-P7."""
    from cwd_lightning.models import build_detector

    net = REPO / "experiments" / "common" / "shapes_det_student_net.yaml"
    teacher_file = tmp_path / "teacher.pt"
    torch.save(build_detector(**yaml.safe_load(net.read_text())["init_args"]).state_dict(), teacher_file)
    result = run_cli(
        "fit", "--config", str(REPO / "experiments" / f"{experiment}.yaml"), "--runs_root", str(tmp_path / "runs"),
        "--model.teacher", str(net), "--model.teacher_checkpoint", str(teacher_file),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--data.init_args.root", str(tmp_path / "shapes"),
        "--data.init_args.shapes.num_train", "16", "--data.init_args.shapes.num_val", "8",
        "--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "4", "--data.init_args.num_workers", "0",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / Path(experiment).name
    rows = _metrics(run_dir)
    for level in levels:  # CWD, FGD and PKD: P3-P5 (P6/P7 are 1×1 at 64 px)
        assert len(_column(rows, f"train/distill/{term}/{level}")) == 2, level
    assert not _column(rows, f"train/distill/{term}/p7")
    if experiment == "shapes_det_crosskd":  # both branches, each on every level
        assert len(_column(rows, "train/distill/crosskd_cls/call4")) == 2
    assert _column(rows, "train/loss_task/classification") and _column(rows, "train/loss_task/bbox_regression")
    assert len(_column(rows, "val/mAP")) == 1 and _column(rows, "val/mAP50")
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])
    if experiment == "shapes_det_cwd":
        (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
        for level in ("0", "2"):  # the channel monitor needs no detection special case
            assert list(wandb_run.glob(f"files/media/images/channels/cwd_fpn/{level}/maps_*.png")), level


def test_make_train_passes_args_to_the_asked_experiment_only():
    """The teacher that `make train EXP=<student>` trains first is its own experiment as written."""
    printed = subprocess.run(["make", "-n", "-B", "-C", str(REPO), "train", "EXP=shapes_cwd",
                              "ARGS=--trainer.max_steps 5", "TEACHER_CKPT=runs/shapes_teacher/best.ckpt"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    teacher = [line for line in printed.splitlines() if "experiments/shapes_teacher.yaml" in line]
    student = [line for line in printed.splitlines() if "experiments/shapes_cwd.yaml" in line]
    assert len(teacher) == 1 and "--trainer.max_steps" not in teacher[0]
    assert len(student) == 1 and student[0].endswith("--trainer.max_steps 5")


def test_rows_logged_after_the_resumed_checkpoint_are_not_kept_twice(tmp_path):
    from cwd_lightning.runs import AppendingCSVLogger

    rows = ["step,train/loss,val/mIoU", *[f"{k},{1 / (k + 1)}," for k in range(8)], "3,,0.5", "7,,0.6"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    # the run died after step 7; its last checkpoint is at global step 4 (after the validation logged at 3)
    assert AppendingCSVLogger(str(tmp_path)).discard_from(4) == 5
    kept = _metrics(tmp_path)
    assert [row["step"] for row in kept] == ["0", "1", "2", "3", "3"] and kept[-1]["val/mIoU"] == "0.5"


def test_no_credential_reaches_the_run_record(tiny_shapes, tmp_path, monkeypatch):
    secret = "wandb-key-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)  # run_cli passes the environment on, as a shell would
    result = run_cli("fit", "--config", str(REPO / "experiments" / "shapes_student.yaml"), "--runs_root",
                     str(tmp_path / "runs"), *tiny_overrides(tiny_shapes, 2), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "last.ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert [p for p in files if secret.encode() in p.read_bytes()] == []  # configs, logs, checkpoints, W&B
    assert secret not in result.stdout + result.stderr


def test_a_huggingface_teacher_and_a_huggingface_student_distil_through_the_cli(teacher_run, tiny_shapes, tmp_path):
    """A tiny SegFormer saved with save_pretrained: as the teacher of the shapes student (its 1/4-stride logits
    resized to the student's), and as a student distilled from the tiny teacher run."""
    from tests.helpers import tiny_segformer

    folder = tiny_segformer(tmp_path / "segformer")
    work, teacher_dir, _, _ = teacher_run
    spec = json.dumps({"class_path": "cwd_lightning.models.huggingface_model", "init_args": {"source": str(folder)}})
    cwd = str(REPO / "experiments" / "shapes_cwd.yaml")
    as_teacher = run_cli("fit", "--config", cwd, "--experiment", "hf_teacher", "--runs_root", str(tmp_path / "runs"),
                         "--model.teacher", spec, "--model.teacher_checkpoint", "null",
                         "--model.terms.cwd_logits.teacher", "model.decode_head.classifier",
                         "--model.terms.cwd_logits.resize", "teacher_to_student", "--trainer.callbacks", "[]",
                         *tiny_overrides(tiny_shapes, 2), cwd=work)  # fmt: skip
    assert as_teacher.returncode == 0, as_teacher.stderr[-3000:]
    student = json.dumps({"class_path": "cwd_lightning.models.huggingface_model",
                          "init_args": {"source": str(folder), "pretrained": False}})  # fmt: skip
    as_student = run_cli("fit", "--config", cwd, "--experiment", "hf_student", "--runs_root", str(tmp_path / "runs"),
                         "--model.student", student,
                         "--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
                         "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"),
                         "--model.terms.cwd_logits.student", "model.decode_head.classifier",
                         "--model.terms.cwd_logits.resize", "teacher_to_student", "--trainer.callbacks", "[]",
                         *tiny_overrides(tiny_shapes, 2), cwd=work)  # fmt: skip
    assert as_student.returncode == 0, as_student.stderr[-3000:]
    for run in ("hf_teacher", "hf_student"):
        values = _column(_metrics(tmp_path / "runs" / run), "train/distill/cwd_logits")
        assert values and all(value > 0 for value in values)


def _vit_file(path: Path, seed: int) -> Path:
    """Seeded weights of the `shapes` ViT teacher network (common/shapes_vit_net.yaml) as a state_dict file."""
    from cwd_lightning.analysis.runs import build

    torch.manual_seed(seed)
    spec = yaml.safe_load((REPO / "experiments" / "common" / "shapes_vit_net.yaml").read_text())
    torch.save(build(spec).state_dict(), path)
    return path


def test_a_two_teacher_run_keeps_both_out_of_its_checkpoints_and_refuses_a_changed_second(shapes_teacher, tiny_shapes,
                                                                                           tmp_path):  # fmt: skip
    runs = tmp_path / "runs"
    fit = ["fit", "--config", str(REPO / "experiments" / "shapes_two_teachers.yaml"), "--runs_root", str(runs),
           "--model.teacher_checkpoint", str(shapes_teacher), "--model.lr_schedule", "poly",
           "--model.teacher_checkpoints", json.dumps({"vit": str(_vit_file(tmp_path / "vit.pt", 0))}),
           "--trainer.callbacks", "[]", *tiny_overrides(tiny_shapes, 2)]  # fmt: skip
    result = run_cli(*fit, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = runs / "shapes_two_teachers"
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert not any(key.startswith(("teacher.", "teachers.")) for key in checkpoint["state_dict"])
    assert any(key.startswith("student.") for key in checkpoint["state_dict"])
    assert sorted(checkpoint["teacher_fingerprints"]) == ["teacher", "vit"]
    assert {"train/distill/cwd_logits", "train/distill/cosine_tokens"} <= set(_metrics(run_dir)[0])

    before = {path.name: path.read_bytes() for path in run_dir.glob("*.ckpt")}
    changed = json.dumps({"vit": str(_vit_file(tmp_path / "other_vit.pt", 1))})
    resumed = run_cli("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last", "--trainer.max_steps",
                      "4", "--model.teacher_checkpoints", changed, cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 2
    assert "the teacher does not match the one this checkpoint was trained with (teacher 'vit')" in resumed.stderr
    assert {path.name: path.read_bytes() for path in run_dir.glob("*.ckpt")} == before  # nothing saved was touched
