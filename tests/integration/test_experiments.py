"""Every experiment file parses, prints its config and builds offline with its own networks (its construction
probe runs); a network whose weights a checkpoint replaces is built without downloading them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from cwd_lightning.analysis.runs import build
from cwd_lightning.cli import DistillCLI, main
from cwd_lightning.models.pretrained import PRETRAINED_ARGUMENTS, without_pretrained
from tests.helpers import EXPERIMENTS, REPO


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_parses(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(out.getvalue())
    builder = resolved["model"]["student"]["class_path"].rsplit(".", 1)[-1]
    assert builder in ("build_segmentation_model", "build_dilated_segmentor", "build_detector", "vit_features")
    data, task = resolved["data"]["init_args"], resolved["model"]["task"]["init_args"]
    num_data_classes = data["num_classes"] if "num_classes" in data else len(data["class_names"])
    assert num_data_classes == task["num_classes"] == resolved["model"]["student"]["init_args"]["num_classes"]
    if config.stem.endswith("_cwd"):
        teacher = resolved["model"]["teacher"]["class_path"]
        if teacher in (
            "cwd_lightning.models.torchvision_model",
            "cwd_lightning.models.smp_pretrained",
        ):  # zoo: weights built in
            assert resolved["model"]["teacher_checkpoint"] is None
        else:
            expected = f"runs/{config.stem.replace('_cwd', '_teacher')}/best.ckpt"
            assert resolved["model"]["teacher_checkpoint"] == expected
        losses = [term["loss"]["class_path"] for term in resolved["model"]["terms"]]
        assert any(loss.endswith("ChannelWiseDivergence") for loss in losses)


def _resolved(config: Path) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        DistillCLI(args=["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(printed.getvalue())


#: detectors are probed at 256 px: small, and P7 (stride 128) still 2×2, so every FPN level carries signal
DETECTION_SIZE = "256"


def _offline(side: str, spec: dict) -> list[str]:
    """No pretrained weights, and detectors at a small size (the probe only needs shapes to line up)."""
    args = []
    for key in PRETRAINED_ARGUMENTS:
        if (spec.get("init_args") or {}).get(key) is not None:
            args += [f"--model.{side}.init_args.{key}", "null"]
    for key in ("min_size", "max_size"):
        if (spec.get("init_args") or {}).get(key) is not None:
            args += [f"--model.{side}.init_args.{key}", DETECTION_SIZE]
    return args


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda path: path.stem)
def test_every_experiment_builds_offline(config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    resolved = _resolved(config)
    model = resolved["model"]
    detection = model["task"]["class_path"].endswith("DetectionTask")
    args = ["--config", str(config), "--runs_root", str(tmp_path / "runs"), "--trainer.logger", "false",
            "--model.task.init_args.example_size", DETECTION_SIZE if detection else "64",
            *_offline("student", model["student"])]  # fmt: skip
    if model.get("teacher"):
        teacher = build(without_pretrained(model["teacher"]))
        torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
        args += ["--model.teacher_checkpoint", str(tmp_path / "teacher.pt"), *_offline("teacher", model["teacher"])]
    if model.get("teachers"):  # the teachers beside model.teacher: without pretrained weights, a file each
        specs = {name: without_pretrained(spec) for name, spec in model["teachers"].items()}
        for name, spec in specs.items():
            torch.save(build(spec).state_dict(), tmp_path / f"{name}.pt")
        files = {name: str(tmp_path / f"{name}.pt") for name in specs}
        args += ["--model.teachers", json.dumps(specs), "--model.teacher_checkpoints", json.dumps(files)]
    cli = DistillCLI(args=args, run=False)
    terms = model.get("terms") or []
    built = [] if cli.model.distiller is None else list(cli.model.distiller.iter_pairs())
    assert sorted({pair.term_name for pair in built}) == sorted(term["name"] for term in terms)
    assert (cli.model.teacher is None) == (not model.get("teacher"))
    assert sorted(cli.model.teachers) == sorted(model.get("teachers") or {})


def test_a_network_a_checkpoint_replaces_is_built_without_downloading_its_pretrained_weights(tmp_path, monkeypatch):
    """The teacher of shapes_cwd asks for ImageNet weights, but a teacher_checkpoint replaces them: nothing is
    fetched (offline this would fail), and the config still says what was written."""
    from cwd_lightning.models import build_segmentation_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.save(build_segmentation_model("PSPNet", "resnet34", 11, None).state_dict(), tmp_path / "teacher.pt")
    cli = DistillCLI(args=["--config", str(REPO / "experiments" / "shapes_cwd.yaml"), "--runs_root", str(tmp_path),
                           "--model.teacher.init_args.encoder_weights", "imagenet",
                           "--model.teacher_checkpoint", str(tmp_path / "teacher.pt"), "--trainer.logger", "false"],
                     run=False)  # fmt: skip
    assert cli.model.teacher is not None
    assert cli.config["model"]["teacher"]["init_args"]["encoder_weights"] == "imagenet"


def test_cityscapes_cwd_runs_with_an_mmseg_teacher_file(tmp_path, monkeypatch):
    """The cityscapes_cwd_mmseg preset with an mmseg model-zoo file of PSPNet-R101-D8 (the fixture's seeded
    weights in mmseg's key names): built offline, the teacher converted, the probe run."""
    import json

    from tests.helpers import seeded_state

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = json.loads((REPO / "tests" / "fixtures" / "openmmlab" / "mmseg_pspnet_r101-d8.json").read_text())
    teacher = tmp_path / "pspnet_r101-d8_512x1024_80k_cityscapes.pth"
    torch.save({"meta": {"mmseg_version": "0.x"}, "state_dict": seeded_state(record["keys"])}, teacher)
    cli = DistillCLI(args=["--config", str(REPO / "experiments" / "cityscapes_cwd_mmseg.yaml"), "--runs_root",
                           str(tmp_path / "runs"), "--model.teacher_checkpoint", str(teacher),
                           "--model.student.init_args.encoder_weights", "null", "--model.task.init_args.example_size",
                           "64", "--trainer.logger", "false"], run=False)  # fmt: skip
    (pair,) = cli.model.distiller.pairs["cwd_logits"]
    assert pair.teacher_path == "decode_head.classifier"
    expected = seeded_state({"decode_head.conv_seg.weight": record["keys"]["decode_head.conv_seg.weight"]})
    assert torch.equal(cli.model.teacher.decode_head.classifier.weight, expected["decode_head.conv_seg.weight"])
    assert cli.model.teacher_fingerprint is not None


def test_coco_retinanet_cwd_runs_with_an_mmdet_teacher_file(tmp_path, monkeypatch):
    """The coco_retinanet_cwd_mmdet preset with an mmdet model-zoo file as its teacher (the R50 fixture's seeded
    weights, standing in for the X101 file): built offline in mmdet's layout, the teacher converted, the probe run
    over the five FPN levels."""
    import json

    from tests.helpers import seeded_state

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = json.loads((REPO / "tests" / "fixtures" / "openmmlab" / "mmdet_retinanet_r50_fpn.json").read_text())
    teacher = tmp_path / "retinanet_r50_fpn_2x_coco.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": seeded_state(record["keys"])}, teacher)
    size = ["--model.task.init_args.example_size", DETECTION_SIZE]
    for side in ("student", "teacher"):
        size += [
            f"--model.{side}.init_args.{key}" if i % 2 == 0 else DETECTION_SIZE
            for key in ("min_size", "max_size")
            for i in range(2)
        ]
    cli = DistillCLI(args=["--config", str(REPO / "experiments" / "coco_retinanet_cwd_mmdet.yaml"), "--runs_root",
                           str(tmp_path / "runs"), "--model.teacher.init_args.backbone", "resnet50",
                           "--model.teacher.init_args.checkpoint", str(teacher),
                           "--model.student.init_args.backbone_weights", "null", *size, "--trainer.logger", "false"],
                     run=False)  # fmt: skip
    levels = ["0", "1", "2", "p6", "p7"]
    assert [pair.teacher_path for pair in cli.model.distiller.pairs["cwd_fpn"]] == [f"backbone.fpn/{k}" for k in levels]
    for side in (cli.model.teacher, cli.model.student):  # both in mmdet's layout: P6 from C5
        assert side.backbone.fpn.extra_blocks.p6.in_channels == 2048
    expected = seeded_state({"bbox_head.retina_reg.weight": record["keys"]["bbox_head.retina_reg.weight"]})
    assert torch.equal(cli.model.teacher.head.regression_head.bbox_reg.weight, expected["bbox_head.retina_reg.weight"])
    assert cli.model.teacher_fingerprint is not None
