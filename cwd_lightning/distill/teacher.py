"""The teacher: loaded (weights only), frozen, fingerprinted and kept out of the student's checkpoints; and where
a step's teacher tensors come from: the live teacher, or the teacher-output cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.distill.recorder import ForwardRecorder
from cwd_lightning.distill.speed import TeacherSpeed
from cwd_lightning.distill.terms import teacher_side
from cwd_lightning.models.weights import load_weights, read_weights


def prepare_teacher(teacher: nn.Module, checkpoint: str | None, name: str = "teacher") -> str:
    """Load ``checkpoint`` into ``teacher`` (over whatever its builder loaded), freeze it and return its
    fingerprint. A teacher needs weights: a checkpoint, or a zoo builder's pretrained ones."""
    if checkpoint is None and getattr(teacher, "pretrained_source", None) is None:  # set by the zoo builders
        network, weights = ("model.teacher", "model.teacher_checkpoint") if name == "teacher" else (
            f"model.teachers.{name}", f"model.teacher_checkpoints.{name}")  # fmt: skip
        raise ValueError(
            f"{network} is set but {weights} is not: a teacher with random weights teaches nothing (give a "
            "teacher run's .ckpt or a state_dict file, or build the teacher with pretrained weights: "
            "cwd_lightning.models.torchvision_model / smp_pretrained / huggingface_model / vit_features)"
        )
    if checkpoint is not None:
        load_weights(teacher, checkpoint)
    freeze(teacher)
    return fingerprint(teacher)


def prepare_teachers(teachers: dict[str, nn.Module], checkpoints: dict[str, str | None]) -> dict[str, str]:
    """``prepare_teacher`` for each of a run's teachers by name; their fingerprints."""
    unknown = sorted(set(checkpoints) - set(teachers))
    if unknown:
        raise ValueError(f"model.teacher_checkpoints: {', '.join(unknown)} names no teacher of model.teachers "
                         f"(teachers: {', '.join(teachers) or 'none'})")  # fmt: skip
    return {name: prepare_teacher(model, checkpoints.get(name), name) for name, model in teachers.items()}


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


def combined_fingerprint(fingerprints: dict[str, str]) -> str | None:
    """The fingerprint of a run's teachers: the one teacher's own, or for several a sha256 over their names
    and fingerprints (a changed teacher, added or removed one changes it)."""
    if not fingerprints:
        return None
    if list(fingerprints) == ["teacher"]:
        return fingerprints["teacher"]
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()


#: the state_dict prefixes of the teachers in a DistillationModule: model.teacher and model.teachers.<name>
TEACHER_PREFIXES = ("teacher.", "teachers.")


