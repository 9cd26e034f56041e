"""The teacher: loaded (weights only), frozen, fingerprinted and kept out of the student's checkpoints; and where
a step's teacher tensors come from: the live teacher, or the teacher-output cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.distill.recorder import ForwardRecorder
from cwd_lightning.models.weights import load_weights, read_weights


def prepare_teacher(teacher: nn.Module, checkpoint: str | None) -> str:
    """Load ``checkpoint`` into ``teacher`` (over whatever its builder loaded), freeze it and return its
    fingerprint. A teacher needs weights: a checkpoint, or a zoo builder's pretrained ones."""
    if checkpoint is None and getattr(teacher, "pretrained_source", None) is None:  # set by models/zoo.py
        raise ValueError(
            "model.teacher is set but model.teacher_checkpoint is not: a teacher with random weights "
            "teaches nothing (give a teacher run's .ckpt or a state_dict file, or build the teacher with "
            "pretrained weights: cwd_lightning.models.torchvision_model / smp_pretrained)"
        )
    if checkpoint is not None:
        load_weights(teacher, checkpoint)
    freeze(teacher)
    return fingerprint(teacher)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (BN statistics and dropout fixed)."""
    model.requires_grad_(False)
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of the state_dict: identifies the teacher weights."""
    return fingerprint_state(model.state_dict())


def fingerprint_state(state: dict[str, Tensor]) -> str:
    """``fingerprint`` of a state_dict (equal to the model's once the state is loaded into it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint_file(path: str | Path) -> str:
    """The fingerprint a run computes for the teacher weights in ``path`` (a run's .ckpt or a state_dict)."""
    return fingerprint_state(read_weights(path))


def strip_from_checkpoint(checkpoint: dict, fingerprint: str | None, prefix: str = "teacher.") -> None:
    """Student checkpoints hold no teacher weights (the teacher comes from its own file), only its
    fingerprint, checked when the checkpoint is loaded."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefix)}
    checkpoint["teacher_fingerprint"] = fingerprint


def check_fingerprint(checkpoint: dict, expected: str | None) -> None:
    """The configured teacher must be the one the checkpoint was trained with."""
    saved = checkpoint.get("teacher_fingerprint")
    if saved != expected:
        raise ValueError(
            "the teacher does not match the one this checkpoint was trained with: fingerprint "
            f"{expected} now, {saved} in the checkpoint (check model.teacher_checkpoint)"
        )


def restore_into_checkpoint(checkpoint: dict, teacher: nn.Module | None, expected: str | None,
                            prefix: str = "teacher.") -> None:  # fmt: skip
    """Before a checkpoint is loaded: the configured teacher must be the one it was trained with (by
    fingerprint), and its weights go back into the state_dict so the load stays strict."""
    check_fingerprint(checkpoint, expected)
    if teacher is not None:
        checkpoint["state_dict"].update({f"{prefix}{k}": v for k, v in teacher.state_dict().items()})


class LiveTeacher:
    """A step's teacher tensors from the frozen teacher itself, run on the batch under ``no_grad`` with the
    tapped modules recorded."""

    def __init__(self, teacher: nn.Module, task: Any, recorder: ForwardRecorder) -> None:
        self.teacher, self.task, self.recorder = teacher, task, recorder

    def record(self, batch: Any) -> Any:
        """Record the teacher on ``batch``; returns the batch the student sees (the same)."""
        with torch.no_grad(), self.recorder:
            self.task.run(self.teacher, self.task.batch_inputs(batch), self.recorder.paths)
        return batch

    def outputs(self, batch: Any) -> dict[str, list[Tensor]]:
        """The recorded tensors (every call of every tapped module), as a cache stores them; a module whose
        output is not a tensor cannot be cached."""
        self.record(batch)
        outputs = {path: list(calls) for path, calls in self.recorder.outputs.items()}
        self.recorder.clear()
        for path, calls in outputs.items():
            if not all(isinstance(call, Tensor) for call in calls):
                raise ValueError(f"model.teacher_cache: the teacher's {path!r} does not output a tensor "
                                 f"({type(calls[0]).__name__}); tap the tensor itself to cache it")  # fmt: skip
        return outputs


class CachedTeacher:
    """A step's teacher tensors read from the teacher-output cache, the teacher not run. The training batches
    of a cached run end with each sample's ``[image, view]`` key (``data/sampling.py``), which this strips."""

    def __init__(self, cache: Any, recorder: ForwardRecorder) -> None:
        self.cache, self.recorder = cache, recorder

    def record(self, batch: Any) -> Any:
        batch, keys = batch[:-1], batch[-1]
        self.recorder.outputs = self.cache.lookup(keys, keys.device)
        return batch
