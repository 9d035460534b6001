"""The latest bench/results/*.json as Markdown: the blocks of docs/BENCHMARKS.md and the README's glance table.

A doc embeds a rendered block between `<!-- render:NAME:start -->` and `<!-- render:NAME:end -->`
(NAME: a result file such as `scoring-streamed`, or `costs`), the glance table between
`<!-- glance:start -->` and `<!-- glance:end -->`; tests/test_docs.py re-renders every block and
compares. After a new run, `--update` rewrites every marked block in README.md and docs/*.md.

    .venv/bin/python bench/render.py [NAME ...]    # print blocks (default: every result file's)
    .venv/bin/python bench/render.py glance        # the glance table
    .venv/bin/python bench/render.py --update      # re-render every marked block in the docs in place
"""

from __future__ import annotations

import json
import re
import sys

import common


def md(columns: list[str], rows: list[list]) -> str:
    """A Markdown table. Columns empty in every row are left out (they say nothing); with two rows or
    more, a column with the same cell in every row is left out too and stated once above the table."""
    keep = [i for i in range(len(columns)) if any(row[i] not in (None, "") for row in rows)] if rows else \
        list(range(len(columns)))
    same = [i for i in keep[1:] if len(rows) >= 2 and len({common.fmt(row[i]) for row in rows}) == 1]
    caption = "In every row: " + "; ".join(f"{columns[i]} {common.fmt(rows[0][i])}" for i in same) + ".\n\n" \
        if same else ""
    keep = [i for i in keep if i not in same]
    columns, rows = [columns[i] for i in keep], [[row[i] for i in keep] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(common.fmt(v) for v in row) + " |" for row in rows]
    return caption + "\n".join(lines)


def machine_line(m: dict, quick: bool = False) -> str:
    """One line naming the run the numbers come from: date, commit, machine, threads, load."""
    load = m.get("load_avg_1m")
    load = (f"load average {load.get('start')} at the start, {load.get('end')} at the end" if load else
            f"load average {m.get('load_avg_1m_at_start')} at the start")
    threads = m["torch_threads"]
    gpu = f"one {m['cuda']} GPU, " if m.get("cuda") else ""
    return (f"_Run of {m['date'][:16].replace('T', ' ')} UTC{' (`--quick` sizes)' if quick else ''}, commit "
            f"{m['git']['commit'][:8]}{' with uncommitted changes' if m['git']['dirty'] else ''}; {gpu}{m['cpu']}, "
            f"{m['cores']} cores, {threads} torch thread{'s' if threads != 1 else ''}, torch {m['torch']}, "
            f"transformers {m['transformers']}; {load}._")


def _peak(mem: dict) -> float | None:
    """A memory child's whole-process peak RSS: loading the model or scoring, whichever was higher."""
    peaks = [mem[k] for k in ("load_peak_mb", "peak_mb") if mem.get(k) is not None]
    return max(peaks) if peaks else None


def scoring(d: dict) -> str:
    """Scorer tables: per model and implementation, plus the streamed scorer's memory formula."""
    if not all("impls" in r for r in d["results"].values()):
        return _scoring_fast_naive(d)
    rows, formulas, ref = [], [], "fast"
    for model, r in d["results"].items():
        ref, mem = ("fast" if "fast" in r["impls"] else r["impls"][0]), r.get("memory", {})
        for impl in r["impls"]:  # the reference against itself: ratio 1, no difference, same ranking
            stats = {"paired": 1.0, "best": 1.0} if impl == ref else r.get(f"{impl}_over_{ref}", {})
            same = True if impl == ref else r.get(f"{impl}_same_ranking")
            rows.append([model, impl, r["num_blocks"], f"{r['sizes']['windows']}x{r['sizes']['seq_len']}",
                         r["median_s"][impl], stats.get("paired"), stats.get("best"),
                         0.0 if impl == ref else r.get(f"{impl}_max_abs_diff"),
                         None if same is None else ("yes" if same else "NO"), _peak(mem.get(impl, {})),
                         mem.get(impl, {}).get("scoring_mb")])
        f = r.get("formula_mib")
        if f:
            formulas.append([model, f["whole_model"], f["blocks"], f["streams"], f["embedding_head"],
                             f["activations"], f["total"], mem.get("streamed", {}).get("scoring_mb")])
    table = md(["model", "impl", "blocks", "tokens", "median s", f"time / {ref} (paired median)",
                f"time / {ref} (fastest calls)", f"max abs score diff to {ref}", f"same ranking as {ref}",
                "peak RSS MiB (loading or scoring)", "+MiB while scoring"], rows)
    if not formulas:
        return table
    title = "Streamed scorer memory (MiB): `iterabre.streaming.streamed_memory`'s parts and total vs measured"
    return f"{table}\n\n{title}:\n\n" + md(
        ["model", "whole model (fp32)", "2 blocks", "streams", "embedding + head", "one block call's activations",
         "formula total", "measured +MiB"], formulas)


def _scoring_fast_naive(d: dict) -> str:
    """fast vs naive scorer table (result files written before the streamed scorer)."""
    rows = []
    for model, r in d["results"].items():
        mem = r.get("memory", {})
        rows.append([model, r["num_blocks"], f"{r['sizes']['windows']}x{r['sizes']['seq_len']}",
                     r["median_s"]["fast"], r["median_s"]["naive"], r["ratio_fast_over_naive"],
                     r["ratio_stats"]["best"] if "ratio_stats" in r else None, r["max_abs_score_diff"],
                     {True: "yes", False: "NO"}.get(r.get("same_ranking")), mem.get("fast", {}).get("peak_mb"),
                     mem.get("naive", {}).get("peak_mb"), mem.get("fast", {}).get("scoring_mb"),
                     mem.get("naive", {}).get("scoring_mb")])
    return md(["model", "blocks", "tokens", "fast s (median)", "naive s (median)", "fast / naive (paired median)",
               "fast / naive (fastest calls)", "max abs score diff", "same ranking", "fast peak RSS MiB",
               "naive peak RSS MiB", "fast +MiB", "naive +MiB"], rows)


