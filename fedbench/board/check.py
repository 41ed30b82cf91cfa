"""Regression check: re-run a fixed small suite and compare with stored references.

``fedbench check`` runs every case of the suite (offline data, a tiny or offline backbone, a
few rounds, seconds each) and compares the fresh record with the reference record stored at
``results/ci/<task>/<method>/<spec_hash>.json``: every value in ``metrics.final``, every
per-round metric, the communication totals and the data fingerprint.

Tolerances (stated in the output). On one machine a run reproduces exactly; across machines
float reductions differ in the last bits and a few test examples can flip, so:

- accuracies and other scores: absolute ``tol`` (default 0.02, i.e. 2 points); one client's
  accuracy: ``tol`` or one of its test samples, whichever is larger (a client with 49 test
  images moves in steps of 0.0204, so one near-tie flipping is a step beyond 0.02);
- losses: relative ``loss_tol`` (default 5%);
- bytes, message counts, parameter counts, round numbers, sampled clients, the data
  fingerprint: exact (the channel measures bytes, the spec fixes the sampling);
- the best-validation round may move only to a round whose reference validation accuracy
  is within ``tol`` of the best (a near-tie, not a regression).

A case whose method or task is not registered here is skipped with a note (the suite names
every built-in; some arrive later). A missing reference fails: ``fedbench check --update``
writes references for the cases that ran and removes the suite's stale ones (older spec
hashes of the same task and method), printing what changed.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedbench.harness.run as fb_run
from fedbench.core.results import load_record, record_path, write_record
from fedbench.core.spec import RunSpec
from fedbench.errors import FedbenchError, UnknownNameError


@dataclass(frozen=True)
class Case:
    """One run of a suite: what ``fedbench run METHOD TASK --set ... --rounds R`` would run."""

    method: str
    task: str
    sets: tuple[str, ...] = ()
    rounds: int = 2
    backbone: str | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.method} on {self.task}"

    def spec(self) -> RunSpec:
        return fb_run.resolve_spec(self.method, self.task, backbone=self.backbone, seed=self.seed,
                                   rounds=self.rounds, sets=list(self.sets))


# Small enough for seconds per case, large enough that the numbers are well above chance, so a
# regression shows (NIID-Bench protocol otherwise).
_MNIST_SMALL = ("max_train=3000", "max_test=500")
_ROTATED_SMALL = ("samples_per_domain=300",)
# The digits dual encoder's learned temperature (about 14) leaves FedCLIP's contrastive loss nearly
# flat; CLIP's 100 (what the released code reads off OpenAI CLIP) and lr 1e-3 make three rounds move.
_FEDCLIP_FAST = (*_ROTATED_SMALL, "lr=0.001", "logit_scale=100")

# The real digits-t2i generator, a tenth of its default synthetic set and two sampling steps: seconds.
_FEDMMKT_FAST = ("synth_per_class=1", "sampling_steps=2", "eval_per_class=1", "generator_steps=1", "local_epochs=2")

SUITES: dict[str, list[Case]] = {
    "ci": [
        Case("fedavg", "mnist-dirichlet", _MNIST_SMALL, rounds=3),
        Case("fedprox", "mnist-dirichlet", _MNIST_SMALL, rounds=3),
        Case("local", "mnist-dirichlet", _MNIST_SMALL, rounds=3),
        Case("zero-shot", "rotated-mnist", _ROTATED_SMALL, rounds=1, backbone="digits-clip"),
        Case("fedclip", "rotated-mnist", _FEDCLIP_FAST, rounds=3, backbone="digits-clip"),
        Case("modality-broadcast", "rotated-mnist", _ROTATED_SMALL, rounds=3, backbone="digits-clip"),
        Case("fedcmi", "rotated-mnist-glimpse", (*_ROTATED_SMALL, "mode=two-view"), rounds=3, backbone="digits-clip"),
        Case("fedmmkt", "rotated-mnist", (*_ROTATED_SMALL, *_FEDMMKT_FAST), rounds=2, backbone="digits-clip"),
    ],
}
REFERENCE_FOLDER = "ci"


@dataclass(frozen=True)
class Tolerance:
    acc: float = 0.02  # absolute, for accuracies and any other float score
    loss: float = 0.05  # relative, for losses

    def describe(self) -> str:
        return (f"tolerances: accuracies and other scores ±{self.acc:g} absolute (--tol; a client's accuracy "
                f"may also move by one of its test samples); losses ±{self.loss:.0%} "
                f"relative (--loss-tol); bytes, message and parameter counts, rounds, sampled clients and the "
                f"data fingerprint exact")


@dataclass
class Diff:
    key: str
    reference: Any
    now: Any
    allowed: str  # "exact", "±0.02", "±5%", "near-tie"
    moved: bool  # beyond tolerance


@dataclass
class CaseResult:
    case: Case
    status: str  # ok | moved | missing | error | skipped | updated | unchanged | new
    spec_hash: str = ""
    diffs: list[Diff] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("moved", "missing", "error")


# ------------------------------------------------------------------------------------------
# A fresh record against its reference
# ------------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(value[k], f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        for i, x in enumerate(value):
            _flatten(x, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value
    return out


def comparable(record: Mapping[str, Any]) -> dict[str, Any]:
    """The values a check compares, flattened to ``path -> value``."""
    rounds = {f"round {r.get('round')}": {k: v for k, v in r.items() if k != "round"}
              for r in record["metrics"]["rounds"]}
    comm = {k: record["comm"].get(k) for k in ("up_bytes", "down_bytes", "up_messages", "down_messages")}
    data = {"data_fingerprint": (record.get("provenance") or {}).get("data_fingerprint")}
    return _flatten({"final": record["metrics"]["final"], "rounds": rounds, "comm": comm, "provenance": data},
                    "", {})


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1].split("[", 1)[0]


def _is_exact(key: str, ref: Any, now: Any) -> bool:
    leaf = _leaf(key)
    if any(w in leaf for w in ("bytes", "messages", "params", "fingerprint")) or leaf in ("rounds_run", "clients"):
        return True
    return not (isinstance(ref, float) or isinstance(now, float))


def _near_tie(reference: Mapping[str, Any], best_round: Any, tol: float) -> bool:
    vals = {r.get("round"): r.get("val_acc") for r in reference["metrics"]["rounds"]}
    best, other = vals.get(reference["metrics"]["final"].get("best_val_round")), vals.get(best_round)
    return isinstance(best, (int, float)) and isinstance(other, (int, float)) and best - other <= tol


def diff_against_reference(reference: Mapping[str, Any], now: Mapping[str, Any], tol: Tolerance) -> list[Diff]:
    """Every value of ``now`` that differs from ``reference``, each marked moved (beyond tolerance) or not."""
    ref_flat, now_flat = comparable(reference), comparable(now)
    diffs = []
    for key in sorted(set(ref_flat) | set(now_flat)):
        a, b = ref_flat.get(key, "(absent)"), now_flat.get(key, "(absent)")
        if a == b:
            continue
        if key not in ref_flat:  # a metric added since the reference: reported, not a regression
            diffs.append(Diff(key, a, b, "new", False))
        elif key not in now_flat or a is None or b is None or isinstance(a, (str, bool)) or isinstance(b, (str, bool)):
            diffs.append(Diff(key, a, b, "exact", True))
        elif key in ("final.best_val_round", "final.best_val.round"):
            diffs.append(Diff(key, a, b, "near-tie", not _near_tie(reference, b, tol.acc)))
        elif _is_exact(key, a, b):
            diffs.append(Diff(key, a, b, "exact", True))
        elif "loss" in _leaf(key):
            diffs.append(Diff(key, a, b, f"±{tol.loss:.0%}", not math.isclose(a, b, rel_tol=tol.loss, abs_tol=1e-6)))
        elif (one := _one_sample(reference, key)) > tol.acc:
            # A client's accuracy moves in steps of one test sample: on another CPU a near-tie
            # logit may fall the other way, so one step is float noise, not a regression.
            diffs.append(Diff(key, a, b, "±1 sample", abs(a - b) > one + 1e-9))
        else:
            diffs.append(Diff(key, a, b, f"±{tol.acc:g}", abs(a - b) > tol.acc + 1e-12))
    return diffs


def _one_sample(reference: Mapping[str, Any], key: str) -> float:
    """1 / (client i's test count) for a ``client_acc[i]`` entry, else 0."""
    match = re.search(r"client_acc\[(\d+)\]$", key)
    sizes = (reference.get("partition") or {}).get("split_sizes") or []
    if not match or int(match.group(1)) >= len(sizes):
        return 0.0
    test = (sizes[int(match.group(1))] or {}).get("test") or 0
    return 1.0 / test if test else 0.0


# ------------------------------------------------------------------------------------------
# Running the suite
# ------------------------------------------------------------------------------------------


def _stale_references(ref_dir: Path, spec: RunSpec) -> list[Path]:
    folder = ref_dir / spec.task / spec.method
    return sorted(p for p in folder.glob("*.json") if p.stem != spec.spec_hash) if folder.is_dir() else []


def check_case(case: Case, ref_dir: Path, tol: Tolerance, *, update: bool = False,
               cache_dir: str | Path | None = None) -> CaseResult:
    t0 = time.perf_counter()
    try:
        spec = case.spec()
    except UnknownNameError as exc:
        return CaseResult(case, "skipped", note=f"not registered here ({str(exc).split('.')[0]})")
    except FedbenchError as exc:
        return CaseResult(case, "error", note=f"the suite's spec does not resolve: {exc}")
    try:
        record = fb_run.execute(spec, None, cache_dir=cache_dir)
    except Exception as exc:  # a crash is a failed check, reported with the others
        return CaseResult(case, "error", spec.spec_hash, note=f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    path = record_path(ref_dir, spec)
    stale = _stale_references(ref_dir, spec)
    reference = load_record(path) if path.is_file() else None
    diffs = diff_against_reference(reference, record, tol) if reference is not None else []
    if update:
        record.pop("path", None)
        if reference is not None and not diffs:
            status, note = "unchanged", ""
        else:
            write_record(record, ref_dir)
            status = "updated" if reference is not None else "new"
            note = f"wrote {path}"
        for old in stale:
            old.unlink()
            note += f"; removed stale {old.name}"
        return CaseResult(case, status, spec.spec_hash, diffs, note.strip("; "), seconds)
    if reference is None:
        hint = (f" (references with other spec hashes exist: {', '.join(p.stem for p in stale)}: the spec changed, "
                f"e.g. a default)" if stale else "")
        return CaseResult(case, "missing", spec.spec_hash, note=f"no reference at {path}{hint}; "
                          f"run `fedbench check --update` and commit {ref_dir}", seconds=seconds)
    status = "moved" if any(d.moved for d in diffs) else "ok"
    return CaseResult(case, status, spec.spec_hash, diffs, seconds=seconds)


def run_check(
    cases: Sequence[Case],
    ref_dir: str | Path,
    tol: Tolerance = Tolerance(),
    *,
    update: bool = False,
    cache_dir: str | Path | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    out = []
    for case in cases:
        result = check_case(case, Path(ref_dir), tol, update=update, cache_dir=cache_dir)
        if on_case:
            on_case(result)
        out.append(result)
    return out


def _short(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def report(results: Sequence[CaseResult], tol: Tolerance, *, update: bool = False, verbose: bool = False) -> str:
    """The summary table, then what moved (or, with ``update`` / ``verbose``, everything that changed)."""
    from tabulate import tabulate

    lines = [tol.describe(), ""]
    lines.append(tabulate([(r.case.name, r.status, r.spec_hash or "-", f"{r.seconds:.1f}", r.note) for r in results],
                          headers=["case", "status", "spec hash", "s", "note"], tablefmt="simple"))
    rows = []
    for r in results:
        for d in r.diffs:
            if d.moved or update or verbose:
                delta = d.now - d.reference if all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in (d.now, d.reference)) else ""
                rows.append((r.case.name, d.key, _short(d.reference), _short(d.now), _short(delta), d.allowed,
                             "MOVED" if d.moved else "within"))
    if rows:
        lines += ["", "changed" if update else "moved" if not verbose else "differences", ""]
        lines.append(tabulate(rows, headers=["case", "value", "reference", "now", "delta", "allowed", ""],
                              tablefmt="simple", disable_numparse=True))
    failed = [r for r in results if r.failed]
    lines.append("")
    if all(r.status == "skipped" for r in results):
        lines.append("FAILED: no case of the suite could run here (every method or task is missing)")
    elif update:
        lines.append(f"{sum(r.status in ('updated', 'new') for r in results)} references written, "
                     f"{sum(r.status == 'unchanged' for r in results)} unchanged, {len(failed)} errors")
    elif failed:
        lines.append(f"FAILED: {len(failed)} of {len(results)} cases. If a change is intended, run "
                     f"`fedbench check --update` and commit the new references with it.")
    else:
        lines.append(f"OK: {sum(r.status == 'ok' for r in results)} cases match their references "
                     f"({sum(r.status == 'skipped' for r in results)} skipped)")
    return "\n".join(lines)


def check(suite: str = "ci", results_dir: str | Path = "results", tol: Tolerance = Tolerance(), *,
          update: bool = False, cache_dir: str | Path | None = None, verbose: bool = False,
          log: Callable[[str], None] = print) -> int:
    """``fedbench check``: run the suite, print the report; 0 when nothing moved, else 1."""
    if suite not in SUITES:
        raise FedbenchError(f"--suite {suite}: unknown suite; known: {', '.join(sorted(SUITES))}")
    ref_dir = Path(results_dir) / REFERENCE_FOLDER

    def progress(r: CaseResult) -> None:
        log(f"  {r.case.name}: {r.status}" + (f" ({r.note})" if r.status in ("skipped", "error") else ""))

    # One intra-op thread: float reductions then run in the same order on every machine, whatever
    # its core count, so references made on one machine reproduce on another.
    import torch

    torch.set_num_threads(1)
    log(f"fedbench check: suite {suite!r}, references in {ref_dir}" + (" (updating)" if update else ""))
    results = run_check(SUITES[suite], ref_dir, tol, update=update, cache_dir=cache_dir, on_case=progress)
    log(report(results, tol, update=update, verbose=verbose))
    nothing_ran = all(r.status == "skipped" for r in results)
    return 1 if nothing_ran or any(r.failed for r in results) else 0
