"""File plumbing used by the library, the flows and bench/: atomic writes, content hashes, JSON, git.

Every file or folder is built under a temp name next to its destination and renamed into
place, so a crash, a kill or a full disk leaves at worst a `*.tmp-<pid>` sibling, never a
half-written model, data file or report under the real name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from iterabre.errors import IterabreError

_CHUNK = 1 << 20
_HASH_MEMO: dict[tuple, str] = {}


# ---------------------------------------------------------------- atomic writes

def _disk_full(dst: Path) -> IterabreError:
    """The one line a full disk gets: what was being written, and that the old state survived."""
    return IterabreError(f"the disk ran out of space while writing {dst}; nothing under that name was changed "
                         "(the previous state is intact).",
                         f"free space on {dst.parent} (or move the output elsewhere) and re-run: finished steps "
                         "are reused")


@contextmanager
def _enospc_as_error(dst: Path):
    """Turn ENOSPC (no space) and EDQUOT (quota) into `_disk_full`; other errors pass through."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(dst) from None
        raise


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
def _swap_in(dst: Path, make, commit, remove):
    """Yield a temp path next to `dst` (prepared by `make`); `commit(tmp, dst)` on success, `remove(tmp)` always."""
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    try:
        with _enospc_as_error(dst):
            dst.parent.mkdir(parents=True, exist_ok=True)
            make(tmp)
            yield tmp
            commit(tmp, dst)
    finally:
        remove(tmp)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a leftover of a killed process with the same pid
    path.mkdir()


def atomic_dir(dst: str | os.PathLike):
    """Context manager: a fresh temp dir next to `dst`; on success it replaces `dst`, on error it is removed."""
    return _swap_in(Path(dst), _fresh_dir, replace_dir, lambda tmp: shutil.rmtree(tmp, ignore_errors=True))


def atomic_file(dst: str | os.PathLike):
    """Context manager: a temp path next to `dst`; on success it is renamed over `dst`, on error removed."""
    return _swap_in(Path(dst), lambda tmp: None, os.replace, lambda tmp: tmp.unlink(missing_ok=True))


def write_json(obj, path: str | os.PathLike, indent: int | None = 2, sort_keys: bool = True) -> Path:
    """JSON (trailing newline, readable by everyone) written atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n", encoding="utf-8")
    return path


def read_json(path: str | os.PathLike):
    """The JSON value stored at `path`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_torch(obj, path: str | os.PathLike) -> Path:
    """torch.save written atomically."""
    import torch

    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return path


# ---------------------------------------------------------------- content hashes

# A folder's model card documents it and is no part of its content: the flow writes final/README.md
# after final/ was evaluated, and that must not turn the cached evaluation into a miss.
NOT_CONTENT = frozenset({"README.md"})


def file_stats(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every file under `path` (or of `path` itself), sorted; a
    folder's top-level README.md is left out (NOT_CONTENT)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() not in NOT_CONTENT)
    base = path.parent if path.is_file() else path
    return [(p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def hash_path(path: str | os.PathLike) -> str:
    """sha256 over the sorted relative file names and contents of a file or directory."""
    path = Path(path)
    if not path.exists():
        raise IterabreError(f"{path} does not exist, so it cannot be hashed.", "re-run the step that writes it")
    stats = file_stats(path)
    memo_key = (str(path.resolve()), tuple(stats))  # unchanged names, sizes and mtimes -> same content
    if memo_key not in _HASH_MEMO:
        digest = hashlib.sha256()
        base = path.parent if path.is_file() else path
        for name, _, _ in stats:
            digest.update(name.encode() + b"\0")
            with open(base / name, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        _HASH_MEMO[memo_key] = digest.hexdigest()
    return _HASH_MEMO[memo_key]


# ---------------------------------------------------------------- git

def _git(repo: Path, *args: str) -> str | None:
    """stdout of a git command in `repo`, or None (not a checkout, no git, no commit yet)."""
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """HEAD of the repository holding this code, or 'unknown'."""
    from iterabre.paths import REPO_ROOT

    return _git(Path(repo or REPO_ROOT), "rev-parse", "HEAD") or "unknown"


def git_dirty(repo: str | os.PathLike | None = None) -> bool:
    """Whether the working tree has uncommitted changes."""
    from iterabre.paths import REPO_ROOT

    return bool(_git(Path(repo or REPO_ROOT), "status", "--porcelain"))


# ---------------------------------------------------------------- one job per output folder

LOCK_NAME = ".iterabre.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _stale(owner: dict) -> bool:
    """A lock left by a dead process on this host (a kill -9, a crash, a reboot)."""
    import socket

    return owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1)))


@contextmanager
def output_lock(folder: str | os.PathLike):
    """Hold `folder/.iterabre.lock` (pid, host, start time) for the life of a job.

    A second job on the same folder is refused with one line naming the owner; a lock whose
    process is gone on this host is stale and taken over. O_EXCL makes the take-over race-free
    between two jobs started at the same instant: exactly one creates the file.
    """
    import socket
    import time

    folder = Path(folder)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    created = not folder.exists()
    with _enospc_as_error(lock):
        folder.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and not _stale(owner):
                raise _in_use(folder, owner, lock) from None
            lock.unlink(missing_ok=True)
    else:
        raise IterabreError(f"could not take {lock}: another job keeps re-creating it.", "pass another --output")
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield lock
    finally:
        if _lock_owner(lock) == me:
            lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a job refused before writing anything leaves no empty folder behind


def check_unlocked(folder: str | os.PathLike) -> None:
    """Refuse, in one line, a folder another live job holds (checked again, race-free, by `output_lock`)."""
    lock = Path(folder) / LOCK_NAME
    owner = _lock_owner(lock)
    if owner is not None and not _stale(owner):
        raise _in_use(Path(folder), owner, lock)


def _in_use(folder: Path, owner: dict, lock: Path) -> IterabreError:
    return IterabreError(f"{folder} is in use by another iterabre job (pid {owner.get('pid')} on {owner.get('host')}, "
                         f"started {owner.get('started')}).",
                         f"wait for it to finish, or pass another --output; if that job is gone, delete {lock}")


def _lock_owner(lock: Path) -> dict | None:
    """The JSON in a lock file; {} while its owner is still writing it, None when it is gone."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"pid": -1, "host": "?", "started": "just now"}  # being written: treat as live
