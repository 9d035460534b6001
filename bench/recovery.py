"""Recovery throughput: `iterabre.recovery.recover` (KD, all weights) vs a plain HF `Trainer` loop.

Same student (SmolLM2 without blocks 20-25), same frozen 30-block teacher, same wikitext
windows, batch size, sequence length, optimizer steps, lr schedule and clipping. The
baseline is what a user would write by hand: a `Trainer` subclass whose `compute_loss`
runs the teacher under no_grad and returns the forward KL over non-padding tokens.
Runs alternate (A B B A ...) on fresh student copies; tokens/s is the median.
Peak memory: max RSS (CPU) or the CUDA allocator's peak of each variant in its own process.
On a GPU (`--device cuda`) both run in bf16 autocast and the table adds MFU: achieved FLOP/s
(bench/flops.py) over the GPU's dense bf16 peak.

The planner's recovery estimate for the same job sits next to iterabre's measured peak.
Where the SmolLM2 weights are a random stand-in (bench/stand_in.py, on a machine they cannot
travel to), the result says so: throughput and memory do not depend on the weights' values.

    .venv/bin/python bench/recovery.py [--quick] [--device cuda [--peak-tflops N]] [--batch-size B --seq-len T]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import common

REMOVED = [20, 21, 22, 23, 24, 25]
VARIANTS = ("iterabre", "hf_trainer")
LR = 5e-5


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (CUDA: bf16 autocast for both)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: table)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default 4; quick 2)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; quick 64)")
    p.add_argument("--refresh-estimates", action="store_true",
                   help="rewrite the saved planner estimate with the current planner (measurements kept)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # variant name: memory probe
    return p.parse_args()


def sizes(args) -> dict:
    """Batch, sequence length, optimizer steps and repeats."""
    return dict(batch_size=common.pick(args.batch_size, 4, 2, args.quick), seq_len=common.pick(args.seq_len, 128, 64, args.quick),
                steps=2 if args.quick else 8, repeats=common.pick(args.repeats, 3, 1, args.quick))


def setup(size: dict, device: str = "cpu"):
    """(teacher, pruned student template, windows [N,T]) on `device`."""
    from iterabre.data import load_documents, token_windows
    from iterabre.models import load_model
    from iterabre.surgery import remove_blocks

    teacher, tokenizer = load_model("smollm2-135m", device=device)
    student = remove_blocks(copy.deepcopy(teacher), REMOVED)
    n = size["batch_size"] * size["steps"]
    ids = token_windows(tokenizer, load_documents("wikitext", "valid"), size["seq_len"])[:n]
    if len(ids) < n:
        raise SystemExit(f"wikitext valid gives {len(ids)} windows of {size['seq_len']} tokens, {n} needed: "
                         "use a smaller --batch-size or --seq-len")
    return teacher, student, ids


def _device(model) -> str:
    """'cuda' or 'cpu': where the model's weights are."""
    return next(model.parameters()).device.type


def run_iterabre(teacher, template, ids, size: dict) -> dict:
    """One recover() call on a fresh student copy; returns seconds and tokens."""
    import torch

    from iterabre.config import RecoveryConfig
    from iterabre.recovery import recover

    student, marks = copy.deepcopy(template), []
    cfg = RecoveryConfig(method="kd", trainable="all", tokens=ids.numel(), batch_size=size["batch_size"],
                         lr=LR, lr_schedule="cosine", max_loss_ratio=None)
    start = time.perf_counter()
    res = recover(student, teacher, ids, torch.ones_like(ids), cfg, removed=REMOVED, device=_device(teacher),
                  progress=lambda info: marks.append(clocks()))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_s": res.tokens / res.tokens_per_s, "tokens": res.tokens,
            "steps": res.steps, "final_loss": res.losses[-1][1] if res.losses else None, **steady(marks)}


