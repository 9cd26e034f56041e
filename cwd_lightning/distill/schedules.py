"""Learning-rate schedules, built from torch's schedulers (stepped once per optimiser step)."""

from __future__ import annotations

from typing import Literal

import torch
from torch.optim.lr_scheduler import ConstantLR, LinearLR, LRScheduler, OneCycleLR, PolynomialLR, SequentialLR

Schedule = Literal["poly", "onecycle", "constant"]

#: the steps of a schedule defined over a time budget: it is built over these and advanced to the share of the
#: budget spent (``advance_to``), so torch's schedulers run unchanged and end when the budget does
VIRTUAL_STEPS = 10_000


def build_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    total_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 0.9,
) -> LRScheduler:
    """``poly``: lr·(1 − t/T)^power, the CWD / mmseg recipe (``PolynomialLR``); ``onecycle``: torch's
    ``OneCycleLR`` peaking at the optimiser's lr (it has its own warm-up); ``constant``. ``warmup_steps``
    prepends a linear warm-up from lr/warmup_steps (``LinearLR`` then ``SequentialLR``); the main schedule
    then runs over the remaining steps."""
    if schedule not in ("poly", "onecycle", "constant"):
        raise ValueError(f"model.lr_schedule: {schedule!r} is not one of 'poly', 'onecycle', 'constant'")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"model.warmup_steps: {warmup_steps} must be ≥ 0 and below the {total_steps} training steps")
    if schedule == "onecycle":
        if warmup_steps:
            raise ValueError("model.warmup_steps: the one-cycle schedule has its own warm-up; set it to 0")
        return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps)
    main_steps = total_steps - warmup_steps
    if schedule == "poly":
        main: LRScheduler = PolynomialLR(optimizer, total_iters=main_steps, power=poly_power)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup_steps:
        return main
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def advance_to(scheduler: LRScheduler, progress: float) -> None:
    """Step a schedule built over ``VIRTUAL_STEPS`` to the point ``progress`` (0…1) of its budget."""
    target = min(VIRTUAL_STEPS - 1, int(progress * VIRTUAL_STEPS))
    while scheduler.last_epoch < target:
        scheduler.step()
