"""The IteRABRe loop, written once, as the Prefect flow `iterabre`.

    prepare base + data -> evaluate base
    while blocks > target: score -> prune -> recover -> (evaluate) -> log an MLflow child run
    publish final/ -> evaluate final -> report -> register + alias (champion | challenger)

Every task calls one `iterabre.steps` function and passes only paths and small JSON; its
cache key (flows/caching.py) is its code, the content of its input paths and its other
arguments. Re-running the same job after a crash turns every finished task into a `Cached`
state and continues from the last checkpoint. The same flow runs from the CLI
(`run_from_cli`, Prefect's in-process API), from a deployment on a worker
(`prefect deployment run iterabre/compress`) and from `flows.watch`.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows import tracking
from flows.caching import ContentKey, InPath, Ledger, input_paths, task_key
from flows.lifecycle import ensure_prefect_api, signals_as_interrupts
from iterabre import planning, steps
from iterabre.config import CompressConfig, FlowOptions, RecoveryConfig, normalise, validate
from iterabre.errors import IterabreError
from iterabre.evaluation.report import choice_summary
from iterabre.planner import check_plan
from iterabre.files import hash_path, output_lock, write_json

D, R, O = CompressConfig(), RecoveryConfig(), FlowOptions()
RESULTS_ENV = "PREFECT_RESULTS_LOCAL_STORAGE_PATH"
_PERSIST = dict(persist_result=True, result_serializer="json")


def _model_out(path) -> dict:
    """What a model-producing task returns: its folder, content hash and block count."""
    return {"path": str(path), "hash": hash_path(path), "num_layers": steps.num_layers(path)}


# ---------------------------------------------------------------- tasks (one library call each)

@task(name="prepare-base", **_PERSIST)
def prepare_base(model: InPath, revision: str | None, allow_remote_code: bool, allow_pickle: bool,
                 work_dir: str) -> dict:
    """Load the base model (any spec) and save it as a local safetensors folder."""
    return _model_out(steps.prepare_base(model, revision, work_dir, allow_remote_code, allow_pickle))


@task(name="prepare-data", **_PERSIST)
def prepare_data(config: dict, base_dir: InPath, work_dir: str, budgets: list[int]) -> dict:
    """Cut disjoint calibration / recovery / held-out token windows."""
    path = steps.prepare_data(CompressConfig.from_dict(config), base_dir, work_dir, budgets)
    meta = steps.data_meta(path)
    return {"path": str(path), "hash": hash_path(path), "split": meta["split"],
            "generation_flops": meta["generation_flops"]}


@task(name="score", **_PERSIST)
def score(model_dir: InPath, data_path: InPath, scorer: str, k: int, device: str, dtype: str,
          select_from: str = D.select_from) -> dict:
    """Score every remaining block of the current model; choose the k to remove."""
    return steps.score(model_dir, data_path, scorer, k, device, dtype, select_from)


@task(name="prune", **_PERSIST)
def prune(model_dir: InPath, remove: list[int], out_dir: str) -> dict:
    """Save a copy of the model without the chosen blocks."""
    return _model_out(steps.prune(model_dir, remove, out_dir))


def _oom(task, task_run, state) -> bool:
    """Retry only CUDA out-of-memory: memory a neighbouring job held may be free 10 s later."""
    try:
        state.result()
    except Exception as e:  # torch.OutOfMemoryError is a RuntimeError; nothing else is retried
        return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    return False


@task(name="recover", retries=2, retry_delay_seconds=10, retry_condition_fn=_oom, **_PERSIST)
def recover(student_dir: InPath, teacher_dir: InPath, data_path: InPath, recovery: dict, removed: list[int],
            window_range: list[int], out_dir: str, device: str, extra_range: list[int] | None = None,
            dtype: str = D.dtype, num_processes: int = D.num_processes, fsdp: bool = D.fsdp) -> dict:
    """Heal the pruned model by distillation from the teacher; save the result."""
    result = steps.recover(student_dir, teacher_dir, data_path, recovery, removed, tuple(window_range),
                           out_dir, device, progress=_loss_logger(recovery["tokens"]),
                           extra_range=tuple(extra_range) if extra_range else None, dtype=dtype,
                           num_processes=num_processes, fsdp=fsdp)
    return {**_model_out(out_dir), "recovery": result}


@task(name="evaluate", **_PERSIST)
def evaluate(model_dir: InPath, tasks: str, limit: float | None, device: str, seed: int, dtype: str,
             parallelize: bool) -> dict:
    """lm-eval metrics of a saved model ({} when no task is asked for)."""
    return steps.evaluate(model_dir, tasks, limit, device, seed, parallelize, dtype)


@task(name="publish", **_PERSIST)
def publish(model_dir: InPath, out_dir: str) -> dict:
    """Copy the last checkpoint to DIR/final."""
    return _model_out(steps.publish(model_dir, out_dir))


TASKS = (prepare_base, prepare_data, score, prune, recover, evaluate, publish)


def _loss_logger(total_tokens: int):
    """A recovery progress callback that logs about ten lines per phase."""
    logger, every = get_run_logger(), max(1, total_tokens // 10)
    seen = {"next": every}

    def progress(info: dict) -> None:
        if info["tokens"] >= seen["next"]:
            seen["next"] += every
            logger.info("recovery %d/%d tokens, loss %.4f, %.0f tok/s", info["tokens"], total_tokens,
                        info["loss"], info["tokens_per_s"])
    return progress


# ---------------------------------------------------------------- job context

@dataclass
class Run:
    """One job's config, options, folders, bound tasks and MLflow parent run."""

    cfg: CompressConfig
    opts: FlowOptions
    out: Path
    device: str
    tasks: dict = field(default_factory=dict)
    made: dict = field(default_factory=dict)  # output path -> (task, params, content hash) of its producer
    job: tracking.Job | None = None
    progress_id: object = None

    @property
    def results_dir(self) -> Path:
        return Path(os.environ.get(RESULTS_ENV) or self.out / ".prefect-results")

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.results_dir)

    def call(self, name: str, **params) -> dict:
        """A task's result: cached when its code and inputs are unchanged, else computed.

        The one place that repairs the cache: before a task that must run, any of its input
        folders that is gone or changed since its task made it (a pruned model deleted after
        its recovery, a checkpoint damaged on disk) is made again by that task.
        """
        task = self.tasks[name]
        if not self.cached(task, params):
            for arg in input_paths(task.fn):
                self._remake_if_changed(params.get(arg))
        out = task(**params)
        if isinstance(out, dict) and "path" in out:
            self.made[out["path"]] = (name, params, out["hash"])
        return out

    def cached(self, task, params: dict) -> bool:
        """Whether a result for this call is stored (without running the task)."""
        return (self.results_dir / task_key(task.fn, params, self.ledger)).exists()

    def _remake_if_changed(self, path: str | None) -> None:
        """Run the producer of `path` again (cache refreshed) if the folder is gone or its content changed."""
        if path not in self.made:
            return
        name, params, digest = self.made[path]
        if Path(path).exists() and self.ledger.hash(path) == digest:
            return
        get_run_logger().warning("%s is %s since %s made it: making it again", path,
                                 "changed" if Path(path).exists() else "gone", name)
        for arg in input_paths(self.tasks[name].fn):
            self._remake_if_changed(params.get(arg))
        self.tasks[name].with_options(refresh_cache=True)(**params)


