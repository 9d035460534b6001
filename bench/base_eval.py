"""Full-suite evaluation of a model (issue #6): every wikitext-2 test article, all 67 BLiMP
phenomena (67,000 pairs) and all 11 XCOPA languages (5,500 items), no limit.

That is ~2.2M forwarded tokens, about 1.5 h of both cores of the CPU machine, so the work is
cut into chunks of leaf tasks (wikitext; BLiMP and XCOPA in a few slices each). Each finished
chunk is saved at once, so an interrupted run resumes; start the script twice (`--threads 1`
each) to keep two cores busy: a process claims the next chunk nobody else is running. When
every chunk is in, the BLiMP and XCOPA group scores are computed from their subtasks with
lm-eval's own group rule (weight_by_size from the group YAML, lm-eval's stderr formula), so
they equal what one `iterabre evaluate --limit none` call would report.

    python bench/base_eval.py --threads 1 & python bench/base_eval.py --threads 1
    python bench/base_eval.py --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import common
from iterabre.files import pid_alive

GROUPS = ("blimp", "xcopa")
SLICES = {"blimp": 6, "xcopa": 2}  # ~15-20 min of one core per chunk


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--model", default="smollm2-135m", help="embedded name, folder or hub id")
    p.add_argument("--batch-size", type=int, default=32)
    common.add_result_args(p, "base_eval")
    return p.parse_args()


def settings(args) -> dict:
    """Everything that changes the numbers; saved chunks are reused only when these match."""
    return {"model": args.model, "batch_size": args.batch_size, "limit": 2 if args.quick else None}


def plan_chunks(slices: dict[str, int] = SLICES) -> dict[str, list[str]]:
    """{chunk id: leaf task names}: wikitext whole, each group cut into contiguous slices."""
    from iterabre.evaluation.harness import subtask_names

    chunks = {"wikitext": ["wikitext"]}
    for group in GROUPS:
        leaves, n = subtask_names(group), slices[group]
        for i in range(n):
            part = leaves[i * len(leaves) // n:(i + 1) * len(leaves) // n]
            chunks[f"{group}/{i + 1}of{n}"] = part
    return chunks


# ---------------------------------------------------------------- shared result file

@contextlib.contextmanager
def locked_state(name: str, s: dict):
    """The result file's {"chunks", "claims"} under an exclusive lock; written back on exit."""
    with common.locked(name):
        old = common.previous(name, s)
        state = {"chunks": old.get("chunks", {}), "claims": old.get("claims", {})}
        yield state
        common.write_json(name, {"machine": common.machine_info(), "settings": s, **state,
                                 "summary": summary(state["chunks"], plan_chunks(), s["limit"])})


def claim_next(name: str, s: dict, chunks: dict[str, list[str]]) -> str | None:
    """Mark the first chunk that is neither done nor claimed by a live process as ours."""
    with locked_state(name, s) as state:
        for chunk in chunks:
            owner = state["claims"].get(chunk)
            if chunk not in state["chunks"] and (owner is None or not pid_alive(owner)):
                state["claims"][chunk] = os.getpid()
                return chunk
    return None


def save_chunk(name: str, s: dict, chunk: str, record: dict) -> None:
    with locked_state(name, s) as state:
        state["chunks"][chunk] = record
        state["claims"].pop(chunk, None)


# ---------------------------------------------------------------- evaluation

def run_chunk(model, tokenizer, tasks: list[str], s: dict) -> dict:
    """lm-eval on the chunk's leaf tasks; wall time and forward rate around it."""
    from iterabre.evaluation import evaluate

    start = time.perf_counter()
    results = evaluate(model, tokenizer, tasks, limit=s["limit"], batch_size=s["batch_size"])
    return {"tasks": tasks, "results": {t: results[t] for t in tasks}, "seconds": round(time.perf_counter() - start, 1),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def leaf_sizes(tasks: list[str], limit: int | None) -> list[int]:
    """Documents each leaf task scores (rows of its parquet file, capped by an integer limit)."""
    import pyarrow.parquet as pq

    from iterabre.evaluation.tasks.utils import task_data_path

    rows = [pq.ParquetFile(task_data_path(t)).metadata.num_rows for t in tasks]
    return [min(r, limit) if limit else r for r in rows]


def group_metrics(group: str, leaves: dict[str, dict], sizes: list[int]) -> dict:
    """A group's acc and acc_stderr from its leaves, exactly as lm-eval's group aggregation."""
    import yaml
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr, unweighted_mean_stderr

    from iterabre.evaluation.harness import TASKS_DIR

    cfg = yaml.safe_load((TASKS_DIR / f"{group}.yaml").read_text(encoding="utf-8"))
    by_size = cfg["aggregate_metric_list"][0]["weight_by_size"]
    accs = [m["acc"] for m in leaves.values()]
    stderrs = [m["acc_stderr"] for m in leaves.values()]
    stderr = pooled_sample_stderr(stderrs, sizes) if by_size else unweighted_mean_stderr(stderrs)
    return {"acc": aggregate_subtask_metrics(accs, sizes, by_size), "acc_stderr": stderr, "n": sum(sizes)}


def summary(done: dict[str, dict], chunks: dict[str, list[str]], limit: int | None) -> dict:
    """Headline numbers of the finished groups; a group is summarised only when all its chunks are in."""
    out = {}
    leaves = {t: m for record in done.values() for t, m in record["results"].items()}
    if "wikitext" in leaves:
        out["wikitext"] = leaves["wikitext"]
    for group in GROUPS:
        mine = [c for c in chunks if c.startswith(group + "/")]
        if mine and all(c in done for c in mine):
            names = [t for c in mine for t in chunks[c]]
            out[group] = group_metrics(group, {t: leaves[t] for t in names}, leaf_sizes(names, limit))
    out["seconds"] = round(sum(r["seconds"] for r in done.values()), 1)
    return out


def print_report(name: str) -> None:
    from iterabre.files import read_json

    path = common.result_path(name)
    saved = read_json(path) if path.exists() else {}
    done, plan = saved.get("chunks", {}), plan_chunks()
    print(f"{len(done)}/{len(plan)} chunks done; missing: {[c for c in plan if c not in done] or 'none'}")
    print(json.dumps(saved.get("summary", {}), indent=2))


def main() -> None:
    """Claim and run chunks until none is left, saving each; then print the summary."""
    args = parse_args()
    common.apply_threads(args.threads)
    s, name = settings(args), common.result_name(args, "base_eval")
    if not args.report_only:
        from iterabre.models import load_model

        model, tokenizer, chunks = *load_model(args.model), plan_chunks()
        while (chunk := claim_next(name, s, chunks)) is not None:
            print(f"[run ] {chunk} ({len(chunks[chunk])} tasks) ...", flush=True)
            record = run_chunk(model, tokenizer, chunks[chunk], s)
            save_chunk(name, s, chunk, record)
            print(f"[done] {chunk} in {record['seconds'] / 60:.1f} min", flush=True)
    print_report(name)


if __name__ == "__main__":
    main()
