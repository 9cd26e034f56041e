"""The learning-rate schedules are torch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwd_lightning.distill.schedules import build_schedule


# ---------------------------------------------------------------- schedules: torch's own
@pytest.mark.parametrize(("schedule", "warmup"), [("poly", 0), ("poly", 10), ("onecycle", 0), ("constant", 5)])
def test_schedules_give_torchs_learning_rates(schedule, warmup):
    from torch.optim.lr_scheduler import ConstantLR, LinearLR, OneCycleLR, PolynomialLR, SequentialLR

    total, base = 100, 0.02
    ours = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_schedule(ours, schedule, total, warmup, poly_power=0.9)
    if schedule == "onecycle":
        expected = OneCycleLR(reference, max_lr=base, total_steps=total)
    else:
        main = PolynomialLR(reference, total - warmup, 0.9) if schedule == "poly" else ConstantLR(reference, 1.0, 0)
        expected = main
        if warmup:
            expected = SequentialLR(reference, [LinearLR(reference, 1 / warmup, 1.0, warmup), main], [warmup])
    for step in range(total):
        if step < warmup:  # torch's LinearLR ramp, in closed form
            factor = 1 / warmup + (1 - 1 / warmup) * step / warmup
            assert ours.param_groups[0]["lr"] == pytest.approx(base * factor, rel=1e-9)
        elif schedule == "poly":
            expected_lr = base * (1 - (step - warmup) / (total - warmup)) ** 0.9
            assert ours.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-9)
        elif schedule == "constant":
            assert ours.param_groups[0]["lr"] == pytest.approx(base, rel=1e-12)
        if step in (0, 1, warmup, 37, total - 1) or step == warmup - 1:
            assert ours.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        ours.step()
        scheduler.step()
        reference.step()
        expected.step()


def test_bad_schedules_are_refused():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="one-cycle schedule has its own warm-up"):
        build_schedule(optimizer, "onecycle", 100, warmup_steps=5)
    with pytest.raises(ValueError, match="warmup_steps: 100 must be"):
        build_schedule(optimizer, "poly", 100, warmup_steps=100)
    with pytest.raises(ValueError, match="'cosine' is not one of"):
        build_schedule(optimizer, "cosine", 100)