def recovery(d: dict) -> str:
    """recover() vs Trainer table; on a GPU with MFU, and the planner's estimate next to iterabre's peak."""
    s, mem = d["summary"], d.get("memory", {})
    steady, mfu = [f"steady_{c}_tokens_per_s" for c in ("wall", "cpu")], d.get("mfu", {})
    estimate = d.get("planner", {}).get("estimate_mb")
    rows = [[v, s[v]["train_tokens_per_s"], s[v]["call_tokens_per_s"],
             *[s[v].get(k) for k in steady], mfu.get(f"{v}_mfu"), mem.get(v, {}).get("peak_mb"),
             mem.get(v, {}).get("training_mb"), estimate if v == "iterabre" else None] for v in ("iterabre", "hf_trainer")]
    rows.append(["iterabre / Trainer", s["ratio_train_tokens_per_s"], s["ratio_call_tokens_per_s"],
                 *[s.get(f"ratio_{k}") for k in steady], None, None, None, None])
    z, gpu = d.get("sizes", {}), mfu.get("device", "cpu") != "cpu"
    head = (f"{s['iterabre']['tokens']} tokens per run ({z.get('steps')} optimizer steps of {z.get('batch_size')} x "
            f"{z.get('seq_len')} tokens), {z.get('repeats')} runs per variant.") if z else ""
    if gpu:
        head += (f" bf16 autocast; MFU = KD FLOP/s ({mfu['flops_per_token'] / 1e9:.2f} GFLOP per token) over "
                 f"{mfu['peak_tflops']:g} TFLOP/s.")
    if d.get("weights"):
        head += f" Weights: {d['weights']}."
    note = f" {d['memory_note'][0].upper()}{d['memory_note'][1:]}." if d.get("memory_note") else ""
    peak = "peak GPU MiB (allocated)" if gpu else "peak RSS MiB"
    return (head + note + "\n\n" if head or note else "") + md(
        ["variant", "train-loop tok/s", "whole-call tok/s", "steady-state tok/s", "steady-state CPU tok/s", "MFU",
         peak, "+MiB while training", "planner estimate MiB"], rows)


def pruned_speed(d: dict) -> str:
    """24 vs 30 block speed table; the speed-ups are recomputed from the per-call seconds (paired)."""
    rows = []
    for kind, r in d["results"].items():
        base, pruned = r["seconds"]["base"], r["seconds"]["pruned"]
        st, n = common.ratio_stats(base, pruned), r["tokens_per_call"]
        rows.append([kind, n, n / min(base), n / min(pruned), st["paired"], st["best"],
                     f"{min(st['pairs']):.2f}-{max(st['pairs']):.2f}", st["paired"] / d["block_ideal"],
                     st["paired"] / d["matmul_ideal"]])
    b, p = d["base_blocks"], d["pruned_blocks"]
    head = (f"Ideal speed-up {b}/{p} = {d['block_ideal']:.3g} (all compute in the blocks); matmul ideal "
            f"{d['matmul_ideal']:.4g} (also counts the LM head, which removing blocks does not shrink). "
            f"{len(base)} alternating rounds per pass.\n\n")
    return head + md(["pass", "tokens per call", f"{b}-block tok/s (fastest call)", f"{p}-block tok/s (fastest call)",
                      "speed-up (paired median)", "speed-up (fastest calls)", "speed-up per round",
                      f"fraction of {b}/{p}", "fraction of matmul ideal"], rows)


def overhead(d: dict) -> str:
    """Flow wall time vs the library steps inside it; Prefect API start-up per CLI process."""
    m = d["median_s"]
    if "plain" in m:  # files from before the flow timed its own steps (a second copy of the loop then)
        return md(["what", "seconds"], [["plain loop of iterabre.steps (median)", m["plain"]],
                                        ["Prefect + MLflow flow (median)", m["flow"]],
                                        ["overhead per job", d["overhead_s"]], ["overhead %", d["overhead_pct"]],
                                        ["one-off: ephemeral Prefect server start", d["server_start_s"]],
                                        ["one-off: importing prefect + mlflow + the flow", d["imports_s"]]])
    job = md(["what", "seconds"], [["inside the `iterabre.steps` calls of a flow run (median)", m["steps"]],
                                   ["the whole flow run (median)", m["flow"]],
                                   ["overhead per job (median of per-run differences)", d["overhead_s"]],
                                   ["overhead %", d["overhead_pct"]],
                                   ["one-off: importing prefect + mlflow + the flow", d["imports_s"]]])
    api = d["api_start"]
    modes = {"cold": "in-process API, new PREFECT_HOME", "warm": "in-process API, same PREFECT_HOME again",
             "server": "`prefect server start` already running (PREFECT_API_URL)"}
    rows = [[label, *[api["median_s"][mode][k] for k in ("ensure_s", "first_flow_s", "process_s")]]
            for mode, label in modes.items()]
    rows.append(["starting that `prefect server start` (once)", api["server_ready_s"], None, None])
    per_process = md(["Prefect API per CLI process (median)", "ensure_prefect_api s", "first (empty) flow s",
                      "whole process s"], rows)
    return f"{job}\n\n{per_process}"


def quality(d: dict) -> str:
    """The quality table: one row per method (per-language XCOPA: bench/quality.py --report-only)."""
    from quality import _pm

    rows = [[uid, len(u["removed"]), u.get("recovery_tokens", 0), u["wikitext_word_ppl"],
             _pm(u["blimp_acc"], u["blimp_stderr"]), _pm(u["xcopa_acc"], u["xcopa_stderr"]), u["avg_acc"],
             " ".join(map(str, u["removed"])), u["seconds"] / 60] for uid, u in d["units"].items()]
    return md(["method", "blocks removed", "KD tokens", "wikitext word ppl", "BLiMP acc", "XCOPA acc",
               "avg acc", "removed (original idx)", "minutes"], rows)


