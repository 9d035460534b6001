"""The docs state what the code and the result files say: defaults, choices, the results at a glance."""

import dataclasses
import re
import sys

from iterabre import cli
from iterabre.config import CompressConfig, FlowOptions, RecoveryConfig, choices_of
from iterabre.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
PIPELINE = (REPO_ROOT / "docs" / "PIPELINE.md").read_text(encoding="utf-8")


def _field(option: str) -> tuple[type, dataclasses.Field]:
    """The config field behind a `compress` option such as --recovery or --scorer."""
    name = option.removeprefix("--").replace("-", "_")
    recovery = {v: k for k, v in cli._RECOVERY_PARAMS.items() if v}
    cls, name = (RecoveryConfig, recovery[name]) if name in recovery else (CompressConfig, name)
    return cls, next(f for f in dataclasses.fields(cls) if f.name == name)


def _table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with `header`."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_readme_option_table_matches_the_config():
    rows = _table_rows(README, "| option | values |")
    assert len(rows) >= 6
    for option, values in rows:
        _, f = _field(option.strip("`"))
        listed = re.findall(r"`([^`]+)`", values)
        default = re.findall(r"`([^`]+)` \([^)]*default", values)
        assert set(listed) == set(choices_of(f)), option  # every valid value, nothing else
        assert default == [f.default], option


def test_pipeline_flow_option_table_matches_flow_options():
    rows = {name.strip("`"): default for name, default, _ in _table_rows(PIPELINE, "| parameter | default |")}
    expected = {f.name: str(f.default).lower() for f in dataclasses.fields(FlowOptions)}
    assert rows == expected


def test_readme_results_at_a_glance_are_the_result_files():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import render

    block = README[README.index("<!-- glance:start -->"):README.index("<!-- glance:end -->")]
    assert render.glance_from_files() in block  # regenerate with `python bench/render.py glance`
