"""fedbench validate: clean records pass; edited, moved, out-of-range or inconsistent ones fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedbench.board.validate import check_record, validate_file, validate_paths
from fedbench.cli.main import main
from fedbench.core.spec import RunSpec

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


# ---------------------------------------------------------------- spec versions 1 and 2


def _respec(record: dict, drop: tuple[str, ...] = (), **changes) -> dict:
    """``record`` with its spec changed and ``spec_hash`` recomputed, so only the change is at fault."""
    record["spec"].update(changes)
    for key in drop:
        record["spec"].pop(key, None)
    record["spec_hash"] = RunSpec.from_dict(record["spec"]).spec_hash
    return record


def test_records_name_their_method_code(results):
    spec = json.loads(_record(results).read_text())["spec"]
    assert spec["spec_version"] == 2 and spec["method_version"] >= 1
    assert spec["method_class"].endswith("FedAvg")


def test_a_version_1_record_passes(results):
    path = _record(results)
    record = _respec(json.loads(path.read_text()), drop=("method_class", "method_version"), spec_version=1)
    path.unlink()
    moved = path.with_name(f"{record['spec_hash']}.json")
    moved.write_text(json.dumps(record, indent=1))
    assert validate_file(moved).ok, validate_file(moved).problems


@pytest.mark.parametrize(
    "drop, changes, expected",
    [
        (("method_class",), {}, "spec.method_class is missing or empty"),
        ((), {"method_class": ""}, "spec.method_class is missing or empty"),
        ((), {"method_class": 3}, "spec.method_class = 3: expected str"),
        (("method_version",), {}, "spec.method_version = None: a version-2 spec needs"),
        ((), {"method_version": 0}, "spec.method_version = 0: a version-2 spec needs"),
        ((), {"method_version": -1}, "spec.method_version = -1: a version-2 spec needs"),
        ((), {"method_version": True}, "spec.method_version = True: expected int"),
        ((), {"method_version": "1"}, "spec.method_version = '1': expected int"),
        ((), {"spec_version": 3}, "this fedbench reads spec versions 1, 2"),
        (("spec_version",), {}, "spec.spec_version = None"),
        ((), {"spec_version": 1}, "spec.method_class in a version-1 spec"),
        (("method_class",), {"spec_version": 1}, "spec.method_version in a version-1 spec"),
    ],
    ids=["v2-no-class", "v2-empty-class", "v2-class-type", "v2-no-version", "v2-version-0", "v2-version-negative",
         "v2-version-bool", "v2-version-str", "spec-version-3", "no-spec-version", "v1-with-identity",
         "v1-with-version"],
)
def test_method_code_identity_is_checked(results, drop, changes, expected):
    record = _respec(json.loads(_record(results).read_text()), drop, **changes)
    problems = check_record(record)
    assert any(expected in p for p in problems), problems


def test_a_record_is_dirty_only_when_the_code_differs(tmp_path):
    import subprocess

    from fedbench.core.results import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c")
    clean = git_commit(tmp_path / "results")
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "results" / "r.json").write_text('{"rewritten": true}')  # a sweep rewrote a record
    (tmp_path / "results" / "new.json").write_text("{}")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