def quality_equal(d: dict) -> str:
    """bench/quality.py --equal-compute: every recipe gets the same FLOPs (scoring + recovery)."""
    from quality import _pm

    rows = []
    for uid, u in d["units"].items():
        plan = u["plan"]
        if not u.get("feasible", True):  # its scoring alone spends the budget: nothing was run
            rows.append([uid, plan["fields"]["schedule"], plan["recovery"]["method"], None, plan["scoring"] / 1e12,
                         "none affordable", None, None, None, None, None])
            continue
        rows.append([uid, plan["fields"]["schedule"], plan["recovery"]["method"], u.get("kd_tokens", 0),
                     u["scoring_flops"] / 1e12, u["recovery_flops"] / 1e12, u["wikitext_word_ppl"],
                     _pm(u["blimp_acc"], u["blimp_stderr"]), _pm(u["xcopa_acc"], u["xcopa_stderr"]),
                     " ".join(map(str, u["removed"])), u["seconds"] / 60])
    s = d["settings"]
    head = (f"SmolLM2-135M, {s['blocks']} blocks removed, seed {s['seed']}; budget {s['flops'] / 1e12:.1f} TFLOP per "
            f"recipe (what KD with {s['equal_kd_tokens']} tokens spends with its scoring), counted from the shapes "
            f"(`iterabre.flops`).\n\n")
    return head + md(["recipe", "schedule", "recovery", "KD tokens", "scoring TFLOP", "recovery TFLOP",
                      "wikitext word ppl", "BLiMP acc", "XCOPA acc", "removed (original idx)", "minutes"], rows)


def seed_files(name: str) -> list[dict]:
    """The result files of a `NAME-seeds` block: NAME-seed0.json, NAME-seed1.json, ... in seed order."""
    prefix = name.removesuffix("-seeds") + "-seed"
    paths = [p for p in common.RESULTS.glob(f"{prefix}*.json") if p.stem[len(prefix):].isdigit()]
    return [json.loads(p.read_text()) for p in sorted(paths, key=lambda p: int(p.stem[len(prefix):]))]


def _seed_word(n: int) -> str:
    return "seed" if n == 1 else "seeds"


def _sd(xs: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def _msd(xs: list[float], digits: int) -> str:
    """'mean ± sd' of per-seed values (the value alone for one seed: it has no spread)."""
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}" if xs else ""
    return f"{sum(xs) / len(xs):.{digits}f} ± {_sd(xs):.{digits}f}"


def _paired(runs: list[dict], a: str, b: str, key: str) -> list[float]:
    """Per-seed a - b of `key`, over the seeds where both recipes ran."""
    return [u[a][key] - u[b][key] for u in runs if a in u and b in u]


def _feasible(files: list[dict]) -> list[dict]:
    """Per seed file, the units that ran (a recipe whose scoring spent the whole budget did not)."""
    return [{k: u for k, u in d["units"].items() if u.get("feasible", True)} for d in files]


def _knobs(overrides: dict) -> str:
    """A recipe's changed knobs as the recovery column says them: ", lr 0.0002, block recon blocks both"."""
    return "".join(f", {o.replace('_', ' ')} {v:g}" if isinstance(v, float) else f", {o.replace('_', ' ')} {v}"
                   for o, v in overrides.items())


def equal_seeds(files: list[dict]) -> str:
    """Equal-compute tables over seeds: mean ± sd per recipe, paired differences to the default recipe, the
    goal (beat every published baseline by more than the seed spread on perplexity, not worse on BLiMP) and
    the paper's own comparison (iterative vs one-shot, same scorer and recovery)."""
    from quality import BASELINES, DEFAULT_RECIPE, EQUAL_RECIPES, recipe

    runs = _feasible(files)
    order = list(EQUAL_RECIPES)  # recipes in their table order, each followed by its @ variants
    names = sorted({k for r in runs for k in r}, key=lambda k: (order.index(k.split("@")[0]), k))
    # Δ is against the default; a set it did not run on compares with the recipe it runs on a scattered removal.
    ref = next((k for k in (DEFAULT_RECIPE, DEPTH_RECIPES[0]) if any(k in r for r in runs)), DEFAULT_RECIPE)
    rows = []
    for k in names:
        got = [r[k] for r in runs if k in r]
        (scorer, schedule, method, when), overrides = recipe(k)
        d_ppl, d_blimp = _paired(runs, k, ref, "wikitext_word_ppl"), _paired(runs, k, ref, "blimp_acc")
        rows.append([f"**{k}**" if k == DEFAULT_RECIPE else k, scorer, schedule, method + (" at the end" if when == "end" and
                     schedule == "iterative" else "") + _knobs(overrides), len(got),
                     sum(u["total_flops"] for u in got) / len(got) / files[0]["settings"]["flops"],
                     _msd([u["kd_tokens"] for u in got], 0), _msd([u["wikitext_word_ppl"] for u in got], 1),
                     _msd(d_ppl, 1) if k != ref else "", _msd([u["blimp_acc"] for u in got], 3),
                     _msd(d_blimp, 3) if k != ref else "", _msd([u["xcopa_acc"] for u in got], 3),
                     _msd([u["seconds"] / 60 for u in got], 1)])
    everywhere = all(row[4] == len(files) for row in rows)  # every recipe ran on every seed: the head says so
    if everywhere:
        rows = [row[:4] + [""] + row[5:] for row in rows]
    s, seeds = files[0]["settings"], ", ".join(str(d["settings"]["seed"]) for d in files)
    head = (f"SmolLM2-135M, {s['blocks']} blocks removed, {_seed_word(len(files))} {seeds}"
            f"{' (every recipe)' if everywhere and len(files) > 1 else ''};"
            f" budget {s['flops'] / 1e12:.1f} TFLOP per recipe (what one-shot output scoring and KD with "
            f"{s['equal_kd_tokens']} tokens spend), counted from the shapes (`iterabre.flops`). "
            f"{'Mean ± sd over the seeds; ' if len(files) > 1 else ''}Δ = recipe − {ref} on the same seed (paired).\n\n")
    table = md(["recipe", "scorer", "schedule", "recovery", "seeds", "total / budget", "KD tokens",
                "wikitext word ppl", f"Δ ppl vs {ref}", "BLiMP acc", "Δ BLiMP", "XCOPA acc", "minutes"], rows)
    starved = [(d["settings"]["seed"], k, u) for d in files for k, u in d["units"].items()
               if not u.get("feasible", True)]
    lines = []
    for k in dict.fromkeys(k for _, k, _ in starved):  # one line per recipe: its scoring cost is the same every seed
        seeds = [str(seed) for seed, o, _ in starved if o == k]
        u = next(u for _, o, u in starved if o == k)
        lines.append(f"- {k} ({_seed_word(len(seeds))} {', '.join(seeds)}): its scoring alone is predicted to "
                     f"cost {u['plan']['scoring'] / 1e12:.1f} TFLOP, so no KD micro-batch is affordable; not run.")
    # The recipe with the lowest mean perplexity over every seed, when it is not the default, gets the same
    # verdict lines: a reader deciding whether to override the default needs them.
    full = [k for k in names if all(k in r for r in runs)]
    best = min(full, key=lambda k: sum(r[k]["wikitext_word_ppl"] for r in runs), default=ref)
    verdicts = _verdicts(runs, names, ref, BASELINES)
    if best != ref:
        verdicts += [f"- The lowest perplexity here, {best}, against the published baselines:"] + \
            ["  " + line for line in _verdicts(runs, names, best, BASELINES, pairs=False)]
    return head + table + "\n\n" + "\n".join(verdicts + lines)