def strip_from_checkpoint(checkpoint: dict, fingerprints: dict[str, str]) -> None:
    """Student checkpoints hold no teacher weights (each teacher comes from its own file), only their
    fingerprints, checked when the checkpoint is loaded."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(TEACHER_PREFIXES)}
    checkpoint["teacher_fingerprint"] = combined_fingerprint(fingerprints)
    checkpoint["teacher_fingerprints"] = dict(fingerprints)


def check_fingerprint(checkpoint: dict, fingerprints: dict[str, str]) -> None:
    """The configured teachers must be the ones the checkpoint was trained with."""
    expected, saved = combined_fingerprint(fingerprints), checkpoint.get("teacher_fingerprint")
    if saved == expected:
        return
    before = checkpoint.get("teacher_fingerprints") or {}
    changed = sorted(name for name in set(before) | set(fingerprints) if before.get(name) != fingerprints.get(name))
    which = f" ({', '.join(teacher_side(name) for name in changed)})" if before else ""
    raise ValueError(
        f"the teacher does not match the one this checkpoint was trained with{which}: fingerprint "
        f"{expected} now, {saved} in the checkpoint (check model.teacher_checkpoint / model.teacher_checkpoints)"
    )


def restore_into_checkpoint(checkpoint: dict, teachers: dict[str, nn.Module], fingerprints: dict[str, str]) -> None:
    """Before a checkpoint is loaded: the configured teachers must be the ones it was trained with (by
    fingerprint), and their weights go back into the state_dict so the load stays strict."""
    check_fingerprint(checkpoint, fingerprints)
    for name, teacher in teachers.items():
        prefix = "teacher." if name == "teacher" else f"teachers.{name}."
        checkpoint["state_dict"].update({f"{prefix}{k}": v for k, v in teacher.state_dict().items()})


class LiveTeacher:
    """A step's teacher tensors from the frozen teacher itself, run on the batch under ``no_grad`` with the
    tapped modules recorded, in the precision its ``speed`` says (outputs of a bf16/fp16 teacher in fp32)."""

    def __init__(
        self, teacher: nn.Module, task: Any, recorder: ForwardRecorder, speed: TeacherSpeed | None = None
    ) -> None:
        self.teacher, self.task, self.recorder = teacher, task, recorder
        self.speed = speed or TeacherSpeed()

    def record(self, batch: Any) -> None:
        device = next((p.device for p in self.teacher.parameters()), torch.device("cpu"))
        with torch.no_grad(), self.speed.autocast(device), self.recorder:
            self.task.run(self.teacher, self.task.batch_inputs(batch), self.recorder.paths)
        if self.speed.upcasts:
            self.recorder.to_float32()

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
    """A step's tensors of the teacher ``name`` from its cache, the teacher not run: the training loader's workers
    read them with each image (``data/sampling.py``), they come with the batch's cache entry, already on the
    step's device, and are upcast there to fp32."""

    def __init__(self, name: str, recorder: ForwardRecorder) -> None:
        self.name, self.recorder = name, recorder

    def record(self, batch: Any) -> None:
        entry = batch[-1]
        if not isinstance(entry, dict) or self.name not in entry.get("teacher", {}):
            raise RuntimeError(f"the training batch carries no cached tensors of teacher {self.name!r}: a cached run "
                               "trains from the loader its data module builds once the caches are open")  # fmt: skip
        tensors = entry["teacher"][self.name]
        self.recorder.load({path: [tensor.float() for tensor in calls] for path, calls in tensors.items()})


class TeacherOutputs:
    """Where a step's tensors of every teacher come from (each live or from its cache): ``record(batch)``
    records them all and returns the batch the student sees (without the cache keys of a cached run)."""

    def __init__(self, sources: list[LiveTeacher | CachedTeacher], cached: bool = False) -> None:
        self.sources, self.cached = sources, cached

    def record(self, batch: Any) -> Any:
        for source in self.sources:
            source.record(batch)
        return batch[:-1] if self.cached else batch


def teacher_files(
    teacher: nn.Module | None,
    teacher_checkpoint: str | None,
    teachers: dict[str, nn.Module] | None,
    teacher_checkpoints: dict[str, str] | None,
    terms: list[Any] | None,
) -> dict[str, str | None]:
    """The weights file of each of a run's teachers by name (``teacher`` for ``model.teacher``), after the checks
    of how they are declared; errors name the key at fault."""
    if "teacher" in (teachers or {}):
        raise ValueError("model.teachers: the name 'teacher' is model.teacher's; name the others otherwise")
    if "teacher" in (teacher_checkpoints or {}):
        raise ValueError("model.teacher_checkpoints: model.teacher's weights go in model.teacher_checkpoint")
    if teachers and not terms:
        raise ValueError("model.teachers are set but model.terms are not: no term would read them")
    if terms and teacher is None and not teachers:
        raise ValueError("model.terms are set but model.teacher is not: distillation needs a teacher")
    return {**({"teacher": teacher_checkpoint} if teacher is not None else {}), **(teacher_checkpoints or {})}


class FrozenTeachers:
    """The DistillationModule's teachers (``teacher`` and the named ``teachers``): by name, and kept in eval mode
    whatever mode Lightning puts the module in."""

    def all_teachers(self) -> dict[str, nn.Module]:
        """The run's teachers by name: ``teacher`` (``model.teacher``) and those of ``model.teachers``."""
        return {**({"teacher": self.teacher} if self.teacher is not None else {}), **self.teachers}

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        for teacher in self.all_teachers().values():
            teacher.eval()
        return self
