"""Where tensors live and in which precision: device names and dtypes from user options.

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