def clocks() -> tuple[float, float]:
    """(wall, this process's CPU) seconds now, after the GPU's queued work (if any) has finished."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def steady(marks: list[tuple[float, float]]) -> dict:
    """Wall and CPU seconds per optimizer step between the first and the last step's end.

    Leaves out step 1 (optimizer state allocation, first-touch page faults). CPU time is what
    this process itself used, so time slices lost to other jobs on a shared CPU do not count.
    """
    n = len(marks) - 1
    if n < 1:
        return {"steady_wall_s_per_step": None, "steady_cpu_s_per_step": None}
    return {"steady_wall_s_per_step": (marks[-1][0] - marks[0][0]) / n,
            "steady_cpu_s_per_step": (marks[-1][1] - marks[0][1]) / n}


def kd_trainer_class():
    """A Trainer whose loss is forward KL(teacher || student) over non-padding tokens."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class KDTrainer(Trainer):
        """Plain distillation: frozen teacher forward under no_grad, student forward, KL."""

        def __init__(self, *args, teacher=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Mean over non-padding tokens of KL(teacher || student)."""
            with torch.no_grad():
                t_logits = self.teacher(**inputs, use_cache=False).logits  # [B,T,V]
            out = model(**inputs, use_cache=False)
            keep = inputs["attention_mask"].bool()
            log_q = F.log_softmax(out.logits[keep].float(), dim=-1)  # [N,V] student
            log_p = F.log_softmax(t_logits[keep].float(), dim=-1)  # [N,V] teacher
            loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
            return (loss, out) if return_outputs else loss

    return KDTrainer


def step_marks_callback(marks: list):
    """A TrainerCallback that records `clocks()` at the end of every optimizer step."""
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(clocks())

    return Marks()


def run_trainer(teacher, template, ids, size: dict) -> dict:
    """One Trainer.train() on a fresh student copy with the same steps, lr schedule and clipping."""
    import torch
    from transformers import TrainingArguments

    student, cuda = copy.deepcopy(template).train(), _device(teacher) == "cuda"
    teacher.eval().requires_grad_(False)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=size["batch_size"], max_steps=size["steps"],
            learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=round(0.05 * size["steps"]),
            weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", logging_strategy="no",
            report_to="none", use_cpu=not cuda, bf16=cuda, disable_tqdm=True, remove_unused_columns=False, seed=0)
        marks = []
        trainer = kd_trainer_class()(model=student, args=args, train_dataset=data, teacher=teacher,
                                     callbacks=[step_marks_callback(marks)])
        start = clocks()[0]
        metrics = trainer.train().metrics
        wall = clocks()[0] - start
    tokens = size["steps"] * size["batch_size"] * size["seq_len"]
    return {"wall_s": wall, "train_s": wall, "tokens": tokens, "steps": size["steps"],
            "final_loss": metrics.get("train_loss"), **steady(marks)}


RUNNERS = {"iterabre": run_iterabre, "hf_trainer": run_trainer}


def compare(args) -> dict:
    """Alternate the two variants; collect per-run results."""
    size = sizes(args)
    teacher, template, ids = setup(size, common.device(args.device))
    runs = {v: [] for v in VARIANTS}
    for r in range(size["repeats"] + 1):  # round 0 is the warm-up and is not counted
        for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            result = RUNNERS[v](teacher, template, ids, size)
            if r > 0:
                runs[v].append(result)
    summary = summarise(runs)
    return {"sizes": size, "runs": runs, "summary": summary,
            "mfu": mfu_summary(summary, template, teacher, size, args.peak_tflops)}


def mfu_summary(summary: dict, student, teacher, size: dict, peak_override: float | None) -> dict:
    """FLOPs per token of KD, the device's peak and each variant's steady-state MFU."""
    import torch

    import flops

    name = torch.cuda.get_device_name(0) if _device(teacher) == "cuda" else None
    per_token = flops.kd_flops_per_token(student, teacher, size["seq_len"])
    peak = flops.peak_tflops(name, peak_override)
    tok_s = {v: summary[v]["steady_wall_tokens_per_s"] for v in VARIANTS}
    return {"device": name or "cpu", "flops_per_token": per_token, "peak_tflops": peak,
            **{f"{v}_mfu": flops.mfu(t, per_token, peak) for v, t in tok_s.items()},
            **{f"{v}_tflops": t * per_token / 1e12 for v, t in tok_s.items()}}


def planner_estimate(size: dict, device: str) -> dict:
    """The memory planner's recovery estimate (MiB) for iterabre's job here: KD of all weights of the
    24-block student, one-shot, this batch, float32 weights as `setup` loads them (bf16 autocast on CUDA)."""
    from iterabre import planner

    m = planner.counts_for("smollm2-135m")
    job = planner.Job(target_layers=m.num_layers - len(REMOVED), schedule="one-shot", method="kd", trainable="all",
                      dtype="float32", device=device, batch_size=size["batch_size"], seq_len=size["seq_len"])
    return common.phase_mb(planner.recovery_phase(m, job, False))


def with_estimate(result: dict) -> dict:
    """The result with the current planner's estimate for its job (the memory runs' device and sizes)."""
    if "memory" not in result:
        return result
    device = next(iter(result["memory"].values())).get("kind", "cpu")
    return {**result, "planner": planner_estimate(result["sizes"], device)}


def weights_note() -> str | None:
    """What stands in for SmolLM2's weights, if they are a stand-in (bench/stand_in.py), else None."""
    from iterabre.paths import SOURCE_FILE, models_dir

    source = models_dir() / "smollm2-135m" / SOURCE_FILE
    return json.loads(source.read_text()).get("stand_in") if source.exists() else None


