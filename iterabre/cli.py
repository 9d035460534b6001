"""The `iterabre` command line: models, data, compress, evaluate.

Heavy libraries (torch, transformers, prefect, mlflow, dvc) are imported inside the
commands, so `iterabre --help` answers in well under a second. Every command is wrapped
so an IterabreError prints one red `error: ...` line and exits 2, and Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from iterabre.config import CompressConfig, RecoveryConfig
from iterabre.errors import IterabreError

app = typer.Typer(name="iterabre", help="Make LLMs smaller by removing decoder blocks and healing them "
                  "(IteRABRe).", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
models_app = typer.Typer(help="Embedded models: pull, list.", no_args_is_help=True)
data_app = typer.Typer(help="The DVC-tracked data folder: import, version.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

# Phoning home fails (and logs errors) on offline machines; users may still turn these on.
for _var, _off in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                   ("DVC_NO_ANALYTICS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_var, _off)

_DEFAULTS = CompressConfig()
_RECOVERY_DEFAULTS = RecoveryConfig()
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
    from iterabre.models import pull_embedded_model

    typer.echo(pull_embedded_model(name))


@models_app.command("list")
@friendly
def models_list():
    """Embedded models and whether they are pulled."""
    from iterabre.models import list_models

    for row in list_models():
        state = "pulled" if row["pulled"] else "not pulled"
        typer.echo(f"{row['name']:<16} {state:<11} {row['licence']:<11} {row['origin']}")


# ---------------------------------------------------------------- data

_DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data"


@data_app.command("import")
@friendly
def data_import(source: Path = typer.Option(_DEFAULT_SOURCE, help="Raw corpora (wikitext-2/, blimp/, xcopa/)."),
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


def build_config(recovery_overrides: dict, **options) -> CompressConfig:
    """A CompressConfig from CLI options (names match the dataclass fields)."""
    if options.get("target_layers") is not None and options.get("target_ratio") is not None:
        raise IterabreError("both --target-layers and --target-ratio were given.", "pass only one of them")
    known = {f.name for f in fields(CompressConfig)}
    cfg = CompressConfig(**{k: v for k, v in options.items() if k in known})
    for key, value in recovery_overrides.items():
        if value is not None:
            setattr(cfg.recovery, key, value)
    return cfg


@app.command()
@friendly
def compress(
    model: str = typer.Option(_DEFAULTS.model, help="Embedded name, local folder, .gguf file or hub id."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (commit or tag) for hub ids."),
    target_layers: Optional[int] = typer.Option(None, help="Blocks to keep at the end."),
    target_ratio: Optional[float] = typer.Option(None, help="Fraction of blocks to keep, e.g. 0.8."),
    scorer: str = typer.Option(_DEFAULTS.scorer, help="output | block-influence | angular | perplexity."),
    schedule: str = typer.Option(_DEFAULTS.schedule, help="iterative (IteRABRe) | one-shot."),
    blocks_per_step: int = typer.Option(_DEFAULTS.blocks_per_step, help="Blocks removed per iteration."),
    recovery: str = typer.Option(_RECOVERY_DEFAULTS.method, help="none | kd | lora-kd | reconstruct | reconstruct+kd."),
    recovery_tokens: int = typer.Option(_DEFAULTS.recovery_tokens, help="Total recovery token budget."),
    calibration_tokens: int = typer.Option(_DEFAULTS.calibration_tokens, help="Tokens used to score blocks."),
    seq_len: int = typer.Option(_DEFAULTS.seq_len, help="Tokens per sequence."),
    teacher: str = typer.Option(_DEFAULTS.teacher, help="base | previous."),
    budget_schedule: str = typer.Option(_DEFAULTS.budget_schedule,
                                        help="Split of the recovery budget: equal | increasing | final | adaptive."),
    final_share: float = typer.Option(_DEFAULTS.final_share, help="final: share of the budget spent after the last removal."),
    adaptive_eval_tokens: int = typer.Option(_DEFAULTS.adaptive_eval_tokens,
                                             help="adaptive: tokens between held-out KD checks."),
    adaptive_tol: float = typer.Option(_DEFAULTS.adaptive_tol,
                                       help="adaptive: stop a step when held-out KD improves by less (relative)."),
    calibration: str = typer.Option(_DEFAULTS.calibration, help="wikitext | self-generated."),
    seed: int = typer.Option(_DEFAULTS.seed, help="Seed for data sampling, training and generation."),
    device: str = typer.Option(_DEFAULTS.device, help="auto | cpu | cuda."),
    output: str = typer.Option(_DEFAULTS.output, help="Folder for final/, checkpoints and report.json."),
    eval_tasks: str = typer.Option(_DEFAULTS.eval_tasks, help="Comma-separated lm-eval tasks ('' = none)."),
    eval_limit: Optional[str] = typer.Option(str(_DEFAULTS.eval_limit), help="Per-task limit: fraction, count or none."),
    allow_remote_code: bool = typer.Option(False, help="Allow models that ship their own Python code."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt (pickle) weights."),
    lr: Optional[float] = typer.Option(None, help=f"Recovery learning rate (default {_RECOVERY_DEFAULTS.lr})."),
    batch_size: Optional[int] = typer.Option(None, help=f"Recovery batch size (default {_RECOVERY_DEFAULTS.batch_size})."),
    trainable: Optional[str] = typer.Option(None, help="all | lora | adjacent (default all)."),
):
    """Remove decoder blocks from a model and heal it (runs the Prefect flow, logs to MLflow)."""
    options = dict(locals())
    overrides = {"method": options.pop("recovery"), "lr": options.pop("lr"),
                 "batch_size": options.pop("batch_size"), "trainable": options.pop("trainable")}
    options["eval_limit"] = _parse_limit(options["eval_limit"])
    cfg = build_config(overrides, **options)
    from flows.compress import run_from_cli

    run_from_cli(cfg)


@app.command()
@friendly
def evaluate(
    model: str = typer.Option(_DEFAULTS.model, help="Embedded name, local folder, .gguf file or hub id."),
    tasks: str = typer.Option(_DEFAULTS.eval_tasks, help="Comma-separated tasks (wikitext, blimp, xcopa, ...)."),
    limit: Optional[str] = typer.Option(str(_DEFAULTS.eval_limit), help="Per-task limit: fraction, count or none."),
    output: Optional[str] = typer.Option(None, help="Folder for results.json and the report."),
    batch_size: int = typer.Option(8, help="Evaluation batch size."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
):
    """Evaluate a model with lm-eval on local data and print the metrics."""
    from iterabre.evaluation import run_evaluate

    result = run_evaluate(model, tasks, _parse_limit(limit), output, batch_size, device)
    typer.echo(json.dumps(result, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    app()
