"""fedbench sweep: the grid, skipping recorded runs, resuming after an interrupt, Ray."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

import fedbench.harness.run as fb_run
from fedbench.board.validate import validate_paths
from fedbench.cli.main import main
from fedbench.core.registry import METHODS
from fedbench.core.results import write_record
from fedbench.core.spec import RunSpec
from fedbench.errors import FedbenchError, SpecError
from fedbench.harness.sweep import is_recorded, plan, sweep

FAST = ["local_epochs=1", "samples=200"]


def _quiet(_: str) -> None:
    pass


@pytest.fixture
def counting_execute(monkeypatch):
    """Wrap the real execute: count finished runs per spec hash; optionally interrupt the Nth call."""
    real = fb_run.execute
    state = {"calls": 0, "interrupt_on": None, "fail_hash": None, "done": Counter()}

    def wrapped(spec, results_dir="results", **kw):
        state["calls"] += 1
        if state["calls"] == state["interrupt_on"]:
            raise KeyboardInterrupt
        if spec.spec_hash == state["fail_hash"]:
            raise RuntimeError("boom")
        record = real(spec, results_dir, **kw)
        state["done"][spec.spec_hash] += 1
        return record

    monkeypatch.setattr(fb_run, "execute", wrapped)
    return state


def test_plan_is_the_full_grid_resolved_up_front(blobs_task):
    specs = plan(["fedavg", "fedprox"], [blobs_task], [0, 1, 2], FAST, rounds=2)
    assert [(s.method, s.seed) for s in specs] == [(m, s) for m in ("fedavg", "fedprox") for s in (0, 1, 2)]
    assert len({s.spec_hash for s in specs}) == 6
    assert len(plan(["fedavg"], [blobs_task], [0, 0], FAST, rounds=2)) == 1  # duplicates collapse


def test_scoped_sets_apply_to_one_method(blobs_task):
    specs = plan(["fedavg", "fedprox"], [blobs_task], [0], [*FAST, "fedprox.mu=0.5", "blobs.alpha=0.3"], rounds=2)
    by_method = {s.method: s for s in specs}
    assert by_method["fedprox"].method_options["mu"] == 0.5
    assert "mu" not in by_method["fedavg"].method_options
    assert all(s.task_options["alpha"] == 0.3 for s in specs)
    with pytest.raises(SpecError, match=r"fedavg on blobs: .*--set fedavg.KEY=V"):
        plan(["fedavg", "fedprox"], [blobs_task], [0], [*FAST, "mu=0.5"], rounds=2)


def test_interrupted_sweep_resumes_without_redoing_or_losing_runs(blobs_task, tmp_path, counting_execute):
    grid = dict(methods=["fedavg", "local"], tasks=[blobs_task], seeds=[0, 1, 2], sets=FAST, rounds=2,
                results_dir=tmp_path, progress=False, log=_quiet)
    counting_execute["interrupt_on"] = 3
    with pytest.raises(KeyboardInterrupt):
        sweep(**grid)
    first = sorted(tmp_path.rglob("*.json"))
    assert len(first) == 2  # two finished, the third left nothing
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]  # no temp files

    counting_execute["interrupt_on"] = None
    report = sweep(**grid)
    assert len(report.skipped) == 2 and len(report.written) == 4 and not report.failed
    assert set(first) <= set(report.skipped)
    assert max(counting_execute["done"].values()) == 1, "a finished run was done twice"
    assert len(counting_execute["done"]) == 6
    verdicts = validate_paths([tmp_path])
    assert len(verdicts) == 6 and all(v.ok for v in verdicts)

    again = sweep(**grid)  # everything recorded: nothing runs
    assert len(again.skipped) == 6 and not again.written and len(counting_execute["done"]) == 6


def test_unreadable_record_is_run_again(blobs_task, tmp_path, counting_execute):
    grid = dict(methods=["fedavg"], tasks=[blobs_task], seeds=[0], sets=FAST, rounds=2, results_dir=tmp_path,
                progress=False, log=_quiet)
    (path,) = sweep(**grid).written
    path.write_text("{truncated")
    report = sweep(**grid)
    assert report.written == [path] and validate_paths([path])[0].ok


def test_records_of_an_older_method_version_are_run_again(blobs_task, tmp_path, counting_execute, monkeypatch):
    grid = dict(methods=["fedavg"], tasks=[blobs_task], seeds=[0], sets=FAST, rounds=2, results_dir=tmp_path,
                progress=False, log=_quiet)
    (old,) = sweep(**grid).written
    assert sweep(**grid).skipped == [old]  # the same code: recorded, skipped

    monkeypatch.setattr(METHODS.get("fedavg").obj, "version", 2)  # the method's math changed
    (spec,) = plan(["fedavg"], [blobs_task], [0], FAST, rounds=2)
    assert spec.method_version == 2 and not is_recorded(spec, tmp_path)
    report = sweep(**grid)
    assert not report.skipped and len(report.written) == 1 and report.written[0] != old
    assert json.loads(report.written[0].read_text())["spec"]["method_version"] == 2
    assert old.is_file() and json.loads(old.read_text())["spec"]["method_version"] == 1  # kept, not replaced


def test_a_spec_version_1_record_is_run_again(blobs_task, tmp_path, counting_execute):
    grid = dict(methods=["fedavg"], tasks=[blobs_task], seeds=[0], sets=FAST, rounds=2, results_dir=tmp_path,
                progress=False, log=_quiet)
    (path,) = sweep(**grid).written
    record = json.loads(path.read_text())
    del record["spec"]["method_class"], record["spec"]["method_version"]
    record["spec"]["spec_version"] = 1
    record["spec_hash"] = RunSpec.from_dict(record["spec"]).spec_hash
    path.unlink()
    old = write_record(record, tmp_path)  # the same run, as recorded before specs named the method's code
    assert validate_paths([old])[0].ok
    report = sweep(**grid)
    assert not report.skipped and report.written == [path] and old.is_file()


def test_keep_going_records_failures(blobs_task, tmp_path, counting_execute):
    specs = plan(["fedavg"], [blobs_task], [0, 1], FAST, rounds=2)
    counting_execute["fail_hash"] = specs[0].spec_hash
    grid = dict(methods=["fedavg"], tasks=[blobs_task], seeds=[0, 1], sets=FAST, rounds=2, results_dir=tmp_path,
                progress=False, log=_quiet)
    with pytest.raises(RuntimeError, match="boom"):
        sweep(**grid)
    report = sweep(**grid, keep_going=True)
    assert len(report.failed) == 1 and "boom" in report.failed[0][1]
    assert len(report.written) + len(report.skipped) == 1


def test_ray_missing_says_how_to_install(blobs_task, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(FedbenchError, match=r"pip install 'fedbench\[ray\]'"):
        sweep(["fedavg"], [blobs_task], [0], FAST, 2, results_dir=tmp_path, executor="ray", log=_quiet)


def test_cli_dry_run_prints_the_plan(blobs_task, tmp_path, capsys):
    argv = ["sweep", "fedavg", "local", "--tasks", blobs_task, "--seeds", "0", "1", "--rounds", "2",
            "--set", "local_epochs=1", "--set", "samples=200", "--results-dir", str(tmp_path), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 already recorded" in out and out.count("would run") == 4
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.slow
def test_ray_executor_runs_each_spec_as_a_task(blobs_task, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    plugin = Path(__file__).parent / "plugins" / "blobs_task.py"
    report = sweep(["fedavg", "local"], [blobs_task], [0], FAST, 2, results_dir=tmp_path, executor="ray",
                   num_cpus=2, includes=[plugin], progress=False, log=_quiet)
    assert len(report.written) == 2 and not report.failed
    assert all(v.ok for v in validate_paths([tmp_path]))
    local = sweep(["fedavg", "local"], [blobs_task], [0], FAST, 2, results_dir=tmp_path, log=_quiet)
    assert len(local.skipped) == 2  # same specs, same paths, whichever executor wrote them
