"""The non-finite checks of a training run: a NaN or inf stops the run (or skips its step) before it
reaches the weights, and a diverged model is never validated or saved."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

#: on_non_finite: skip gives up after this many non-finite batches in a row (a diverged model, not a bad batch)
MAX_CONSECUTIVE_SKIPS = 20

OnNonFinite = Literal["error", "skip"]


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """Whether each tensor is all finite, as one boolean tensor: a single host sync to read it."""
    return torch.stack([torch.isfinite(tensor).all() for tensor in tensors])


def _listed(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


class NonFiniteGuard:
    """What to do with a non-finite loss (``error``: stop; ``skip``: skip the step, counted), and the checks
    of gradients and of the trained state. Under DDP the per-step checks are not made: a host sync every
    step would stall the ranks, and a rank raising alone would leave the others waiting in the next
    all-reduce; a non-finite loss there reaches the weights of every rank, which are checked on every rank
    together before each validation and checkpoint."""

    def __init__(self, on_non_finite: OnNonFinite = "error") -> None:
        if on_non_finite not in ("error", "skip"):
            raise ValueError(f"model.on_non_finite must be 'error' or 'skip', got {on_non_finite!r}")
        self.on_non_finite = on_non_finite
        self.skipped_steps = 0  # steps whose loss was not finite, skipped; kept in checkpoints
        self._consecutive = 0

    @property
    def skips(self) -> bool:
        return self.on_non_finite == "skip"

    def check_distributed(self, world_size: int) -> None:
        if self.skips and world_size > 1:
            raise ValueError("model.on_non_finite: skip is not supported under DDP (the ranks would have to agree "
                             "on every step); use error")  # fmt: skip

    def step_is_finite(self, logs: dict[str, Tensor], losses: Iterable[Tensor], step: int, world_size: int) -> bool:
        """False when this step is to be skipped; raises when the run must stop."""
        if world_size > 1 or all(bool(torch.isfinite(value)) for value in losses):
            self._consecutive = 0
            return True
        bad = ", ".join(name for name, value in logs.items() if not torch.isfinite(value).all())
        if self.skips and self._consecutive + 1 >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"non-finite loss at step {step} in {bad} for {MAX_CONSECUTIVE_SKIPS} batches in a row "
                "(model.on_non_finite: skip): the model has diverged, skipping cannot help. Stopped; any "
                "checkpoint already written holds the last validated state."
            )
        if self.skips:
            self._consecutive += 1
            self.skipped_steps += 1
            warnings.warn(f"non-finite loss at step {step} in {bad}: step skipped ({self.skipped_steps} so far, "
                          "model.on_non_finite: skip)", stacklevel=3)  # fmt: skip
            return False
        raise FloatingPointError(
            f"non-finite loss at step {step} in {bad} (task = train/loss_task, a distillation term = "
            f"train/distill/<term>): { ({k: float(v) for k, v in logs.items()}) }. Stopped before this step's "
            "update; any checkpoint already written holds the last validated state (model.on_non_finite: skip "
            "skips such steps instead)."
        )

    @staticmethod
    def check_gradients(named: list[tuple[str, Tensor | None]], step: int) -> None:
        """Gradients that overflowed although the loss is finite stop the run before they reach the weights."""
        named = [(name, gradient) for name, gradient in named if gradient is not None]
        if not named or bool(finite_flags([gradient for _, gradient in named]).all()):
            return
        bad = [name for name, gradient in named if not torch.isfinite(gradient).all()]
        raise FloatingPointError(f"non-finite gradients at step {step} (finite loss): {_listed(bad)}. "
                                 "Stopped before the update.")  # fmt: skip

    @staticmethod
    def non_finite(named: list[tuple[str, Tensor]]) -> list[str]:
        """Names of the floating-point tensors holding inf or NaN: one fused reduction, one host sync."""
        named = [(name, tensor) for name, tensor in named if tensor.is_floating_point()]
        if not named:
            return []
        finite = finite_flags([tensor for _, tensor in named]).tolist()
        return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]

    def check_state(self, named: list[tuple[str, Tensor]], step: int, moment: str) -> None:
        """A diverged student is never validated (so never 'best') and never saved."""
        bad = self.non_finite(named)
        if bad:
            raise FloatingPointError(
                f"non-finite weights or statistics at step {step}, {moment}: {_listed(bad)}. Stopped: no "
                "checkpoint of this state is written (best.ckpt, if any, keeps the last finite model; a smaller "
                "learning rate, warm-up or gradient clipping usually helps)."
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))


def trained_tensors(modules: dict[str, nn.Module | None]) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of the named modules (None: left out), as ``<name>.<path>``."""
    return [(f"{prefix}.{name}", tensor) for prefix, module in modules.items() if module is not None
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]]  # fmt: skip


class NonFiniteChecks:
    """The DistillationModule's hooks of its ``guard``: the trained tensors checked before every validation
    and (in ``on_save_checkpoint``) every checkpoint, the gradients before every update."""

    def trained_tensors(self) -> list[tuple[str, Tensor]]:
        """The trained weights and buffers (BatchNorm statistics): student, connectors, losses' own modules."""
        return trained_tensors({"student": self.student, "distiller": self.distiller})

    def non_finite_state(self) -> list[str]:
        return self.guard.non_finite(self.trained_tensors())

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # a diverged student is never validated, so never 'best'
            self.guard.check_state(self.trained_tensors(), self.global_step, "before validation")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Not under DDP (``distill/guards.py``) nor under a 16-bit grad scaler, which skips such steps."""
        if self.trainer.world_size > 1 or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        names = {id(p): n for n, p in self.named_parameters()}
        named = [(names.get(id(p), "?"), p.grad) for group in optimizer.param_groups for p in group["params"]]
        self.guard.check_gradients(named, self.global_step)
