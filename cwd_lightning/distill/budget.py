"""Training for a budget of time instead of a number of steps: the clock the run keeps of its own training loop."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

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
    """The seconds spent in training steps so far (kept in the checkpoint, so a resumed run goes on counting)."""

    def __init__(self, budget: TimeBudget) -> None:
        self.budget = budget
        self.elapsed = 0.0
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
            self.elapsed += self._now() - self._started
            self._started = None

    @property
    def progress(self) -> float:
        """The share of the budget spent, 0…1."""
        return min(1.0, self.elapsed / self.budget.seconds)

    @property
    def spent(self) -> bool:
        return self.elapsed >= self.budget.seconds

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed, "seconds": self.budget.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.elapsed = float(state["elapsed"])
