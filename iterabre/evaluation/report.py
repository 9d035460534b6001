"""Compression report: report.json -> report.md (tables) + importance.png + metrics.png.

The report.json structure is written by the compress flow: base_eval / final_eval and
steps[i].eval are `evaluate()` outputs ({task: {metric: value}}; a step's eval may be
missing), steps[i].scores maps ORIGINAL block index (str or int) to importance.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

# (task, metric, higher is better, column label)
MAIN_METRICS = (("wikitext", "word_perplexity", False, "wikitext ppl"),
                ("blimp", "acc", True, "blimp acc"),
                ("xcopa", "acc", True, "xcopa acc"))
# Accuracy of guessing for the two-choice tasks. A small English-only base model can sit at
# chance on XCOPA (SmolLM2-135M: 0.519 ± 0.007); then its retained % measures nothing.
CHANCE = {("blimp", "acc"): 0.5, ("xcopa", "acc"): 0.5}


def atomic_write(path: Path, data: bytes) -> Path:
    """Write `data` to a temp file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- rows

def eval_rows(report: dict) -> list[dict]:
    """[{label, removed, eval}] for base, each evaluated step, and final (blocks removed so far)."""
    n_base = report["base_num_layers"]
    rows = [{"label": "base", "removed": 0, "eval": report.get("base_eval")}]
    for step in report.get("steps", []):
        if step.get("eval"):
            rows.append({"label": f"step {step['step']}", "removed": n_base - step["num_layers"],
                         "eval": step["eval"]})
    rows.append({"label": "final", "removed": n_base - report["final_num_layers"],
                 "eval": report.get("final_eval")})
    return [r for r in rows if r["eval"]]


def present_metrics(rows: list[dict]) -> list[tuple]:
    """The MAIN_METRICS that at least one row has."""
    return [m for m in MAIN_METRICS if any(m[1] in (r["eval"].get(m[0]) or {}) for r in rows)]


def metric_value(ev: dict | None, task: str, metric: str) -> tuple[float | None, float | None]:
    """(value, stderr) of task/metric in an eval dict, None where absent."""
    row = (ev or {}).get(task) or {}
    return row.get(metric), row.get(f"{metric}_stderr")


def retained(value: float | None, base: float | None, higher_is_better: bool) -> float | None:
    """Percent of the base score kept; for perplexity (lower is better) base/value."""
    if value is None or base is None or value == 0 or base == 0:
        return None
    return 100.0 * (value / base if higher_is_better else base / value)


# ---------------------------------------------------------------- markdown

def _fmt(value: float | None, stderr: float | None = None, decimals: int | None = None) -> str:
    """Markdown cell: '0.7120 ± 0.0140', '23.41', or '–' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    decimals = decimals if decimals is not None else (2 if abs(value) >= 10 else 4)
    text = f"{value:.{decimals}f}"
    if isinstance(stderr, str):  # "n/a": lm-eval gives no stderr (perplexities); none is invented
        return f"{text} ± {stderr}"
    return f"{text} ± {stderr:.4f}" if stderr is not None else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def metrics_table(report: dict) -> list[str]:
    """Rows base / step k / final; per main metric its value and % retained vs base."""
    rows = eval_rows(report)
    metrics, base = present_metrics(rows), report.get("base_eval")
    header = ["model", "blocks removed", "blocks"]
    for *_, label in metrics:
        header += [label, f"{label.split()[0]} retained %"]
    body = []
    for r in rows:
        cells = [r["label"], str(r["removed"]), str(report["base_num_layers"] - r["removed"])]
        for task, metric, higher, _ in metrics:
            value, stderr = metric_value(r["eval"], task, metric)
            base_value, _ = metric_value(base, task, metric)
            cells += [_fmt(value, "n/a" if stderr is None else stderr),
                      _fmt(retained(value, base_value, higher), decimals=1)]
        body.append(cells)
    return _table(header, body)


def chance_lines(report: dict) -> list[str]:
    """A warning per CHANCE metric whose base score is within two standard errors of guessing."""
    lines = []
    for (task, metric), chance in CHANCE.items():
        value, stderr = metric_value(report.get("base_eval"), task, metric)
        if value is not None and value - 2 * (stderr or 0.0) <= chance:
            lines.append(f"- The base model's {task} {metric} ({_fmt(value, stderr)}) is within two standard "
                         f"errors of chance ({chance}): its retained % cannot show lost ability; judge "
                         "this compression on the other metrics.")
    return lines


def _windows(step: dict) -> str:
    """'4–20' (or '4–20, 60–62' with carried tokens): the step's recovery window positions."""
    spans = step.get("recovery_windows") or []
    return ", ".join(f"{a}–{b}" for a, b in spans) or "–"


