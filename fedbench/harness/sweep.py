"""Run a grid of specs (methods x tasks x seeds), resumably: ``fedbench sweep``.

The whole grid is resolved with :func:`fedbench.harness.run.resolve_spec` before anything runs, so a
bad option fails in the first second, not after an hour. A spec whose record already exists
at ``record_path`` (same ``spec_hash``) is skipped. The hash covers the method's class and
version, so a method whose version was bumped runs again: records of the older version (and
records of spec version 1, which name no version) lie under other hashes and are never taken
for the new one. Records are written atomically, so an interrupted sweep leaves only whole
records: running the same command again redoes the unfinished runs and nothing else.

``--set`` applies to every (method, task) pair. ``METHOD.KEY=V`` or ``TASK.KEY=V`` applies to
that method or task only (``--set fedprox.mu=0.01``); ``method.KEY`` / ``task.KEY`` keep their
usual meaning. An unscoped key that some pair does not declare is an error: scope it.

Executors:

- ``local``: one run after another in this process.
- ``ray``: one Ray remote task per run (``ray.init(address=...)`` joins a running cluster;
  without an address a local cluster with ``num_cpus`` CPUs is started). Workers return their
  record to this process, which writes it; workers need no access to ``results_dir``. They do
  need the task data, any ``--include`` file at the same path, and the package itself: on a
  multi-machine cluster that means a shared filesystem (or the same install and data paths on
  every node). Two sweeps writing into the same folder at once may run a spec twice (the
  second write replaces the first with an identical record); nothing is lost.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fedbench.harness.run as fb_run
from fedbench.core.results import check_writable, load_record, record_path, write_record
from fedbench.core.spec import RunSpec, parse_sets
from fedbench.errors import FedbenchError, ResultsError, SpecError

Executor = Literal["local", "ray"]


@dataclass
class SweepReport:
    """What a sweep did: paths of records written and skipped, and the runs that failed."""

    planned: list[RunSpec]
    skipped: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{len(self.planned)} runs planned: {len(self.skipped)} already recorded (skipped), "
                f"{len(self.written)} run now, {len(self.failed)} failed")
        for spec, why in self.failed:
            text += f"\n  FAILED {spec.method} on {spec.task} seed {spec.seed} ({spec.spec_hash}): {why}"
        return text


def _scoped_sets(sets: Sequence[str], method: str, task: str, names: set[str]) -> dict[str, str]:
    """The ``--set`` pairs that apply to one (method, task): unscoped ones plus those scoped to it."""
    out: dict[str, str] = {}
    for key, value in parse_sets(sets).items():
        scope, dot, rest = key.partition(".")
        if dot and scope in names:
            if scope == method:
                out[f"method.{rest}"] = value
            elif scope == task:
                out[f"task.{rest}"] = value
        else:
            out[key] = value
    return out


def plan(
    methods: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int],
    sets: Sequence[str] = (),
    rounds: int | None = None,
    backbone: str | None = None,
    *,
    sample: float | int = 1.0,
    eval_every: int = 1,
) -> list[RunSpec]:
    """Every spec of the grid, resolved and de-duplicated, in method, task, seed order.

    Every spec is resolved (options in range, task checks passed) before any runs: if some cannot
    be, one SpecError names each distinct problem and nothing has run.
    """
    if not methods or not tasks or not seeds:
        raise SpecError("a sweep needs at least one method, one task (--tasks) and one seed (--seeds)")
    names = set(methods) | set(tasks)
    specs: dict[str, RunSpec] = {}
    problems: dict[str, None] = {}  # distinct messages in grid order (one bad option fails every seed alike)
    for method, task in itertools.product(methods, tasks):
        pair_sets = _scoped_sets(sets, method, task, names)
        for seed in seeds:
            try:
                spec = fb_run.resolve_spec(method, task, backbone=backbone, seed=seed, rounds=rounds,
                                           sample=sample, sets=pair_sets, eval_every=eval_every)
            except SpecError as exc:
                hint = (f". In a sweep, --set {method}.KEY=V or --set {task}.KEY=V applies an option to one "
                        f"method or task only") if pair_sets and not str(exc).startswith("--seed") else ""
                problems.setdefault(f"{method} on {task}: {exc}{hint}")
                continue
            specs.setdefault(spec.spec_hash, spec)
    if len(problems) == 1:
        raise SpecError(next(iter(problems)))
    if problems:
        raise SpecError(f"{len(problems)} problems in the sweep's grid; nothing was run:\n  " + "\n  ".join(problems))
    return list(specs.values())


def is_recorded(spec: RunSpec, results_dir: str | Path) -> bool:
    """True when a whole record of exactly this spec (method version included) is already on disk."""
    path = record_path(results_dir, spec)  # named by spec_hash: another method version lies elsewhere
    if not path.is_file():
        return False
    try:
        return load_record(path).get("spec_hash") == spec.spec_hash
    except ResultsError:
        print(f"fedbench sweep: {path} is unreadable; it will be re-run", file=sys.stderr)
        return False


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit="run", disable=not show, leave=False)


def _label(spec: RunSpec) -> str:
    return f"{spec.method}/{spec.task}/seed{spec.seed}"


def _run_local(todo: list[RunSpec], results_dir: Path, report: SweepReport, cache_dir: str | Path | None,
               keep_going: bool, bar: Any) -> None:
    for spec in todo:
        bar.set_postfix_str(_label(spec))
        try:
            record = fb_run.execute(spec, results_dir, cache_dir=cache_dir)
        except Exception as exc:  # KeyboardInterrupt is not an Exception: it ends the sweep
            if not keep_going:
                raise
            report.failed.append((spec, f"{type(exc).__name__}: {exc}"))
        else:
            report.written.append(Path(record["path"]))
        bar.update(1)


def _ray_worker(spec_dict: dict[str, Any], includes: list[str], override: bool, cache_dir: str | None,
                threads: int) -> dict[str, Any]:
    """Runs inside a Ray worker: load plugins, run the spec, return its record (not written here)."""
    import torch

    from fedbench.core.registry import include

    for path in includes:
        include(path, override=override)
    torch.set_num_threads(max(1, threads))
    return fb_run.execute(RunSpec.from_dict(spec_dict), None, cache_dir=cache_dir)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FedbenchError(
            "--executor ray needs Ray, which is not installed: pip install 'fedbench[ray]'"
        ) from None
    return ray


def _run_ray(todo: list[RunSpec], results_dir: Path, report: SweepReport, cache_dir: str | Path | None,
             keep_going: bool, bar: Any, *, address: str | None, num_cpus: int | None, cpus_per_run: int,
             includes: Sequence[str], override: bool) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    worker = ray.remote(num_cpus=cpus_per_run, max_retries=0)(_ray_worker)
    incl = [str(Path(p).resolve()) for p in includes]
    cache = None if cache_dir is None else str(Path(cache_dir).resolve())
    pending = {worker.remote(s.to_dict(), incl, override, cache, cpus_per_run): s for s in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            bar.set_postfix_str(_label(spec))
            try:
                record = ray.get(ready[0])
            except Exception as exc:  # a RayTaskError wraps the worker's exception
                if not keep_going:
                    raise FedbenchError(f"{_label(spec)} failed in a Ray worker: {exc}") from exc
                report.failed.append((spec, f"{type(exc).__name__}: {exc}"))
            else:
                report.written.append(write_record(record, results_dir))
            bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def sweep(
    methods: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int],
    sets: Sequence[str] = (),
    rounds: int | None = None,
    backbone: str | None = None,
    results_dir: str | Path = "results",
    executor: Executor = "local",
    address: str | None = None,
    *,
    sample: float | int = 1.0,
    eval_every: int = 1,
    cache_dir: str | Path | None = None,
    keep_going: bool = False,
    num_cpus: int | None = None,
    cpus_per_run: int = 1,
    includes: Sequence[str | Path] = (),
    override: bool = False,
    progress: bool | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> SweepReport:
    """Run every spec of the grid that has no record yet; returns what was skipped, written, failed.

    ``KeyboardInterrupt`` stops the sweep (the run in flight leaves no record) and propagates;
    running the same sweep again resumes it. ``keep_going`` records a failed run and goes on;
    ``dry_run`` only reports what would run.
    """
    if executor not in ("local", "ray"):
        raise SpecError(f"--executor {executor}: choose local or ray")
    if executor == "ray":
        _import_ray()  # fail before resolving anything
    results = Path(results_dir)
    specs = plan(methods, tasks, seeds, sets, rounds, backbone, sample=sample, eval_every=eval_every)
    check_writable(results)
    report = SweepReport(planned=specs)
    todo = []
    for spec in specs:
        if is_recorded(spec, results):
            report.skipped.append(record_path(results, spec))
        else:
            todo.append(spec)
    log(f"fedbench sweep: {len(specs)} runs, {len(report.skipped)} already recorded in {results}, "
        f"{len(todo)} to run ({executor})")
    if dry_run:
        for spec in todo:
            log(f"  would run {_label(spec)} -> {record_path(results, spec)}")
        return report
    bar = _progress(len(todo), progress)
    try:
        if executor == "local":
            _run_local(todo, results, report, cache_dir, keep_going, bar)
        else:
            _run_ray(todo, results, report, cache_dir, keep_going, bar, address=address, num_cpus=num_cpus,
                     cpus_per_run=cpus_per_run, includes=[str(p) for p in includes], override=override)
    except KeyboardInterrupt:
        log(f"fedbench sweep: interrupted after {len(report.written)} of {len(todo)} runs; run the same "
            f"command again to resume (recorded runs are skipped)")
        raise
    finally:
        bar.close()
    log(report.summary())
    return report
