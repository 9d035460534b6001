"""iterabre.config: one declaration of every knob (CLI, flow), its help, and the up-front checks."""

import dataclasses
import inspect

import pytest
import typer

from iterabre import cli
from iterabre.config import (CompressConfig, FlowOptions, RecoveryConfig, choices_of, help_of, normalise,
                             validate)
from iterabre.errors import IterabreError


def _cfg(**kw) -> CompressConfig:
    base = dict(model="x", target_layers=4, calibration_tokens=128, recovery_tokens=256, seq_len=32,
                eval_tasks="", device="cpu")
    return CompressConfig(**{**base, **kw})


def _defaults(cls, skip=()) -> dict:
    """{field name: default} of a dataclass, without `skip`."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def _cli_defaults() -> dict:
    """{parameter name: default} of the `iterabre compress` options, as Typer reads them."""
    params = inspect.signature(cli.compress).parameters
    return {name: p.default.default for name, p in params.items() if isinstance(p.default, typer.models.OptionInfo)}


# ---------------------------------------------------------------- one declaration

def test_every_knob_has_a_one_line_help():
    for cls in (CompressConfig, RecoveryConfig, FlowOptions):
        for f in dataclasses.fields(cls):
            text = help_of(cls, f.name)
            assert text.strip() and "\n" not in text, f"{cls.__name__}.{f.name}"


def test_help_names_every_allowed_value():
    for cls in (CompressConfig, RecoveryConfig):
        for f in dataclasses.fields(cls):
            for value in choices_of(f) or ():
                assert value in f.metadata["help"], f"{cls.__name__}.{f.name}: {value}"


def test_every_field_is_a_cli_option_with_the_same_default():
    options = _cli_defaults()
    expected = {**_defaults(CompressConfig, skip={"recovery"}), **_defaults(FlowOptions)}
    expected["eval_limit"] = str(expected["eval_limit"])  # typed as text: 'none', a fraction or a count
    recovery = _defaults(RecoveryConfig, skip={"tokens"})  # tokens: set per phase from --recovery-tokens
    expected.update({cli._RECOVERY_PARAMS.get(name, name): value for name, value in recovery.items()})
    # a switch that is on by default is offered as --no-<name> (off by default, inverted when read)
    expected = {(f"no_{k}" if v is True else k): (False if v is True else v) for k, v in expected.items()}
    assert options == expected


def test_every_field_is_a_flow_parameter_with_the_same_default():
    from flows.compress import compress

    params = {name: p.default for name, p in inspect.signature(compress.fn).parameters.items()}
    expected = {**_defaults(CompressConfig, skip={"recovery"}), **_defaults(FlowOptions)}
    assert {name: params.get(name, "missing") for name in expected} == expected
    assert set(params) == set(expected) | {"recovery"}  # the nested RecoveryConfig comes as a dict


# ---------------------------------------------------------------- validate / normalise

def test_valid_config_passes():
    validate(_cfg())
    validate(_cfg(target_layers=None, target_ratio=0.5, scorer="angular", schedule="one-shot"))


@pytest.mark.parametrize("bad", [
    dict(target_ratio=0.5),  # both targets
    dict(target_layers=None),  # neither
    dict(target_layers=0),
    dict(target_layers=None, target_ratio=1.0),
    dict(scorer="random"),
    dict(schedule="greedy"),
    dict(teacher="self"),
    dict(calibration="c4"),
    dict(budget_schedule="front"),
    dict(blocks_per_step=0),
    dict(calibration_tokens=16),  # fewer than one window
    dict(recovery=RecoveryConfig(method="magic")),
    dict(recovery=RecoveryConfig(lr=0.0)),
    dict(recovery=RecoveryConfig(method="reconstruct", reconstruct_tokens=-1)),
    dict(calibration="self-generated",  # how much to generate?
         recovery=RecoveryConfig(method="reconstruct+kd", reconstruct_tokens=0)),
    dict(calibration="self-generated", recovery=RecoveryConfig(method="auto", reconstruct_tokens=0)),
    dict(select_from="output,random"),
    dict(scorer="select", select_from="output"),  # nothing to compare
    dict(select_from="angular,angular"),
    dict(device="tpu"),
    dict(eval_limit=0.0),
])
def test_bad_config_is_refused_up_front(bad):
    with pytest.raises(IterabreError):
        validate(_cfg(**bad))


@pytest.mark.parametrize("bad, message", [
    (dict(scorer="random"), "unknown scorer 'random'"),
    (dict(recovery=RecoveryConfig(method="magic")), "unknown recovery method 'magic'"),
    (dict(recovery=RecoveryConfig(trainable="some")), "unknown recovery trainable 'some'"),
    (dict(recovery=RecoveryConfig(lr_schedule="step")), "unknown recovery lr_schedule 'step'"),
    (dict(budget_schedule="front"), "unknown budget_schedule 'front'"),
])
def test_unknown_names_say_which_knob(bad, message):
    with pytest.raises(IterabreError, match=message):
        validate(_cfg(**bad))


def test_normalise_config_makes_equal_jobs_fingerprint_equal():
    a, b = _cfg(eval_limit=2, target_layers=None, target_ratio=1), _cfg(eval_limit=2.0, target_layers=None,
                                                                        target_ratio=1.0)
    assert a.fingerprint() != b.fingerprint()  # 2 vs 2.0 in JSON
    assert normalise(a).fingerprint() == normalise(b).fingerprint()
    assert normalise(a).target_layers is None and normalise(a).recovery == a.recovery