def summarise(runs: dict) -> dict:
    """Median tokens/s per variant (train loop and whole call); iterabre/Trainer as a paired median."""
    out = {}
    for v, rs in runs.items():
        out[v] = {"tokens": rs[0]["tokens"],
                  "train_tokens_per_s": common.median([r["tokens"] / r["train_s"] for r in rs]),
                  "call_tokens_per_s": common.median([r["tokens"] / r["wall_s"] for r in rs]),
                  **{f"steady_{c}_tokens_per_s": common.median([r["tokens"] / r["steps"] / r[f"steady_{c}_s_per_step"]
                                                                for r in rs]) for c in ("wall", "cpu")}}
    for key, field in (("train_tokens_per_s", "train_s"), ("call_tokens_per_s", "wall_s"),
                       ("steady_wall_tokens_per_s", "steady_wall_s_per_step"),
                       ("steady_cpu_tokens_per_s", "steady_cpu_s_per_step")):
        # tokens/s ratio = Trainer time / iterabre time (same token count in both)
        stats = common.ratio_stats([r[field] for r in runs["hf_trainer"]], [r[field] for r in runs["iterabre"]])
        out[f"ratio_{key}"], out[f"ratio_{key}_stats"] = stats["paired"], stats
    return out


def child(variant: str, args) -> None:
    """Memory probe: set up, reset the peak mark, run one variant once, read the peak (RSS or CUDA)."""
    size, device = sizes(args), common.device(args.device)
    teacher, template, ids = setup(size, device)
    # the peak mark is reset after setup: the peak is then the training run's own
    peak = common.peak_of(lambda: RUNNERS[variant](teacher, template, ids, size), device)
    common.emit_child_result({**peak, "kind": device})


def memory(args) -> dict:
    """Peak RSS of each variant in a fresh process."""
    extra = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    extra += ["--device", args.device]
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value:
            extra += [flag, str(value)]
    return common.child_memory(Path(__file__), {v: v for v in VARIANTS}, extra, "training_mb")


def main() -> None:
    """Compare, measure memory, print, save."""
    args = parse_args()
    common.apply_threads(args.threads)
    if args.child:
        return child(args.child, args)
    if args.refresh_estimates:
        for name in ("recovery", "recovery-cuda"):
            if common.result_path(name).exists():
                common.rewrite_derived(name, with_estimate)
        return
    result = compare(args)
    if not args.no_memory:
        result["memory"] = memory(args)
        result["planner"] = planner_estimate(result["sizes"], common.device(args.device))
    result["weights"] = weights_note()
    s, mem, mfu = result["summary"], result.get("memory", {}), result["mfu"]
    rows = [[v, s[v]["tokens"], s[v]["train_tokens_per_s"], s[v]["call_tokens_per_s"],
             s[v]["steady_wall_tokens_per_s"], s[v]["steady_cpu_tokens_per_s"], mfu[f"{v}_mfu"],
             mem.get(v, {}).get("peak_mb"), mem.get(v, {}).get("training_mb")] for v in VARIANTS]
    rows.append(["iterabre / trainer", None, s["ratio_train_tokens_per_s"], s["ratio_call_tokens_per_s"],
                 s["ratio_steady_wall_tokens_per_s"], s["ratio_steady_cpu_tokens_per_s"], None, None, None])
    size = result["sizes"]
    common.print_table(f"KD recovery, SmolLM2 24-block student, batch {size['batch_size']} x {size['seq_len']}, "
                       f"{size['steps']} steps, {size['repeats']} repeats",
                       ["variant", "tokens/run", "train tok/s", "whole-call tok/s", "steady tok/s",
                        "steady CPU tok/s", "MFU", "peak MiB", "+MiB in training"], rows)
    name = "recovery" if mfu["device"] == "cpu" else "recovery-cuda"  # a GPU run keeps the CPU table
    path = common.write_json(name, {"machine": common.machine_info(), "quick": args.quick,
                                          "removed": REMOVED, "lr": LR, "target": "iterabre >= Trainer tokens/s",
                                          **result})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
