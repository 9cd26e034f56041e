"""Reading weights into a network: a run's checkpoint, a state_dict file or another framework's checkpoint,
every key accounted for."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from cwd_lightning.models.importers import is_mmseg_state, mmseg_to_dilated
from cwd_lightning.safe_load import load_weights_only

# A teacher run of this project trains its network as the "student" of a DistillationModule.
_LIGHTNING_PREFIX = "student."


def read_weights(path: str | Path, what: str = "teacher checkpoint") -> dict[str, Tensor]:
    """Model weights from a Lightning ``.ckpt`` of a run of this project, a plain state_dict file, or an
    mmsegmentation model-zoo file (converted to the dilated segmentors' key names: ``models/importers.py``);
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
        elif is_mmseg_state(state):
            state = mmseg_to_dilated(state, f"{what} {str(path)!r}")
        payload = state
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ValueError(f"{what} {str(path)!r} holds no state_dict of tensors")
    return payload


def load_weights(model: nn.Module, path: str | Path, side: str = "teacher") -> None:
    """Load ``path`` into ``model``; any missing, unexpected or mis-shaped key is an error that lists them."""
    state = read_weights(path, f"{side} checkpoint")
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
