"""Re-run records and compare: the check that a consistent hand edit cannot pass.

:mod:`fedbench.board.validate` checks a record's structure, internal consistency and code identity;
a metric changed everywhere it appears passes those. ``fedbench validate --rerun N|all [--seed S]``
runs the specs of a deterministic sample of the records that pass again (nothing is written) and
compares their deterministic blocks (``spec_hash``, the data and backbone fingerprints,
``partition``, ``comm``, ``metrics``, ``diverged``) exactly, naming the first path that differs.
A record whose method code no longer matches this installation (another ``method_class`` or
``method_version``), or whose method, task, data or weights are not here, cannot be re-run: it is
reported SKIPPED, never silently passed and never failed. The comparison is exact: a record made
on a machine whose CPU kernels, thread count or device differ may differ in the last digits (the
mismatch line says when the machines differ).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbench.board.validate import Validation
from fedbench.core.spec import RunSpec
from fedbench.errors import FedbenchError, SpecError, UnknownNameError

# What a re-run must reproduce exactly, in the order a difference is looked for: the first one
# found usually explains the rest (other data -> other partition -> other metrics).
RERUN_FIELDS: tuple[tuple[str, ...], ...] = (
    ("spec_hash",), ("provenance", "data_fingerprint"), ("provenance", "backbone_fingerprint"), ("partition",),
    ("comm",), ("metrics", "rounds"), ("metrics", "final"), ("metrics",), ("diverged",),
)
_ABSENT = object()


@dataclass
class Rerun:
    """The verdict of re-running one record's spec: OK, MISMATCH or SKIPPED (with why)."""

    path: Path
    status: str
    detail: str = ""


def choose_sample(verdicts: list[Validation], n: int | None, seed: int) -> list[Validation]:
    """``n`` of the records that passed (OK or DIVERGED), chosen by ``seed`` (all when ``n`` is None
    or at least their number); the same records for the same files and seed, in path order."""
    candidates = sorted((v for v in verdicts if v.record is not None and not v.problems), key=lambda v: str(v.path))
    if n is not None and n < len(candidates):
        candidates = sorted(random.Random(seed).sample(candidates, n), key=lambda v: str(v.path))
    return candidates


def _field(record: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = record
    for key in keys:
        value = value.get(key, _ABSENT) if isinstance(value, dict) else _ABSENT
    return value


def _short(value: Any) -> str:
    return "nothing" if value is _ABSENT else f"{json.dumps(value, sort_keys=True)[:80]}"


def first_difference(recorded: Any, rerun: Any, where: str) -> str | None:
    """The first place where two JSON values differ (dict keys in sorted order, lists by index),
    as ``where.path: the record has X, the re-run Y``; None when they are identical (types included)."""
    if isinstance(recorded, dict) and isinstance(rerun, dict):
        for key in sorted(set(recorded) | set(rerun), key=str):
            diff = first_difference(recorded.get(key, _ABSENT), rerun.get(key, _ABSENT), f"{where}.{key}")
            if diff:
                return diff
        return None
    if isinstance(recorded, list) and isinstance(rerun, list):
        for i, (a, b) in enumerate(zip(recorded, rerun, strict=False)):  # lengths are compared below
            diff = first_difference(a, b, f"{where}[{i}]")
            if diff:
                return diff
        if len(recorded) != len(rerun):
            return f"{where}: the record has {len(recorded)} items, the re-run {len(rerun)}"
        return None
    if type(recorded) is type(rerun) and recorded == rerun:
        return None
    return f"{where}: the record has {_short(recorded)}, the re-run {_short(rerun)}"


def _machine_note(recorded: Mapping[str, Any], rerun: Mapping[str, Any]) -> str:
    """Why exact digits may legitimately differ: the record was made on other CPU kernels, thread
    count or device, or by another commit of the code."""
    here, there = rerun.get("provenance", {}), recorded.get("provenance")
    if not isinstance(there, dict):
        return ""
    machine_there = there.get("machine") if isinstance(there.get("machine"), dict) else {}
    differ = [k for k in ("cpu_capability", "cpu_flags", "torch_threads")
              if machine_there.get(k) != here["machine"].get(k)]
    differ += ["device"] if there.get("device") != here.get("device") else []
    notes = []
    if differ:
        notes.append(f"the record was made on another machine ({', '.join(differ)} differ), where the last digits of a "
                     f"metric may differ: re-run it there to be sure")
    if there.get("git_commit") != here.get("git_commit"):
        notes.append(f"the record was made by commit {there.get('git_commit')}, this is {here.get('git_commit')}: a "
                     f"change that moves numbers must bump the method's version")
    return f" ({'; '.join(notes)})" if notes else ""


def rerun_record(verdict: Validation, cache_dir: str | Path | None = None) -> Rerun:
    """Run the record's spec again (nothing is written) and compare its deterministic blocks."""
    from fedbench.harness.run import check_code_identity, execute

    record = verdict.record
    assert record is not None  # choose_sample passes only records that loaded
    spec = RunSpec.from_dict(record["spec"])
    try:
        check_code_identity(spec)
    except UnknownNameError as exc:
        return Rerun(verdict.path, "SKIPPED", f"not registered here: {exc} (load its plugin with --include PATH)")
    except SpecError as exc:
        return Rerun(verdict.path, "SKIPPED", f"stale code: {exc}")
    try:
        fresh = execute(spec, results_dir=None, cache_dir=cache_dir)
    except UnknownNameError as exc:  # the task (or backbone) comes from a plugin not loaded here
        return Rerun(verdict.path, "SKIPPED", f"not registered here: {exc} (load its plugin with --include PATH)")
    except FedbenchError as exc:  # its data or weights are not here: nothing was compared
        return Rerun(verdict.path, "SKIPPED", f"cannot run here: {exc}")
    fresh = json.loads(json.dumps(fresh))  # as it would read back from a file (tuples -> lists)
    for keys in RERUN_FIELDS:
        diff = first_difference(_field(record, keys), _field(fresh, keys), ".".join(keys))
        if diff:
            return Rerun(verdict.path, "MISMATCH", diff + _machine_note(record, fresh))
    return Rerun(verdict.path, "OK")


def print_reruns(sample: list[Validation], total: int, seed: int, cache_dir: str | Path | None = None) -> int:
    """Re-run each sampled record, one line each as it finishes; returns 1 on any MISMATCH."""
    print(f"re-running {len(sample)} of {total} valid records (sample seed {seed}); records that FAIL are not "
          f"re-run", flush=True)
    outcomes = []
    for verdict in sample:
        outcome = rerun_record(verdict, cache_dir)
        outcomes.append(outcome)
        if outcome.status == "MISMATCH":
            print(f"RERUN MISMATCH {outcome.path}\n     - {outcome.detail}", flush=True)
        elif outcome.status == "SKIPPED":
            print(f"RERUN SKIPPED  {outcome.path} ({outcome.detail})", flush=True)
        else:
            print(f"RERUN OK       {outcome.path}", flush=True)
    statuses = [o.status for o in outcomes]
    print("re-run: " + ", ".join(f"{statuses.count(s)} {s}" for s in ("OK", "MISMATCH", "SKIPPED"))
          + ("; SKIPPED records are unverified" if "SKIPPED" in statuses else ""))
    return 1 if "MISMATCH" in statuses else 0
