"""Where tensors live and in which precision: device names and dtypes from user options, and the
RAM a machine can still give.

Both turn a user's string into what torch wants, or refuse it with a one-line error, so a
bad --device or dtype fails before any model is loaded.
"""

from __future__ import annotations

from iterabre.errors import IterabreError


def resolve_device(device: str | None) -> str:
    """'auto' -> cuda when available else cpu; refuse cuda on a machine without it."""
    import torch

    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IterabreError(f"device {device!r} was asked for but no CUDA GPU is visible.",
                            "use --device cpu (or auto)")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise IterabreError(f"unknown device {device!r}.", "use auto, cpu or cuda")
    return device


def as_dtype(dtype):
    """torch dtype from a torch dtype or a name such as 'bfloat16'."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise IterabreError(f"unknown dtype {dtype!r}.", "use float32, bfloat16 or float16")
    return value


def available_ram() -> int:
    """Bytes of RAM this machine can still give (MemAvailable), or its total when that is unknown."""
    import os
    from pathlib import Path

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
