"""Where a result or a benchmark came from: the machine (CPU model and cores, or the GPU), the code (commit
and whether the tree differs from it) and the library versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

#: the checkout this package is imported from (editable installs)
REPOSITORY = Path(__file__).resolve().parents[2]


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


def hardware(device: torch.device | None = None) -> str:
    """``AMD EPYC, 2 cores, CPU`` or the GPU's name: the GPU when ``device`` is a CUDA device, or when no
    device is given and one is visible."""
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_cores()} cores, CPU"


def slug(text: str) -> str:
    """``AMD EPYC, 2 cores, CPU`` → ``amd-epyc-2-cores-cpu``; ``NVIDIA H200`` → ``nvidia-h200``."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def git_state(root: Path = REPOSITORY) -> tuple[str | None, bool | None]:
    """HEAD of the checkout at ``root`` and whether tracked files outside ``results/`` (which the sweeps
    themselves write) differ from it; (None, None) outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                                cwd=root, capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def commit(root: Path = REPOSITORY) -> str:
    """The checked-out commit, short, with ``+dirty`` when the tree differs from it; ``unknown`` outside git."""
    head, dirty = git_state(root)
    return "unknown" if head is None else head[:10] + ("+dirty" if dirty else "")


def load_average() -> float | None:
    """The 1-minute load average: other processes competing for the cores distort CPU timings."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    """Python, torch, lightning, and torchdistill where installed (read from its metadata, not imported)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("lightning", "torchdistill"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found