def _verdicts(runs: list[dict], names: list[str], ref: str, baselines: tuple, pairs: bool = True) -> list[str]:
    """One line per published baseline, each of its @ variants too (does `ref` beat it?), and (with `pairs`)
    one per iterative/one-shot pair."""
    from quality import recipe

    lines = []
    for b in (b for b in names if b.split("@")[0] in baselines and b != ref):
        d_ppl, d_blimp = _paired(runs, ref, b, "wikitext_word_ppl"), _paired(runs, ref, b, "blimp_acc")
        if not d_ppl:
            continue
        spread = max(_sd([r[k]["wikitext_word_ppl"] for r in runs if k in r]) for k in (ref, b))
        stderr = sum(r[ref]["blimp_stderr"] for r in runs if ref in r) / sum(ref in r for r in runs)
        gain, blimp = -sum(d_ppl) / len(d_ppl), sum(d_blimp) / len(d_blimp)
        ok = gain > spread and blimp > -stderr
        better = "better" if gain >= 0 else "worse"
        if len(d_ppl) > 1:
            lines.append(f"- {ref} vs {b} ({len(d_ppl)} seeds): perplexity {abs(gain):.1f} {better} (seed sd up to "
                         f"{spread:.1f}), BLiMP {blimp:+.3f} (stderr {stderr:.3f}): goal **{'met' if ok else 'not met'}**.")
        else:
            lines.append(f"- {ref} vs {b} (1 seed): perplexity {abs(gain):.1f} {better}, BLiMP {blimp:+.3f} (stderr "
                         f"{stderr:.3f}): no verdict from one seed.")
    for k in names if pairs else []:
        (scorer, schedule, method, _), overrides = recipe(k)
        twin = next((o for o in names if recipe(o) == ((scorer, "one-shot", method, "steps"), overrides)), None)
        if schedule == "iterative" and twin:
            d_ppl = _paired(runs, k, twin, "wikitext_word_ppl")
            d_blimp = _paired(runs, k, twin, "blimp_acc")
            if d_ppl:
                lines.append(f"- Iterative vs one-shot, {scorer} scorer and {method} ({k} − {twin}, {len(d_ppl)} "
                             f"{_seed_word(len(d_ppl))}): perplexity {_msd(d_ppl, 1)}, BLiMP {_msd(d_blimp, 3)}.")
    return lines


def dtypes(d: dict) -> str:
    """bench/dtypes.py: which precision trained weights get, its bytes and the KD loss it keeps."""
    what = {"fp32": ("float32", "float32", "float32"), "masters": ("**float32 masters** (shipped)", "float32", "bf16"),
            "bf16-fp32state": ("bf16", "float32", "bf16"), "bf16": ("bf16", "bf16", "bf16")}
    units, rows = d["units"], []
    for variant, (weights, moments, frozen) in what.items():
        kd = [units.get(f"train:{variant}:{n}") for n in (2048, 8192)]
        st = units.get(f"state:{variant}")
        rows.append([weights, moments, frozen] +
                    [f"{u['loss_before']:.4f} -> {u['loss_after']:.4f}" if u else None for u in kd] +
                    [f"{st['total'] / 1e9:.2f} G" if st else None])
    table = md(["trained weights", "AdamW moments", "teacher + frozen", "held-out KD, 2,048 tokens",
                "held-out KD, 8,192 tokens", "weights + grads + AdamW (bytes)"], rows)
    return table + (f"\n\n{d['notes'][0].upper()}{d['notes'][1:]}" if d.get("notes") else "")


def recovery_methods(d: dict) -> str:
    """bench/recovery_methods.py: each healing method on the same pruned model, measured on held-out text."""
    rows = []
    for r in d["rows"]:
        called = r["method"] != "none" and "seconds" in r  # `none` makes no recovery call
        rows.append([r["method"], r["rel_error"], r["kd_loss"], r["perplexity"], r["seconds"] if called else None,
                     r.get("peak_mem_mb") if called else None])
    z = d["sizes"]
    head = (f"Removed block(s) {', '.join(map(str, d['removed']))}; {z['calib']} calibration windows "
            f"({d['kd_tokens']} tokens) for every method, {z['heldout']} held-out windows of 128 tokens.\n\n")
    return head + md(["method", "held-out rel. hidden error", "held-out KD loss", "held-out perplexity",
                      "seconds", "peak RSS MiB"], rows)