def _bind_tasks(results_dir: Path) -> dict:
    """The tasks with result storage and the content-key ledger in `results_dir`."""
    from prefect.filesystems import LocalFileSystem

    results_dir.mkdir(parents=True, exist_ok=True)
    block = LocalFileSystem(basepath=str(results_dir.resolve()))
    # Prefect only accepts server-side blocks as task storage; one per results folder.
    block.save(f"iterabre-results-{hashlib.sha256(str(results_dir.resolve()).encode()).hexdigest()[:12]}",
               overwrite=True)
    policy = ContentKey(folder=str(results_dir.resolve()))
    return {t.fn.__name__: t.with_options(result_storage=block, cache_policy=policy) for t in TASKS}


def _config(params: dict) -> tuple[CompressConfig, FlowOptions]:
    """The job's config and options from the flow parameters, validated; nothing touched yet."""
    opts = FlowOptions(**{f.name: params.pop(f.name) for f in dataclasses.fields(FlowOptions)})
    params["recovery"] = {**dataclasses.asdict(R), **(params.get("recovery") or {})}
    cfg = normalise(CompressConfig.from_dict(params))
    validate(cfg)
    plan = check_plan(cfg)  # refuses, in one line, a job whose memory plan does not fit this machine
    if plan is not None and plan.auto_checkpointing:  # activations would not fit without it
        get_run_logger().warning("memory plan: recovery needs gradient checkpointing to fit; switched on")
        cfg.recovery.grad_checkpointing = True
    return cfg, opts


