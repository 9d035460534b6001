"""Evaluation: lm-eval on local data (wikitext, blimp, xcopa) and compression reports.

`evaluate` scores an in-memory model; `run_evaluate` loads a model spec, evaluates it and
writes JSON (the `iterabre evaluate` command); `report.write_report` turns a compression
job's report.json into Markdown and plots.
"""

from iterabre.evaluation.harness import DEFAULT_TASKS, LOCAL_GROUPS, evaluate, local_tasks, parse_tasks
from iterabre.evaluation.run import run_evaluate

__all__ = ["DEFAULT_TASKS", "LOCAL_GROUPS", "evaluate", "local_tasks", "parse_tasks", "run_evaluate"]