def budget_study(d: dict) -> str:
    """The budget study's tables (bench/budget_study.py's own layout); empty experiments left out."""
    import budget_study as bs

    s = d["settings"]
    titles = {"deep": f"Deep: {s['deep_blocks']} blocks, {s['budget']} KD tokens, seed 0",
              "large": f"Large budget: {s['blocks']} blocks, {s['budget'] * s['large_factor']} KD tokens, seed 0"}
    return "\n\n".join(f"{titles.get(title.split()[0], title)}:\n\n" + md(columns, rows)
                        for title, columns, rows in bs.report_tables(s, d["units"]) if rows)


def base_eval(d: dict) -> str:
    """Full-suite headline numbers, XCOPA per language, BLiMP's hardest and easiest phenomena."""
    from quality import XCOPA_LANGS, _pm

    summ, leaves = d.get("summary", {}), {t: m for c in d["chunks"].values() for t, m in c["results"].items()}
    wiki, blimp, xcopa = summ.get("wikitext", {}), summ.get("blimp", {}), summ.get("xcopa", {})
    head = md(["wikitext word ppl", "byte ppl", "bits/byte", "BLiMP acc (pairs)", "XCOPA acc (items)", "minutes (sum of chunks)"],
              [[wiki.get("word_perplexity"), wiki.get("byte_perplexity"), wiki.get("bits_per_byte"),
                f"{_pm(blimp.get('acc'), blimp.get('acc_stderr'))} ({blimp.get('n', '?')})" if blimp else "not run",
                f"{_pm(xcopa.get('acc'), xcopa.get('acc_stderr'))} ({xcopa.get('n', '?')})" if xcopa else "not run",
                summ.get("seconds", 0) / 60]])
    langs = md(XCOPA_LANGS, [[_pm(leaves[f"xcopa_{x}"]["acc"], leaves[f"xcopa_{x}"]["acc_stderr"])
                              if f"xcopa_{x}" in leaves else "" for x in XCOPA_LANGS]])
    ranked = sorted((m["acc"], t.removeprefix("blimp_"), m["acc_stderr"]) for t, m in leaves.items()
                    if t.startswith("blimp_"))
    ends = md(["BLiMP phenomenon", "acc"], [[n, _pm(a, se)] for a, n, se in ranked[:5] + ranked[-5:]])
    return f"{head}\n\nXCOPA per language:\n\n{langs}\n\nBLiMP, the 5 hardest and 5 easiest phenomena:\n\n{ends}"


def _gib(n) -> str:
    """Bytes as GiB with one decimal."""
    return "-" if n is None else f"{n / 2**30:.1f}"


def plans(d: dict) -> str:
    """bench/plans.py: per model, GPUs and recovery: each phase's peak per GPU, whether it fits, the fix."""
    rows = []
    for model, setups in d["plans"].items():
        for setup, by_trainable in setups.items():
            for trainable, p in by_trainable.items():
                ph = {x["phase"]: x for x in p["phases"]}
                bad = [x["phase"] for x in p["phases"] if x["fits"] is False]
                ckpt = " (auto ckpt)" if p["grad_checkpointing"]["auto"] else ""
                rows.append([model, setup, trainable, _gib(ph["score"]["bytes_per_process"]),
                             _gib(ph["recovery"]["bytes_per_process"]) + ckpt,
                             _gib(ph["evaluate"]["bytes_per_process"]), _gib(ph["load"]["bytes_per_process"]),
                             "yes" if p["fits"] else "no: " + ", ".join(bad),
                             "; ".join(p["suggestions"])])
    s = d["settings"]
    head = (f"{s['device_memory'] / 1e9:.0f} GB per GPU ({s['device_memory'] / 2**30:.1f} GiB), dtype "
            f"{s['dtype']}, global micro-batch {s['batch_size']} x {s['seq_len']} tokens, "
            f"{round(100 * s['ratio'])} % of the blocks kept. GiB per GPU (load: host RAM, once).\n\n")
    return head + md(["model", "GPUs", "trains", "score", "recovery", "evaluate", "load (host)", "fits",
                      "would fit"], rows)


def planner_bench(d: dict) -> str:
    """bench/planner.py: the planner's recovery estimate vs the measured peak RSS."""
    from planner import COLUMNS, rows

    return md(COLUMNS, rows(d["units"]))


PAPER_KD_TOKENS = 2_500_000  # the IteRABRe paper's recovery budget, in all


def phase_rates(d: dict) -> str:
    """bench/phase_rates.py: achieved TFLOP/s per phase; per model, what a FLOP of each phase costs in time
    next to a FLOP of KD, and how long the paper's KD budget takes at the measured steady rate."""
    from phase_rates import COLUMNS, rows

    notes = []
    models = dict.fromkeys(u["model"] for u in d["units"].values())
    for m in models:
        u = {x["phase"]: x for x in d["units"].values() if x["model"] == m and not x.get("failed")}
        kd = u.get("kd", {}).get("steady_tflops_per_s")
        if not kd:
            continue
        cost = ", ".join(f"{ph} x{kd / (x.get('steady_tflops_per_s') or x['tflops_per_s']):.2f}"
                         for ph, x in u.items() if ph != "kd")
        minutes = {ph: PAPER_KD_TOKENS / u[ph]["steady_tokens_per_s"] / 60 for ph in ("kd", "lora-kd") if ph in u}
        notes.append(f"- {m}: seconds per FLOP against steady KD: {cost}; {PAPER_KD_TOKENS:,} KD tokens take "
                     + " and ".join(f"{v:.1f} min ({ph})" for ph, v in minutes.items()) + " at the steady rate.")
    return md(COLUMNS, rows(d["units"])) + ("\n\n" + "\n".join(notes) if notes else "")


