"""Reading weights into a network: a run's checkpoint, a state_dict file or another framework's checkpoint,
every key accounted for."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from cwd_lightning.models import importers
from cwd_lightning.safe_load import load_weights_only

# A teacher run of this project trains its network as the "student" of a DistillationModule.
_LIGHTNING_PREFIX = "student."


def read_weights(path: str | Path, what: str = "teacher checkpoint") -> dict[str, Tensor]:
    """Model weights from a Lightning ``.ckpt`` of a run of this project, a plain state_dict file, or an
    OpenMMLab model-zoo file (converted: ``models/importers.py``); ``what`` names the file in errors."""
    return read_checkpoint(path, what)[0]


def read_checkpoint(path: str | Path, what: str = "teacher checkpoint") -> tuple[dict[str, Tensor], str]:
    """``read_weights`` and where the weights came from: ``run`` (a ``.ckpt`` of this project), ``state_dict``,
    ``mmsegmentation`` (a ``*-d8`` segmentor, in the dilated segmentors' names) or ``mmdetection`` (a RetinaNet,
    in torchvision's names)."""
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
    payload, origin, source = load_weights_only(path, what), "state_dict", f"{what} {str(path)!r}"
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):  # {"meta", "state_dict", …}
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ValueError(f"{source} holds no state_dict of tensors")
    if any(key.startswith(_LIGHTNING_PREFIX) for key in payload):
        prefix = len(_LIGHTNING_PREFIX)
        payload, origin = {k[prefix:]: v for k, v in payload.items() if k.startswith(_LIGHTNING_PREFIX)}, "run"
    elif importers.is_mmseg_state(payload):
        payload, origin = importers.mmseg_to_dilated(payload, source), "mmsegmentation"
    elif importers.is_mmdet_retinanet(payload):
        payload, origin = importers.mmdet_retinanet_to_torchvision(payload, source), "mmdetection"
    return payload, origin


def load_weights(model: nn.Module, path: str | Path, side: str = "teacher") -> None:
    """Load ``path`` into ``model``; any missing, unexpected or mis-shaped key is an error that lists them. An
    mmdetection file is refused here: only ``build_detector(checkpoint=...)`` builds the layout it needs."""
    state, origin = read_checkpoint(path, f"{side} checkpoint")
    if origin == "mmdetection":  # even when the keys fit: the layout (P7's input, the anchors) is the builder's
        raise ValueError(f"{side} checkpoint {str(path)!r} is an mmdetection RetinaNet file: give it to the builder "
                         "instead (build_detector's checkpoint: <file>, teacher_checkpoint: null), which builds "
                         "mmdet's layout from it (P6 from C5, no ReLU before P7, its anchors)")  # fmt: skip
    load_state(model, state, f"{side} checkpoint {str(path)!r}", side)


def load_state(model: nn.Module, state: dict[str, Tensor], source: str, side: str = "teacher") -> None:
    """Load ``state`` into ``model`` strictly; any missing, unexpected or mis-shaped key is an error naming
    ``source`` that lists them. BatchNorm batch counters are not compared (torchvision's frozen BatchNorm has
    none; only ``momentum=None`` reads them)."""
    expected = model.state_dict()
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not k.endswith(counter) or k in expected}
    state |= {k: v for k, v in expected.items() if k.endswith(counter) and k not in state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not match the configured {side} architecture"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                more = f" … (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{title} keys ({len(keys)}): {', '.join(keys[:8])}{more}")
        raise ValueError("\n  ".join(parts))
    model.load_state_dict(state)
