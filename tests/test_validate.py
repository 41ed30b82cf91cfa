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
    assert any("NaN is not a number JSON allows" in p for p in validate_file(path).problems)
    path.write_text("{not json")
    assert not validate_file(path).ok
    assert [p.split(";")[0] for p in validate_file(path.with_name("absent.json")).problems] == [
        f"no record at {path.with_name('absent.json')}"]
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


# ---------------------------------------------------------------- top-level keys and image names


def test_unknown_top_level_keys_fail(results):
    path = _record(results)
    _edit(path, lambda r: r.update(signature="0" * 64, note="trust me"))
    problems = validate_file(path).problems
    assert any("unknown top-level keys ['note', 'signature']" in p for p in problems), problems


def test_every_key_the_engine_writes_is_allowed(results):
    path = _record(results)
    record = json.loads(path.read_text())
    assert set(record) <= set(check_record.__globals__["ALLOWED_KEYS"])
    assert {"fidelity", "method_source", "task_source", "partition", "timing"} <= set(record)
    record["path"] = str(path)  # what `fedbench run --json` prints
    record["images"] = {"generated_last_round": f"{record['spec_hash']}.generated_last_round.png"}
    assert check_record(record, path) == []
    record["path"] = 3
    assert any("path = 3: expected a string" in p for p in check_record(record, path))


@pytest.mark.parametrize("file", ["../../../secret.txt", "/etc/passwd", "sub/HASH.grid.png", "HASH.other.png", 7])
def test_image_grids_must_be_plain_names_beside_the_record(results, file):
    record = json.loads(_record(results).read_text())
    name = file.replace("HASH", record["spec_hash"]) if isinstance(file, str) else file
    record["images"] = {"grid": name}
    assert any("images.grid" in p for p in check_record(record)), check_record(record)


def test_schema_version_true_is_not_1(results):
    record = json.loads(_record(results).read_text())
    record["schema_version"] = True
    assert any("schema_version True" in p for p in check_record(record))


# ---------------------------------------------------------------- rounds that are all there


def _cut(record: dict, last: int) -> dict:
    """``record`` as the engine writes a run that stopped after round ``last``."""
    from fedbench.harness.run import EVAL_KEYS, _best_val

    rounds = [r for r in record["metrics"]["rounds"] if r["round"] <= last]
    per_round = record["comm"]["per_round"][:last]
    record["metrics"]["rounds"] = rounds
    record["comm"]["per_round"] = per_round
    record["comm"]["up_bytes"] = sum(p["up_bytes"] for p in per_round)
    record["comm"]["down_bytes"] = sum(p["down_bytes"] for p in per_round)
    best = _best_val(rounds)
    record["metrics"]["final"].update(
        last={k: rounds[-1][k] for k in EVAL_KEYS if k in rounds[-1]},
        best_val={k: best[k] for k in EVAL_KEYS if k in best} if best else None,
        best_val_round=best["round"] if best else None, rounds_run=len(rounds))
    return record


def test_a_record_cut_short_fails(results):
    record = _cut(json.loads(_record(results).read_text()), 1)
    problems = check_record(record)
    assert any("not 1..2" in p and "cut short" in p for p in problems), problems


def test_rounds_run_must_count_the_rounds(results):
    record = json.loads(_record(results).read_text())
    record["metrics"]["final"]["rounds_run"] = 5
    assert any("rounds_run = 5 but metrics.rounds says 2" in p for p in check_record(record))


# ---------------------------------------------------------------- diverged runs


def _diverged(record: dict, at: int, **mark) -> dict:
    """``record`` cut after round ``at``, its train loss there null, marked as the engine marks it."""
    record = _cut(record, at)
    record["metrics"]["rounds"][-1]["train_loss"] = None
    record["diverged"] = {"round": at, "reason": "train loss became nan", **mark}
    return record


