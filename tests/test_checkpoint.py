"""Checkpoint and resume: a run interrupted after any round and resumed writes the record an
uninterrupted run writes, for every method; damaged or foreign checkpoints are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedbench.errors import CheckpointError, SpecError
from fedbench.harness.run import checkpoint_path, execute, resolve_spec

# What a resumed run must reproduce exactly (timings and dates are not deterministic).
DETERMINISTIC = ("spec", "spec_hash", "partition", "comm", "metrics", "fidelity")


def deterministic(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: record[k] for k in DETERMINISTIC}
    out["diverged"] = record.get("diverged")
    out["fingerprints"] = (record["provenance"]["data_fingerprint"], record["provenance"].get("backbone_fingerprint"))
    return out


class Interrupt(KeyboardInterrupt):
    """Ctrl-C after a given round: the checkpoint of that round is on disk (it is written first)."""


def interrupt_after(round_: int):
    def on_round(record: dict[str, Any]) -> None:
        if record["round"] == round_:
            raise Interrupt
    return on_round


def interrupted_then_resumed(spec, results: Path, after: int, **kw) -> dict[str, Any]:
    with pytest.raises(Interrupt):
        execute(spec, results, on_round=interrupt_after(after), checkpoint_every=1, **kw)
    ckpt = checkpoint_path(results, spec)
    assert ckpt.is_file() and not list(results.rglob("*.json"))  # a checkpoint, no record yet
    record = execute(spec, results, resume=True, **kw)
    assert record["provenance"]["resumed_from_round"] == after
    assert not ckpt.exists()  # the record is whole: nothing is left to resume
    return record


def _specs(blobs_task: str) -> dict[str, Any]:
    return {
        # sample < 1: the client sampler's stream must be restored too
        "fedavg": resolve_spec("fedavg", blobs_task, rounds=4, sample=0.5),
        "fedprox": resolve_spec("fedprox", blobs_task, rounds=4, sets={"mu": "0.1"}),
        "local": resolve_spec("local", blobs_task, rounds=4),  # private client state
        "fedclip": resolve_spec("fedclip", blobs_task, backbone="tiny-clip", rounds=4, sample=0.5),
        "modality-broadcast": resolve_spec("modality-broadcast", blobs_task, backbone="tiny-clip", rounds=4,
                                           sets={"lora_layers": "3", "personal_layers": "2",
                                                 "text_lora_layers": "2"}),
    }


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "local", "fedclip", "modality-broadcast"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_record(blobs_task, tmp_path, method):
    spec = _specs(blobs_task)[method]
    whole = execute(spec, tmp_path / "whole", checkpoint_every=0)
    assert "resumed_from_round" not in whole["provenance"]
    resumed = interrupted_then_resumed(spec, tmp_path / "cut", after=2)
    assert deterministic(resumed) == deterministic(whole)
    assert len(resumed["timing"]["round_seconds"]) == len(whole["timing"]["round_seconds"]) == spec.rounds


def test_fedcmi_resumes_to_the_uninterrupted_record(tmp_path):
    spec = resolve_spec("fedcmi", "rotated-mnist-glimpse", backbone="digits-clip", rounds=3,
                        sets={"mode": "two-view", "samples_per_domain": "100"})
    cache = tmp_path / "cache"
    whole = execute(spec, tmp_path / "whole", cache_dir=cache, checkpoint_every=0)
    resumed = interrupted_then_resumed(spec, tmp_path / "cut", after=1, cache_dir=cache)
    assert deterministic(resumed) == deterministic(whole)


def test_fedmmkt_resumes_to_the_uninterrupted_record(tmp_path):
    pytest.importorskip("diffusers")
    from fedbench.models.digits_t2i import NAME
    from fedbench.models.pretrained import prepare

    generator = str(prepare(NAME, tmp_path / "t2i" / NAME, seed=0, quick=True, progress=False))
    sets = {"samples_per_domain": "60", "synth_per_class": "1", "sampling_steps": "2", "eval_per_class": "1",
            "generator_steps": "1", "local_epochs": "1", "distill_steps": "3", "generator": generator}
    spec = resolve_spec("fedmmkt", "rotated-mnist", backbone="digits-clip", rounds=3, sets=sets)
    cache = tmp_path / "cache"
    whole = execute(spec, tmp_path / "whole", cache_dir=cache, checkpoint_every=0)
    resumed = interrupted_then_resumed(spec, tmp_path / "cut", after=1, cache_dir=cache)
    assert deterministic(resumed) == deterministic(whole)


def test_checkpoints_follow_every_k_rounds_and_never_with_zero(blobs_task, tmp_path):
    spec = resolve_spec("fedavg", blobs_task, rounds=5)
    seen: list[int] = []

    def note(record: dict[str, Any]) -> None:
        ckpt = checkpoint_path(tmp_path / "k", spec)
        if ckpt.is_file():
            head = ckpt.read_bytes().split(b"\n", 2)[1]
            seen.append(json.loads(head)["round"])
    execute(spec, tmp_path / "k", on_round=note, checkpoint_every=2)
    assert sorted(set(seen)) == [2, 4]  # none after the last round: the record follows at once
    seen.clear()
    execute(spec, tmp_path / "k", on_round=note, checkpoint_every=0)
    assert seen == []
    with pytest.raises(SpecError, match="--checkpoint-every"):
        execute(spec, tmp_path / "k", checkpoint_every=-1)


def test_resume_without_a_checkpoint_starts_over(blobs_task, tmp_path):
    spec = resolve_spec("fedavg", blobs_task, rounds=2)
    record = execute(spec, tmp_path, resume=True)
    assert "resumed_from_round" not in record["provenance"] and len(record["metrics"]["rounds"]) == 2


def _leave_checkpoint(spec, results: Path) -> Path:
    with pytest.raises(Interrupt):
        execute(spec, results, on_round=interrupt_after(1), checkpoint_every=1)
    return checkpoint_path(results, spec)


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "not-a-checkpoint", "empty", "header-edited"])
def test_a_damaged_checkpoint_is_refused_before_unpickling(blobs_task, tmp_path, damage):
    spec = resolve_spec("fedavg", blobs_task, rounds=3)
    ckpt = _leave_checkpoint(spec, tmp_path)
    data = ckpt.read_bytes()
    if damage == "truncated":
        data = data[: len(data) - 10]
    elif damage == "flipped-byte":
        data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    elif damage == "not-a-checkpoint":
        data = b"just some text\n"
    elif damage == "empty":
        data = b""
    else:  # a header naming another round than the body holds
        data = data.replace(b'"round": 1', b'"round": 2', 1)
    ckpt.write_bytes(data)
    with pytest.raises(CheckpointError, match="without --resume") as info:
        execute(spec, tmp_path, resume=True)
    assert str(ckpt) in str(info.value)
    assert damage != "header-edited" or "another" in str(info.value) or "damaged" in str(info.value)


def test_a_checkpoint_of_other_data_is_refused(blobs_task, tmp_path):
    spec = resolve_spec("fedavg", blobs_task, rounds=3)
    ckpt = _leave_checkpoint(spec, tmp_path)
    head, body = ckpt.read_bytes().split(b"\n", 2)[1:]
    header = json.loads(head)
    header["data_fingerprint"] = "0" * 16
    ckpt.write_bytes(b"fedbench-checkpoint 1\n" + json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(CheckpointError, match="another data_fingerprint"):
        execute(spec, tmp_path, resume=True)


def test_an_unwritable_checkpoint_warns_and_the_run_finishes(blobs_task, tmp_path, monkeypatch):
    from fedbench.federation import checkpoint as module

    def full_disk(*args: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(module, "atomic_write_bytes", full_disk)
    spec = resolve_spec("fedavg", blobs_task, rounds=3)
    with pytest.warns(module.CheckpointWarning, match="No space left"):
        record = execute(spec, tmp_path, checkpoint_every=1)
    assert deterministic(record) == deterministic(execute(spec, None))


# ----------------------------------------------------------------- kill -9 of a real process


def _checkpoint_round(path: Path) -> int:
    try:
        return int(json.loads(path.read_bytes().split(b"\n", 2)[1])["round"])
    except (OSError, IndexError, ValueError, KeyError):
        return -1  # renamed away between listing and reading


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_kill_9_then_resume_gives_the_uninterrupted_record(blobs_task, tmp_path):
    plugin = Path(__file__).parent / "plugins" / "blobs_task.py"
    base = [sys.executable, "-m", "fedbench.cli.main", "run", "fedavg", blobs_task, "--include", str(plugin),
            "--rounds", "12", "--sample", "0.5", "--checkpoint-every", "1", "--results-dir"]
    env = {**os.environ, "FEDBENCH_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*base, str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # Kill as soon as a checkpoint of round 2 or later is on disk: the kill lands mid-run, often
    # while the next checkpoint is being written, which the atomic rename must survive.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list(cut.rglob("*.ckpt"))
        if ckpts and _checkpoint_round(ckpts[0]) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(cut.rglob("*.json")) and list(cut.rglob("*.ckpt"))
    resumed = subprocess.run([*base, str(cut), "--resume", "--json"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*base, str(tmp_path / "whole"), "--json"], capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr
    a, b = (json.loads(p.stdout[p.stdout.index("{"):]) for p in (resumed, whole))
    assert 2 <= a["provenance"]["resumed_from_round"] < 12
    assert deterministic(a) == deterministic(b)
    assert not list(cut.rglob("*.ckpt"))