def _start(cfg: CompressConfig, opts: FlowOptions) -> Run:
    """Connect to MLflow, open (or resume) the parent run, bind the tasks; no compute yet."""
    from prefect.runtime import flow_run

    from iterabre.devices import resolve_device

    client = tracking.connect()
    run = Run(cfg, opts, Path(cfg.output).resolve(), resolve_device(cfg.device))
    run.tasks = _bind_tasks(run.results_dir)
    run.job = tracking.start_job(client, cfg, {"options": dataclasses.asdict(opts)}, flow_run.id)
    return run


# ---------------------------------------------------------------- the loop

def _teacher(run: Run, base: dict, current: dict) -> dict:
    """Whom a step distils from: the base model, or the model before this step's removal."""
    return base if run.cfg.teacher == "base" else current


def _recovery_fields(run: Run, teacher: dict, budget: int, data: dict, windows: list) -> dict:
    """What a step record says about its recovery inputs: teacher, budget and windows used."""
    return {"teacher": run.cfg.teacher, "teacher_layers": teacher["num_layers"], "budget": budget,
            "recovery_windows": [planning.global_windows(data["split"], w) for w in windows if w]}


def iteration(run: Run, step: int, current: dict, base: dict, data: dict, k: int, window: list[int],
              budget: int, extra_window: list[int] | None = None) -> tuple[dict, dict]:
    """score -> prune -> recover (-> evaluate) for one step; returns (new model, step record).

    `extra_window` adds carry-pool windows for tokens an earlier step left over (adaptive budget).
    """
    cfg = run.cfg
    scored = run.call("score", model_dir=current["path"], data_path=data["path"], scorer=cfg.scorer, k=k,
                      device=run.device, dtype=cfg.dtype, select_from=cfg.select_from)
    remove = scored["remove"]
    pruned = run.call("prune", model_dir=current["path"], remove=remove,
                      out_dir=str(run.out / "work" / f"step-{step:02d}-pruned"))
    teacher = _teacher(run, base, current)
    healed = run.call("recover", student_dir=pruned["path"], teacher_dir=teacher["path"], data_path=data["path"],
                      recovery=planning.step_recovery(cfg, budget), removed=remove, window_range=window,
                      out_dir=str(run.out / "steps" / f"step-{step:02d}"), device=run.device,
                      extra_range=list(extra_window) if extra_window else None, dtype=cfg.dtype,
                      num_processes=cfg.num_processes, fsdp=cfg.fsdp)
    if not run.opts.keep_pruned:
        shutil.rmtree(pruned["path"], ignore_errors=True)
    ev = _evaluate(run, healed) if run.opts.eval_every_step else {}
    record = {"step": step, "removed": remove, "scores": scored["scores"], "score_flops": scored.get("flops"),
              **{key: scored[key] for key in ("candidates", "distances", "chosen") if key in scored},
              "num_layers": healed["num_layers"], "recovery": healed["recovery"], "eval": ev,
              "checkpoint": healed["path"],
              **_recovery_fields(run, teacher, budget, data, [window, extra_window])}
    return healed, record


def final_recovery(run: Run, step: int, current: dict, teacher: dict, data: dict, window: list[int],
                   budget: int, removed: list[int]) -> tuple[dict, dict]:
    """The 'final' budget schedule's last phase: heal the finished model once more, nothing removed.

    `removed` is every block removed so far (trainable='adjacent' trains the blocks next to them).
    """
    healed = run.call("recover", student_dir=current["path"], teacher_dir=teacher["path"], data_path=data["path"],
                      recovery=planning.step_recovery(run.cfg, budget), removed=removed, window_range=window,
                      out_dir=str(run.out / "steps" / "final-recovery"), device=run.device, extra_range=None,
                      dtype=run.cfg.dtype, num_processes=run.cfg.num_processes, fsdp=run.cfg.fsdp)
    ev = _evaluate(run, healed) if run.opts.eval_every_step else {}
    record = {"step": step, "name": "final-recovery", "removed": [], "scores": {},
              "num_layers": healed["num_layers"], "recovery": healed["recovery"], "eval": ev,
              "checkpoint": healed["path"], **_recovery_fields(run, teacher, budget, data, [window])}
    return healed, record


