"""The CLI: fast --help, config building, and exit codes for user errors and Ctrl-C."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iterabre.cli import app
from iterabre.config import CompressConfig
from iterabre.data import data_version

runner = CliRunner()


def _fake_flow(monkeypatch, behaviour, options: dict | None = None):
    """Install a stand-in flows.compress whose run_from_cli calls `behaviour(cfg)` (flow options -> `options`)."""
    def run_from_cli(cfg, **flow_options):
        (options if options is not None else {}).update(flow_options)
        return behaviour(cfg)

    module = types.ModuleType("flows.compress")
    module.run_from_cli = run_from_cli
    monkeypatch.setitem(sys.modules, "flows.compress", module)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from iterabre.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'prefect', 'mlflow', 'dvc') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # what keeps `iterabre --help` fast


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("compress", "evaluate", "models", "data"):
        assert command in result.output


def test_compress_builds_config(monkeypatch):
    seen = []
    _fake_flow(monkeypatch, seen.append)
    result = runner.invoke(app, ["compress", "--target-layers", "27", "--recovery", "lora-kd", "--lr", "1e-4",
                                 "--recovery-tokens", "6144", "--eval-limit", "none", "--seq-len", "64",
                                 "--trainable", "lora", "--output", "outputs/x", "--allow-pickle"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert isinstance(cfg, CompressConfig)
    assert (cfg.target_layers, cfg.recovery_tokens, cfg.seq_len, cfg.output) == (27, 6144, 64, "outputs/x")
    assert (cfg.recovery.method, cfg.recovery.lr, cfg.recovery.trainable) == ("lora-kd", 1e-4, "lora")
    assert cfg.eval_limit is None and cfg.allow_pickle and not cfg.allow_remote_code
    assert cfg.recovery.batch_size == CompressConfig().recovery.batch_size  # untouched when not given


def test_every_recovery_field_and_flow_option_is_an_option(monkeypatch):
    seen, options = [], {}
    _fake_flow(monkeypatch, seen.append, options)
    result = runner.invoke(app, ["compress", "--target-layers", "27", "--grad-accum", "2", "--lr-schedule",
                                 "constant", "--recovery-seed", "7", "--seed", "3", "--no-bf16", "--ridge", "0.5",
                                 "--eval-every-step", "--no-log-checkpoints", "--max-ppl-ratio", "2"])
    assert result.exit_code == 0, result.output
    rec = seen[0].recovery
    assert (rec.grad_accum, rec.lr_schedule, rec.seed, rec.bf16, rec.ridge) == (2, "constant", 7, False, 0.5)
    assert seen[0].seed == 3 and rec.tokens == CompressConfig().recovery.tokens  # set per phase by the loop
    assert options == dict(eval_every_step=True, min_blimp_retained=0.9, max_ppl_ratio=2.0,
                           log_checkpoints=False, keep_pruned=False)


def test_compress_help_reads_the_config_help():
    result = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("Blocks to keep at the end", "--recovery-tokens", "--keep-pruned", "--no-log-checkpoints"):
        assert text in result.output


def test_bad_value_fails_before_the_flow_starts(monkeypatch):
    _fake_flow(monkeypatch, lambda cfg: pytest.fail("the flow started"))
    result = runner.invoke(app, ["compress", "--target-layers", "20", "--scorer", "random"])
    assert result.exit_code == 2 and "unknown scorer 'random'" in result.stderr


def test_compress_eval_limit_count(monkeypatch):
    seen = []
    _fake_flow(monkeypatch, seen.append)
    assert runner.invoke(app, ["compress", "--target-ratio", "0.8", "--eval-limit", "20"]).exit_code == 0
    assert seen[0].eval_limit == 20 and isinstance(seen[0].eval_limit, int)


@pytest.mark.parametrize("args,message", [
    (["compress", "--target-layers", "20", "--target-ratio", "0.5"], "both --target-layers and --target-ratio"),
    (["compress", "--target-layers", "20", "--eval-limit", "lots"], "is not a number"),
    (["models", "pull", "nope"], "unknown embedded model"),
])
def test_user_errors_exit_2_with_one_line(monkeypatch, args, message):
    _fake_flow(monkeypatch, lambda cfg: None)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    _fake_flow(monkeypatch, interrupted)
    assert runner.invoke(app, ["compress", "--target-layers", "20"]).exit_code == 130


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def bug(cfg):
        raise RuntimeError("a bug")

    _fake_flow(monkeypatch, bug)
    result = runner.invoke(app, ["compress", "--target-layers", "20"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_data_import_needs_a_source():
    result = runner.invoke(app, ["data", "import"])
    assert result.exit_code == 2 and "--source" in result.output


def test_data_version_command():
    result = runner.invoke(app, ["data", "version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"md5 {data_version()['md5']} clean"


def test_installed_entry_point_error_exit_code():
    exe = Path(sys.executable).with_name("iterabre")  # the console script of this venv
    out = subprocess.run([str(exe), "models", "pull", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown embedded model")


def test_help_fits_80_columns_without_cut_lines():
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"}
    for args in (["--help"], ["compress", "--help"], ["evaluate", "--help"], ["data", "import", "--help"]):
        out = subprocess.run([sys.executable, "-m", "iterabre.cli", *args], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, args
    help_text = subprocess.run([sys.executable, "-m", "iterabre.cli", "compress", "--help"], env=env,
                               capture_output=True, text=True, check=True).stdout
    for panel in ("Target", "Scoring", "Recovery budget", "Recovery (every phase)", "Evaluation",
                  "Registry and flow", "Safety"):
        assert panel in help_text


def test_switches_on_by_default_are_offered_as_no_flags(monkeypatch):
    seen, options = [], {}
    _fake_flow(monkeypatch, seen.append, options)
    result = runner.invoke(app, ["compress", "--target-layers", "27", "--no-log-checkpoints", "--no-bf16"])
    assert result.exit_code == 0, result.output
    assert options["log_checkpoints"] is False and seen[0].recovery.bf16 is False
    assert runner.invoke(app, ["compress", "--target-layers", "27"]).exit_code == 0
    assert options["log_checkpoints"] is True and seen[1].recovery.bf16 is True


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("iterabre ")
