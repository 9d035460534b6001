"""The model registry as a team uses it: lineage on every version, promotion by comparison, list, promote.

Every version of `iterabre-<base model>` carries its lineage and its gate metrics as tags
(`final/<task>/<metric>`, `final/<task>/<metric>_stderr`, ...), so whether a new version may
take `champion` is decided from what the registry itself stores: it works across jobs,
machines and days. A new version becomes `champion` only when it passes the job's gates
(`iterabre.planning.promotion`) and is not worse than the current champion on any gate metric
(beyond one standard error of the difference where lm-eval gives one), at the same or a smaller
parameter count; otherwise it gets `challenger` and the reason (tag `iterabre.promotion_reason`).
`iterabre registry promote` is the human override (tag `iterabre.override`).

The pure part (tags, comparison, decision) comes first; the functions that talk to MLflow take
an `MlflowClient` from `flows.tracking.connect`.
"""

from __future__ import annotations

import math
import time

from iterabre.errors import IterabreError

# The gate metrics of iterabre.planning.promotion: (task, metric, higher is better).
GATES = (("blimp", "acc", True), ("wikitext", "word_perplexity", False))
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_PROMOTION, TAG_REASON = "iterabre.promotion", "iterabre.promotion_reason"
TAG_OVERRIDE, TAG_GATES = "iterabre.override", "iterabre.gates"
TAG_PARAMS, TAG_SIZE, TAG_EVAL_LIMIT = "iterabre.num_params", "iterabre.size_bytes", "iterabre.eval_limit"
TAG_LAYERS, TAG_REMOVED = "iterabre.num_layers", "iterabre.removed_blocks"
MISSING = "–"


# ---------------------------------------------------------------- lineage (pure)

def _number(value) -> str:
    """Tags are strings: repr keeps every digit of a float, so comparisons read back the same value."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def gate_tags(evaluation: dict, prefix: str) -> dict[str, str]:
    """{'<prefix>/blimp/acc': '0.71', '<prefix>/blimp/acc_stderr': '0.01', ...} for the gate metrics present."""
    out = {}
    for task, metric, _ in GATES:
        row = evaluation.get(task) or {}
        for key in (metric, f"{metric}_stderr"):
            if isinstance(row.get(key), (int, float)):
                out[f"{prefix}/{task}/{key}"] = _number(row[key])
    return out


def lineage_tags(report: dict, run_tags: dict, num_params: int, size_bytes: int) -> dict[str, str]:
    """What a version records about how it was made; `run_tags` are its parent run's (git, data, Prefect)."""
    cfg, budget = report.get("config") or {}, report.get("budget") or {}
    tags = {"iterabre.base_model": report["base_model"], "iterabre.base_revision": cfg.get("revision") or "none",
            TAG_REMOVED: ",".join(str(b) for b in report.get("removed_layers", [])),
            "iterabre.base_num_layers": str(report["base_num_layers"]), TAG_LAYERS: str(report["final_num_layers"]),
            TAG_PARAMS: str(num_params), TAG_SIZE: str(size_bytes),
            "iterabre.recovery_method": str((cfg.get("recovery") or {}).get("method", "unknown")),
            "iterabre.recovery_tokens": str(budget.get("used_total", "unknown")),
            "iterabre.eval_tasks": str(cfg.get("eval_tasks", "")), TAG_EVAL_LIMIT: str(cfg.get("eval_limit")),
            "iterabre.licence": str(report.get("licence") or "unknown"),
            "data.md5": (report.get("data_version") or {}).get("md5") or run_tags.get("data.md5", "unknown"),
            "git.commit": run_tags.get("git.commit", "unknown"),
            "prefect.flow_run_id": run_tags.get("prefect.flow_run_id", "none")}
    return {**tags, **gate_tags(report.get("base_eval") or {}, "base"),
            **gate_tags(report.get("final_eval") or {}, "final")}


