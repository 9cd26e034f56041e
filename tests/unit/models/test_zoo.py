"""Teachers from the model zoos (torchvision, smp) and the `/out` output selector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cwd_lightning.cli import DistillCLI
from cwd_lightning.distill import DistillTerm
from cwd_lightning.distill.teacher import fingerprint_state
from cwd_lightning.losses import ChannelWiseDivergence
from tests.helpers import REPO, tiny_detection_datamodule, tiny_overrides


def _fake_torchvision_weights(torch_home: Path, name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A randomly initialised ``name`` saved under the file name torchvision downloads its DEFAULT weights to."""
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(name).DEFAULT
    torch.manual_seed(0)
    state = get_model(name, weights=None, weights_backbone=None, num_classes=len(weights.meta["categories"]),
                      **kwargs).state_dict()  # fmt: skip
    path = torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _spec(builder: str, **init_args) -> str:
    """A whole ``--model.teacher`` value (replacing the YAML's, init_args included)."""
    # jsonargparse keeps init_args of the replaced class that the new one also takes (num_classes): reset it
    init_args = {"num_classes": None, **init_args} if builder == "torchvision_model" else init_args
    return json.dumps({"class_path": f"cwd_lightning.models.zoo.{builder}", "init_args": init_args})


def _fit(cli: DistillCLI) -> dict[str, torch.Tensor]:
    teacher_before = {k: v.clone() for k, v in cli.model.teacher.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert all(torch.equal(v, teacher_before[k]) for k, v in cli.model.teacher.state_dict().items())
    return cli.trainer.callback_metrics


_QUIET = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
          "--trainer.limit_val_batches", "0"]  # fmt: skip


