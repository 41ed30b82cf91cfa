"""fedbench validate: clean records pass; edited, moved, out-of-range or inconsistent ones fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedbench.board.validate import check_record, validate_file, validate_paths
from fedbench.cli.main import main

FAST = ["local_epochs=1", "samples=200"]


@pytest.fixture(scope="module")
def pristine(blobs_task, tmp_path_factory) -> Path:
    """One fedavg and one local record on blobs, written by the real engine."""
    from fedbench.harness.run import execute, resolve_spec

    root = tmp_path_factory.mktemp("validate-results")
    for method in ("fedavg", "local"):
        execute(resolve_spec(method, blobs_task, rounds=2, sets=FAST), root)
    return root


@pytest.fixture
def results(pristine, tmp_path) -> Path:
    """A fresh copy per test, so tampering never leaks."""
    return Path(shutil.copytree(pristine, tmp_path / "results"))


def _record(results: Path, method: str = "fedavg") -> Path:
    (path,) = sorted((results / "blobs" / method).glob("*.json"))
    return path


def _edit(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=1))


def test_clean_records_pass(results, capsys):
    verdicts = validate_paths([results])
    assert len(verdicts) == 2 and all(v.ok for v in verdicts), [v.problems for v in verdicts]
    assert main(["validate", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK   ") == 2 and "2 OK, 0 FAIL" in out


def test_edited_spec_fails_its_hash(results):
    path = _record(results)
    _edit(path, lambda r: r["spec"]["method_options"].update(lr=0.5))
    problems = validate_file(path).problems
    assert any("not the hash of the spec" in p for p in problems), problems


def test_moved_record_fails_its_location(results):
    path = _record(results)
    moved = results / "blobs" / "fedprox" / path.name
    moved.parent.mkdir()
    shutil.move(path, moved)
    problems = validate_file(moved).problems
    assert any("its spec says" in p and "blobs/fedavg/" in p for p in problems), problems
    renamed = path.with_name("0123456789abcdef.json")
    shutil.move(moved, renamed)
    assert any("its spec says" in p for p in validate_file(renamed).problems)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r["metrics"]["rounds"][-1].update(global_acc=1.5), "must be a fraction in [0, 1]"),
        (lambda r: r["metrics"]["rounds"][0]["client_acc"].__setitem__(0, -0.1), "must be a fraction in [0, 1]"),
        (lambda r: r["comm"].update(up_bytes=-5), "must be a non-negative integer"),
        (lambda r: r["comm"]["per_round"][0].update(down_bytes=r["comm"]["per_round"][0]["down_bytes"] + 1),
         "sum to"),
        (lambda r: r["metrics"]["final"]["last"].update(global_acc=0.99), "but round 2 says"),
        (lambda r: r["metrics"]["final"].update(best_val_round=None), "best_val_round"),
        (lambda r: r.update(schema_version=2), "schema_version 2"),
        (lambda r: r.pop("comm"), "missing keys ['comm']"),
        (lambda r: r["metrics"]["final"].update(trainable_params="many"), "trainable_params"),
    ],
    ids=["acc>1", "client-acc<0", "negative-bytes", "per-round-sum", "final-edited", "best-round", "schema",
         "missing-comm", "params-type"],
)
def test_out_of_range_or_inconsistent_metrics_fail(results, change, expected):
    path = _record(results)
    _edit(path, change)
    problems = validate_file(path).problems
    assert any(expected in p for p in problems), problems


def test_nan_and_non_json_are_refused(results):
    path = _record(results)
    text = path.read_text().replace('"global_loss": ', '"global_loss": NaN, "was": ', 1)
    path.write_text(text)
    assert any("not strict JSON" in p for p in validate_file(path).problems)
    path.write_text("{not json")
    assert not validate_file(path).ok
    assert validate_file(path.with_name("absent.json")).problems == ["no such file"]
    assert check_record(["not", "a", "record"]) == ["not a JSON object"]


def test_in_memory_nan_is_refused(results):
    record = json.loads(_record(results).read_text())
    record["metrics"]["rounds"][-1]["train_loss"] = float("nan")
    assert any("not a finite number" in p for p in check_record(record))


def test_cli_fails_when_any_record_fails(results, capsys):
    _edit(_record(results, "local"), lambda r: r["spec"].update(seed=7))
    assert main(["validate", str(results)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 OK, 1 FAIL" in out