@pytest.mark.parametrize("at", [1, 2])
def test_a_consistent_diverged_record_is_reported_diverged(results, capsys, at):
    path = _record(results)
    record = _diverged(json.loads(path.read_text()), at)
    path.write_text(json.dumps(record, indent=1))
    verdict = validate_file(path)
    assert verdict.problems == [] and verdict.status == "DIVERGED"
    assert verdict.reasons == [f"diverged at round {at}: train loss became nan"]
    assert main(["validate", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"DIVERGED {path} (diverged at round {at}" in out and "1 OK, 1 DIVERGED, 0 FAIL" in out


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r["diverged"].update(round=1), "not 1..1 (diverged.round 1)"),  # round 2 is still there
        (lambda r: r["diverged"].update(round=3), "diverged.round = 3 but the spec asked for 2 rounds"),
        (lambda r: r["diverged"].update(round=0), "diverged.round = 0"),
        (lambda r: r["diverged"].update(round="2"), "diverged.round = '2'"),
        (lambda r: r["diverged"].update(round=True), "diverged.round = True"),
        (lambda r: r["diverged"].update(reason=" "), "diverged.reason is missing or empty"),
        (lambda r: r["diverged"].pop("reason"), "diverged has keys ['round']"),
        (lambda r: r["diverged"].update(ok=True), "diverged has keys ['ok', 'reason', 'round']"),
        (lambda r: r.update(diverged=[2]), "diverged = [2]: expected an object"),
        (lambda r: r["metrics"]["rounds"][0].update(train_loss=None), "round 1: train_loss = None before diverged"),
        (lambda r: r["metrics"]["rounds"][0].update(global_loss=None), "round 1: global_loss = None before diverged"),
    ],
    ids=["not-last-round", "beyond-spec", "round-0", "round-str", "round-bool", "empty-reason", "no-reason",
         "extra-key", "not-object", "null-loss-before", "null-global-loss-before"],
)
def test_an_inconsistent_diverged_record_fails(results, change, expected):
    record = _diverged(json.loads(_record(results).read_text()), 2)
    change(record)
    problems = check_record(record)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r["metrics"]["rounds"][1].update(train_loss=None), "round 2: train_loss = None, not a finite"),
        (lambda r: r["metrics"]["rounds"][0].update(global_loss=None), "round 1: global_loss = None, not a finite"),
        (lambda r: r["metrics"]["rounds"][0].update(train_loss=float("inf")), "round 1: train_loss = inf"),
        (lambda r: r["metrics"]["rounds"][0].pop("train_loss"), "round 1: no train_loss"),
    ],
    ids=["null-train-loss", "null-global-loss", "inf-train-loss", "no-train-loss"],
)
def test_an_unmarked_record_with_a_non_finite_loss_fails(results, change, expected):
    record = json.loads(_record(results).read_text())
    change(record)
    problems = check_record(record)
    assert any(expected in p for p in problems), problems
    assert any("not marked diverged" in p for p in problems) or "no train_loss" in expected


def test_an_old_diverged_record_fails_in_the_cli(results, capsys):
    path = _record(results)
    _edit(path, lambda r: r["metrics"]["rounds"][1].update(train_loss=None, global_loss=None))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {path}" in out and "not marked diverged" in out and "0 OK, 1 FAIL" in out


# ---------------------------------------------------------------- --rerun


def _consistent_edit(record: dict) -> None:
    """Better accuracy everywhere the last round's appears: every check of consistency still holds."""
    last = record["metrics"]["rounds"][-1]
    better = round(min(last["global_acc"] + 0.05, 1.0), 6) if last["global_acc"] < 1 else 0.5
    for block in (last, record["metrics"]["final"]["last"], record["metrics"]["final"]["best_val"] or {}):
        if block.get("round") == last["round"]:
            block["global_acc"] = better


def test_rerun_catches_a_consistent_hand_edit_that_plain_validate_passes(results, capsys):
    edited, untouched = _record(results), _record(results, "local")
    _edit(edited, _consistent_edit)
    _edit(edited, lambda r: r["provenance"]["machine"].update(torch_threads=64))  # as if made elsewhere
    assert main(["validate", str(results)]) == 0  # consistent: structure cannot tell
    capsys.readouterr()
    assert main(["validate", "--rerun", "all", str(results)]) == 1
    out = capsys.readouterr().out
    assert f"RERUN MISMATCH {edited}\n     - metrics.rounds[1].global_acc: the record has " in out
    assert "(the record was made on another machine (torch_threads differ)" in out  # why digits may differ
    assert f"RERUN OK       {untouched}" in out and "re-run: 1 OK, 1 MISMATCH, 0 SKIPPED" in out


