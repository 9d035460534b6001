"""Print the latest bench/results/*.json as Markdown tables, for pasting into docs/BENCHMARKS.md.

    .venv/bin/python bench/render.py [scoring recovery pruned_speed overhead quality budget_study base_eval
                                      plans planner]
"""

from __future__ import annotations

import json
import sys

import common


def md(columns: list[str], rows: list[list]) -> str:
    """A Markdown table; columns empty in every row are left out (they say nothing)."""
    keep = [i for i in range(len(columns)) if any(row[i] not in (None, "") for row in rows)] if rows else \
        list(range(len(columns)))
    columns, rows = [columns[i] for i in keep], [[row[i] for i in keep] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(common.fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    """One line saying where and when the numbers were taken."""
    load = m.get("load_avg_1m") or {"start": m.get("load_avg_1m_at_start"), "end": "?"}
    return (f"_{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s)), "
            f"transformers {m['transformers']}, {m['date']}, commit {m['git']['commit'][:8]}"
            f"{' + uncommitted changes' if m['git']['dirty'] else ''}, load average {load.get('start')} -> "
            f"{load.get('end')}_")


def scoring(d: dict) -> str:
    """Scorer tables: per model and implementation, plus the streamed scorer's memory formula."""
    if not all("impls" in r for r in d["results"].values()):
        return _scoring_fast_naive(d)
    rows, formulas = [], []
    for model, r in d["results"].items():
        ref, mem = ("fast" if "fast" in r["impls"] else r["impls"][0]), r.get("memory", {})
        for impl in r["impls"]:
            stats = r.get(f"{impl}_over_{ref}", {})
            same = r.get(f"{impl}_same_ranking")
            rows.append([model, impl, r["num_blocks"], f"{r['sizes']['windows']}x{r['sizes']['seq_len']}",
                         r["median_s"][impl], stats.get("paired"), stats.get("best"), r.get(f"{impl}_max_abs_diff"),
                         None if same is None else ("yes" if same else "NO"),
                         mem.get(impl, {}).get("peak_mb"), mem.get(impl, {}).get("scoring_mb")])
        f = r.get("formula_mib")
        if f:
            target = f["blocks"] + f["streams"] + f["embedding_head"]
            formulas.append([model, f["one_block"], f["blocks"], f["streams"], f["embedding_head"], target,
                             f["activations"], f["per_call"], f["total"],
                             mem.get("streamed", {}).get("scoring_mb"), f["whole_model"],
                             mem.get("fast", {}).get("peak_mb")])
    table = md(["model", "impl", "blocks", "tokens", "median s", "ratio to fast (paired median)",
                "ratio to fast (min t)", "max abs score diff to fast", "same ranking", "peak RSS MiB",
                "+MiB scoring"], rows)
    if not formulas:
        return table
    return table + "\n\nStreamed scorer memory (MiB): formula parts vs measured:\n\n" + md(
        ["model", "one block", "2 blocks", "streams", "embedding/head", "2 blocks + streams + emb/head",
         "block call activations", "candidates per call", "formula total", "measured +MiB (streamed)",
         "whole model fp32", "fast path peak RSS"], formulas)


def _scoring_fast_naive(d: dict) -> str:
    """fast vs naive scorer table (result files from before the streamed scorer)."""
    rows = []
    for model, r in d["results"].items():
        mem = r.get("memory", {})
        rows.append([model, r["num_blocks"], f"{r['sizes']['windows']}x{r['sizes']['seq_len']}",
                     r["median_s"]["fast"], r["median_s"]["naive"], r["ratio_fast_over_naive"],
                     r["ratio_stats"]["best"] if "ratio_stats" in r else None, r["max_abs_score_diff"],
                     mem.get("fast", {}).get("peak_mb"), mem.get("naive", {}).get("peak_mb"),
                     mem.get("fast", {}).get("scoring_mb"), mem.get("naive", {}).get("scoring_mb")])
    return md(["model", "blocks", "tokens", "fast s (median)", "naive s (median)", "fast/naive (paired median)",
               "fast/naive (min t)", "max abs score diff", "fast peak RSS MiB", "naive peak RSS MiB",
               "fast +MiB", "naive +MiB"], rows)


def recovery(d: dict) -> str:
    """recover() vs Trainer table."""
    s, mem = d["summary"], d.get("memory", {})
    steady, mfu = [f"steady_{c}_tokens_per_s" for c in ("wall", "cpu")], d.get("mfu", {})
    rows = [[v, s[v]["tokens"], s[v]["train_tokens_per_s"], s[v]["call_tokens_per_s"],
             *[s[v].get(k) for k in steady], mfu.get(f"{v}_mfu"), mem.get(v, {}).get("peak_mb"),
             mem.get(v, {}).get("training_mb")] for v in ("iterabre", "hf_trainer")]
    rows.append(["iterabre / Trainer", None, s["ratio_train_tokens_per_s"], s["ratio_call_tokens_per_s"],
                 *[s.get(f"ratio_{k}") for k in steady], None, None, None])
    return md(["variant", "tokens per run", "train-loop tok/s", "whole-call tok/s", "steady-state tok/s",
               "steady-state CPU tok/s", "MFU", "peak MiB", "+MiB while training"], rows)


def pruned_speed(d: dict) -> str:
    """24 vs 30 block speed table."""
    rows = [[k, r["base_tokens_per_s"], r["pruned_tokens_per_s"], r["speedup"], r["speedup_stats"]["best"]
             if "speedup_stats" in r else None, d["block_ideal"], r["fraction_of_block_ideal"], d["matmul_ideal"],
             r["fraction_of_matmul_ideal"]] for k, r in d["results"].items()]
    return md(["pass", "30-block tok/s", "24-block tok/s", "speed-up (paired median)", "speed-up (min t)",
               "ideal 30/24", "fraction of ideal", "matmul ideal", "fraction of matmul ideal"], rows)


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
    """The quality table plus per-language XCOPA."""
    from quality import XCOPA_LANGS, _pm

    rows, langs = [], []
    for uid, u in d["units"].items():
        rows.append([uid, len(u["removed"]), u.get("recovery_tokens", 0), u["wikitext_word_ppl"],
                     _pm(u["blimp_acc"], u["blimp_stderr"]), _pm(u["xcopa_acc"], u["xcopa_stderr"]), u["avg_acc"],
                     " ".join(map(str, u["removed"])), u["seconds"] / 60])
        langs.append([uid] + [_pm(*u["xcopa_langs"][x]) if x in u["xcopa_langs"] else "" for x in XCOPA_LANGS])
    main = md(["method", "blocks removed", "KD tokens", "wikitext word ppl", "BLiMP acc", "XCOPA acc",
               "avg acc", "removed (original idx)", "minutes"], rows)
    return main + "\n\nXCOPA per language:\n\n" + md(["method", *XCOPA_LANGS], langs)


def budget_study(d: dict) -> str:
    """The budget study's tables (bench/budget_study.py's own layout); empty experiments left out."""
    import budget_study as bs

    return "\n\n".join(f"{title}:\n\n" + md(columns, rows)
                        for title, columns, rows in bs.report_tables(d["settings"], d["units"]) if rows)


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


RENDER = {"scoring": scoring, "recovery": recovery, "pruned_speed": pruned_speed, "overhead": overhead,
          "plans": plans, "planner": planner_bench, "quality": quality, "budget_study": budget_study,
          "base_eval": base_eval}


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


def glance(quality: dict, study: dict) -> str:
    """README's results at a glance: SmolLM2-135M, what each budget keeps, from the result files."""
    columns = ["blocks removed", "KD tokens", "seeds", "base ppl / BLiMP", "best measured recipe",
               "its ppl / BLiMP", "iterative output + KD", "source"]
    return md(columns, _study_rows(study) + [_quality_row(quality)])


def glance_from_files() -> str:
    """`glance` of bench/results/quality.json and budget_study.json."""
    return glance(*(json.loads(common.result_path(n).read_text()) for n in ("quality", "budget_study")))


def main() -> None:
    """Render the named result files (default: all that exist)."""
    if sys.argv[1:] == ["glance"]:
        print(glance_from_files())
        return
    for name in sys.argv[1:] or list(RENDER):
        path = common.result_path(name)
        if not path.exists():
            print(f"## {name}\n\n(no results yet)\n")
            continue
        data = json.loads(path.read_text())
        kind = next((k for k in ("quality", "budget_study", "base_eval", "scoring") if name.startswith(k)),
                    name.removesuffix("-cuda").removesuffix("-quick"))
        print(f"## {name}{' (quick)' if data.get('quick') else ''}\n\n{machine_line(data['machine'])}\n")
        print(RENDER[kind](data) + "\n")


if __name__ == "__main__":
    main()
