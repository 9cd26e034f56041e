"""Every file this project reads with ``torch.load`` goes through ``load_weights_only``: tensors and plain
containers only (``weights_only=True``). A file that needs pickle, or is not a checkpoint at all, is
refused with our message, never PyTorch's advice to turn the check off: unpickling runs arbitrary code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def load_weights_only(path: str | Path, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; ``what`` names the file in errors
    ("teacher checkpoint", "exported student", …)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # random bytes, or a pickle not written by torch.save
            raise ValueError(f"{what} {str(path)!r} is not a PyTorch checkpoint (damaged, or not written by "
                             "torch.save?)") from None  # fmt: skip
        raise ValueError(
            f"{what} {str(path)!r} holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
            "which are never loaded here: unpickling can run any code. Re-save its weights where you trust it: "
            "torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # zip errors of truncated or foreign files
        raise ValueError(
            f"{what} {str(path)!r} is not a readable PyTorch checkpoint (damaged or truncated?): {type(error).__name__}"
        ) from None