def test_rerun_of_clean_records_passes_and_a_faked_divergence_does_not(results, capsys):
    assert main(["validate", "--rerun", "all", str(results)]) == 0
    assert "re-run: 2 OK, 0 MISMATCH, 0 SKIPPED" in capsys.readouterr().out
    path = _record(results)
    path.write_text(json.dumps(_diverged(json.loads(path.read_text()), 1), indent=1))
    assert main(["validate", "--rerun", "all", str(results)]) == 1
    out = capsys.readouterr().out
    assert f"DIVERGED {path}" in out and f"RERUN MISMATCH {path}" in out


def test_rerun_skips_a_record_of_other_code_and_says_so(results, capsys):
    path = _record(results)
    stale = _respec(json.loads(path.read_text()), method_version=99)
    path.unlink()
    moved = path.with_name(f"{stale['spec_hash']}.json")
    moved.write_text(json.dumps(stale, indent=1))
    foreign = _respec(json.loads(_record(results, "local").read_text()), method="from-a-plugin")
    (results / "blobs" / "from-a-plugin").mkdir()
    (results / "blobs" / "from-a-plugin" / f"{foreign['spec_hash']}.json").write_text(json.dumps(foreign))
    assert main(["validate", "--rerun", "all", str(results)]) == 0  # unverified is not failed
    out = capsys.readouterr().out
    assert f"RERUN SKIPPED  {moved} (stale code: spec {stale['spec_hash']} was made for" in out
    assert "RERUN SKIPPED" in out and "not registered here" in out and "--include" in out
    assert "re-run: 1 OK, 0 MISMATCH, 2 SKIPPED; SKIPPED records are unverified" in out


def test_rerun_sample_is_chosen_by_the_seed(results, capsys):
    from fedbench.board.rerun import choose_sample

    verdicts = validate_paths([results])
    picks = {seed: [v.path for v in choose_sample(verdicts, 1, seed)] for seed in range(12)}
    assert all(len(p) == 1 for p in picks.values())
    assert picks == {seed: [v.path for v in choose_sample(validate_paths([results]), 1, seed)] for seed in range(12)}
    assert {p[0] for p in picks.values()} == {v.path for v in verdicts}  # every record can be drawn
    assert [v.path for v in choose_sample(verdicts, None, 0)] == sorted(v.path for v in verdicts)
    assert main(["validate", "--rerun", "1", "--seed", "3", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.count("RERUN OK") == 1 and f"RERUN OK       {picks[3][0]}" in out


def test_rerun_arguments_are_checked(results, capsys):
    for bad in ("0", "-1", "some"):
        with pytest.raises(SystemExit) as exit_info:
            main(["validate", "--rerun", bad, str(results)])
        assert exit_info.value.code == 2 and "a number of records >= 1, or all" in capsys.readouterr().err
    assert main(["validate", "--seed", "3", str(results)]) == 2
    assert "give --rerun N too" in capsys.readouterr().err


def test_first_difference_names_the_first_differing_path():
    from fedbench.board.rerun import first_difference

    a = {"rounds": [{"acc": 0.5, "loss": 1.0}, {"acc": 0.6}], "total": 3}
    assert first_difference(a, json.loads(json.dumps(a)), "m") is None
    assert first_difference(a, {**a, "total": 3.0}, "m") == "m.total: the record has 3, the re-run 3.0"
    b = {"rounds": [{"acc": 0.5, "loss": 1.0}, {"acc": 0.61}], "total": 4}
    assert first_difference(a, b, "m") == "m.rounds[1].acc: the record has 0.6, the re-run 0.61"
    shorter = {**a, "rounds": a["rounds"][:1]}
    assert first_difference(a, shorter, "m") == "m.rounds: the record has 2 items, the re-run 1"
    assert first_difference(a, {**a, "extra": 1}, "m") == "m.extra: the record has nothing, the re-run 1"