def phases(report: dict) -> list[dict]:
    """Every recovery phase of a job in order: its steps, then the `final` schedule's last phase if any."""
    return report.get("steps", []) + ([report["final_recovery"]] if report.get("final_recovery") else [])


def steps_table(report: dict) -> list[str]:
    """One row per recovery phase: removed blocks (original numbering), teacher, losses, text used."""
    body = []
    for step in phases(report):
        rec = step.get("recovery") or {}
        body.append([step.get("name") or str(step["step"]), _blocks(step.get("removed", [])),
                     str(step.get("num_layers", "–")), _fmt(rec.get("loss_before")),
                     _fmt(rec.get("loss_after")), str(rec.get("tokens", "–")),
                     _fmt(rec.get("seconds"), decimals=1), str(step.get("teacher", "–")),
                     str(step.get("budget", "–")), _windows(step), str(rec.get("method", "–"))])
    header = ["step", "removed blocks", "blocks left", "KD loss before", "KD loss after",
              "recovery tokens", "recovery s", "teacher", "budget", "recovery windows", "recovery"]
    return _table(header, body)


def _blocks(blocks) -> str:
    """'17, 14, 13': block numbers as the report writes them."""
    return ", ".join(str(b) for b in blocks) or "–"


def _select_line(step: dict) -> str:
    """Which candidate set `--scorer select` removed and each set's output distance."""
    chosen, distances = step["chosen"], step["distances"]
    sets = "; ".join(f"{rule} {_blocks(step['candidates'][rule])} ({distances[rule]:.4f}"
                     + (", removed)" if rule == chosen else ")") for rule in distances)
    return (f"- Step {step['step']}: `select` compared the sets its scorers proposed by the output "
            f"distance of removing each as a whole (mean 1 − cosine of the final hidden states against the "
            f"unpruned model, calibration text) and removed the smallest: {sets}.")


def _repair_lines(step: dict) -> list[str]:
    """What the repair before KD did: `auto`'s choice, the blocks it changed and the error it left."""
    rec, label = step.get("recovery") or {}, step.get("name") or f"Step {step['step']}"
    extra, lines = rec.get("extra") or {}, []
    if extra.get("auto"):
        gaps = extra.get("gaps")
        lines.append(f"- {label}: `auto` repaired with {extra['auto']}"
                     + (f" ({gaps} gap{'s' if gaps != 1 else ''}: least squares for one contiguous gap, "
                        "block-wise reconstruction for several)." if gaps is not None else "."))
    if recon := extra.get("block_recon"):
        kept = [b for u in recon["units"] if not u.get("restored") for b in u["blocks"]]
        undone = [b for u in recon["units"] if u.get("restored") for b in u["blocks"]]
        lines.append(f"- {label}: block-wise reconstruction trained block{'s' * (len(kept) != 1)} {_blocks(kept)} "
                     f"({recon['tokens']:,} tokens, {recon['steps']} Adam steps)"
                     + (f", undone for block{'s' * (len(undone) != 1)} {_blocks(undone)} (it did not help)"
                        if undone else "")
                     + f"; held-out residual error {recon['error_before']:.3f} → {recon['error_after']:.3f}.")
    if fit := extra.get("reconstruct"):
        lines.append(f"- {label}: least squares refitted {', '.join(fit['fitted']) or 'nothing'} (module names "
                     f"of the pruned model; {fit['tokens']:,} tokens)"
                     + (f", undone for {', '.join(fit['restored'])} (it did not help)" if fit.get("restored") else "")
                     + f"; residual error {fit['error_before']:.3f} → {fit['error_after']:.3f}.")
    return lines


