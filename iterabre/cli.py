"""The `iterabre` command line: models, data, compress, evaluate.

Heavy libraries (torch, transformers, prefect, mlflow, dvc) are imported inside the
commands, so `iterabre --help` answers in well under a second. Every command is wrapped
so an IterabreError prints one red `error: ...` line and exits 2, and Ctrl-C exits 130.
The options of `compress` are read from the fields of `iterabre.config` (default, help), so a
knob is declared there only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import typing
from pathlib import Path
from typing import Optional

import typer

from iterabre.config import CompressConfig, FlowOptions, RecoveryConfig, help_of, validate
from iterabre.errors import IterabreError

app = typer.Typer(name="iterabre", help="Make LLMs smaller by removing decoder blocks and healing them "
                  "(IteRABRe).", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
models_app = typer.Typer(help="Embedded models: pull, list.", no_args_is_help=True)
data_app = typer.Typer(help="The DVC-tracked data folder: import, version.", no_args_is_help=True)
app.add_typer(models_app, name="models")

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"iterabre {version('iterabre')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Make LLMs smaller by removing decoder blocks and healing them (IteRABRe)."""

app.add_typer(data_app, name="data")

# Phoning home fails (and logs errors) on offline machines; users may still turn these on.
for _var, _off in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                   ("DVC_NO_ANALYTICS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_var, _off)

_DEFAULTS = CompressConfig()
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def friendly(func):
    """Turn IterabreError into one red line + exit 2 and Ctrl-C into exit 130; keep other tracebacks."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except IterabreError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    return wrapper


# ---------------------------------------------------------------- models

@models_app.command("pull")
@friendly
def models_pull(name: str = typer.Argument("smollm2-135m", help="Embedded model name.")):
    """Download, verify and convert an embedded model (once; later runs do nothing)."""
    from iterabre.embedded import pull_embedded_model

    typer.echo(pull_embedded_model(name))


@models_app.command("list")
@friendly
def models_list():
    """Embedded models and whether they are pulled."""
    from iterabre.embedded import list_models

    for row in list_models():
        state = "pulled" if row["pulled"] else "not pulled"
        typer.echo(f"{row['name']:<16} {state:<11} {row['licence']:<11} {row['origin']}")


# ---------------------------------------------------------------- data

@data_app.command("import")
@friendly
def data_import(source: Path = typer.Option(..., help="Folder of the raw corpora (wikitext-2/, blimp/, xcopa/), "
                                                 "e.g. ../shared/data."),
                dest: Optional[Path] = typer.Option(None, help="Output folder (default: the repo's data/).")):
    """Convert the raw corpora into parquet files under data/ (then `dvc add data && dvc push`)."""
    from iterabre.data import import_data

    typer.echo(import_data(source, dest))


@data_app.command("version")
@friendly
def data_version_cmd():
    """Print the data folder's DVC md5 and whether the working copy differs from it."""
    from iterabre.data import data_version

    version = data_version()
    typer.echo(f"md5 {version['md5']} {'dirty' if version['dirty'] else 'clean'}")


# ---------------------------------------------------------------- registry

registry_app = typer.Typer(help="The MLflow model registry: list versions, promote one by hand.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
@friendly
def registry_list(name: Optional[str] = typer.Argument(None, help="Registered model, e.g. iterabre-smollm2-135m "
                                                        "(default: every iterabre model).")):
    """Versions with their aliases, sizes, gate metrics and promotion decision, in one table."""
    from flows.registry import list_command

    typer.echo(list_command(name))


@registry_app.command("promote")
@friendly
def registry_promote(name: str = typer.Argument(..., help="Registered model, e.g. iterabre-smollm2-135m."),
                     version: int = typer.Argument(..., help="Version number (see `iterabre registry list`)."),
                     alias: str = typer.Option("champion", help="Alias to give it (moved from the version "
                                                                "that has it)."),
                     reason: Optional[str] = typer.Option(None, help="Why, recorded on the version.")):
    """Give a version an alias by hand (a deliberate override, recorded on the version as a tag)."""
    from flows.registry import promote_command

    typer.echo(promote_command(name, str(version), alias, reason))


# ---------------------------------------------------------------- compress / evaluate

def _parse_limit(value: Optional[str]) -> Optional[float | int]:
    """'none'/'full' -> None (whole task); otherwise a fraction (<1) or a count."""
    if value is None or value.lower() in ("none", "full", "all"):
        return None
    try:
        limit = float(value)
    except ValueError:
        raise IterabreError(f"--eval-limit {value!r} is not a number.", "pass e.g. 0.05, 100 or none") from None
    if limit <= 0:
        raise IterabreError(f"--eval-limit {value} must be positive.", "pass e.g. 0.05, 100 or none")
    return int(limit) if limit >= 1 and limit.is_integer() else limit  # >= 1 is a count of examples


# Recovery fields whose option is not --<name>: the method is the main recovery switch (--recovery),
# and the job has its own --seed. recovery.tokens is no option: the loop sets it per phase.
_RECOVERY_PARAMS = {"method": "recovery", "seed": "recovery_seed", "tokens": None}
_PARSERS = {"eval_limit": _parse_limit}  # options typed as text on the command line, parsed here
_GROUPS = {"job": CompressConfig, "recovery": RecoveryConfig, "flow": FlowOptions}
# Help panels of `compress --help`: where each job field is shown (a presentation choice, kept here).
_PANELS = {"Target": ("model", "revision", "target_layers", "target_ratio", "output"),
           "Scoring": ("scorer", "schedule", "blocks_per_step", "calibration", "calibration_tokens", "seq_len"),
           "Recovery budget": ("teacher", "recovery_tokens", "budget_schedule", "final_share", "adaptive_eval_tokens",
                               "adaptive_tol"),
           "Evaluation": ("eval_tasks", "eval_limit", "eval_parallelize"),
           "Safety": ("allow_remote_code", "allow_pickle")}
_PANEL_OF = {name: panel for panel, names in _PANELS.items() for name in names}
_GROUP_PANEL = {"recovery": "Recovery (every phase)", "flow": "Registry and flow"}


def _panel(group: str, name: str) -> str:
    return _GROUP_PANEL.get(group) or _PANEL_OF.get(name, "Job")


def _inverted(f: dataclasses.Field) -> bool:
    """A switch that is on by default is offered as its --no- form only (one name: readable at 80 columns)."""
    return f.default is True


def _param_name(group: str, f: dataclasses.Field) -> str | None:
    """The compress parameter of a field (None: not an option; the nested recovery has its own)."""
    name = _RECOVERY_PARAMS.get(f.name, f.name) if group == "recovery" else (None if f.name == "recovery" else f.name)
    return f"no_{name}" if name and _inverted(f) else name


def _knobs() -> list[tuple[str, str, dataclasses.Field]]:
    """(parameter name, group, field) of every compress option: job fields, recovery fields, flow options."""
    knobs = [(_param_name(group, f), group, f) for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)]
    return [knob for knob in knobs if knob[0]]


def _parameter(name: str, group: str, f: dataclasses.Field) -> inspect.Parameter:
    """The Typer option of one field: its default and help come from the dataclass."""
    hint, default = typing.get_type_hints(_GROUPS[group])[f.name], f.default
    if name in _PARSERS:
        hint, default = Optional[str], str(default)
    flag = [f"--{name.replace('_', '-')}"] if hint is bool else []  # a switch without a --no- twin
    default = False if _inverted(f) else default
    option = typer.Option(default, *flag, help=f.metadata["help"], rich_help_panel=_panel(group, f.name))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hint)


