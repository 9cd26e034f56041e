"""Training for a budget of time instead of a number of steps: the clock the run keeps of its own training loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LRScheduler

from cwd_lightning.distill.schedules import advance_to

Clock = Literal["auto", "process", "wall"]


@dataclass
class TimeBudget:
    """``model.time_budget``: train until ``seconds`` of the training loop are spent (every training step from
    the fetched batch to the end of its update; data loading, validation and checkpoints not counted), with the
    learning-rate schedule and the terms' weight schedules defined over the budget, so every run ends its
    schedule whatever its step time. ``clock``: ``process`` = this process's CPU seconds (all its threads; not
    slowed by other work on the machine, only by less cache), ``wall`` = elapsed seconds (on a GPU after
    synchronising it), ``auto`` = ``process`` on CPU, ``wall`` on a GPU. Set ``trainer.max_steps: -1`` (and
    ``max_epochs: -1``) so that the budget alone ends the run."""

    seconds: float
    clock: Clock = "auto"

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"model.time_budget.seconds must be > 0, got {self.seconds}")
        if self.clock not in ("auto", "process", "wall"):
            raise ValueError(f"model.time_budget.clock: {self.clock!r} is not 'auto', 'process' or 'wall'")


class TrainingClock:
    """The seconds spent in training steps so far (kept in the checkpoint, so a resumed run goes on counting).
    A step's seconds count once it has ended, as the slowest rank's under DDP (a step waits for every rank
    anyway): so every rank holds the same ``elapsed``, stops at the same step and follows the same schedule."""

    def __init__(self, budget: TimeBudget, warmup_steps: int = 0) -> None:
        if warmup_steps:
            raise ValueError("model.warmup_steps: a schedule over model.time_budget has no step count; use "
                             "lr_schedule: onecycle (its own warm-up) or 0")  # fmt: skip
        self.budget = budget
        self.elapsed = 0.0
        self._step = 0.0  # this step's seconds so far, on this rank
        self._started: float | None = None
        self._device: torch.device | None = None

    def _now(self) -> float:
        clock = self.budget.clock
        if clock == "auto":
            clock = "wall" if self._device is not None and self._device.type == "cuda" else "process"
        if clock == "wall":
            if self._device is not None and self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            return time.perf_counter()
        return time.process_time()

    def start(self, device: torch.device) -> None:
        self._device = device
        self._started = self._now()

    def stop(self) -> None:
        if self._started is not None:
            self._step += self._now() - self._started
            self._started = None

    def end_step(self, slowest: Callable[[float], float] = float) -> None:
        """Stop, and count this step's seconds (``slowest``: the maximum over the ranks under DDP)."""
        self.stop()
        self.elapsed += slowest(self._step)
        self._step = 0.0

    def advance(self, scheduler: LRScheduler) -> None:
        """Step a schedule built over the budget to the share spent (the time this takes is not counted)."""
        self.stop()
        advance_to(scheduler, self.progress)
        self.start(self._device)

    @property
    def progress(self) -> float:
        """The share of the budget spent by the steps that have ended, 0…1."""
        return min(1.0, self.elapsed / self.budget.seconds)

    @property
    def spent(self) -> bool:
        return self.elapsed >= self.budget.seconds

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed, "seconds": self.budget.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed = float(state["elapsed"])


class TimeBudgetSteps:
    """The DistillationModule's hooks for ``time_budget`` (its ``clock``: None without one): the clock runs
    through each training step, the learning-rate schedule follows the share spent, and the run stops once the
    budget is spent (Lightning validates once more then)."""

    clock: TrainingClock | None

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """One step, or under a time budget: to the share of the budget spent."""
        scheduler.step() if self.clock is None else self.clock.advance(scheduler)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.clock is not None:
            self.clock.start(self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.clock is not None:
            self.clock.end_step(self._slowest if self.trainer.world_size > 1 else float)
            self.log("train/budget_spent_s", self.clock.elapsed)
            self.trainer.should_stop = self.trainer.should_stop or self.clock.spent  # validated once more

    def _slowest(self, seconds: float) -> float:
        return float(self.trainer.strategy.reduce(torch.tensor(seconds, device=self.device), reduce_op="max"))

    def check_budget_limits(self) -> None:
        if self.clock is not None and self.trainer.max_steps != -1:
            raise ValueError(f"model.time_budget ends the run, but trainer.max_steps is {self.trainer.max_steps}: "
                             "set trainer.max_steps: -1 (and trainer.max_epochs: -1)")  # fmt: skip