def choice_summary(report: dict) -> list[str]:
    """Short console lines: which set `select` removed against which, and the repair `auto` ran, per
    phase that made such a choice (report.md's Removal and repair section has the details)."""
    lines = []
    for step in phases(report):
        parts, extra = [], ((step.get("recovery") or {}).get("extra") or {})
        if step.get("chosen") and step.get("distances"):
            chosen, distances = step["chosen"], step["distances"]
            others = ", ".join(f"{rule}'s {d:.4f}" for rule, d in distances.items() if rule != chosen)
            parts.append(f"select removed {chosen}'s set (output distance {distances[chosen]:.4f}; {others})")
        if extra.get("auto"):
            gaps = extra.get("gaps")
            parts.append(f"auto repaired with {extra['auto']}"
                         + (f" ({gaps} gap{'s' * (gaps != 1)})" if gaps is not None else ""))
        if parts:
            lines.append(f"  {step.get('name') or 'step ' + str(step['step'])}: {'; '.join(parts)}")
    return lines


def choice_lines(report: dict) -> list[str]:
    """Per phase: the removal `select` chose and why, and what the repair before KD did."""
    lines = []
    for step in phases(report):
        if step.get("chosen") and step.get("distances"):
            lines.append(_select_line(step))
        lines += _repair_lines(step)
    return lines


def _span(part: dict) -> str:
    """'[0, 2) = 256 tokens': a [start, stop) range of window positions and its size."""
    start, stop = part["windows"]
    return f"[{start}, {stop}) = {part['tokens']:,} tokens"


def data_lines(report: dict) -> list[str]:
    """Where the text came from (disjoint token ranges) and how the recovery budget was spent."""
    lines, split, budget = [], report.get("data_split"), report.get("budget")
    if split:
        calib = split["calibration"]
        lines += [f"- Text: {split['seq_len']}-token windows of {split['source']}, positions in one seeded "
                  f"permutation (seed {split['seed']}) of its {split['windows_available']:,} windows, so "
                  f"disjoint ranges are disjoint text: calibration {_span(calib)}"
                  + (f" ({calib['source']})" if calib.get("source") else "")
                  + f", held-out {_span(split['heldout'])}, recovery {_span(split['recovery'])}.",
                  f"- Evaluation: {split['evaluation']}."]
        if split.get("block_recon"):
            recon = split["block_recon"]
            lines.append(f"- Block-recon text: {recon['windows']} windows = {recon['tokens']:,} tokens, "
                         f"{recon['source']}.")
    if budget:
        used = ", ".join(f"{u:,}" for u in budget.get("used", []))
        lines.append(f"- Recovery budget: `{budget['schedule']}` schedule, {budget['total']:,} tokens given, "
                     f"{budget.get('used_total', 0):,} trained (per phase: {used}).")
    compute = report.get("compute")
    if compute and compute.get("total_flops"):
        generated = (f"generating calibration text {compute['generation_flops'] / 1e12:,.2f}, "
                     if compute.get("generation_flops") else "")
        lines.append(f"- Compute: {compute['total_flops'] / 1e12:,.2f} TFLOP ({generated}scoring "
                     f"{compute['scoring_flops'] / 1e12:,.2f}, recovery {compute['recovery_flops'] / 1e12:,.2f}; "
                     "evaluation not counted).")
    teachers = sorted({str(s["teacher"]) for s in report.get("steps", []) if s.get("teacher")})
    if teachers:
        lines.append(f"- Teacher: {' / '.join(teachers)} ('base' = the unpruned model; 'previous' = the "
                     "model before each step's removal).")
    return lines


