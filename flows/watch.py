"""Scheduled flow `iterabre-watch`: compress every watch-list entry that MLflow has no result for.

`watchlist.yaml` lists models (id + revision + target + optional overrides of any
`compress` parameter). An entry counts as done when MLflow holds a FINISHED parent run
with the same base model, revision and config fingerprint (`CompressConfig.fingerprint`,
which ignores the output folder); every other entry gets a `compress` deployment run,
started without waiting (`timeout=0`), so one watch run can fan out to several workers.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows import tracking
from flows.compress import compress
from iterabre.config import CompressConfig, FlowOptions, normalise, validate
from iterabre.errors import IterabreError
from iterabre.paths import REPO_ROOT

DEFAULT_WATCHLIST = REPO_ROOT / "watchlist.yaml"


def _flow_parameters() -> set[str]:
    """Names the compress flow accepts."""
    return set(inspect.signature(compress.fn).parameters)


def load_watchlist(path: str | Path) -> list[dict]:
    """Entries of a watch list, each merged over the file's `defaults:`; unknown keys refused."""
    path = Path(path)
    if not path.exists():
        raise IterabreError(f"watch list {path} does not exist.", "create it (see watchlist.yaml in the repo)")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    defaults, entries = doc.get("defaults") or {}, doc.get("models") or []
    merged = [{**defaults, **entry.pop("overrides", {}), **entry} for entry in map(dict, entries)]
    allowed = _flow_parameters()
    for entry in merged:
        unknown = sorted(set(entry) - allowed)
        if unknown or "model" not in entry:
            raise IterabreError(f"watch-list entry {entry} has unknown keys {unknown} or no model.",
                                f"use only compress parameters: {', '.join(sorted(allowed))}")
    return merged


def entry_config(entry: dict) -> CompressConfig:
    """The CompressConfig a compress run of this entry will use (flow defaults filled in)."""
    defaults = {k: v.default for k, v in inspect.signature(compress.fn).parameters.items()}
    params = {**defaults, **entry}
    for f in dataclasses.fields(FlowOptions):
        params.pop(f.name)
    base = CompressConfig()
    params["recovery"] = {**base.to_dict()["recovery"], **(params.get("recovery") or {})}
    return normalise(CompressConfig.from_dict(params))


def entry_parameters(entry: dict) -> dict:
    """Deployment parameters of an entry; the output folder defaults to outputs/watch/<name>-<fingerprint>."""
    cfg = entry_config(entry)
    output = entry.get("output") or str(REPO_ROOT / "outputs" / "watch" /
                                        f"{tracking.registered_name(cfg.model)}-{cfg.fingerprint()[:8]}")
    return {**entry, "output": output}


@flow(name="iterabre-watch", log_prints=True)
def watch(watchlist: str = str(DEFAULT_WATCHLIST), deployment: str = "iterabre/compress") -> list[dict]:
    """Start a compress run for each watch-list entry without a FINISHED MLflow parent run."""
    logger, client = get_run_logger(), tracking.connect()
    started = []
    entries = load_watchlist(watchlist)
    configs = [entry_config(entry) for entry in entries]
    for cfg in configs:  # one bad entry stops the tick before any run starts
        validate(cfg)
    for entry, cfg in zip(entries, configs):
        if tracking.finished_jobs(client, cfg.model, cfg.revision, cfg.fingerprint()):
            logger.info("%s@%s %s: already compressed, skipping", cfg.model, cfg.revision, cfg.fingerprint())
            continue
        params = entry_parameters(entry)
        flow_run = run_deployment(deployment, parameters=params, timeout=0)
        logger.info("%s@%s: started %s (flow run %s)", cfg.model, cfg.revision, deployment, flow_run.id)
        started.append({"model": cfg.model, "fingerprint": cfg.fingerprint(), "flow_run_id": str(flow_run.id)})
    return started
