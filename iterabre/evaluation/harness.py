"""Evaluate an in-memory model with lm-evaluation-harness on the project's local data.

The task configs in `tasks/` read parquet files from the data folder (never the hub).
Per-phenomenon BLiMP and per-language XCOPA tasks are rendered at run time from one
template each into a temporary include folder, so the group YAMLs stay the single list
of subtasks. Any other task name is passed to lm-eval's own registry (needs the hub).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from iterabre.errors import IterabreError
from iterabre.evaluation.tasks import utils as task_utils

TASKS_DIR = Path(__file__).parent / "tasks"
LOCAL_GROUPS = ("wikitext", "blimp", "xcopa")
DEFAULT_TASKS = ",".join(LOCAL_GROUPS)
# (group yaml, template yaml, dataset_kwargs key, extra lines for each rendered subtask)
_SUBTASKS = {
    "blimp": ("blimp.yaml", "_blimp_template.yaml", "phenomenon", ""),
    "xcopa": ("xcopa.yaml", "_xcopa_template.yaml", "lang",
              "doc_to_text: !function lm_eval.tasks.xcopa.utils.doc_to_text_{name}\n"),
}
# lm-eval messages that are expected here and say nothing useful to an iterabre user.
_NOISE = ("Custom kwargs can be passed", "overrides existing task", "`pretrained` model kwarg is not of type",
          "Passed an already-initialized model")


# ---------------------------------------------------------------- task configs

def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from a list or comma string, stripped, de-duplicated, order kept."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not names:
        raise IterabreError("no evaluation task was given.", f"pass tasks such as {DEFAULT_TASKS}")
    return names


def subtask_names(group: str) -> list[str]:
    """Leaf task names of a local group, read from its YAML (e.g. blimp -> blimp_adjunct_island, ...)."""
    cfg = yaml.safe_load((TASKS_DIR / _SUBTASKS[group][0]).read_text(encoding="utf-8"))
    return list(cfg["task"])


def render_tasks(dest: str | os.PathLike) -> Path:
    """Copy the task configs into `dest` and write one YAML per BLiMP phenomenon / XCOPA language."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in TASKS_DIR.iterdir():
        if path.suffix in (".yaml", ".py") and path.name != "__init__.py":
            shutil.copyfile(path, dest / path.name)
    for group, (_, template, key, extra) in _SUBTASKS.items():
        for task in subtask_names(group):
            name = task.removeprefix(f"{group}_")
            text = (f"include: {template}\ntask: {task}\ndataset_kwargs:\n  {key}: {name}\n"
                    + extra.format(name=name))
            (dest / f"{task}.yaml").write_text(text, encoding="utf-8")
    return dest


def local_tasks() -> list[str]:
    """Every local task name: the three groups and their subtasks."""
    return [n for g in LOCAL_GROUPS for n in ([g] + (subtask_names(g) if g in _SUBTASKS else []))]


def leaf_tasks(name: str) -> list[str]:
    """The leaf tasks a local name runs: a group's subtasks, or the task itself."""
    return subtask_names(name) if name in _SUBTASKS else [name]


# ---------------------------------------------------------------- checks

def check_limit(limit: float | int | None) -> float | int | None:
    """A fraction in (0, 1) or a positive count of documents per task (None = all)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise IterabreError(f"limit={limit!r} is not a positive fraction or count.",
                            "pass e.g. 0.05 (5% of each task) or 100 (first 100 documents per task)")
    return limit if limit < 1 else int(limit)


def check_data(names: list[str], data_dir=None) -> None:
    """Fail before any model work when a local task's parquet file is missing."""
    for name in names:
        for leaf in leaf_tasks(name):
            task_utils.require(task_utils.task_data_path(leaf, data_dir))