def removals(d: dict) -> str:
    """Per depth and recipe: the removal's output distance before recovery (bench/removals.py) beside the
    perplexity / BLiMP its run reached after recovery (the seed files), mean ± sd over the seeds scored."""
    rows = []
    for name in d["settings"]["sets"]:
        runs = {f["settings"]["seed"]: f["units"] for f in seed_files(name)}
        for recipe in d["settings"]["recipes"]:
            scored = [r for r in d["rows"] if r["set"] == name and r["recipe"] == recipe]
            if not scored:
                continue
            after = [runs[r["seed"]][recipe] for r in scored]
            sets = {tuple(sorted(r["removed"])) for r in scored}
            removed = " ".join(map(str, sets.pop())) if len(sets) == 1 else f"{len(sets)} different sets"
            rows.append([scored[0]["blocks"], recipe, len(scored), removed,
                         _msd([r["output_distance"] for r in scored], 3),
                         _msd([u["wikitext_word_ppl"] for u in after], 1), _msd([u["blimp_acc"] for u in after], 3)])
    return md(["blocks removed", "recipe", "seeds", "removed (sorted)", "output distance before recovery",
               "wikitext word ppl after", "BLiMP after"], rows)


RENDER = {"scoring": scoring, "recovery": recovery, "pruned_speed": pruned_speed, "overhead": overhead,
          "plans": plans, "planner": planner_bench, "quality": quality, "budget_study": budget_study,
          "base_eval": base_eval, "recovery_methods": recovery_methods, "quality_equal": quality_equal,
          "dtypes": dtypes, "phase_rates": phase_rates, "removals": removals}


def _mean(units: list[dict], key: str) -> float:
    return sum(u[key] for u in units) / len(units)


def _study_rows(b: dict) -> list[list]:
    """Glance rows of the budget study: best recipe vs the iterative default per experiment."""
    s, rows = b["settings"], []
    base = b["units"]["base"]
    for exp, blocks, tokens in (("main", s["blocks"], s["budget"]), ("deep", s["deep_blocks"], s["budget"]),
                                ("large", s["blocks"], s["budget"] * s["large_factor"])):
        by_method: dict[str, list[dict]] = {}
        for u in b["units"].values():
            if u.get("exp") == exp:
                by_method.setdefault(u["method"], []).append(u)
        if not by_method:
            continue
        best = min(by_method, key=lambda m: _mean(by_method[m], "wikitext_word_ppl"))
        default = by_method.get("iter-increasing", [])
        rows.append([f"{blocks} of 30", tokens, len(by_method[best]),
                     f"{base['wikitext_word_ppl']:.1f} / {base['blimp_acc']:.3f}", best,
                     f"{_mean(by_method[best], 'wikitext_word_ppl'):.1f} / {_mean(by_method[best], 'blimp_acc'):.3f}",
                     f"{_mean(default, 'wikitext_word_ppl'):.1f} / {_mean(default, 'blimp_acc'):.3f}" if default else "",
                     f"BENCHMARKS §7 ({exp})"])
    return rows


def _quality_row(q: dict) -> list:
    """Glance row of the quality bench: its best recipe vs IteRABRe as the paper runs it."""
    units = {k: u for k, u in q["units"].items() if k != "base"}
    best = min(units, key=lambda k: units[k]["wikitext_word_ppl"])
    base, ours = q["units"]["base"], units.get("iterabre")
    return [f"{len(units[best]['removed'])} of 30", q["settings"].get("recovery_tokens", units[best].get("recovery_tokens")),
            1, f"{base['wikitext_word_ppl']:.1f} / {base['blimp_acc']:.3f}", best,
            f"{units[best]['wikitext_word_ppl']:.1f} / {units[best]['blimp_acc']:.3f}",
            f"{ours['wikitext_word_ppl']:.1f} / {ours['blimp_acc']:.3f}" if ours else "", "BENCHMARKS §5"]


EQUAL_GLANCE = ("quality-equal-10b", "quality-equal-8b", "quality-equal-6b", "quality-equal-16k")  # the equal-compute seed sets the glance table shows


def _equal_row(files: list[dict], base: dict | None) -> list:
    """Glance row of an equal-compute seed set: its best recipe (lowest mean perplexity among those run on
    the most seeds, @ variants included) vs the paper's."""
    runs = _feasible(files)
    by = {k: [r[k] for r in runs if k in r] for k in sorted({k for r in runs for k in r})}
    most = max(len(v) for v in by.values())
    best = min((k for k in by if len(by[k]) == most), key=lambda k: _mean(by[k], "wikitext_word_ppl"))
    s, ours = files[0]["settings"], by.get("iterabre", [])
    return [f"{s['blocks']} of 30", f"{s['flops'] / 1e12:.1f} TFLOP (= {s['equal_kd_tokens']} KD tokens)", most,
            f"{base['wikitext_word_ppl']:.1f} / {base['blimp_acc']:.3f}" if base else "", best,
            f"{_mean(by[best], 'wikitext_word_ppl'):.1f} / {_mean(by[best], 'blimp_acc'):.3f}",
            f"{_mean(ours, 'wikitext_word_ppl'):.1f} / {_mean(ours, 'blimp_acc'):.3f}" if ours else "",
            "BENCHMARKS §5 (equal compute)"]


def glance(quality: dict, study: dict, equal: list[list[dict]] = ()) -> str:
    """README's results at a glance: SmolLM2-135M, what each budget keeps, from the result files; `equal`:
    equal-compute seed sets (their base is the quality table's when both used the same evaluation)."""
    columns = ["blocks removed", "budget (KD tokens, or FLOPs)", "seeds", "base ppl / BLiMP", "best measured recipe",
               "its ppl / BLiMP", "iterative output + KD", "source"]
    base = quality["units"]["base"]
    rows = [_equal_row(files, base if files[0]["settings"]["eval"] == quality["settings"]["eval"] else None)
            for files in equal if files]
    return md(columns, rows + _study_rows(study) + [_quality_row(quality)])


