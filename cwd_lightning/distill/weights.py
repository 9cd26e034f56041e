"""A term's weight over training: a schedule (deferred start, warm-up, decay, stop) and an optional calibration
that sets the weight from measurements instead of a guess.

weight(t) = base · schedule.factor(t, progress), where base is the term's ``weight`` until a calibration
replaces it. Everything here is plain numbers kept in the checkpoint, so a resumed run continues with the
weights an uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

Decay = Literal["none", "linear", "cosine", "step"]


@dataclass
class WeightSchedule:
    """``schedule`` of a term: the factor its weight is multiplied by at global step t (0-based).

    0 before ``start`` (deferred start) and from ``stop`` on; a linear warm-up from 0 to 1 over ``warmup``
    steps after ``start`` ((t − start + 1) / warmup); times the decay, over the run's progress p ∈ [0, 1]
    (t / max_steps, or the share of a time budget used): ``linear`` 1 − (1 − final)·p, ``cosine``
    final + (1 − final)·½(1 + cos πp), ``step`` gamma^(number of ``milestones`` ≤ t), ``none`` 1.
    """

    start: int = 0
    warmup: int = 0
    decay: Decay = "none"
    final: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    stop: int | None = None

    def __post_init__(self) -> None:
        if self.decay not in ("none", "linear", "cosine", "step"):
            raise ValueError(f"schedule.decay: {self.decay!r} is not one of 'none', 'linear', 'cosine', 'step'")
        if self.start < 0 or self.warmup < 0:
            raise ValueError(f"schedule: start ({self.start}) and warmup ({self.warmup}) must be ≥ 0")
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"schedule.stop ({self.stop}) must come after schedule.start ({self.start})")
        if self.final < 0 or self.gamma < 0:
            raise ValueError(f"schedule: final ({self.final}) and gamma ({self.gamma}) must be ≥ 0")
        if self.milestones and self.decay != "step":
            raise ValueError("schedule.milestones are for decay: step")

    def factor(self, step: int, progress: float) -> float:
        if step < self.start or (self.stop is not None and step >= self.stop):
            return 0.0
        ramp = min(1.0, (step - self.start + 1) / self.warmup) if self.warmup else 1.0
        p = min(max(progress, 0.0), 1.0)
        if self.decay == "linear":
            decay = 1.0 - (1.0 - self.final) * p
        elif self.decay == "cosine":
            decay = self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))
        elif self.decay == "step":
            decay = self.gamma ** sum(step >= milestone for milestone in self.milestones)
        else:
            decay = 1.0
        return ramp * decay


@dataclass
class Calibration:
    """``calibration`` of a term: its weight set from measurements (the term's ``weight`` is the start value).

    - ``ratio``: the term is not applied for the first ``measure_steps`` steps; the means of its raw value and
      of the task loss over them set weight = target · mean(task) / mean(term), kept from then on (the
      weighted term starts at ``target`` times the task loss).
    - ``gradient_share``: every ``every`` steps (from step 0), the gradients of the task loss and of the
      weighted term with respect to the parameters of the student module ``layer`` ('' = the whole student)
      give the term's share s = ‖g_term‖ / (‖g_term‖ + ‖g_task‖); when |s − target| > ``tolerance`` the
      weight is multiplied by the odds ratio (target / (1 − target)) / (s / (1 − s)), bounded to
      [1 / max_change, max_change] per update (RT-DETRv4's rule for its distillation weight, which it applies
      once per epoch). As the term's gradient is linear in its weight, one update reaches the target when the
      gradients hold still. Each measurement costs two extra backward passes through the graph.
    Under DDP the measured values are averaged over the ranks, so every rank sets the same weight.
    """

    target: float
    mode: Literal["ratio", "gradient_share"] = "ratio"
    measure_steps: int = 20
    every: int = 50
    layer: str = ""
    tolerance: float = 0.01
    max_change: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in ("ratio", "gradient_share"):
            raise ValueError(f"calibration.mode: {self.mode!r} is not 'ratio' or 'gradient_share'")
        if self.mode == "ratio" and not self.target > 0:
            raise ValueError(f"calibration.target: a ratio to the task loss must be > 0, got {self.target}")
        if self.mode == "gradient_share" and not 0 < self.target < 1:
            raise ValueError(f"calibration.target: a gradient share must be in (0, 1), got {self.target}")
        if self.measure_steps < 1 or self.every < 1:
            raise ValueError("calibration: measure_steps and every must be ≥ 1")
        if self.max_change <= 1 or self.tolerance < 0:
            raise ValueError("calibration: max_change must be > 1 and tolerance ≥ 0")


class TermWeights:
    """The current weight of every term, from its ``weight``, ``schedule`` and ``calibration``."""

    def __init__(self, terms: list[Any]) -> None:
        self.terms = {term.name: term for term in terms}
        self.base = {term.name: float(term.weight) for term in terms}
        self.sums = {term.name: [0.0, 0.0] for term in terms if _mode(term) == "ratio"}  # Σ task, Σ term
        self.calibrated: dict[str, bool] = {name: False for name in self.sums}
        self.shares: dict[str, float] = {}  # the last measured gradient share of each term

    @property
    def varying(self) -> list[str]:
        """The terms whose weight is not a fixed number (logged as ``train/weight/<term>``)."""
        return [name for name, term in self.terms.items() if term.schedule is not None or term.calibration]

    def at(self, step: int, progress: float) -> dict[str, float]:
        weights = {}
        for name, term in self.terms.items():
            measuring = name in self.calibrated and not self.calibrated[name]
            factor = term.schedule.factor(step, progress) if term.schedule is not None else 1.0
            weights[name] = 0.0 if measuring else self.base[name] * factor
        return weights

    def observe(self, step: int, task: Tensor, terms: dict[str, Tensor], mean: Callable[[Tensor], Tensor]) -> None:
        """Ratio calibration: add this step's (rank-averaged) values; set the weight after the last one."""
        for name, sums in self.sums.items():
            calibration = self.terms[name].calibration
            if self.calibrated[name] or step >= calibration.measure_steps:
                continue
            sums[0] += float(mean(task.detach().float()))
            sums[1] += float(mean(terms[name].detach().float()))
            if step == calibration.measure_steps - 1:
                if not sums[1] > 0:
                    steps = calibration.measure_steps
                    raise ValueError(f"distillation term {name!r}: its value was {sums[1]} over the {steps} "
                                     "calibration steps; a ratio cannot be set")  # fmt: skip
                self.base[name] = calibration.target * sums[0] / sums[1]
                self.calibrated[name] = True

    def share_due(self, step: int, weights: dict[str, float]) -> list[str]:
        """The gradient-share terms to measure at this step (not while their weight is 0)."""
        return [name for name, term in self.terms.items() if _mode(term) == "gradient_share"
                and step % term.calibration.every == 0 and weights[name] > 0]  # fmt: skip

    def update_share(self, name: str, term_norm: float, task_norm: float) -> float:
        """One controller update from the measured gradient norms; the measured share."""
        calibration = self.terms[name].calibration
        share = term_norm / (term_norm + task_norm) if term_norm + task_norm > 0 else 0.0
        self.shares[name] = share
        if abs(share - calibration.target) > calibration.tolerance:
            odds = share / (1 - share) if 0 < share < 1 else (0.0 if share <= 0 else math.inf)
            wanted = calibration.target / (1 - calibration.target)
            change = wanted / odds if odds > 0 else math.inf
            self.base[name] *= min(max(change, 1 / calibration.max_change), calibration.max_change)
        return share

    def state_dict(self) -> dict[str, Any]:
        return {"base": dict(self.base), "sums": {k: list(v) for k, v in self.sums.items()},
                "calibrated": dict(self.calibrated), "shares": dict(self.shares)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.update(state["base"])
        self.sums.update({k: list(v) for k, v in state["sums"].items()})
        self.calibrated.update(state["calibrated"])
        self.shares.update(state["shares"])


def _mode(term: Any) -> str | None:
    return term.calibration.mode if term.calibration is not None else None


def gradient_norm(loss: Tensor, parameters: list[torch.nn.Parameter]) -> Tensor | None:
    """‖∂loss/∂parameters‖₂ without touching ``.grad`` (the graph is kept for the step's own backward); None
    when the loss does not depend on them."""
    if not loss.requires_grad:
        return None
    gradients = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    squares = [g.detach().float().pow(2).sum() for g in gradients if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else None


def share_layer_parameters(student: nn.Module, terms: list[Any]) -> dict[str, list[nn.Parameter]]:
    """The trained parameters of each gradient-share term's ``calibration.layer`` in the student."""
    layers = {}
    for term in terms:
        if term.calibration is None or term.calibration.mode != "gradient_share":
            continue
        layer = term.calibration.layer
        try:
            module = student.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"distillation term {term.name!r}: calibration.layer {layer!r} is not a module of the "
                             "student") from None  # fmt: skip
        layers[term.name] = [p for p in module.parameters() if p.requires_grad]
        if not layers[term.name]:
            raise ValueError(f"distillation term {term.name!r}: calibration.layer {layer!r} has no trained parameters")
    return layers


def calibrate(module: Any, step: int, losses: Any, weights: dict[str, float]) -> None:
    """The calibrations' measurements of a finished step of ``module`` (a DistillationModule): they set the
    weights of the following steps; the measured shares are logged as ``train/gradient_share/<term>``."""

    def mean(value: Tensor) -> Tensor:
        return module.trainer.strategy.reduce(value, reduce_op="mean")

    term_weights = module.term_weights
    term_weights.observe(step, losses.task, losses.terms, mean)
    for name in term_weights.share_due(step, weights):
        parameters = module.share_layers[name]
        term_norm = gradient_norm(weights[name] * losses.terms[name], parameters)
        if term_norm is None:
            layer = term_weights.terms[name].calibration.layer
            raise ValueError(f"distillation term {name!r}: its gradient does not reach calibration.layer {layer!r} "
                             "of the student")  # fmt: skip
        task_norm = gradient_norm(losses.task, parameters)
        task_norm = torch.zeros(()) if task_norm is None else task_norm
        share = term_weights.update_share(name, float(mean(term_norm)), float(mean(task_norm)))
        module.log(f"train/gradient_share/{name}", share)
