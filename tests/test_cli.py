from __future__ import annotations

import json
import os

import pytest

from fedbench.cli.main import main

FAST = ["--rounds", "1", "--set", "local_epochs=1"]


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_run_writes_one_record_and_prints_a_table(blobs_task, tmp_path, capsys):
    assert main(["run", "fedavg", blobs_task, *FAST, "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "global acc % (last round)" in out and "bytes per round up / down" in out
    records = _files(tmp_path)
    assert len(records) == 1 and records[0].parent.parent.name == blobs_task
    assert json.loads(records[0].read_text())["spec"]["method"] == "fedavg"
    umask = os.umask(0)
    os.umask(umask)
    assert records[0].stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_run_json_and_show(blobs_task, tmp_path, capsys):
    assert main(["run", "fedprox", blobs_task, *FAST, "--results-dir", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["spec"]["method"] == "fedprox"
    assert main(["show", record["path"]]) == 0
    assert record["spec_hash"] in capsys.readouterr().out


def test_list_methods_shows_fidelity_and_source(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "reproduction" in out and "McMahan" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "fedavgg", "blobs"], "Did you mean 'fedavg'"),
        (["run", "fedavg", "blobz"], "unknown task 'blobz'"),
        (["run", "fedavg", "blobs", "--set", "nosuch=1"], "unknown option"),
        (["run", "fedavg", "blobs", "--set", "lr=abc"], "expected a number"),
        (["run", "fedavg", "blobs", "--rounds", "0"], "--rounds 0: must be >= 1"),
        (["run", "fedavg", "blobs", "--set", "alpha=0"], "alpha must be > 0"),
        (["run", "fedavg", "blobs", "--clients", "1000"], "clients"),
        (["run", "zero-shot", "blobs", "--backbone", "tiny-clipp"], "Did you mean 'tiny-clip'"),
        (["run", "fedavg", "mnist-dirichlet", "--set", "data_dir=/no/such/folder"], "data_dir"),
        (["run", "fedavg", "cifar10-dirichlet", "--set", "data_dir=/no/such/folder"], "data_dir"),
        (["show", "no/such/record.json"], "no record at"),
    ],
)
def test_bad_input_exits_2_with_the_fix_and_writes_nothing(blobs_task, tmp_path, capsys, argv, message):
    results = tmp_path / "results"
    code = main([*argv, "--results-dir", str(results)] if argv[0] == "run" else argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not results.exists() or _files(results) == []


def test_unwritable_results_dir_fails_before_running(blobs_task, tmp_path, capsys):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    assert main(["run", "fedavg", blobs_task, *FAST, "--results-dir", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_a_crashed_run_leaves_no_record(blobs_task, tmp_path, monkeypatch):
    import fedbench.harness.run as run_module

    def boom(*args, **kwargs):
        raise RuntimeError("crash mid-run")

    monkeypatch.setattr(run_module, "run_federation", boom)
    with pytest.raises(RuntimeError):
        main(["run", "fedavg", blobs_task, *FAST, "--results-dir", str(tmp_path)])
    assert _files(tmp_path) == []


def test_record_write_is_atomic(tmp_path, monkeypatch):
    from fedbench.core import results

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError):
        results.atomic_write_text(tmp_path / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []
