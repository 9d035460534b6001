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


def _render():
    """bench/render.py, which renders the result files into the docs."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import render

    return render


DOCS = {path.relative_to(REPO_ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]}
BENCHMARKS = DOCS["docs/BENCHMARKS.md"]


def test_readme_results_at_a_glance_are_the_result_files():
    render = _render()
    for name in ("README.md", "docs/BENCHMARKS.md"):  # regenerate with `python bench/render.py --update`
        blocks = [text for block, text in render.marked_blocks(DOCS[name]) if block == "glance"]
        assert blocks == [render.glance_from_files()], name


def test_every_rendered_block_in_the_docs_is_its_result_file():
    """Numbers live once: every `<!-- render:NAME:start -->` block equals a fresh render of its result file."""
    render = _render()
    for name, text in DOCS.items():
        assert text.count(":start -->") == text.count(":end -->") == len(render.marked_blocks(text)), name
        for block, shown in render.marked_blocks(text):
            assert shown == render.rendered(block), f"{name}: {block} (`python bench/render.py --update`)"
    names = {block for block, _ in render.marked_blocks(BENCHMARKS)}
    assert {"glance", "costs", "scoring", "scoring-streamed", "recovery", "pruned_speed", "overhead", "quality",
            "recovery_methods", "budget_study", "planner"} <= names


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_references_to_benchmark_sections_resolve():
    headings = re.findall(r"^#+ (.+)$", BENCHMARKS, re.M)
    anchors, numbers = {_anchor(h) for h in headings}, {m for h in headings for m in re.findall(r"^(\d+)\. ", h)}
    sources = {**DOCS, "bench/render.py": (REPO_ROOT / "bench" / "render.py").read_text(encoding="utf-8")}
    for name, text in sources.items():
        own = name == "docs/BENCHMARKS.md"
        for anchor in re.findall(r"BENCHMARKS\.md#([\w-]+)" + (r"|\]\(#([\w-]+)\)" if own else ""), text):
            anchor = anchor if isinstance(anchor, str) else next(a for a in anchor if a)
            assert anchor in anchors, f"{name}: #{anchor}"
        for number in re.findall(r"BENCHMARKS[^§\n]{0,40}§(\d+)", text):
            assert number in numbers, f"{name}: BENCHMARKS §{number}"


def test_benchmarks_cite_only_files_that_exist():
    for path in re.findall(r"`((?:bench|docs|configs|tests|iterabre|flows)/[\w./-]+)`", BENCHMARKS):
        assert (REPO_ROOT / path).exists(), path
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", BENCHMARKS):
        assert (REPO_ROOT / "docs" / link).exists(), link