def test_a_torchvision_segmentation_teacher_with_dict_outputs(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = _fake_torchvision_weights(tmp_path / "torch", "deeplabv3_mobilenet_v3_large", aux_loss=True)
    cli = DistillCLI(args=[
        "--config", str(REPO / "experiments" / "shapes_cwd.yaml"), "--runs_root", str(tmp_path / "runs"),
        "--model.teacher", _spec("torchvision_model", name="deeplabv3_mobilenet_v3_large"),
        "--model.teacher_checkpoint", "null",
        "--model.terms.0.teacher", "classifier.4", "--model.terms.0.connector", "conv",
        "--model.terms.0.resize", "teacher_to_student", *tiny_overrides(tiny_shapes, 2), *_QUIET,
    ], run=False)  # fmt: skip
    teacher = cli.model.teacher
    assert teacher.pretrained_source.startswith("torchvision deeplabv3_mobilenet_v3_large")
    assert cli.model.teacher_fingerprint == fingerprint_state(state)  # the cached file, loaded as it is
    assert set(teacher(torch.zeros(1, 3, 32, 32))) == {"out", "aux"}
    logged = _fit(cli)
    assert torch.isfinite(logged["train/distill/cwd_logits"]) and float(logged["train/distill/cwd_logits"]) > 0


def test_a_torchvision_detector_teacher(tiny_shapes, tmp_path, monkeypatch):
    tiny_detection_datamodule(tiny_shapes.parent / "det_shapes").prepare_data()  # the tiny data as COCO json
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = _fake_torchvision_weights(tmp_path / "torch", "fcos_resnet50_fpn")
    # at 64 px P5 is 2×2 (at 32 px it is 1×1, where CWD is refused)
    cli = DistillCLI(args=[
        "--config", str(REPO / "experiments" / "shapes_det_cwd.yaml"), "--runs_root", str(tmp_path / "runs"),
        "--model.teacher", _spec("torchvision_model", name="fcos_resnet50_fpn", min_size=64, max_size=64),
        "--model.teacher_checkpoint", "null",
        "--model.student.init_args.min_size", "64", "--model.student.init_args.max_size", "64",
        "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.root", str(tiny_shapes.parent / "det_shapes"), "--data.init_args.shapes", "null",
        "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--model.task.init_args.example_size", "64", *_QUIET,
    ], run=False)  # fmt: skip
    assert cli.model.teacher_fingerprint == fingerprint_state(state)
    logged = _fit(cli)
    assert all(torch.isfinite(logged[f"train/distill/cwd_fpn/{level}"]) for level in ("0", "1", "2"))


def test_an_smp_from_pretrained_teacher_from_a_local_folder(tiny_shapes, tmp_path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    saved = smp.Unet("resnet18", encoder_weights=None, classes=11)
    saved.save_pretrained(str(tmp_path / "unet"))
    cli = DistillCLI(args=[
        "--config", str(REPO / "experiments" / "shapes_cwd.yaml"), "--runs_root", str(tmp_path / "runs"),
        "--model.teacher", _spec("smp_pretrained", source=str(tmp_path / "unet")), "--model.teacher_checkpoint", "null",
        # a U-Net's logits are full-resolution: both terms tap the upsampled logits
        "--model.terms.0.student", "segmentation_head", "--model.terms.0.teacher", "segmentation_head",
        *tiny_overrides(tiny_shapes, 2), *_QUIET,
    ], run=False)  # fmt: skip
    assert cli.model.teacher.pretrained_source == f"smp {tmp_path / 'unet'}"
    assert cli.model.teacher_fingerprint == fingerprint_state(saved.state_dict())
    logged = _fit(cli)
    assert float(logged["train/distill/cwd_logits"]) > 0


def test_a_missing_download_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    from cwd_lightning.models import zoo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url: str, destination: str, progress: bool = True) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    url = "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth"
    with pytest.raises(RuntimeError, match=rf"could not download {url}.*put it at {expected}"):
        zoo.torchvision_model("deeplabv3_resnet101")
    with pytest.raises(ValueError, match="no segmentation or detection model 'resnet18'"):
        zoo.torchvision_model("resnet18")
    with pytest.raises(RuntimeError, match="could not load the smp model from the folder"):
        zoo.smp_pretrained(str(tmp_path))


def test_a_teacher_without_weights_is_still_refused(tiny_shapes, tmp_path):
    with pytest.raises(SystemExit, match="teacher_checkpoint is not: a teacher with random weights"):
        config = str(REPO / "experiments" / "shapes_cwd.yaml")
        args = ["--config", config, "--runs_root", str(tmp_path), "--model.teacher_checkpoint", "null"]
        DistillCLI(args=[*args, *tiny_overrides(tiny_shapes, 2), *_QUIET], run=False)


def _torchvision_teacher_cli(teacher_path: str, written_in: str, tiny_shapes, tmp_path) -> DistillCLI:
    """shapes_cwd with a (random, cached) torchvision DeepLabV3 teacher whose term taps ``teacher_path``, the
    term written in a YAML file or on the command line."""
    _fake_torchvision_weights(tmp_path / "torch", "deeplabv3_mobilenet_v3_large", aux_loss=True)
    override = tmp_path / "term.yaml"
    loss = "{class_path: cwd_lightning.losses.ChannelWiseDivergence}"
    term = f"{{name: cwd_logits, student: segmentation_head, teacher: {teacher_path}, loss: {loss}, connector: conv}}"
    override.write_text(f"model:\n  terms:\n    - {term}\n")
    on_the_command_line = ["--model.terms.0.student", "segmentation_head", "--model.terms.0.teacher",
                           teacher_path.strip('"'), "--model.terms.0.connector", "conv"]  # fmt: skip
    where = ["--config", str(override)] if written_in == "yaml" else on_the_command_line
    return DistillCLI(args=[
        "--config", str(REPO / "experiments" / "shapes_cwd.yaml"), *where, "--runs_root", str(tmp_path / "runs"),
        "--model.teacher", _spec("torchvision_model", name="deeplabv3_mobilenet_v3_large"),
        "--model.teacher_checkpoint", "null", *tiny_overrides(tiny_shapes, 2), *_QUIET,
    ], run=False)  # fmt: skip


@pytest.mark.parametrize("written_in", ["yaml", "command line"])
def test_the_output_selector_is_a_path_not_a_yaml_list(written_in, tiny_shapes, tmp_path, monkeypatch):
    """``teacher: /out`` taps the key ``out`` of the teacher's own output (a dict for torchvision), written
    plain in YAML and on the command line alike."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cli = _torchvision_teacher_cli("/out", written_in, tiny_shapes, tmp_path)
    (pair,) = cli.model.distiller.pairs["cwd_logits"]
    assert pair.teacher_path == "/out"
    logged = _fit(cli)
    assert torch.isfinite(logged["train/distill/cwd_logits"]) and float(logged["train/distill/cwd_logits"]) > 0


@pytest.mark.parametrize("written_in", ["yaml", "command line"])
def test_the_old_selector_form_fails_naming_the_new_one(written_in, tiny_shapes, tmp_path, monkeypatch):
    """``"[out]"`` (read as the list ``["out"]``) and ``backbone.fpn[p6]`` were the selectors before
    ``/out`` and ``backbone.fpn/p6``: a config that still has them fails in one line that names the new form."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit, match=r"no module 'out' in teacher; .*write the path '/out'"):
        _torchvision_teacher_cli('"[out]"', written_in, tiny_shapes, tmp_path)
    with pytest.raises(ValueError, match=r"the selector 'backbone\.fpn\[p6\]' is written 'backbone\.fpn/p6' now"):
        DistillTerm("cwd_fpn", "backbone.fpn[p6]", "backbone.fpn[p6]", ChannelWiseDivergence())