def glance_from_files() -> str:
    """`glance` of bench/results/quality.json, budget_study.json and the EQUAL_GLANCE seed sets."""
    return glance(*(json.loads(common.result_path(n).read_text()) for n in ("quality", "budget_study")),
                  [seed_files(n) for n in EQUAL_GLANCE])


# result file -> its section of docs/BENCHMARKS.md (tests/test_docs.py checks the anchors)
SECTIONS = {"scoring": "#1-block-scoring", "scoring-streamed": "#1-block-scoring",
            "recovery": "#2-recovery-throughput", "recovery-cuda": "#2-recovery-throughput", "pruned_speed": "#3-pruned-model-speed", "overhead": "#4-orchestration-overhead",
            "recovery_methods": "#6-recovery-methods", "planner": "#8-memory-planner",
            "planner-cuda": "#8-memory-planner", "phase_rates-cuda": "#2-recovery-throughput"}


def _x(value: float) -> str:
    return f"x{value:.2f}"


def costs(files: dict[str, dict]) -> str:
    """The glance table of what the tool costs: one line per speed / memory benchmark, from its result file."""
    rows = []

    def row(name: str, what: str, result: str) -> None:
        section = SECTIONS[name]
        rows.append([what, result, f"[§{section[1]}]({section})"])

    if "scoring" in files:
        r = files["scoring"]["results"]
        row("scoring", "scoring every block: fast path vs naive re-runs",
            "time " + ", ".join(f"{_x(v['ratio_fast_over_naive'])} ({k}, {v['num_blocks']} blocks)"
                                for k, v in r.items())
            + ("; identical scores" if all(v["max_abs_score_diff"] == 0 for v in r.values()) else ""))
    if "scoring-streamed" in files:
        r = {k: v for k, v in files["scoring-streamed"]["results"].items() if "streamed_over_fast" in v}
        text = "time " + ", ".join(f"{_x(v['streamed_over_fast']['paired'])} ({k})" for k, v in r.items())
        mem = {k: v["memory"] for k, v in r.items() if {"fast", "streamed"} <= set(v.get("memory", {}))}
        if mem:
            text += "; peak RSS " + ", ".join(f"{_peak(m['streamed']):.0f} vs {_peak(m['fast']):.0f} MiB ({k})"
                                              for k, m in mem.items())
        row("scoring-streamed", "streamed scoring (weights read block by block) vs fast path", text)
    if "recovery" in files:
        d = files["recovery"]
        text = f"{_x(d['summary']['ratio_train_tokens_per_s'])} the training tokens/s"
        mem = d.get("memory", {})
        if {"iterabre", "hf_trainer"} <= set(mem):
            text += f"; peak RSS {mem['iterabre']['peak_mb'] - mem['hf_trainer']['peak_mb']:+.0f} MiB"
        row("recovery", "KD recovery vs a hand-written Hugging Face Trainer KD loop", text)
    if "recovery-cuda" in files:
        d = files["recovery-cuda"]
        mem, mfu, z = d.get("memory", {}), d["mfu"], d["sizes"]
        text = (f"{_x(d['summary']['ratio_train_tokens_per_s'])} the training tokens/s "
                f"({d['summary']['iterabre']['train_tokens_per_s']:,.0f} vs "
                f"{d['summary']['hf_trainer']['train_tokens_per_s']:,.0f}), MFU {100 * mfu['iterabre_mfu']:.1f} %")
        if {"iterabre", "hf_trainer"} <= set(mem):
            text += f"; peak {mem['iterabre']['peak_mb']:.0f} vs {mem['hf_trainer']['peak_mb']:.0f} MiB"
        if d.get("planner"):
            text += f" (planner {d['planner']['estimate_mb']:.0f})"
        row("recovery-cuda", f"the same on one {mfu['device']}, bf16 autocast, {z['batch_size']} x {z['seq_len']} "
            f"tokens a step{' (random weights, SmolLM2 shapes)' if d.get('weights') else ''}", text)
    if "pruned_speed" in files:
        d = files["pruned_speed"]
        st = {k: common.ratio_stats(r["seconds"]["base"], r["seconds"]["pruned"])["paired"]
              for k, r in d["results"].items()}
        row("pruned_speed", f"speed of the pruned model, {d['pruned_blocks']} of {d['base_blocks']} blocks kept",
            ", ".join(f"{k} {_x(v)}" for k, v in st.items()) + f" (ideal {_x(d['block_ideal'])}, "
            f"{_x(d['matmul_ideal'])} counting the LM head)")
    if "overhead" in files:
        d = files["overhead"]
        text = f"+{d['overhead_s']:.1f} s per job"
        if "api_start" in d:
            m = d["api_start"]["median_s"]
            text += (f"; Prefect API start per CLI process {m['cold']['process_s']:.0f} s (fresh PREFECT_HOME), "
                     f"{m['server']['process_s']:.0f} s with `prefect server start` kept running")
        row("overhead", "orchestration (Prefect + MLflow) on top of the library steps", text)
    if "recovery_methods" in files:
        by = {r["method"]: r for r in files["recovery_methods"]["rows"]}
        if {"reconstruct", "kd", "none"} <= set(by):
            n = len(files["recovery_methods"]["removed"])
            row("recovery_methods", f"healing {n} removed block{'s' if n != 1 else ''} with "
                f"{files['recovery_methods']['kd_tokens']} tokens: reconstruct vs KD",
                f"held-out hidden-state error {by['reconstruct']['rel_error']:.2f} in "
                f"{by['reconstruct']['seconds']:.0f} s vs {by['kd']['rel_error']:.2f} in {by['kd']['seconds']:.0f} s "
                f"(none: {by['none']['rel_error']:.2f})")
    if "phase_rates-cuda" in files:
        d = files["phase_rates-cuda"]
        big = {x["phase"]: x for x in d["units"].values() if x["model"] == "llama8b" and not x.get("failed")}
        if big:
            rate = lambda x: x.get("steady_tflops_per_s") or x["tflops_per_s"]  # noqa: E731
            row("phase_rates-cuda", f"TFLOP/s of each phase on one {d['machine']['cuda']}, Llama-3.1-8B shapes, "
                "bf16 (KD steps after the first)",
                ", ".join(f"{ph} {rate(x):.0f} ({x['batch']} x {x['seq']}, MFU {100 * (x.get('steady_mfu') or x['mfu']):.0f} %)"
                          for ph, x in big.items()))
    for name in ("planner", "planner-cuda"):
        u = {k: x for k, x in files.get(name, {}).get("units", {}).items() if not x.get("failed")}
        if u:
            errors = [100 * (x["ratio"] - 1) for x in u.values()]
            models = sorted({x["model"].split("/")[-1] for x in u.values()})
            gpu = files[name]["machine"].get("cuda") if name.endswith("-cuda") else None
            row(name, f"the same on one {gpu} (GPU memory)" if gpu else
                "memory planner's recovery estimate vs measured peak RSS",
                f"{min(errors):+.1f} % to {max(errors):+.1f} % ({len(u)} recoveries of {', '.join(models)})")
    return md(["what", "measured", "details"], rows)