def _evaluate(run: Run, model: dict) -> dict:
    """The evaluate task on a model produced by an earlier task."""
    return run.call("evaluate", model_dir=model["path"], tasks=run.cfg.eval_tasks, limit=run.cfg.eval_limit,
                    device=run.device, seed=run.cfg.seed, dtype=run.cfg.dtype,
                    parallelize=run.cfg.eval_parallelize)


@flow(name="iterabre", log_prints=True)
def compress(model: str = D.model, revision: str | None = D.revision, target_layers: int | None = D.target_layers,
             target_ratio: float | None = D.target_ratio, scorer: str = D.scorer, select_from: str = D.select_from,
             schedule: str = D.schedule,
             blocks_per_step: int = D.blocks_per_step, teacher: str = D.teacher, calibration: str = D.calibration,
             calibration_tokens: int = D.calibration_tokens, recovery_tokens: int = D.recovery_tokens,
             budget_schedule: str = D.budget_schedule, final_share: float = D.final_share,
             adaptive_eval_tokens: int = D.adaptive_eval_tokens, adaptive_tol: float = D.adaptive_tol,
             seq_len: int = D.seq_len, seed: int = D.seed, device: str = D.device,
             dtype: str = D.dtype, num_processes: int = D.num_processes, fsdp: bool = D.fsdp,
             allow_remote_code: bool = D.allow_remote_code, allow_pickle: bool = D.allow_pickle,
             output: str = D.output, eval_tasks: str = D.eval_tasks, eval_limit: float | None = D.eval_limit,
             eval_parallelize: bool = D.eval_parallelize,
             recovery: dict | None = None, eval_every_step: bool = O.eval_every_step,
             min_blimp_retained: float = O.min_blimp_retained, max_ppl_ratio: float = O.max_ppl_ratio,
             log_checkpoints: bool = O.log_checkpoints, keep_pruned: bool = O.keep_pruned) -> dict:
    """Remove decoder blocks from `model` until `target_layers` remain, healing after each step.

    Parameters are the fields of `CompressConfig` (`recovery`: a dict of `RecoveryConfig`
    overrides) and of `FlowOptions`; tests/test_config.py holds them equal.
    """
    cfg, opts = _config(dict(locals()))
    with signals_as_interrupts(), output_lock(Path(cfg.output).resolve()):
        run = _start(cfg, opts)
        try:
            return _loop(run)
        except BaseException as e:
            tracking.fail_job(run.job, killed=isinstance(e, KeyboardInterrupt))
            raise


def _loop(run: Run) -> dict:
    """The algorithm: base -> [score, prune, recover]* -> final -> report -> registry."""
    cfg, out = run.cfg, run.out
    base = run.call("prepare_base", model=cfg.model, revision=cfg.revision, allow_remote_code=cfg.allow_remote_code,
                    allow_pickle=cfg.allow_pickle, work_dir=str(out / "work"))
    plan = planning.num_steps_for(cfg, base["num_layers"])  # blocks removed per step
    budget = planning.budget_plan(cfg, len(plan))
    data = run.call("prepare_data", config=cfg.to_dict(), base_dir=base["path"], work_dir=str(out / "work"),
                    budgets=planning.data_budgets(budget))
    base_eval = _evaluate(run, base)
    _progress(run, 0, len(plan))
    current, records, final_rec = _iterate(run, base, data, plan, budget)
    final = run.call("publish", model_dir=current["path"], out_dir=str(out / "final"))
    report = _report(run, base, final, base_eval, _evaluate(run, final), records, budget, data, final_rec)
    return _finish(run, report, final)


