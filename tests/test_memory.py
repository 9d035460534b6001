"""Peak-memory measurement: a phase's peak is its own, not an earlier phase's."""

import pytest
import torch

from iterabre.memory import peak_mb, start_peak


def _touch(mb: int) -> float:
    """Allocate and write `mb` MiB, return a value so the work is not optimised away."""
    block = torch.ones(mb * 2**18)  # float32: 4 bytes each
    return float(block[-1])


def test_peak_sees_an_allocation_inside_the_phase():
    cpu = torch.device("cpu")
    base = start_peak(cpu)
    _touch(200)
    assert peak_mb(cpu, base) >= 150


def test_peak_is_reset_between_phases():
    cpu = torch.device("cpu")
    start_peak(cpu)
    _touch(1000)  # an earlier phase peaks ~1 GB higher, then frees it (large blocks go back to the OS)
    earlier = peak_mb(cpu, 0)
    base = start_peak(cpu)
    if base != 0:
        pytest.skip("this OS cannot reset the peak RSS; the ru_maxrss fallback reports growth only")
    assert peak_mb(cpu, base) < earlier - 500