def options_from_config(func):
    """Give `func(**values)` one keyword parameter per knob, which Typer turns into --options."""
    params = [_parameter(*knob) for knob in _knobs()]
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def build_config(values: dict) -> tuple[CompressConfig, dict]:
    """The CompressConfig and the flow options from the values of the compress options."""
    if values.get("target_layers") is not None and values.get("target_ratio") is not None:
        raise IterabreError("both --target-layers and --target-ratio were given.", "pass only one of them")
    groups = {group: {} for group in _GROUPS}
    for name, group, f in _knobs():
        value = _PARSERS[name](values[name]) if name in _PARSERS else values[name]
        groups[group][f.name] = not value if _inverted(f) else value
    return CompressConfig(**groups["job"], recovery=RecoveryConfig(**groups["recovery"])), groups["flow"]


@app.command()
@friendly
@options_from_config
def compress(**values):
    """Remove decoder blocks from a model and heal it (runs the Prefect flow, logs to MLflow)."""
    cfg, options = build_config(values)
    validate(cfg)  # a bad value fails here, before Prefect and MLflow start
    from flows.compress import run_from_cli

    run_from_cli(cfg, **options)


@app.command()
@friendly
def evaluate(
    model: str = typer.Option(_DEFAULTS.model, help=help_of(CompressConfig, "model")),
    tasks: str = typer.Option(_DEFAULTS.eval_tasks, help="Comma-separated tasks (wikitext, blimp, xcopa, ...)."),
    limit: Optional[str] = typer.Option(str(_DEFAULTS.eval_limit), help=help_of(CompressConfig, "eval_limit")),
    output: Optional[str] = typer.Option(None, help="Folder for results.json and the report."),
    batch_size: int = typer.Option(8, help="Evaluation batch size."),
    device: str = typer.Option(_DEFAULTS.device, help=help_of(CompressConfig, "device")),
    parallelize: bool = typer.Option(False, help=help_of(CompressConfig, "eval_parallelize")),
):
    """Evaluate a model with lm-eval on local data and print the metrics."""
    from iterabre.evaluation import run_evaluate

    result = run_evaluate(model, tasks, _parse_limit(limit), output, batch_size, device, parallelize)
    typer.echo(json.dumps(result, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------- plan

_REC = RecoveryConfig()
EXIT_DOES_NOT_FIT = 1


@app.command()
@friendly
def plan(
    model: str = typer.Option(_DEFAULTS.model, help="Model folder, config.json file, embedded name or hub id "
                                                    "(its config.json only: no weights are read)."),
    target_layers: Optional[int] = typer.Option(None, help=help_of(CompressConfig, "target_layers")),
    target_ratio: Optional[float] = typer.Option(None, help=help_of(CompressConfig, "target_ratio")),
    revision: Optional[str] = typer.Option(None, help=help_of(CompressConfig, "revision")),
    recovery: str = typer.Option(_REC.method, help=help_of(RecoveryConfig, "method")),
    trainable: str = typer.Option(_REC.trainable, help=help_of(RecoveryConfig, "trainable")),
    lora_rank: int = typer.Option(_REC.lora_rank, help=help_of(RecoveryConfig, "lora_rank")),
    dtype: str = typer.Option("auto", help="Working dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | "
                                           "bfloat16."),
    num_processes: int = typer.Option(1, help="Recovery processes (torchrun), one GPU each."),
    fsdp: bool = typer.Option(False, help="Shard the student (and teacher) over the processes with FSDP2."),
    batch_size: int = typer.Option(_REC.batch_size, help="Recovery sequences per micro-batch (all processes)."),
    seq_len: int = typer.Option(_DEFAULTS.seq_len, help=help_of(CompressConfig, "seq_len")),
    calibration_tokens: int = typer.Option(_DEFAULTS.calibration_tokens,
                                           help=help_of(CompressConfig, "calibration_tokens")),
    schedule: str = typer.Option(_DEFAULTS.schedule, help=help_of(CompressConfig, "schedule")),
    blocks_per_step: int = typer.Option(_DEFAULTS.blocks_per_step, help=help_of(CompressConfig, "blocks_per_step")),
    scorer: str = typer.Option(_DEFAULTS.scorer, help=help_of(CompressConfig, "scorer")),
    calibration: str = typer.Option(_DEFAULTS.calibration, help=help_of(CompressConfig, "calibration")),
    eval_tasks: str = typer.Option(_DEFAULTS.eval_tasks, help=help_of(CompressConfig, "eval_tasks")),
    eval_parallelize: bool = typer.Option(False, help=help_of(CompressConfig, "eval_parallelize") +
                                          " Planned as split over --num-processes GPUs."),
    grad_checkpointing: bool = typer.Option(False, help="Plan with gradient checkpointing (else it is switched "
                                                        "on only when recovery needs it to fit)."),
    device: str = typer.Option(_DEFAULTS.device, help="cpu | cuda (a machine to plan for, need not be this one); "
                                                      "auto: this machine's."),
    device_memory: Optional[str] = typer.Option(None, help="Memory per device, e.g. 80GiB, 16GB, 512MiB "
                                                           "(default: this machine's GPU memory, or available RAM)."),
    host_memory: Optional[str] = typer.Option(None, help="RAM of the GPU machine for the host-side load phase "
                                                         "(default: this machine's available RAM when planning for "
                                                         "this machine, else not checked)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (bytes per process per phase)."),
):
    """Estimate the peak memory of each phase per process from config.json alone; exit 1 if one does not fit."""
    from iterabre import planner
    from iterabre.devices import available_ram

    if (target_layers is None) == (target_ratio is None):
        raise IterabreError("give exactly one of --target-layers and --target-ratio.",
                            "pass --target-layers N (blocks to keep) or --target-ratio R (e.g. 0.8)")
    device = _plan_device(device)
    limit = planner.parse_bytes(device_memory) if device_memory is not None else _machine_memory(device)
    host = planner.parse_bytes(host_memory) if host_memory is not None else (
        available_ram() if device_memory is None else None)
    path = planner.config_file(model, revision)
    if path is None:
        raise IterabreError(f"no config.json of {model} on this machine (a .gguf file, an embedded model not "
                            "pulled yet, or a hub id never fetched).", "pass a folder or config.json file, run "
                            "`iterabre models pull`, or fetch only the config: `hf download ID config.json`")
    counts = planner.counts_from_config(planner.read_config(path), model)
    target = target_layers if target_layers is not None else round(target_ratio * counts.num_layers)
    job = planner.Job(target_layers=target,
                      schedule=schedule, blocks_per_step=blocks_per_step, method=recovery, trainable=trainable,
                      lora_rank=lora_rank, dtype=dtype, device=device, num_processes=num_processes, fsdp=fsdp,
                      batch_size=batch_size, seq_len=seq_len, calibration_tokens=calibration_tokens,
                      grad_checkpointing=grad_checkpointing, scorer=scorer, eval_tasks=eval_tasks,
                      eval_parallelize=eval_parallelize, calibration=calibration)
    result = planner.plan(counts, job, limit, host)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else planner.table(result))
    if result.grad_checkpointing and result.auto_checkpointing and not as_json:
        typer.echo("gradient checkpointing: switched on by the planner (recovery fits only with it)")
    if not result.fits:
        typer.secho(f"does not fit: {planner.refusal(result)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _plan_device(device: str) -> str:
    """cpu or cuda; auto means this machine's. A plan for cuda needs no GPU here."""
    if device == "auto":
        from iterabre.devices import resolve_device

        return resolve_device("auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise IterabreError(f"unknown device {device!r} to plan for.", "use cpu, cuda or auto")
    return "cuda" if device.startswith("cuda") else "cpu"


def _machine_memory(device: str) -> int:
    """This machine's memory for `device`; a CUDA plan on a machine without a GPU needs the size given."""
    import torch

    from iterabre import planner

    if device == "cuda" and not torch.cuda.is_available():
        raise IterabreError("planning for cuda on a machine without a GPU, and no --device-memory was given.",
                            "pass the GPU's memory, e.g. --device-memory 80GiB")
    return planner.machine_memory(device)


if __name__ == "__main__":
    app()