def _iterate(run: Run, base: dict, data: dict, plan: list[int], budget: dict) -> tuple[dict, list, dict | None]:
    """Every step (+ the final phase): (last model, step records, final-phase record or None).

    Under 'adaptive' each step gets its share plus what the previous step left (carry); the
    carry is a pure function of cached results, so a resumed job replays it exactly.
    """
    cfg, n = run.cfg, len(plan)
    ranges = [list(r) for r in planning.recovery_ranges(planning.data_budgets(budget), cfg.seq_len)]
    pool = tuple(ranges[n]) if budget["carry_pool"] else None  # after the step windows
    current, records, carry, teacher = base, [], 0, base
    for step, k in enumerate(plan, 1):
        given, teacher = budget["steps"][step - 1] + carry, _teacher(run, base, current)
        extra = planning.carry_range(pool, carry, cfg.seq_len)
        current, record = iteration(run, step, current, base, data, k, ranges[step - 1], given,
                                    list(extra) if extra else None)
        record["carried_in"] = carry
        carry = planning.next_carry(given, record["recovery"]["tokens"]) if budget["schedule"] == "adaptive" else 0
        records.append(record)
        _log_step(run, record)
        _progress(run, step, n, records)
    if not budget["final"]:
        return current, records, None
    removed = [i for r in records for i in r["removed"]]
    current, record = final_recovery(run, n + 1, current, teacher, data, ranges[n], budget["final"], removed)
    _log_step(run, record)
    return current, records, record


def _log_step(run: Run, record: dict) -> None:
    """The step's MLflow child run (with its checkpoint unless log_checkpoints is off)."""
    tracking.log_step(run.job, record, record["checkpoint"] if run.opts.log_checkpoints else None)


def _progress(run: Run, done: int, total: int, records: list | None = None) -> None:
    """Loop progress and the per-step table, as Prefect UI artifacts."""
    if run.progress_id is None:
        run.progress_id = create_progress_artifact(progress=0.0, key="iterabre-progress",
                                                   description=f"blocks removed from {run.cfg.model}")
    update_progress_artifact(run.progress_id, progress=100.0 * done / max(total, 1))
    if records:
        rows = [{"step": r["step"], "removed": ",".join(map(str, r["removed"])), "num_layers": r["num_layers"],
                 "loss_before": r["recovery"].get("loss_before"), "loss_after": r["recovery"].get("loss_after"),
                 "tokens": r["recovery"].get("tokens")} for r in records]
        create_table_artifact(rows, key="iterabre-steps", description="IteRABRe iterations")


def _report(run: Run, base: dict, final: dict, base_eval: dict, final_eval: dict, records: list,
            budget: dict | None = None, data: dict | None = None, final_rec: dict | None = None) -> dict:
    """report.json content (see docs/PIPELINE.md)."""
    from iterabre.data import data_version

    try:
        version = data_version()
    except Exception as e:  # reports must not fail on a missing data.dvc
        version = {"md5": "unknown", "dirty": None, "error": str(e)}
    alias, reasons = planning.promotion(base_eval, final_eval, run.opts.min_blimp_retained, run.opts.max_ppl_ratio)
    return {"base_model": run.cfg.model, "base_num_layers": base["num_layers"],
            "final_num_layers": final["num_layers"], "removed_layers": [i for r in records for i in r["removed"]],
            "config": run.cfg.to_dict(), "data_version": version, "base_eval": base_eval,
            "final_eval": final_eval, "steps": records, "final_dir": final["path"],
            "promotion": {"alias": alias, "reasons": reasons}, "mlflow_run_id": run.job.run_id,
            "budget": _budget_summary(budget, records, final_rec), "final_recovery": final_rec,
            "compute": _compute_summary(records, final_rec, data),
            "data_split": (data or {}).get("split"), **_card_facts(run, base, final)}


def _card_facts(run: Run, base: dict, final: dict) -> dict:
    """What the model card and the registry need beyond the job's results: name, sizes, licence."""
    from iterabre import modelcard

    return {"registered_name": tracking.registered_name(run.cfg.model),
            "num_parameters": {"base": modelcard.parameter_count(base["path"]),
                               "final": modelcard.parameter_count(final["path"])},
            "licence": modelcard.base_licence(run.cfg.model, run.cfg.revision),
            "base_hub_id": modelcard.base_hub_id(run.cfg.model)}


