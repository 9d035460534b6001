"""bench/overhead.py: the flow timed against the library steps inside it; the render of old and new files."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import overhead  # noqa: E402
import render  # noqa: E402

from flows.compress import TASKS  # noqa: E402
from iterabre import steps  # noqa: E402


def test_timed_steps_times_every_task_step_and_puts_them_back():
    originals = {t.fn.__name__: getattr(steps, t.fn.__name__) for t in TASKS}
    spent = {}
    with overhead.timed_steps(spent):
        assert all(getattr(steps, name) is not fn for name, fn in originals.items())
        assert steps.evaluate("unused", "", None, "cpu") == {}  # still the real function underneath
        assert steps.evaluate.__wrapped__ is originals["evaluate"]
    assert {name: getattr(steps, name) for name in originals} == originals
    assert list(spent) == ["evaluate"] and spent["evaluate"] >= 0


def test_job_summary_is_the_median_of_each_runs_own_difference():
    runs = [{"flow_s": f, "steps_s": s, "overhead_s": f - s, "per_step_s": {"score": s / 2, "recover": s / 2}}
            for f, s in ((10.0, 8.0), (11.0, 8.5), (30.0, 9.0))]
    out = overhead.job_summary(runs)
    assert out["median_s"] == {"flow": 11.0, "steps": 8.5} and out["overhead_s"] == 2.5
    assert out["overhead_pct"] == 100 * 2.5 / 8.5 and out["steps_median_s"] == {"score": 4.25, "recover": 4.25}


def test_one_flow_job_splits_its_wall_time(tiny_model_dir, tmp_path):
    """Through the real flow: the steps' time is part of the wall time, every step the job needs ran."""
    run = overhead.one_job(overhead.job_config(tiny_model_dir, tmp_path / "out", quick=True))
    assert 0 < run["steps_s"] < run["flow_s"] and run["overhead_s"] == run["flow_s"] - run["steps_s"]
    assert {"prepare_base", "prepare_data", "score", "prune", "recover", "publish"} <= set(run["per_step_s"])
    assert len(run["removed_layers"]) == 2 and (tmp_path / "out" / "report.json").exists()
    assert not hasattr(steps.score, "__wrapped__")


def _api(ensure: float) -> dict:
    return {"ensure_s": ensure, "first_flow_s": 1.0, "imports_s": 2.0, "process_s": ensure + 4.0}


def test_render_reads_old_and_new_result_files():
    old = {"median_s": {"plain": 2.0, "flow": 3.0}, "overhead_s": 1.0, "overhead_pct": 50.0,
           "server_start_s": 13.0, "imports_s": 1.5}
    assert "plain loop of iterabre.steps" in render.overhead(old)
    new = {"median_s": {"steps": 2.0, "flow": 3.0}, "overhead_s": 1.0, "overhead_pct": 50.0, "imports_s": 1.5,
           "api_start": {"median_s": {"cold": _api(15.0), "warm": _api(5.0), "server": _api(0.01)},
                         "server_ready_s": 20.0}}
    text = render.overhead(new)
    assert "| the whole flow run (median) | 3 |" in text and "already running" in text
    assert "| in-process API, new PREFECT_HOME | 15 | 1 | 19 |" in text
