"""`iterabre evaluate`: load a model spec, evaluate it, write JSON, print a small table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from iterabre.errors import IterabreError
from iterabre.evaluation.harness import DEFAULT_TASKS, evaluate, evaluate_parallel, parse_tasks
from iterabre.evaluation.report import atomic_write
from iterabre.paths import require_dir_or_absent

# Metrics shown in the terminal table; everything lm-eval returns still goes to the JSON.
_SHOWN = ("word_perplexity", "bits_per_byte", "acc")


def run_evaluate(model_spec: str, tasks: str | list[str] = DEFAULT_TASKS, limit: float | int | None = None,
                 output: str | os.PathLike | None = None, batch_size: int = 8, device: str = "cpu",
                 parallelize: bool = False) -> dict:
    """Evaluate `model_spec` (embedded name, folder, .gguf or hub id); returns and writes the record.

    Record: {"model", "tasks", "limit", "batch_size", "device", "num_layers", "seconds",
    "results": {task: {metric: value}}}. `output` is a .json file, or a folder that gets
    results.json. `parallelize`: lm-eval loads the folder split over every visible GPU
    (harness.evaluate_parallel) instead of one device holding the whole model.
    """
    from iterabre.devices import resolve_device
    from iterabre.models import load_model, model_folder

    names, device = parse_tasks(tasks), resolve_device(device)
    if output is not None:
        check_output(output)  # before minutes of evaluation, not when writing the result
    if parallelize:
        folder = model_folder(model_spec)  # raises IterabreError naming the model
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        start = time.perf_counter()  # lm-eval loads the model itself: its load is counted
        results = evaluate_parallel(folder, names, limit=limit, batch_size=batch_size)
    else:
        model, tokenizer = load_model(model_spec, device=device)  # raises IterabreError naming the model
        layers = model.config.num_hidden_layers
        start = time.perf_counter()  # the evaluation alone, not the load
        results = evaluate(model, tokenizer, names, limit=limit, batch_size=batch_size, device=device)
    record = {"model": str(model_spec), "tasks": names, "limit": limit, "batch_size": batch_size,
              "device": "parallel" if parallelize else device, "num_layers": layers,
              "seconds": round(time.perf_counter() - start, 1), "results": results}
    if output is not None:
        atomic_write(results_path(output), json.dumps(record, indent=2).encode())
    print_results(results, names)
    return record


def results_path(output: str | os.PathLike) -> Path:
    """`output` itself when it names a .json file, else `output`/results.json."""
    path = Path(output)
    return path if path.suffix == ".json" else path / "results.json"


def check_output(output: str | os.PathLike) -> Path:
    """The results file `output` stands for, refused now if a file or folder is in its way."""
    fix = "pass --output a folder (results.json goes inside) or a new .json file name"
    path = results_path(output)
    if path.is_dir():
        raise IterabreError(f"--output {path} is an existing folder, not a .json file.", fix)
    require_dir_or_absent(path.parent, "--output", fix)
    return path


def _cell(metrics: dict[str, float], name: str) -> str:
    """'0.712 ± 0.014' or '23.41' (perplexities have no stderr)."""
    value, stderr = metrics[name], metrics.get(f"{name}_stderr")
    return f"{value:.4g} ± {stderr:.2g}" if stderr is not None else f"{value:.4g}"


def print_results(results: dict[str, dict[str, float]], names: list[str]) -> None:
    """Rich table of the requested tasks only (subtasks are in the JSON)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "metric", "value")
    for task in names:
        for metric in (m for m in _SHOWN if m in results.get(task, {})):
            table.add_row(task, metric, _cell(results[task], metric))
    Console().print(table)
