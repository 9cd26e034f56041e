"""The teacher: loaded (weights only), frozen, fingerprinted and kept out of the student's checkpoints; and where
a step's teacher tensors come from: the live teacher, or the teacher-output cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.distill.recorder import ForwardRecorder
from cwd_lightning.safe_load import load_weights_only

# A teacher run of this project trains its network as the "student" of a DistillationModule.
_LIGHTNING_PREFIX = "student."


def read_weights(path: str | Path, what: str = "teacher checkpoint") -> dict[str, Tensor]:
    """Model weights from a Lightning ``.ckpt`` of a run of this project or a plain state_dict file;
    ``what`` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        # unlike the YAML's includes (read from the including file's folder), checkpoint paths are read from
        # the working directory, as Lightning's ckpt_path: say so, with the absolute path tried
        base = "" if path.is_absolute() else f" (a relative path is read from the working directory: {path.absolute()})"
        hint = (
            " Train the teacher first (e.g. `make train EXP=shapes_teacher`) or point model.teacher_checkpoint at "
            "a state_dict file."
            if what == "teacher checkpoint"
            else ""
        )
        raise FileNotFoundError(f"{what} {str(path)!r} not found{base}.{hint}")
    payload = load_weights_only(path, what)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state = payload["state_dict"]
        if any(key.startswith(_LIGHTNING_PREFIX) for key in state):
            state = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in state.items() if k.startswith(_LIGHTNING_PREFIX)}
        payload = state
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ValueError(f"{what} {str(path)!r} holds no state_dict of tensors")
    return payload


def load_weights(model: nn.Module, path: str | Path, side: str = "teacher") -> None:
    """Load ``path`` into ``model``; any missing, unexpected or mis-shaped key is an error that lists them."""
    state = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{side} checkpoint {str(path)!r} does not match the configured {side} architecture"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                more = f" … (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{title} keys ({len(keys)}): {', '.join(keys[:8])}{more}")
        raise ValueError("\n  ".join(parts))
    model.load_state_dict(state)


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
