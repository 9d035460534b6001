"""Peak memory of one phase (recovery, reconstruction), on CUDA or on the CPU.

On CUDA the allocator's peak counter is reset at the start. On Linux CPUs, writing "5" to
/proc/self/clear_refs resets the process's peak RSS (VmHWM), so the phase's own peak is
read back instead of a lifetime maximum that an earlier phase may already have set.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _vm_hwm_kib() -> int | None:
    """The process's peak resident set (KiB) since the last reset, where Linux reports it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def start_peak(device: torch.device) -> int:
    """Reset the peak counters; returns the CPU baseline used when no reset is possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:
        _CLEAR_REFS.write_text("5")
        return 0
    except OSError:  # not Linux, or not allowed: fall back to the growth of ru_maxrss
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_mb(device: torch.device, baseline: int) -> float:
    """CUDA peak allocated MiB, or the CPU peak RSS (MiB) since `start_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _vm_hwm_kib() if baseline == 0 else None
    if hwm is not None:
        return hwm / 1024
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