def stored_gates(tags: dict) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(task, metric) -> (value, stderr or None) of the final gate metrics stored on a version."""
    out = {}
    for task, metric, _ in GATES:
        value = tags.get(f"final/{task}/{metric}")
        if value is not None:
            stderr = tags.get(f"final/{task}/{metric}_stderr")
            out[(task, metric)] = (float(value), None if stderr is None else float(stderr))
    return out


def describe(tags: dict, alias: str, reasons: list[str]) -> str:
    """The version's description: lineage in a few lines, then the promotion decision."""
    gates = stored_gates(tags)
    metrics = ", ".join(f"{t} {m} {_pm(*gates[(t, m)])}" for t, m, _ in GATES if (t, m) in gates) or "none measured"
    return "\n".join([
        f"{tags['iterabre.base_model']} (revision {tags['iterabre.base_revision']}) with blocks "
        f"[{tags[TAG_REMOVED]}] removed (original indices): {tags['iterabre.base_num_layers']} -> {tags[TAG_LAYERS]} "
        f"blocks, {int(tags[TAG_PARAMS]):,} parameters.",
        f"Recovery: {tags['iterabre.recovery_method']} on {tags['iterabre.recovery_tokens']} tokens. "
        f"Data md5 {tags['data.md5']}, git {tags['git.commit'][:12]}, Prefect flow run {tags['prefect.flow_run_id']}.",
        f"Gate metrics (eval limit {tags[TAG_EVAL_LIMIT]}): {metrics}.",
        f"{alias}: {'; '.join(reasons)}"])


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4g} ± {stderr:.2g}" if stderr is not None else f"{value:.4g}"


# ---------------------------------------------------------------- promotion (pure)

def _worse(task: str, metric: str, higher: bool, new: tuple, old: tuple, champion: str) -> str | None:
    """Why `new` is worse than the champion's `old` on one metric, or None when it is not.

    Worse means beyond one standard error of the difference, sqrt(se_new² + se_old²) (either one
    alone when only one is known); a metric without one (perplexity) must simply not be worse.
    """
    (value, se_new), (best, se_old) = new, old
    errors = [s for s in (se_new, se_old) if s is not None]
    se = math.sqrt(sum(s * s for s in errors)) if errors else 0.0
    gap = best - value if higher else value - best  # > 0: the new version is worse
    if gap <= se:
        return None
    margin = f" by more than one standard error ({se:.2g})" if errors else ""
    return f"{task} {metric} {value:.4g} is worse than champion v{champion}'s {best:.4g}{margin}"


def compare(mine: dict, theirs: dict, champion: str) -> list[str]:
    """Reasons the version tagged `mine` is worse than champion version `champion` (tags `theirs`); [] if not."""
    reasons = []
    params, best_params = mine.get(TAG_PARAMS), theirs.get(TAG_PARAMS)
    if params is None or best_params is None:
        reasons.append(f"parameter count unknown for {'this version' if params is None else f'champion v{champion}'}")
    elif int(params) > int(best_params):
        reasons.append(f"{int(params):,} parameters, more than champion v{champion}'s {int(best_params):,}")
    if mine.get(TAG_EVAL_LIMIT) != theirs.get(TAG_EVAL_LIMIT):
        return reasons + [f"evaluated with eval_limit {mine.get(TAG_EVAL_LIMIT)}, champion v{champion} with "
                          f"{theirs.get(TAG_EVAL_LIMIT)}: the metrics are not comparable"]
    new, old = stored_gates(mine), stored_gates(theirs)
    if not old:
        return reasons + [f"champion v{champion} stores no gate metric to compare with (registered before "
                          "iterabre recorded them): promote by hand with `iterabre registry promote`"]
    for task, metric, higher in GATES:
        if (task, metric) in old:
            if (task, metric) not in new:
                reasons.append(f"no {task} {metric} to compare with champion v{champion}'s")
            elif why := _worse(task, metric, higher, new[(task, metric)], old[(task, metric)], champion):
                reasons.append(why)
    return reasons


def decide(gates: tuple[str, list[str]], mine: dict, champion: tuple[str, dict] | None) -> tuple[str, list[str]]:
    """(alias, reasons): champion only when the gates pass and the version is not worse than `champion`."""
    alias, reasons = gates
    if alias != CHAMPION:
        return CHALLENGER, list(reasons)
    if champion is None:
        return CHAMPION, [*reasons, "first version to pass the gates (no champion yet)"]
    version, theirs = champion
    if worse := compare(mine, theirs, version):
        return CHALLENGER, [*reasons, *worse]
    return CHAMPION, [*reasons, f"not worse than champion v{version} on the gate metrics, at no more parameters"]


# ---------------------------------------------------------------- registry I/O

def _is_missing(error: Exception) -> bool:
    """MLflow's 'no such model / version / alias' (the exception type varies across stores)."""
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", "")) or "not found" in str(error).lower()


