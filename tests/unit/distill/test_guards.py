"""The non-finite guard: a non-finite loss stops the run naming the part and the step, or (``skip``) skips the
step without a trace, counted and checkpointed, until the model has diverged; non-finite gradients and
weights are named."""

from __future__ import annotations

import pytest
import torch

from cwd_lightning.distill.guards import MAX_CONSECUTIVE_SKIPS, NonFiniteGuard
from tests.helpers import cwd_module, tiny_datamodule


def test_a_finite_step_passes_and_a_non_finite_one_stops_naming_the_part_and_step():
    guard = NonFiniteGuard("error")
    logs = {"train/loss": torch.tensor(1.0), "train/distill/cwd": torch.tensor(0.5)}
    assert guard.step_is_finite(logs, logs.values(), step=3, world_size=1)
    logs["train/distill/cwd"] = torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7 in train/distill/cwd \(task"):
        guard.step_is_finite(logs, logs.values(), step=7, world_size=1)
    assert guard.step_is_finite(logs, logs.values(), step=7, world_size=2)  # no per-step host sync under DDP


def test_skip_counts_each_skipped_step_and_gives_up_after_a_run_of_them():
    guard = NonFiniteGuard("skip")
    bad = {"train/loss": torch.tensor(float("inf"))}
    with pytest.warns(UserWarning, match="step skipped"):
        assert not guard.step_is_finite(bad, bad.values(), step=0, world_size=1)
    assert guard.step_is_finite({"train/loss": torch.tensor(1.0)}, [torch.tensor(1.0)], step=1, world_size=1)
    with (
        pytest.warns(UserWarning),
        pytest.raises(FloatingPointError, match=f"{MAX_CONSECUTIVE_SKIPS} batches in a row"),
    ):
        for step in range(2, 2 + MAX_CONSECUTIVE_SKIPS):
            guard.step_is_finite(bad, bad.values(), step=step, world_size=1)
    assert guard.skipped_steps == MAX_CONSECUTIVE_SKIPS  # 1 + (MAX − 1) before giving up
    restored = NonFiniteGuard("skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped_steps == guard.skipped_steps
    with pytest.raises(ValueError, match="not supported under DDP"):
        guard.check_distributed(world_size=2)
    with pytest.raises(ValueError, match="must be 'error' or 'skip'"):
        NonFiniteGuard("ignore")


def test_non_finite_gradients_and_weights_are_named():
    finite, infinite = torch.ones(3), torch.tensor([1.0, float("inf")])
    NonFiniteGuard.check_gradients([("a", finite), ("b", None)], step=0)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 4 \(finite loss\): b\. Stopped"):
        NonFiniteGuard.check_gradients([("a", finite), ("b", infinite)], step=4)
    named = [("student.w", finite), ("student.bn.num_batches_tracked", torch.tensor(3)), ("distiller.x", infinite)]
    assert NonFiniteGuard.non_finite(named) == ["distiller.x"]  # integer buffers are not checked
    with pytest.raises(
        FloatingPointError, match=r"at step 9, before validation: distiller\.x\. Stopped: no checkpoint"
    ):
        NonFiniteGuard().check_state(named, step=9, moment="before validation")


def test_on_non_finite_skip_counts_the_skipped_steps(teacher_file, tiny_shapes, tmp_path):
    import lightning as L

    from cwd_lightning.distill import DistillTerm

    class NaNAtFirstStep(torch.nn.Module):
        """Not finite on the first training batch (4 images; the build's probe runs on 2), finite after."""

        done = False

        def forward(self, student, teacher):
            loss = (student - teacher).abs().mean()
            if student.shape[0] == 4 and not self.done:
                self.done = True
                return loss * float("nan")
            return loss

    terms = [DistillTerm("sometimes", "segmentation_head", "segmentation_head", NaNAtFirstStep(), 1.0)]
    module = cwd_module(teacher_file, terms, on_non_finite="skip")
    poisoned = []

    def poison_once(layer, inputs):  # the first training batch reaches BatchNorm as NaN: its statistics move
        if layer.training and not poisoned:
            poisoned.append(True)
            return (inputs[0] * float("nan"),)
        return None

    module.student.encoder.bn1.register_forward_pre_hook(poison_once)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    skipped = r"non-finite loss at step 0 in train/loss, .*train/distill/sometimes.*: step skipped \(1 so far"
    with pytest.warns(UserWarning, match=skipped):
        trainer.fit(module, tiny_datamodule(tiny_shapes))
    assert module.guard.skipped_steps == 1 and trainer.global_step == 3 and poisoned
    assert module.non_finite_state() == []  # the skipped step's statistics were put back
    checkpoint: dict = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["skipped_steps"] == 1


def test_on_non_finite_skip_gives_up_on_a_diverged_model(teacher_file, tiny_shapes, tmp_path):
    import lightning as L

    from cwd_lightning.distill import DistillTerm
    from cwd_lightning.distill.guards import MAX_CONSECUTIVE_SKIPS

    class AlwaysNaN(torch.nn.Module):
        def forward(self, student, teacher):
            return (student - teacher).abs().mean() * (float("nan") if student.shape[0] == 4 else 1.0)

    terms = [DistillTerm("always", "segmentation_head", "segmentation_head", AlwaysNaN(), 1.0)]
    module = cwd_module(teacher_file, terms, on_non_finite="skip")
    trainer = L.Trainer(max_steps=50, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    with (
        pytest.warns(UserWarning, match="step skipped"),
        pytest.raises(FloatingPointError, match=f"for {MAX_CONSECUTIVE_SKIPS} batches in a row"),
    ):
        trainer.fit(module, tiny_datamodule(tiny_shapes))
    # a skipped batch still counts as a step for max_steps and the schedule (Lightning's count), without update
    assert module.guard.skipped_steps == MAX_CONSECUTIVE_SKIPS - 1 == trainer.global_step
