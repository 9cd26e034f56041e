"""What a result file records about where it came from: hardware, code, teacher."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from cwd_lightning.distill.teacher import fingerprint_state, read_weights


def hardware() -> str:
    """CPU model and cores (or the GPU), as a short string for the table."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores (CPU)"


def commit() -> str:
    """The checked-out commit, ``+dirty`` when tracked files outside ``results/`` (which the sweep itself
    writes) differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                                capture_output=True, text=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def teacher_fingerprint(resolved: dict) -> str | None:
    """The fingerprint of the teacher a resolved config names (as the run will compute it), or None."""
    checkpoint = (resolved.get("model") or {}).get("teacher_checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        return None
    return fingerprint_state(read_weights(checkpoint))
