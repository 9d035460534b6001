"""Atomic directory writes: build in a sibling temp dir, then swap it into place.

A crash or Ctrl-C mid-write leaves at worst a `*.tmp-<pid>` sibling, never a
half-written model or data folder under the real name.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def replace_dir(tmp: Path, dst: Path) -> None:
    """Swap `tmp` into place at `dst`; an old `dst` is moved aside first, then deleted."""
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        os.replace(dst, old)  # a rename: the old content stays whole until the swap is done
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dst: str | os.PathLike):
    """Yield a fresh temp dir next to `dst`; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