def render_markdown(report: dict) -> str:
    """The whole report.md text."""
    removed = ", ".join(str(b) for b in report.get("removed_layers", [])) or "none"
    version = (report.get("data_version") or {}).get("md5", "unknown")
    lines = [f"# Compression report: {report.get('base_model', 'model')}", "",
             f"{report['base_num_layers']} → {report['final_num_layers']} blocks; removed (original "
             f"numbering, in removal order): {removed}. Data version: `{version}`.", "",
             "## Evaluation", "",
             "Retained % is score / base score (for perplexity: base / perplexity). ± is lm-eval's "
             "standard error; n/a where lm-eval gives none (perplexity).", ""]
    lines += metrics_table(report)
    if warnings := chance_lines(report):
        lines += [""] + warnings
    lines += ["", "## Steps", ""] + steps_table(report)
    if choices := choice_lines(report):
        lines += ["", "## Removal and repair", ""] + choices
    if facts := data_lines(report):
        lines += ["", "## Data and budget", ""] + facts
    lines += ["", "![block importance](importance.png)", "", "![metrics](metrics.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def importance_matrix(report: dict):
    """float[steps, base blocks] of row-normalised scores; NaN where a block was already gone."""
    import numpy as np

    steps = report.get("steps", [])
    # A base that was itself pruned keeps its original numbering: [0, 2, 5] has 3 blocks
    # but needs 6 columns.
    seen = [int(k) for step in steps for k in (step.get("scores") or {})]
    n = max([report["base_num_layers"]] + [k + 1 for k in seen])
    grid = np.full((len(steps), n), np.nan)
    for i, step in enumerate(steps):
        scores = {int(k): float(v) for k, v in (step.get("scores") or {}).items()}
        if not scores:
            continue
        lo, hi = min(scores.values()), max(scores.values())
        for block, score in scores.items():
            # Scales differ a lot between steps (and scorers): compare blocks within a step.
            grid[i, block] = (score - lo) / (hi - lo) if hi > lo else 0.5
    return grid


def _png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (figure closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def importance_png(report: dict) -> bytes:
    """Heatmap: original block index (x) by step (y); an x marks the blocks removed at that step."""
    import matplotlib.pyplot as plt

    grid, steps = importance_matrix(report), report.get("steps", [])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * grid.shape[1] + 2), max(2.5, 0.4 * len(steps) + 1.5)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # NaN: block already removed
    image = ax.imshow(grid if steps else [[float("nan")]], aspect="auto", cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
    for i, step in enumerate(steps):
        removed = list(step.get("removed", []))
        ax.scatter(removed, [i] * len(removed), marker="x", color="red", s=40, label="removed" if i == 0 else None)
    ax.set_xlabel("block (original numbering)")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_ylabel("step")
    ax.set_yticks(range(len(steps)), [str(s["step"]) for s in steps])
    ax.set_title("block importance per step (row-normalised; grey = already removed)")
    fig.colorbar(image, ax=ax, label="importance (0 = least in step)")
    if steps:
        ax.legend(loc="upper right", fontsize="small")
    return _png(fig)


def metrics_png(report: dict) -> bytes:
    """One panel per main metric: value vs number of blocks removed, stderr as error bars."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = eval_rows(report)
    metrics = present_metrics(rows)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 3.4), squeeze=False)
    for ax, (task, metric, _, label) in zip(axes[0], metrics):
        points = [(r["removed"], *metric_value(r["eval"], task, metric)) for r in rows]
        points = [(x, v, s or 0.0) for x, v, s in points if v is not None]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    marker="o", capsize=3)
        ax.set_xlabel("blocks removed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        if metric == "word_perplexity":
            ax.set_yscale("log")  # perplexity can explode by orders of magnitude without recovery
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no evaluations in this report", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    return _png(fig)


def write_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write report.md, importance.png and metrics.png into `out_dir` (each atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers, workers or CI
    out = Path(out_dir)
    return [atomic_write(out / "report.md", render_markdown(report).encode()),
            atomic_write(out / "importance.png", importance_png(report)),
            atomic_write(out / "metrics.png", metrics_png(report))]
