"""Peak memory of a phase: process peak RSS on the CPU, the CUDA caching allocator's peak on a GPU."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (the weights a teacher adds to a run)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """``reset()`` before a phase, ``peak()`` after it.

    On the CPU the peak is the process's peak resident set (VmHWM), reset by writing "5" to
    /proc/self/clear_refs (Linux ≥ 4.0). Where that is not possible it falls back to
    ``getrusage``'s ru_maxrss, which cannot be reset: the peak of the whole process so far, said in
    ``method``. On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
    (tensors only, not the allocator's cache)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
            self.resettable = True
        elif self._can_reset_rss():
            self.method = "peak RSS (VmHWM of /proc/self/status), reset via /proc/self/clear_refs"
            self.resettable = True
        else:
            self.method = (
                "peak RSS of the whole process so far (getrusage ru_maxrss): /proc/self/clear_refs is not "
                "writable, so the peak is not reset between phases"
            )
            self.resettable = False

    @staticmethod
    def _can_reset_rss() -> bool:
        if _status_bytes("VmHWM") is None:
            return False
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def current(self) -> int:
        """Memory in use now (the baseline a phase starts from)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS") or 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.resettable:
            return _status_bytes("VmHWM") or 0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB
