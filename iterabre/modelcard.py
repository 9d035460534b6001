"""The model card (Hugging Face `README.md`) of a compressed model, from its report.

`render(report)` is pure: report.json content in, markdown out; the flow writes it into
`final/` before registering the model. The two helpers below it gather the facts the card
needs from the base model's files (its licence, its parameter count) without loading
weights, so the flow can put them in the report first.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

from iterabre.config import select_rules
from iterabre.paths import SOURCE_FILE

UNKNOWN = "unknown"


# ---------------------------------------------------------------- the card (pure)

def render(report: dict) -> str:
    """The whole README.md: YAML front matter (licence, base model, task), then what, how well, how to load."""
    lines = _front_matter(report) + [f"# {_title(report)}", ""]
    lines += _summary(report) + ["", "## What was done", ""] + _what_was_done(report)
    lines += ["", "## Evaluation", ""] + _evaluation(report)
    lines += ["", "## Licence", ""] + _licence(report)
    lines += ["", "## How to load", ""] + _how_to_load(report)
    return "\n".join(lines) + "\n"


def hf_licence_id(licence: str | None) -> str:
    """The card's `license:` value: Hugging Face uses lower-case SPDX-like ids ('Apache-2.0' -> 'apache-2.0')."""
    return (licence or UNKNOWN).strip().lower() or UNKNOWN


def _front_matter(report: dict) -> list[str]:
    lines = ["---", f"license: {hf_licence_id(report.get('licence'))}"]
    if report.get("base_hub_id"):  # the hub validates base_model against its ids: never a local path
        lines.append(f"base_model: {report['base_hub_id']}")
    return lines + ["library_name: transformers", "pipeline_tag: text-generation",
                    "tags:", "- iterabre", "- block-pruning", "- knowledge-distillation", "---", ""]


def _title(report: dict) -> str:
    removed = report["base_num_layers"] - report["final_num_layers"]
    return (f"{report.get('registered_name') or 'iterabre model'}: {report['base_model']} with {removed} of "
            f"{report['base_num_layers']} decoder blocks removed")


def _millions(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f}M"


def _params(report: dict) -> tuple[int | None, int | None]:
    counts = report.get("num_parameters") or {}
    return counts.get("base"), counts.get("final")


# How the card says the blocks were ranked, per --scorer (select names the rules it compared).
HOW_SCORED = {
    "output": "by how much the model's final hidden states change without it (the IteRABRe criterion)",
    "block-influence": "by how little it changes its own input (ShortGPT's block influence)",
    "angular": "by the angular distance across each contiguous run of blocks",
    "perplexity": "by the perplexity of the model without it (SLEB)",
}
# What the card says a recovery method did (`auto` is reported as the method it ran).
HOW_REPAIRED = {
    "none": "left the smaller model unhealed",
    "kd": "healed the smaller model by distillation from the original",
    "lora-kd": "healed the smaller model by distillation from the original through LoRA adapters, merged "
               "into the weights",
    "reconstruct": "refitted the block before each gap by least squares to reproduce the original model's "
                   "residual stream",
    "reconstruct+kd": "refitted the block before each gap by least squares to reproduce the original model's "
                      "residual stream, then distilled from the original",
    "block-recon": "retrained the kept block(s) at each gap to reproduce the original model's residual stream",
    "block-recon+kd": "retrained the kept block(s) at each gap to reproduce the original model's residual stream, "
                      "then distilled from the original",
}


def _repairs(report: dict) -> list[str]:
    """The recovery methods the job ran, in order, once each (`auto` resolved by the step records)."""
    from iterabre.evaluation.report import phases

    ran = [(p.get("recovery") or {}).get("method") for p in phases(report)]
    named = ((report.get("config") or {}).get("recovery") or {}).get("method")
    return list(dict.fromkeys(m for m in ran if m)) or ([named] if named and named != "auto" else [])


def _how_scored(report: dict) -> str:
    cfg = report.get("config") or {}
    scorer = cfg.get("scorer", UNKNOWN)
    if scorer != "select":
        return HOW_SCORED.get(scorer, f"with the `{scorer}` scorer")
    rules = select_rules(str(cfg.get("select_from") or ""))
    chosen = Counter(s["chosen"] for s in report.get("steps", []) if s.get("chosen"))
    names = [f"`{r}`" for r in rules] or ["several rules"]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    picked = (f"`{next(iter(chosen))}`'s" if len(chosen) == 1 else
              ", ".join(f"`{rule}`'s at {n} step{'s' * (n != 1)}" for rule, n in chosen.most_common()))
    return (f"with {listed} and chose, of the sets they proposed, the one whose removal as a whole moves the "
            "final hidden states least" + (f" ({picked})" if chosen else ""))


def _summary(report: dict) -> list[str]:
    base, final = _params(report)
    shrink = f" ({100 * (1 - final / base):.1f} % fewer)" if base and final else ""
    cfg = report.get("config") or {}
    repaired = " or ".join(HOW_REPAIRED.get(m, f"ran `{m}`") for m in _repairs(report)) or "did not heal it"
    removed = report["base_num_layers"] - report["final_num_layers"]
    select = cfg.get("scorer") == "select"
    if cfg.get("schedule") == "iterative":
        how = (f"it scored every decoder block {_how_scored(report)}, removed "
               f"{'that set' if select else 'the least important'}, {repaired}, and repeated until "
               f"{report['final_num_layers']} blocks remained")
    else:
        how = (f"it scored the decoder blocks once {_how_scored(report)}, removed "
               f"{f'its {removed} blocks' if select else f'the {removed} least important'} at once and {repaired}")
    return [f"This model was made from `{report['base_model']}` by iterabre, block pruning after IteRABRe "
            f"(iterative recovery-aided block reduction): {how}. Parameters: {_millions(base)} -> "
            f"{_millions(final)}{shrink}."]


def _what_was_done(report: dict) -> list[str]:
    cfg, budget = report.get("config") or {}, report.get("budget") or {}
    rec = cfg.get("recovery") or {}
    removed = ", ".join(str(b) for b in report.get("removed_layers", [])) or "none"
    data = (report.get("data_version") or {}).get("md5", UNKNOWN)
    trained = budget.get("used_total")
    return [f"- Base model: `{report['base_model']}`, revision `{cfg.get('revision') or 'none'}`.",
            f"- Blocks removed (original 0-based indices, in removal order): {removed}; "
            f"{report['final_num_layers']} of {report['base_num_layers']} remain. The config keeps the original "
            "index of every remaining block as `iterabre_original_layers`.",
            f"- Block scoring: `{cfg.get('scorer', UNKNOWN)}` scorer, `{cfg.get('schedule', UNKNOWN)}` schedule, "
            f"on {cfg.get('calibration_tokens', '?')} calibration tokens ({cfg.get('calibration', UNKNOWN)}).",
            f"- Recovery: `{rec.get('method', UNKNOWN)}`"
            + (f" (ran {', '.join(f'`{m}`' for m in _repairs(report))})" if rec.get("method") == "auto" else "")
            + f" from the `{cfg.get('teacher', UNKNOWN)}` teacher, "
            f"{'?' if trained is None else f'{trained:,}'} tokens trained in all "
            f"(`{budget.get('schedule', cfg.get('budget_schedule', UNKNOWN))}` budget schedule).",
            f"- Data version (DVC md5 of the calibration, recovery and evaluation data): `{data}`.",
            f"- MLflow run: `{report.get('mlflow_run_id', UNKNOWN)}`."]


def _asked_tasks(report: dict) -> list[str]:
    """The evaluation tasks the job asked for, in its order (subtasks stay in report.json)."""
    asked = str((report.get("config") or {}).get("eval_tasks") or "")
    return [t.strip() for t in asked.split(",") if t.strip()]


def _cell(row: dict, metric: str) -> str:
    value, stderr = row.get(metric), row.get(f"{metric}_stderr")
    if not isinstance(value, (int, float)):
        return "–"
    text = f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
    return f"{text} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else text