def _offline() -> bool:
    """Whether the HF environment forbids network access."""
    flags = (os.environ.get(k, "").lower() for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def builtin_tasks_dir() -> Path:
    """lm-eval's own task folder (~15k configs; indexing it takes ~8 s on 2 cores)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _task_manager(include: Path, remote: list[str], metadata: dict):
    """A TaskManager over the local configs; lm-eval's built-ins are indexed only for `remote` names."""
    from lm_eval.tasks import TaskManager

    # Later paths override earlier ones, so the local wikitext/blimp/xcopa win over the built-ins.
    paths = ([builtin_tasks_dir()] if remote else []) + [include]
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False, metadata=metadata)
    unknown = [n for n in remote if n not in manager.all_tasks]
    if unknown:
        raise IterabreError(
            f"unknown evaluation task(s): {', '.join(unknown)}.",
            f"use one of the local tasks {', '.join(LOCAL_GROUPS)} (or blimp_<phenomenon>, "
            f"xcopa_<lang>), or an lm-eval task name such as arc_easy")
    return manager


def _check_remote_loads(manager, remote: list[str]) -> None:
    """Load the hub datasets of non-local tasks now, turning an offline failure into a clear error."""
    if not remote:
        return
    try:
        manager.load(remote)
    except Exception as e:  # datasets raises several types for "offline and not cached"
        if not _offline():
            raise
        raise IterabreError(
            f"task(s) {', '.join(remote)} need the Hugging Face hub but HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
            f"is set and the dataset is not cached ({type(e).__name__}).",
            f"go online and unset those variables, or evaluate the local tasks {DEFAULT_TASKS}") from e


# ---------------------------------------------------------------- logging

class _DropNoise(logging.Filter):
    """Drops lm-eval records that are expected in iterabre's use (see _NOISE)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep a record unless its message contains one of the _NOISE fragments."""
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval logs at WARNING and above without its expected noise or per-task bars; restored after."""
    from unittest import mock

    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface  # noqa: F401
    import lm_eval.tasks  # noqa: F401
    from tqdm import tqdm

    root = logging.getLogger("lm_eval")
    level, noise = root.level, _DropNoise()
    root.setLevel(logging.WARNING)
    # A logger's filters do not apply to its children's records, so filter every lm_eval logger.
    loggers = [root] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                        if n.startswith("lm_eval.")]
    for lg in loggers:
        lg.addFilter(noise)
    # One "building contexts" bar per task is 78 bars for blimp+xcopa; keep only the request bars.
    quiet_bar = mock.patch.object(lm_eval.api.task, "tqdm", lambda *a, **k: tqdm(*a, **k, disable=True))
    # lm-eval runs `git describe` in the cwd for its metadata; outside a repo git prints "fatal: ...".
    no_git = mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    # lm-eval also collects torch's environment report (pip, nvidia-smi...): ~3-8 s, unused here.
    no_env = mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None)
    try:
        with quiet_bar, no_git, no_env:
            yield
    finally:
        root.setLevel(level)
        for lg in loggers:
            lg.removeFilter(noise)


# ---------------------------------------------------------------- evaluate

@contextlib.contextmanager
def _keep_rng():
    """lm-eval reseeds random/numpy/torch globally; give the caller (e.g. a training loop) its state back."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # CPU generator; evaluation draws no CUDA randomness
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's {"task": {"acc,none": x, "acc_stderr,none": s, "alias": ...}} -> {"task": {"acc": x, ...}}."""
    out = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, sep, _filter = key.partition(",")
            # Non-numbers are labels ("alias") or "N/A" stderrs (perplexities have none).
            if sep and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric] = float(value)
        if row:
            out[task] = row
    return out


# Rolling log-likelihood (wikitext) scores windows of the model's full context: one batch holds
# batch x max_length x vocab fp32 logits, and the log-softmax a second copy (SmolLM2: 8192 x 49152
# x 4 B = 1.6 GB per window, so lm-eval's batch of 32 wants ~100 GB). Cap the batch to this budget.
ROLLING_LOGITS_BUDGET = 4 * 2**30  # bytes


