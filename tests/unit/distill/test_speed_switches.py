"""The speed switches against the fp32 path: bf16 autocast, channels_last, a compiled student."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.helpers import cwd_module, tiny_datamodule


@pytest.fixture()
def setup(tiny_shapes, teacher_file):
    data = tiny_datamodule(tiny_shapes)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return teacher_file, batch


def _losses(module, batch, autocast: bool = False) -> dict[str, float]:
    module.eval()  # BatchNorm on running statistics: every variant sees the same normalisation
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = module.step_losses(batch, module.task.training_loss)
        task, distill, values = losses.task, losses.distill, losses.values
    assert task.dtype == torch.float32 and distill.dtype == torch.float32  # losses in fp32 under autocast too
    return {"task": float(task), "distill": float(distill), **{k: float(v) for k, v in values.items()}}


def _same_weights(teacher_file, reference, **switches):
    module = cwd_module(teacher_file, **switches)
    module.load_state_dict(reference.state_dict())
    return module


def test_bf16_autocast_matches_fp32_within_3_percent(setup):
    teacher_file, batch = setup
    module = cwd_module(teacher_file)
    fp32, bf16 = _losses(module, batch), _losses(module, batch, autocast=True)
    assert fp32.keys() == bf16.keys() == {"task", "distill", "cwd_logits"}
    for key in fp32:
        assert bf16[key] == pytest.approx(fp32[key], rel=0.03), key


def test_channels_last_matches_fp32(setup):
    teacher_file, batch = setup
    reference = cwd_module(teacher_file)
    module = _same_weights(teacher_file, reference, channels_last=True)
    module.configure_model()
    assert module.student.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images, _ = module.speed.inputs(batch)
    assert images.is_contiguous(memory_format=torch.channels_last)
    expected, got = _losses(reference, batch), _losses(module, batch)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_a_compiled_student_matches_eager_and_keeps_its_recorded_tensors(setup):
    teacher_file, batch = setup
    reference = cwd_module(teacher_file)
    module = _same_weights(teacher_file, reference, compile_student="aot_eager")
    module.configure_model()
    assert module.student._compiled_call_impl is not None  # nn.Module.compile, in place
    assert set(module.student.state_dict()) == set(reference.student.state_dict())  # names unchanged
    from torch._dynamo.utils import counters

    counters.clear()
    expected = _losses(reference, batch)
    graphs = []
    for _ in range(3):  # later calls run the cached graph: the recorder's per-step hooks cause no recompile
        got = _losses(module, batch)
        graphs.append(counters["stats"]["unique_graphs"])
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert graphs == [1, 1, 1]


def test_bf16_mixed_training_through_lightning(setup, tiny_shapes):
    teacher_file, _ = setup
    module = cwd_module(teacher_file)
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=1, val_check_interval=2,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))
    assert trainer.global_step == 2
    assert 0.0 <= float(trainer.callback_metrics["val/mIoU"]) <= 1.0
    assert module.non_finite_state() == []


def _teacher_logits(module, batch, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return module.live_teachers["teacher"].outputs(batch)["segmentation_head"][0]


def test_the_teachers_precision_is_their_own(setup):
    """bf16/fp16: fp32 targets within a small CWD of the fp32 teacher's; 32: fp32 bit for bit even under the
    student's bf16 autocast; auto: as the student (bf16 under its autocast)."""
    from cwd_lightning.losses import ChannelWiseDivergence

    teacher_file, batch = setup
    reference = cwd_module(teacher_file)
    fp32 = _teacher_logits(reference, batch)
    cwd = ChannelWiseDivergence(4.0)
    for precision in ("bf16", "16"):
        low = _teacher_logits(_same_weights(teacher_file, reference, teacher_precision=precision), batch)
        assert low.dtype == torch.float32 and not torch.equal(low, fp32), precision
        assert float(cwd(low, fp32)) < 1e-3, precision
        assert float((low - fp32).abs().max()) < 0.05 * float(fp32.abs().max()), precision
    in_fp32 = _teacher_logits(_same_weights(teacher_file, reference, teacher_precision="32"), batch, autocast=True)
    assert torch.equal(in_fp32, fp32)
    assert _teacher_logits(reference, batch, autocast=True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"model.teacher_precision must be auto, 32, bf16 or 16, got 'fp8'"):
        cwd_module(teacher_file, teacher_precision="fp8")


def test_the_teachers_layout_is_their_own(setup):
    teacher_file, _ = setup
    module = cwd_module(teacher_file, channels_last=True, teacher_channels_last=False)
    module.configure_model()
    assert module.student.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.teacher.encoder.conv1.weight.is_contiguous()
    only_teacher = cwd_module(teacher_file, teacher_channels_last=True)
    only_teacher.configure_model()
    assert only_teacher.teacher.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert only_teacher.student.encoder.conv1.weight.is_contiguous()
