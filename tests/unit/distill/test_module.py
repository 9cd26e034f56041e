"""The DistillationModule: a frozen teacher in eval mode, every student parameter trained, the teacher's
weights checked and kept out of checkpoints, connectors, non-finite values stopped."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from cwd_lightning.distill import DistillationModule, DistillTerm
from cwd_lightning.distill.teacher import fingerprint
from cwd_lightning.losses import ChannelWiseDivergence
from cwd_lightning.models import build_segmentation_model
from cwd_lightning.tasks import SegmentationTask
from tests.helpers import cwd_module, tiny_datamodule, tiny_segmenter

NUM_CLASSES = 11


class _TeacherModeProbe(L.Callback):
    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.modes.append(module.teacher.training or any(m.training for m in module.teacher.modules()))


def test_teacher_stays_frozen_and_in_eval_mode_across_epochs(teacher_file, tiny_shapes):
    module = cwd_module(teacher_file)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    probe = _TeacherModeProbe()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[probe])  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))

    assert trainer.global_step == 6
    assert probe.modes == [False] * 6  # Lightning calls .train() every epoch; the teacher stays in eval
    for key, value in module.teacher.state_dict().items():  # BN running stats included
        assert torch.equal(value, teacher_before[key]), key
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())
    assert module.teacher_fingerprint == fingerprint(module.teacher)
    hooks = [m for m in (*module.teacher.modules(), *module.student.modules()) if m._forward_hooks]
    assert hooks == []  # every recorder handle was removed
    logged = trainer.callback_metrics
    assert {"train/loss_task", "train/distill/cwd_logits", "train/distill_to_task", "val/mIoU"} <= set(logged)
    expected_ratio = 3.0 * logged["train/distill/cwd_logits"] / logged["train/loss_task"]
    assert logged["train/distill_to_task"].item() == pytest.approx(expected_ratio.item(), rel=1e-4)


def test_every_student_parameter_receives_a_gradient():
    """smp's PSPNet builds 5 ResNet stages and uses 3; the builder removes the rest."""
    student = tiny_segmenter()
    assert not any(name.startswith("encoder.layer4") for name, _ in student.named_parameters())
    loss = student(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert [n for n, p in student.named_parameters() if p.grad is None] == []


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"teacher checkpoint '.*nope.ckpt' not found.*make train"):
        cwd_module(tmp_path / "nope.ckpt")
    monkeypatch.chdir(tmp_path)  # a relative path: the error names the base it was read from
    with pytest.raises(FileNotFoundError, match=rf"read from the working directory: {tmp_path}/runs/t/best.ckpt"):
        cwd_module("runs/t/best.ckpt")


def test_teacher_checkpoint_of_another_architecture_lists_keys(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(tiny_segmenter("Unet", "resnet18").state_dict(), other)
    with pytest.raises(ValueError, match=r"does not match the configured teacher architecture") as error:
        cwd_module(other)
    assert "missing keys" in str(error.value) and "unexpected keys" in str(error.value)


def test_terms_need_a_teacher_and_a_teacher_needs_weights(teacher_file):
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationModule(SegmentationTask(NUM_CLASSES), tiny_segmenter(), terms=[
            DistillTerm("t", "segmentation_head", "segmentation_head", ChannelWiseDivergence())])  # fmt: skip
    with pytest.raises(ValueError, match="teacher_checkpoint is not"):
        DistillationModule(SegmentationTask(NUM_CLASSES), tiny_segmenter(), teacher=tiny_segmenter())


def test_shape_mismatch_needs_a_connector_and_connectors_are_trained(teacher_file, tiny_shapes):
    # PSPNet decoder: 512 channels at stride 8; FPN decoder: 128 channels at stride 4
    term = partial(DistillTerm, "features", "decoder", "decoder", ChannelWiseDivergence(4.0), 10.0)
    with pytest.raises(ValueError, match=r"student 'decoder' gives \(512, 4, 4\) and teacher 'decoder' gives "
                                         r"\(128, 8, 8\).*connector"):  # fmt: skip
        cwd_module(teacher_file, terms=[term()])
    module = cwd_module(teacher_file, terms=[term(connector="conv_bn", resize="student_to_teacher")])
    connector = module.distiller.pairs["features"][0].connector
    assert connector[0].in_channels == 512 and connector[0].out_channels == 128
    optimised = {id(p) for p in module.trainable_parameters()}
    assert all(id(p) in optimised for p in connector.parameters())
    assert not any(id(p) in optimised for p in module.teacher.parameters())
    before = connector[0].weight.detach().clone()
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))
    assert not torch.equal(connector[0].weight, before)
    assert "train/distill/features" in trainer.callback_metrics


def test_checkpoints_hold_no_teacher_and_check_its_fingerprint(teacher_file, tmp_path):
    module = cwd_module(teacher_file)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert checkpoint["teacher_fingerprint"] == fingerprint(module.teacher)

    module.on_load_checkpoint(checkpoint)  # same teacher: restores its weights for a strict load
    module.load_state_dict(checkpoint["state_dict"])

    torch.manual_seed(123)
    other = tmp_path / "other_teacher.pt"
    torch.save(tiny_segmenter("FPN", "resnet18").state_dict(), other)
    with pytest.raises(ValueError, match="teacher does not match"):
        cwd_module(other).on_load_checkpoint({"state_dict": {}, "teacher_fingerprint": fingerprint(module.teacher)})


def test_timm_encoders_plug_in_through_tu_names():
    student = build_segmentation_model("PSPNet", "tu-mobilenetv3_small_050", 3, encoder_weights=None)
    assert student(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    student(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [n for n, p in student.named_parameters() if p.grad is None] == []


def test_missing_imagenet_weights_fail_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network: no 20 s of retries
    with pytest.raises(
        RuntimeError, match=r"could not load 'imagenet' weights for encoder 'resnet18'.*encoder_weights: null"
    ):
        build_segmentation_model("PSPNet", "resnet18", 3, encoder_weights="imagenet")


class _Diverge(L.Callback):
    """After step 2, one BatchNorm statistic of the student becomes inf (what a learning-rate spike does)."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == 2:
            bn = next(m for m in pl_module.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var[0] = float("inf")


def test_a_diverged_student_is_never_validated_or_saved(teacher_file, tiny_shapes, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = cwd_module(teacher_file)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/mIoU", mode="max", save_top_k=1)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, logger=False,
                        callbacks=[_Diverge(), best], enable_progress_bar=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"at step 2, before validation: student\..*running_var"):
        trainer.fit(module, tiny_datamodule(tiny_shapes))
    assert not list(tmp_path.glob("*.ckpt"))  # the validation at step 2 was the first: nothing saved
    with pytest.raises(FloatingPointError, match="before writing a checkpoint"):
        trainer.save_checkpoint(tmp_path / "manual.ckpt")
    assert not (tmp_path / "manual.ckpt").exists()


class _NaNLoss(torch.nn.Module):
    def forward(self, student, teacher):
        return (student - teacher).abs().mean() * float("nan")


def test_a_non_finite_term_is_named_with_its_step(teacher_file, tiny_shapes):
    terms = [DistillTerm("broken", "segmentation_head", "segmentation_head", _NaNLoss(), 1.0)]
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0 in train/loss, train/distill/broken"):
        trainer.fit(cwd_module(teacher_file, terms), tiny_datamodule(tiny_shapes))