def rolling_batch_size(batch_size: int, max_length: int, vocab_size: int,
                       budget: int = ROLLING_LOGITS_BUDGET) -> int:
    """The largest batch <= `batch_size` whose two fp32 logits copies fit in `budget` (at least 1)."""
    per_window = 2 * max_length * vocab_size * 4
    return max(1, min(batch_size, budget // per_window))


def memory_safe_hflm(model, tokenizer, batch_size: int, **hflm_args):
    """An lm-eval HFLM whose rolling (perplexity) requests run in batches capped by ROLLING_LOGITS_BUDGET."""
    from lm_eval.models.huggingface import HFLM

    class MemorySafeHFLM(HFLM):
        """HFLM with `rolling_batch_size` applied to loglikelihood_rolling only."""

        _window_bar = None  # one bar over all rolling windows while loglikelihood_rolling runs

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            """Score the rolling windows with the capped batch size, then restore it."""
            from tqdm import tqdm

            full = self.batch_size_per_gpu
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self.batch_size_per_gpu = rolling_batch_size(int(full), self.max_length, vocab,
                                                         ROLLING_LOGITS_BUDGET)
            # lm-eval opens a new bar per batch (one per window at batch 1: ~70 for wikitext).
            self._window_bar = tqdm(desc="Scoring rolling windows", unit=" windows", disable=disable_tqdm)
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.batch_size_per_gpu = full
                self._window_bar.close()
                self._window_bar = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """lm-eval's scoring; inside loglikelihood_rolling it advances the one window bar instead."""
            bar = self._window_bar
            out = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or bar is not None,
                                                override_bs=override_bs)
            if bar is not None:
                bar.update(len(requests))
            return out

    return MemorySafeHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_args)


def evaluate(model, tokenizer, tasks: str | list[str] = DEFAULT_TASKS, limit: float | int | None = None,
             batch_size: int = 8, device: str = "cpu", seed: int = 0,
             data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on an in-memory HF model: {task: {metric: value, metric_stderr: ...}}.

    Results hold every requested task and, for groups, each subtask (blimp_*, xcopa_*).
    `limit` keeps the first N documents (or the first fraction) of each task, in file order.
    The model is evaluated on `device` in eval mode and returned to its device and mode after.
    """
    import torch

    from iterabre.devices import resolve_device

    device = resolve_device(device)
    was_training = model.training
    home = next(model.parameters(), torch.empty(0)).device
    try:
        # HFLM ignores `device` for an in-memory model and uses the model's own device.
        model.to(device).eval()
        make_lm = lambda: memory_safe_hflm(model, tokenizer, batch_size)  # noqa: E731
        return evaluate_lm(make_lm, tasks, limit, seed, data_dir)
    finally:
        model.to(home).train(was_training)


def evaluate_parallel(model_dir: str | os.PathLike, tasks: str | list[str] = DEFAULT_TASKS,
                      limit: float | int | None = None, batch_size: int = 8, seed: int = 0,
                      data_dir: str | os.PathLike | None = None,
                      dtype: str = "float32") -> dict[str, dict[str, float]]:
    """`evaluate` for a saved model larger than one device: lm-eval loads it itself, split over every
    visible GPU (parallelize=True, accelerate's device_map="auto"), with what does not fit in CPU memory.

    Without a GPU the whole model lands in CPU memory, so the same code path runs on a CPU machine.
    """
    import torch

    from iterabre.devices import available_ram

    # Inputs go to `device` (the first GPU); accelerate's hooks move activations between GPUs.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="iterabre-offload-") as offload:  # accelerate's spill, if any
        make_lm = lambda: memory_safe_hflm(str(model_dir), None, batch_size, parallelize=True,  # noqa: E731
                                           device=device, dtype=dtype, max_cpu_memory=available_ram() // 2,
                                           offload_folder=offload)
        return evaluate_lm(make_lm, tasks, limit, seed, data_dir)


def evaluate_lm(make_lm, tasks: str | list[str] = DEFAULT_TASKS, limit: float | int | None = None,
                seed: int = 0, data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Like `evaluate` for any lm-eval `LM`; `make_lm()` is called once tasks and data are checked."""
    import lm_eval

    names, limit = parse_tasks(tasks), check_limit(limit)
    local = set(local_tasks())
    check_data([n for n in names if n in local], data_dir)
    remote = [n for n in names if n not in local]
    metadata = {"data_dir": str(data_dir)} if data_dir else {}
    with tempfile.TemporaryDirectory(prefix="iterabre-tasks-") as tmp, quiet_lm_eval(), _keep_rng():
        manager = _task_manager(render_tasks(tmp), remote, metadata)
        _check_remote_loads(manager, remote)
        out = lm_eval.simple_evaluate(
            model=make_lm(), tasks=names, limit=limit, task_manager=manager, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return flatten_results(out["results"])