def costs_from_files() -> str:
    """`costs` of every result file it reads that exists."""
    names = [n for n in SECTIONS if common.result_path(n).exists()]
    return costs({n: json.loads(common.result_path(n).read_text()) for n in names})


def _kind(name: str) -> str:
    """The render function of a result file name (`quality-quick` -> quality, `scoring-streamed` -> scoring)."""
    if name.startswith("quality-equal"):
        return "quality_equal"
    kinds = ("quality", "budget_study", "base_eval", "scoring", "recovery_methods")
    return next((k for k in kinds if name.startswith(k)), name.removesuffix("-cuda").removesuffix("-quick"))


EQUAL_DEPTHS = ("quality-equal-6b", "quality-equal-8b", "quality-equal-10b")  # the depth table's seed sets
# Its columns after the default: the two recipes `select-auto` chooses between (run at every depth), then the
# published baselines.
DEPTH_RECIPES = ("oneshot-block-recon+kd@lr=2e-4", "angular-reconstruct+kd@lr=2e-4@reconstruct_tokens=16384",
                 "shortgpt-kd@lr=2e-4", "angular-kd@lr=2e-4", "iterabre")


def equal_depths(sets: list[list[dict]]) -> str:
    """The default against the published baselines at every depth measured: mean ± sd perplexity / mean BLiMP
    over the seeds each ran, the lowest perplexity of a row in bold."""
    from quality import DEFAULT_RECIPE

    names = (DEFAULT_RECIPE,) + DEPTH_RECIPES
    rows = []
    for files in sets:
        runs = _feasible(files)
        got = {k: [r[k] for r in runs if k in r] for k in names}
        best = min((k for k in names if got[k]), key=lambda k: _mean(got[k], "wikitext_word_ppl"))
        cells = []
        for k, units in got.items():
            cell = "not run"
            if units:
                cell = f"{_msd([u['wikitext_word_ppl'] for u in units], 1)} / {_mean(units, 'blimp_acc'):.3f}"
                if len(units) != len(files):  # ran on fewer seeds than the row: say how many
                    cell += f" ({len(units)} {_seed_word(len(units))})"
            cells.append(f"**{cell}**" if k == best else cell)
        rows.append([f"{files[0]['settings']['blocks']} of 30 ({len(files)} {_seed_word(len(files))})"] + cells)
    return md(["blocks removed", f"default ({DEFAULT_RECIPE})", *DEPTH_RECIPES], rows)


def block(name: str) -> str:
    """The text of a doc's `render:NAME` block: the run it came from, its tables, the units not run."""
    if name == "costs":
        return costs_from_files()
    if name == "quality-equal-depths":  # the default and the baselines over every depth's seed files
        return equal_depths([seed_files(n) for n in EQUAL_DEPTHS])
    if name.endswith("-seeds"):  # one table over the seed files NAME-seed<k>.json
        files = seed_files(name)
        return "\n\n".join([machine_line(files[-1]["machine"]), equal_seeds(files)])
    data = json.loads(common.result_path(name).read_text())
    parts = [machine_line(data["machine"], bool(data.get("quick"))), RENDER[_kind(name)](data)]
    if data.get("pending"):
        parts.append("Not run: " + ", ".join(f"`{u}`" for u in data["pending"]) + ".")
    return "\n\n".join(parts)


MARKED = re.compile(r"(<!-- (?:render:([\w.-]+)|glance):start -->\n)(?:(.*?)\n)?(<!-- (?:render:\2|glance):end -->)",
                    re.S)


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(name, text) of every marked block in a doc; name `glance` for the glance table."""
    return [(m.group(2) or "glance", m.group(3) or "") for m in MARKED.finditer(text)]


def rendered(name: str) -> str:
    """What a marked block named `name` should hold."""
    return glance_from_files() if name == "glance" else block(name)


def update(paths: list) -> None:
    """Re-render every marked block of the given docs in place."""
    for path in paths:
        text = path.read_text(encoding="utf-8")
        new = MARKED.sub(lambda m: f"{m.group(1)}{rendered(m.group(2) or 'glance')}\n{m.group(4)}", text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(common.REPO)}")


def main() -> None:
    """Print the named blocks (default: every result file's), or rewrite the docs' blocks with --update."""
    args = sys.argv[1:]
    if args == ["--update"]:
        update([common.REPO / "README.md", *sorted((common.REPO / "docs").glob("*.md"))])
        return
    if args == ["glance"]:
        print(glance_from_files())
        return
    for name in args or ["costs", *sorted(p.stem for p in common.RESULTS.glob("*.json"))]:
        if name != "costs" and not common.result_path(name).exists():
            print(f"(no bench/results/{name}.json)\n")
            continue
        print(f"<!-- render:{name}:start -->\n{block(name)}\n<!-- render:{name}:end -->\n")


if __name__ == "__main__":
    main()