def holder(client, name: str, alias: str):
    """The version of `name` that has `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _is_missing(e):
            return None
        raise


def choose_alias(client, name: str, version: str, gates: tuple[str, list[str]], mine: dict) -> tuple[str, list[str]]:
    """The alias a newly registered `version` gets, against the champion the registry holds now.

    A resumed job whose version already is champion keeps it (and the reasons it got it for).
    """
    current = holder(client, name, CHAMPION)
    if current is not None and str(current.version) == str(version):
        return CHAMPION, (current.tags.get(TAG_REASON) or "; ".join(gates[1])).split("; ")
    return decide(gates, mine, None if current is None else (str(current.version), current.tags))


def record_decision(client, name: str, version: str, alias: str, reasons: list[str], tags: dict,
                    gate_reasons: list[str]) -> None:
    """Set the alias, and put the decision and its reasons on the version (tags + description)."""
    client.set_registered_model_alias(name, alias, version)
    for key, value in {TAG_PROMOTION: alias, TAG_REASON: "; ".join(reasons),
                       TAG_GATES: "; ".join(gate_reasons)}.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=describe(tags, alias, reasons))


def _registered_model(client, name: str):
    """The registered model `name`, or one line listing the names that exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if not _is_missing(e):
            raise
    known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
    raise IterabreError(f"there is no registered model {name!r} in the MLflow registry.",
                        f"use one of: {known} (see `iterabre registry list`)")


def _versions(client, name: str) -> list:
    """Every version of `name`, newest first."""
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def _size(tags: dict) -> str:
    size = tags.get(TAG_SIZE)
    return MISSING if size is None else f"{int(size) / 2**20:,.1f} MB"


def _params(tags: dict) -> str:
    params = tags.get(TAG_PARAMS)
    return MISSING if params is None else f"{int(params) / 1e6:,.2f}M"


def _metric(tags: dict, task: str, metric: str) -> str:
    found = stored_gates(tags).get((task, metric))
    return MISSING if found is None else _pm(*found)


def version_rows(client, name: str | None = None) -> list[dict]:
    """One row per version (all iterabre models when `name` is None): aliases, size, key metrics, decision."""
    if name is not None:
        models = [_registered_model(client, name)]
    else:
        models = sorted(client.search_registered_models("name LIKE 'iterabre-%'"), key=lambda m: m.name)
    rows = []
    for model in models:
        aliases = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in _versions(client, model.name):
            tags = v.tags or {}
            rows.append({"model": model.name, "version": str(v.version),
                         "aliases": ",".join(sorted(aliases.get(str(v.version), []))) or MISSING,
                         "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                         "blocks": tags.get(TAG_LAYERS, MISSING), "params": _params(tags), "size": _size(tags),
                         "wikitext ppl": _metric(tags, "wikitext", "word_perplexity"),
                         "blimp acc": _metric(tags, "blimp", "acc"),
                         "decision": "set by hand" if TAG_OVERRIDE in tags else tags.get(TAG_PROMOTION, MISSING)})
    return rows


def table(rows: list[dict]) -> str:
    """Rows as one aligned plain-text table (column names from the first row)."""
    if not rows:
        return "no iterabre models are registered yet (run `iterabre compress`)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def promote(client, name: str, version: str, alias: str = CHAMPION, reason: str | None = None) -> str:
    """Give `version` of `name` the alias by hand, and record who did it, when, and what it replaced."""
    import getpass

    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    existing = [str(v.version) for v in _versions(client, name)]
    if str(version) not in existing:
        raise IterabreError(f"{name} has no version {version}.",
                            f"use one of: {', '.join(existing) or 'none'} (see `iterabre registry list {name}`)")
    try:  # both calls check the alias name
        before = holder(client, name, alias)
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise IterabreError(f"MLflow refused the alias {alias!r}: {str(e).splitlines()[0][:200]}",
                            "use letters, digits, '_' or '-' (not 'latest', not 'v<number>')") from None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        user = "unknown"
    note = (f"{alias} set by hand by {user} on {time.strftime('%Y-%m-%d %H:%M:%S %z')}"
            + (f", replacing v{before.version}" if before is not None and str(before.version) != str(version) else "")
            + (f": {reason}" if reason else ""))
    client.set_model_version_tag(name, str(version), TAG_OVERRIDE, note)
    return f"models:/{name}@{alias} -> version {version} ({note})"


# ---------------------------------------------------------------- CLI entry points

def list_command(name: str | None = None) -> str:
    """`iterabre registry list [NAME]`: the table."""
    from flows.tracking import connect

    return table(version_rows(connect(), name))


def promote_command(name: str, version: str, alias: str = CHAMPION, reason: str | None = None) -> str:
    """`iterabre registry promote NAME VERSION [--alias A]`: what was done, in one line."""
    from flows.tracking import connect

    return promote(connect(), name, version, alias, reason)