def _evaluation(report: dict) -> list[str]:
    base, final = report.get("base_eval") or {}, report.get("final_eval") or {}
    rows = [[task, metric, _cell(base.get(task, {}), metric), _cell(final.get(task, {}), metric)]
            for task in _asked_tasks(report)
            for metric in sorted({**base.get(task, {}), **final.get(task, {})}) if not metric.endswith("_stderr")]
    if not rows:
        return ["No evaluation was run for this model."]
    cfg = report.get("config") or {}
    limit = cfg.get("eval_limit")
    scope = "every example" if limit is None else f"limit {limit} (a fraction below 1, else a count of examples)"
    return ["| task | metric | base | this model |", "|---|---|---|---|"] + \
        ["| " + " | ".join(r) + " |" for r in rows] + \
        ["", f"lm-eval on local data, {scope}. ± is lm-eval's standard error (perplexities have none)."]


def _licence(report: dict) -> list[str]:
    licence = report.get("licence") or UNKNOWN
    if licence == UNKNOWN:
        return ["The base model's licence could not be found in its files; this model inherits whatever it is. "
                "Check the base model's terms before using or sharing it."]
    return [f"{licence}, inherited from the base model `{report['base_model']}`: this model is a modified "
            "version of it (blocks removed, weights changed by distillation)."]


def _how_to_load(report: dict) -> list[str]:
    name = report.get("registered_name") or "<registered name>"
    return ["From this folder:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
            "From the MLflow model registry (the alias `champion` is the best version so far):", "",
            "```python", "import mlflow", "",
            f'generate = mlflow.pyfunc.load_model("models:/{name}@champion")',
            'print(generate.predict(["Once upon a time"], params={"max_new_tokens": 32}))',
            f'pipe = mlflow.transformers.load_model("models:/{name}@champion")  # a transformers pipeline',
            "```", "",
            f"Serve it: `mlflow models serve -m models:/{name}@champion --env-manager local -p 5001`."]


# ---------------------------------------------------------------- facts from files (no weights read)

def parameter_count(folder: str | os.PathLike) -> int:
    """Parameters stored in a safetensors model folder, from the file headers (tied weights are stored once)."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # safetensors: u64 header length, then JSON
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= dim
                total += n
    return total


def base_licence(spec: str, revision: str | None = None) -> str:
    """The base model's licence: embedded models know theirs; folders and hub caches say it in their
    README front matter, config.json or iterabre's provenance file; otherwise 'unknown'."""
    from iterabre.embedded import EMBEDDED

    if spec in EMBEDDED:
        return EMBEDDED[spec].licence
    folder = _local_folder(spec, revision)
    if folder is None:
        return UNKNOWN
    for read in (_source_licence, _readme_licence, _config_licence):
        if found := read(folder):
            return found
    return UNKNOWN


def base_hub_id(spec: str) -> str | None:
    """The Hugging Face id of the base model, when there is one (embedded: where its weights came from)."""
    from iterabre.embedded import EMBEDDED

    if spec in EMBEDDED:
        return EMBEDDED[spec].origin.split(",")[0].strip()
    looks_like_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")
    return spec if looks_like_id and not Path(spec).expanduser().exists() else None


def _local_folder(spec: str, revision: str | None) -> Path | None:
    """The folder holding the model's files: the path itself, or its hub-cache snapshot (offline lookup)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or base_hub_id(spec) is None:
        return None  # a .gguf file: its metadata is not read here
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json", revision=revision)
    except Exception:  # not cached, bad id: nothing to read offline
        return None
    return Path(found).parent if isinstance(found, str) else None


def _source_licence(folder: Path) -> str | None:
    file = folder / SOURCE_FILE
    return _json(file).get("licence") if file.is_file() else None


def _config_licence(folder: Path) -> str | None:
    file = folder / "config.json"
    return (_json(file).get("license") or _json(file).get("licence")) if file.is_file() else None


def _readme_licence(folder: Path) -> str | None:
    """`license:` of a README's YAML front matter (the Hugging Face model card convention)."""
    import yaml

    file = folder / "README.md"
    if not file.is_file():
        return None
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
