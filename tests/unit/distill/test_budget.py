"""Training for a budget of time: the run stops at its budget with its schedule ended, validated once more, the
time spent kept in the checkpoint; torch's schedulers run over virtual steps advanced with the budget spent."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

from cwd_lightning.distill.budget import TimeBudget, TrainingClock
from cwd_lightning.distill.schedules import VIRTUAL_STEPS, advance_to, build_schedule
from tests.helpers import cwd_module, tiny_datamodule


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)


@pytest.mark.parametrize("schedule", ["onecycle", "poly"])
def test_advance_to_is_the_schedule_at_that_share_of_its_virtual_steps(schedule):
    driven, reference = optimizer(), optimizer()
    driven_schedule = build_schedule(driven, schedule, VIRTUAL_STEPS)
    reference_schedule = build_schedule(reference, schedule, VIRTUAL_STEPS)
    for progress in (0.0, 0.1, 0.2999, 0.5, 0.77, 1.0):
        advance_to(driven_schedule, progress)
        while reference_schedule.last_epoch < min(VIRTUAL_STEPS - 1, int(progress * VIRTUAL_STEPS)):
            reference_schedule.step()
        assert driven.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        assert driven.param_groups[0]["betas"] == reference.param_groups[0]["betas"]  # one-cycle's momentum too
    if schedule == "onecycle":  # the end of the budget is the end of the schedule: lr / (25 · 1e4)
        assert isinstance(driven_schedule, OneCycleLR)
        assert driven.param_groups[0]["lr"] == pytest.approx(4e-3 / 25 / 1e4, rel=1e-2)


def test_clock_counts_process_seconds_and_resumes():
    clock = TrainingClock(TimeBudget(0.05, "process"))
    clock.start(torch.device("cpu"))
    total = 0.0
    while clock.elapsed == 0.0 or not clock.spent:
        for _ in range(20000):
            total += math.sqrt(2.0)
        clock.stop()
        assert clock.progress < 1.0 or clock.elapsed >= 0.05  # a step counts only once it has ended
        clock.end_step()
        clock.start(torch.device("cpu"))
    assert clock.spent and clock.progress == 1.0 and clock.elapsed >= 0.05
    other = TrainingClock(TimeBudget(0.05, "process"))
    other.load_state_dict(clock.state_dict())
    assert other.elapsed == clock.elapsed


def test_every_rank_counts_the_slowest_ranks_step_so_all_stop_together():
    """Under DDP each rank measures its own step; the step counts as the slowest rank's (a max all-reduce), so the
    ranks' clocks, progress and stopping step agree (they drifted apart before: one could stop while another
    waited in a collective)."""
    fast, slow = TrainingClock(TimeBudget(1.0, "wall")), TrainingClock(TimeBudget(1.0, "wall"))
    measured = {id(fast): [0.1, 0.2, 0.3, 0.4], id(slow): [0.3, 0.1, 0.5, 0.2]}
    for step in range(4):
        slowest = max(measured[id(clock)][step] for clock in (fast, slow))  # what the max all-reduce returns
        for clock in (fast, slow):
            clock._step = measured[id(clock)][step]  # what this rank measured
            clock.end_step(slowest=lambda _, slowest=slowest: slowest)
        assert fast.elapsed == slow.elapsed and fast.spent == slow.spent
    assert fast.elapsed == pytest.approx(0.3 + 0.2 + 0.5 + 0.4) and fast.spent


@pytest.mark.parametrize(("make", "match"), [(lambda: TimeBudget(0), "seconds"),
                                             (lambda: TimeBudget(5, "gpu"), "clock")])  # fmt: skip
def test_bad_budgets_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []
        self.validations = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.spent = [*getattr(self, "spent", []), module.clock.elapsed]  # the steps that have ended

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, module) -> None:
        self.spent.append(module.clock.elapsed)

    def on_validation_end(self, trainer, module) -> None:
        self.validations += 1


def test_a_budgeted_fit_stops_at_its_budget_with_its_schedule_ended(teacher_file, tiny_shapes, tmp_path):
    module = cwd_module(teacher_file, lr_schedule="onecycle", time_budget=TimeBudget(4.0, "process"))
    rates = LearningRates()
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_progress_bar=False, callbacks=[rates],
                        val_check_interval=1000, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))
    steps = trainer.global_step
    assert steps >= 3 and module.clock.spent
    assert rates.spent[-2] < 4.0 <= rates.spent[-1]  # it stopped after the step that spent the budget
    assert rates.validations == 1  # the step-count validation never came: the one at the stop did
    peak = max(rates.rates)
    assert rates.rates[-1] < 0.05 * peak  # one-cycle ran to its end within the budget
    assert trainer.callback_metrics["train/budget_spent_s"].item() == pytest.approx(module.clock.elapsed, rel=1e-6)
    path = tmp_path / "budget.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["time_budget"]["elapsed"] == pytest.approx(module.clock.elapsed)


def test_a_budget_with_a_step_limit_is_refused(teacher_file, tiny_shapes):
    module = cwd_module(teacher_file, time_budget=TimeBudget(1.0))
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"trainer\.max_steps: -1"):
        trainer.fit(module, tiny_datamodule(tiny_shapes))
    with pytest.raises(ValueError, match="warmup_steps"):
        cwd_module(teacher_file, time_budget=TimeBudget(1.0), warmup_steps=5)
