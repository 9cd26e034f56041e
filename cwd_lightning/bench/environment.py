"""Where a benchmark ran: hardware (and its file-name slug), library versions, git commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import lightning
import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask of a container, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average: other processes competing for the cores distort CPU timings."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_cores()} cores, CPU"


def slug(text: str) -> str:
    """``AMD EPYC, 2 cores, CPU`` → ``amd-epyc-2-cores-cpu``; ``NVIDIA H200`` → ``nvidia-h200``."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def git_commit(root: Path) -> dict[str, object]:
    """HEAD of the repository that holds ``root`` and whether the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def versions() -> dict[str, str | None]:
    """Python, torch, lightning, and torchdistill where installed (read from its metadata, not imported)."""
    try:
        torchdistill = metadata.version("torchdistill")
    except metadata.PackageNotFoundError:
        torchdistill = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchdistill": torchdistill,
    }
