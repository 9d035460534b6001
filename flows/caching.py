"""Cache keys of the flow's tasks, as a Prefect `CachePolicy`: code + input content + parameters.

A task marks the arguments that are input files or folders with the type `InPath`. The key of
a call hashes

- the code the task runs: its own body, the functions of its module it calls, the library
  functions it calls through a module (`steps.score`) and, transitively, every `iterabre`
  module those import (found from the import statements, read with `ast`);
- the *content* of every `InPath` argument (so an edited input misses, and the same content
  under another name hits);
- every other argument, as JSON.

Content hashes are remembered in a small ledger next to the task results, keyed by the
files' names, sizes and mtimes (as DVC and git do), so a resumed job does not re-read
unchanged checkpoints, and an input that was deleted after its consumers finished (the
pruned model of a step) still has a key.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from prefect.cache_policies import CachePolicy

from iterabre.files import file_stats, hash_path, read_json, write_json
from iterabre.paths import REPO_ROOT

InPath = Annotated[str, "input file or folder: its content is part of the cache key"]
LIBRARY = "iterabre"
LEDGER = "content-hashes.json"


# ---------------------------------------------------------------- code

def _is_library(name: str | None) -> bool:
    return bool(name) and (name == LIBRARY or name.startswith(LIBRARY + "."))


def _imports(tree: ast.AST) -> set[str]:
    """Library modules named by the import statements anywhere in `tree` (lazy imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _is_library(a.name)}
        elif isinstance(node, ast.ImportFrom) and _is_library(node.module):
            found.add(node.module)  # `from iterabre import steps` also names iterabre.steps:
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def _module_file(dotted: str) -> Path | None:
    """The source file of a library module (a package's __init__.py), or None."""
    rel = REPO_ROOT.joinpath(*dotted.split("."))
    for path in (rel.with_suffix(".py"), rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_closure(modules: set[str]) -> set[Path]:
    """Files of `modules` and of every library module they import, transitively.

    A package counts with all its .py and .yaml files (lm-eval task YAMLs and helpers are
    loaded by name, not imported).
    """
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        path = _module_file(todo.pop())
        if path is None:
            continue
        files = sorted(p for p in path.parent.rglob("*") if p.suffix in (".py", ".yaml")) \
            if path.name == "__init__.py" else [path]
        for file in files:
            if file not in seen:
                seen.add(file)
                if file.suffix == ".py":
                    todo += _imports(ast.parse(file.read_text(encoding="utf-8")))
    return seen


def _function_closure(fn: types.FunctionType, funcs: dict, modules: set[str]) -> None:
    """Add `fn`, the same-module functions and library functions it calls, and the modules they use."""
    key = f"{fn.__module__}.{fn.__qualname__}"
    if key in funcs:
        return
    funcs[key] = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(funcs[key])
    modules |= _imports(tree)
    for node in ast.walk(tree):
        obj = None
        if isinstance(node, ast.Name):
            obj = fn.__globals__.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = fn.__globals__.get(node.value.id)
            obj = getattr(owner, node.attr, None) if isinstance(owner, types.ModuleType) else None
        if isinstance(obj, types.FunctionType) and (obj.__module__ == fn.__module__ or _is_library(obj.__module__)):
            _function_closure(obj, funcs, modules)
        elif _is_library(getattr(obj, "__module__", None)):  # a class or constant of another module
            modules.add(obj.__module__)


@functools.lru_cache(maxsize=None)
def code_hash(fn: types.FunctionType) -> str:
    """sha256 of the code a task function runs (see the module docstring); cached per process."""
    funcs: dict[str, str] = {}
    modules: set[str] = set()
    _function_closure(fn, funcs, modules)
    digest = hashlib.sha256()
    for name in sorted(funcs):
        digest.update(name.encode() + b"\0" + funcs[name].encode() + b"\0")
    for path in sorted(_module_closure(modules)):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def code_files(fn: types.FunctionType) -> list[str]:
    """The library files a task's key covers (for tests and docs)."""
    modules: set[str] = set()
    _function_closure(fn, {}, modules)
    return sorted(p.relative_to(REPO_ROOT).as_posix() for p in _module_closure(modules))


# ---------------------------------------------------------------- content

class Ledger:
    """Content hashes of paths, remembered by (names, sizes, mtimes) in `folder/content-hashes.json`."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / LEDGER

    def _entries(self) -> dict:
        return read_json(self.file) if self.file.exists() else {}

    def hash(self, path: str | os.PathLike) -> str | None:
        """The content hash of `path`; for a path that is gone, the last hash recorded for it (or None)."""
        path = Path(path).resolve()
        entries = self._entries()
        if not path.exists():
            return entries.get(str(path), {}).get("hash")
        stats = [list(s) for s in file_stats(path)]
        entry = entries.get(str(path))
        if entry is not None and entry["stats"] == stats:
            return entry["hash"]  # unchanged names, sizes and mtimes: no need to read it again
        digest = hash_path(path)
        entries[str(path)] = {"stats": stats, "hash": digest}
        write_json(entries, self.file, indent=None)
        return digest


def input_paths(fn: types.FunctionType) -> tuple[str, ...]:
    """Names of the arguments of `fn` annotated `InPath` (or `InPath | None`)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return tuple(name for name, hint in hints.items()
                 if hint == InPath or InPath in typing.get_args(hint))


def task_key(fn: types.FunctionType, inputs: dict, ledger: Ledger) -> str:
    """The cache key of one call of task function `fn` with `inputs`."""
    paths = input_paths(fn)
    values = {k: (ledger.hash(v) if k in paths and v is not None else v) for k, v in inputs.items()}
    blob = json.dumps({"task": fn.__qualname__, "code": code_hash(fn), "inputs": values}, sort_keys=True,
                      default=str)
    return f"{fn.__name__.replace('_', '-')}-{hashlib.sha256(blob.encode()).hexdigest()[:40]}"


@dataclass
class ContentKey(CachePolicy):
    """Prefect cache policy: `task_key` with the ledger in `folder` (the job's result storage)."""

    folder: str = ""

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict, **kwargs) -> str:
        return task_key(task_ctx.task.fn, inputs, Ledger(Path(self.folder)))
