"""A run whose loss turns non-finite stops, is recorded as diverged, is reported DIVERGED by
validate and makes `fedbench run` exit 2; it never stands as a normal number."""

from __future__ import annotations

import math

import pytest

from fedbench.board.validate import validate_file
from fedbench.cli.main import main
from fedbench.federation.engine import divergence
from fedbench.harness.run import execute, resolve_spec


@pytest.mark.parametrize("record, train_loss, expected", [
    ({}, math.nan, "train loss is nan"),
    ({}, math.inf, "train loss is inf"),
    ({}, -math.inf, "train loss is -inf"),
    ({"global_acc": 0.1, "global_loss": None}, 0.5, "test loss is not finite"),
    ({"global_acc": 0.1, "global_loss": 2.3}, 0.5, None),
    ({}, None, None),  # a method that reports no training loss
    ({"global_acc": None, "global_loss": None}, 0.5, None),  # a round without evaluation
])
def test_divergence_names_the_non_finite_loss(record, train_loss, expected):
    assert divergence(record, train_loss) == expected


def test_a_diverged_run_stops_and_is_recorded_diverged(blobs_task, tmp_path):
    # eval_every 5: the diverged round is evaluated anyway, so the record shows what broke.
    spec = resolve_spec("fedavg", blobs_task, rounds=5, eval_every=5, sets={"lr": "1e6"})
    record = execute(spec, tmp_path)
    rounds = record["metrics"]["rounds"]
    assert record["diverged"] == {"round": len(rounds), "reason": "train loss is nan"}
    assert len(rounds) < spec.rounds  # stopped: no further rounds of a broken model
    assert rounds[-1]["train_loss"] is None and "global_acc" in rounds[-1]
    verdict = validate_file(record["path"])
    assert verdict.problems == [] and verdict.status == "DIVERGED"
    healthy = execute(resolve_spec("fedavg", blobs_task, rounds=2), None)
    assert "diverged" not in healthy and len(healthy["metrics"]["rounds"]) == 2


def test_the_cli_writes_the_record_and_exits_2(blobs_task, tmp_path, capsys):
    code = main(["run", "fedavg", blobs_task, "--rounds", "3", "--set", "lr=1e6", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "diverged at round 1 (train loss is nan)" in err and "--set lr=" in err
    records = list(tmp_path.rglob("*.json"))
    assert len(records) == 1 and str(records[0]) in err