def _compute_summary(records: list, final_rec: dict | None, data: dict | None = None) -> dict:
    """The job's FLOPs by phase, summed over its steps (counted from shapes, see iterabre.flops).

    Generation is the self-generated calibration text (0 for wikitext). Evaluation is left out:
    it does not depend on the recipe, only on the tasks asked for.
    """
    generation = (data or {}).get("generation_flops") or 0
    scoring = sum(r.get("score_flops") or 0 for r in records)
    recovery = sum(r["recovery"].get("flops") or 0 for r in records + ([final_rec] if final_rec else []))
    return {"generation_flops": generation, "scoring_flops": scoring, "recovery_flops": recovery,
            "total_flops": generation + scoring + recovery}


def _budget_summary(budget: dict | None, records: list, final_rec: dict | None) -> dict | None:
    """The budget plan plus the tokens every phase actually trained on."""
    if budget is None:
        return None
    used = [r["recovery"].get("tokens", 0) for r in records + ([final_rec] if final_rec else [])]
    return {**budget, "used": used, "used_total": sum(used)}


def _finish(run: Run, report: dict, final: dict) -> dict:
    """Model card into final/, register the final model (alias decided against the registry's
    champion), write report.json/.md + plots, close the parent run."""
    from iterabre import modelcard
    from iterabre.evaluation.report import write_report
    from iterabre.files import atomic_file

    tracking.log_evals(run.job, report["base_eval"], report["final_eval"])
    with atomic_file(Path(final["path"]) / "README.md") as tmp:  # not part of final/'s content hash
        tmp.write_text(modelcard.render(report), encoding="utf-8")
    report["registry"] = registered = tracking.register_final(run.job, report)
    # The gates' verdict may be overruled by the comparison with the champion: report the outcome.
    report["promotion"] = {**report["promotion"], "gates": report["promotion"]["alias"],
                           "alias": registered["alias"], "reasons": registered["reasons"]}
    files = [write_json(report, run.out / "report.json"), *write_report(report, run.out)]
    tracking.finish_job(run.job, [str(p) for p in files])
    get_run_logger().info("final model %s (%d blocks) registered as %s (version %d): %s", final["path"],
                          final["num_layers"], registered["uri"], registered["version"],
                          "; ".join(registered["reasons"]))
    return report


# ---------------------------------------------------------------- entry points

def flow_parameters(cfg: CompressConfig, **options) -> dict:
    """The flow's keyword arguments for a CompressConfig (+ FlowOptions fields)."""
    return {**cfg.to_dict(), **dataclasses.asdict(FlowOptions(**options))}


def _metric_lines(report: dict) -> list[str]:
    """'task/metric: base -> final' for the tasks asked for (subtasks stay in report.json)."""
    base, final = report["base_eval"], report["final_eval"]
    asked = [t.strip() for t in report["config"]["eval_tasks"].split(",") if t.strip()]
    return [f"  {t}/{m}: {v:.4g} -> {final[t][m]:.4g}" for t in asked for m, v in base.get(t, {}).items()
            if not m.endswith("_stderr") and m in final.get(t, {})]


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run with its traceback; for a user error the one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], IterabreError):
            record.exc_info, record.exc_text = None, None
        return True


def run_from_cli(cfg: CompressConfig, **options) -> dict:
    """Run the flow in this process (Prefect's in-process API) and print where everything is."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
    ensure_prefect_api()
    report = compress(**flow_parameters(cfg, **options))
    out = Path(cfg.output).resolve()
    print(f"\nremoved blocks {report['removed_layers']}: {report['base_num_layers']} -> "
          f"{report['final_num_layers']} blocks")
    if choices := choice_summary(report):
        print("\n".join(choices))
    print("\n".join(_metric_lines(report)) or "  (no evaluation tasks)")
    print(f"final model: {out / 'final'}\nreport:      {out / 'report.md'}")
    print(f"registry:    {report['registry']['uri']} (version {report['registry']['version']})")
    print(f"MLflow UI:   mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    # The in-process server says goodbye from an atexit hook, after the console it would log to
    # is closed ("--- Logging error ---"). Hooks run last-in first-out, so this one, registered
    # after the server's, mutes that info line at exit and nothing before it.
    atexit.register(logging.getLogger("prefect").setLevel, logging.WARNING)
    return report
