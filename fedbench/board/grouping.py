"""From records to the board: which records share a row, which rows share a table, in what order.

- Only valid records count (:func:`fedbench.board.validate.check_record`, location included); the
  rest are listed, never silently used. ``results/ci/`` holds the regression suite's
  reference records (``fedbench check``), a separate suite on purpose-small data: it is left
  out unless ``include_ci`` (so the task name ``ci`` is reserved).
- A row is one protocol: the whole spec except the seed (method and its options, the method's
  code identity, task and its options, backbone, rounds, clients per round, evaluation interval).
  Its hash is the ``protocol`` column. Records that differ in anything but the seed are never
  averaged: in particular records of another method class or method version (a spec of version 2
  names both; a spec of version 1 names neither and so never shares a row with a version-2 one).
- A table is one task protocol (task, task options, rounds, clients per round). Rows that
  train nothing (zero-shot: ``rounds_run == 0``) appear in every table of their task with
  the same task options, since rounds and sampling do not touch them.
- The headline is held-out domain accuracy (mean over held-out domains) where the task has
  held-out domains, else global-model test accuracy, else the mean client accuracy (methods
  without a global model). The column ``headline`` names which one each row uses; rows are
  ranked only against rows with the same headline metric.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedbench.board.published import published_rows, task_published
from fedbench.board.rows import STAT_NAMES, Board, Row, Table
from fedbench.board.stats import summarize
from fedbench.board.validate import Validation, record_files, validate_file
from fedbench.core import metrics as m
from fedbench.core.hashing import json_digest
from fedbench.core.registry import METHODS, TASKS
from fedbench.core.spec import UNVERSIONED

CI_FOLDER = "ci"
# Ablation runs (results/ablations/) are read by their own tables in benchmarks/, not ranked here.
ABLATIONS_FOLDER = "ablations"
HASH_DIGITS = 12  # of the protocol and table ids shown on the board
HEADLINES = ("heldout_acc_mean", "global_acc", "client_acc_mean")  # in order of preference
_HEADLINE_METRICS = {name: (m.BUILTIN_METRICS[name], m.BUILTIN_METRICS[name].at_best_val()) for name in HEADLINES}
UNKNOWN_COMMIT = "unknown"


def protocol_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A row's protocol, the key that decides which records are averaged: the spec without its seed.

    It keeps ``spec_version``, ``method_class`` and ``method_version``, so records of other
    method code never share a row.
    """
    return {k: v for k, v in spec.items() if k != "seed"}


def protocol_hash(spec: Mapping[str, Any]) -> str:
    return json_digest(protocol_of(spec), HASH_DIGITS)


def headline_metric(record: Mapping[str, Any]) -> str:
    """The first of :data:`HEADLINES` the record's last round reports."""
    for name in HEADLINES:
        if _HEADLINE_METRICS[name][0].read(record) is not None:
            return name
    return "client_acc_mean"


def short_commit(commit: str | None) -> str:
    """``"2846e16f0a…-dirty"`` -> ``"2846e16f-dirty"``; :data:`UNKNOWN_COMMIT` when none was recorded."""
    if not commit:
        return UNKNOWN_COMMIT
    sha = commit.removesuffix("-dirty")
    return sha[:8] + commit[len(sha):]


def version_tag(method_version: int) -> str:
    """``v2``; ``v?`` for a record of spec version 1, which did not record its method's version."""
    return f"v{method_version}" if method_version > UNVERSIONED else "v?"


def load_records(results_dir: str | Path, include_ci: bool = False
                 ) -> tuple[list[tuple[Path, dict[str, Any]]], list[Validation]]:
    """Valid records under ``results_dir`` (sorted by path) and the verdicts on the invalid ones."""
    root = Path(results_dir)
    skip = [root / ABLATIONS_FOLDER] + ([] if include_ci else [root / CI_FOLDER])
    good, bad = [], []
    for path in record_files([root], skip=skip) if root.is_dir() else []:
        verdict = validate_file(path)
        if verdict.ok and verdict.record is not None:
            good.append((path, verdict.record))
        else:
            bad.append(verdict)
    return good, bad


def _option_defaults(kind: str, name: str) -> dict[str, Any] | None:
    """Defaults of a registered method's Hparams / task's Options; None when not registered here."""
    try:
        entry = (METHODS if kind == "method" else TASKS).get(name)
        cls = entry.obj.Hparams if kind == "method" else entry.obj.Options
        return {f.name: f.default for f in fields(cls)}
    except Exception:  # unknown name, a plugin not installed here, a broken plugin: show every option
        return None


def _options_text(options: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> str:
    shown = {k: v for k, v in sorted(options.items()) if defaults is None or defaults.get(k, object()) != v}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def row_label(spec: Mapping[str, Any]) -> str:
    name = f"{spec['method']} {version_tag(spec.get('method_version', UNVERSIONED))}"
    opts = _options_text(spec["method_options"], _option_defaults("method", spec["method"]))
    return f"{name} ({opts})" if opts else name


def _table_label(proto: Mapping[str, Any]) -> str:
    opts = _options_text(proto["task_options"], _option_defaults("task", proto["task"]))
    parts = [proto["task"] + (f" ({opts})" if opts else "")]
    parts.append("no training rounds" if proto["rounds"] is None else f"{proto['rounds']} rounds")
    if proto["sample"] is not None and proto["sample"] != 1.0:
        parts.append(f"clients per round {proto['sample']}")
    return " · ".join(parts)


def _record_stats(record: Mapping[str, Any], headline: str) -> dict[str, float | None]:
    last, best = _HEADLINE_METRICS[headline]
    total = m.UP_BYTES.read(record) + m.DOWN_BYTES.read(record)
    rounds_run = m.ROUNDS_RUN.read(record)
    return {
        "headline": last.read(record),
        "headline_best_val": best.read(record),
        "global_acc": m.GLOBAL_ACC.read(record),
        "heldout_acc_mean": m.HELDOUT_ACC_MEAN.read(record),
        "client_acc_mean": m.CLIENT_ACC_MEAN.read(record),
        "client_acc_worst": m.CLIENT_ACC_WORST.read(record),
        "class_acc_worst": m.CLASS_ACC_WORST.read(record),
        "class_acc_std": m.CLASS_ACC_STD.read(record),
        "modality_acc_worst": m.MODALITY_ACC_WORST.read(record),
        "total_bytes": total,
        "bytes_per_round": total / rounds_run if rounds_run else 0,
        "trainable_params": m.TRAINABLE_PARAMS.read(record),
        "wall_seconds": m.WALL_SECONDS.read(record),
    }


def _curve(records: list[Mapping[str, Any]], headline: str) -> list[tuple[int, float]]:
    key = _HEADLINE_METRICS[headline][0].path[-1]  # a round's row uses the same keys as the last block
    per_round: dict[int, list[float]] = {}
    for rec in records:
        for r in rec["metrics"]["rounds"]:
            if r.get(key) is not None:
                per_round.setdefault(r["round"], []).append(r[key])
    return [(rnd, statistics.fmean(v)) for rnd, v in sorted(per_round.items())]


def measured_row(records: list[Mapping[str, Any]]) -> Row:
    """Aggregate the records of one protocol (each one seed) into a row."""
    first = records[0]
    spec = first["spec"]
    if len({protocol_hash(r["spec"]) for r in records}) != 1:
        raise ValueError("measured_row: the records do not share one protocol")
    headline = headline_metric(first)
    per_record = [_record_stats(r, headline) for r in records]
    stats = {name: summarize(s[name] for s in per_record) for name in STAT_NAMES}
    commits = {short_commit((r.get("provenance") or {}).get("git_commit")) for r in records}
    return Row(
        kind="measured", method=spec["method"], label=row_label(spec), backbone=spec["backbone"],
        headline=headline, stats=stats, protocol_hash=protocol_hash(spec),
        protocol=protocol_of(spec), seeds=sorted(r["spec"]["seed"] for r in records),
        spec_hashes=sorted(r["spec_hash"] for r in records), curve=_curve(records, headline),
        fidelity=str(first.get("fidelity") or ""), trains=(m.ROUNDS_RUN.read(first) or 0) > 0,
        method_class=str(spec.get("method_class") or ""),
        method_version=int(spec.get("method_version", UNVERSIONED)), commits=sorted(commits),
    )


def _table_protocol(spec: Mapping[str, Any], trains: bool) -> dict[str, Any]:
    return {"task": spec["task"], "task_options": dict(spec["task_options"]),
            "rounds": spec["rounds"] if trains else None, "sample": spec["sample"] if trains else None}


def _sort_key(row: Row) -> tuple[Any, ...]:
    # Rows are ranked only against rows with the same headline metric: a local-training row's
    # mean client accuracy is never placed above (or below) another row's held-out accuracy.
    kind = HEADLINES.index(row.headline) if row.headline in HEADLINES else len(HEADLINES)
    score = row.score
    return (kind, score is None, -(score or 0.0), row.kind != "measured", row.label, row.backbone,
            row.protocol_hash)


def build_board(
    records: list[tuple[Path, dict[str, Any]]],
    invalid: list[Validation] | None = None,
    published: Callable[[str], Mapping[str, Any]] = task_published,
) -> Board:
    """Group valid records into protocol rows and task-protocol tables, add matching published rows."""
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for _, rec in sorted(records, key=lambda pr: str(pr[0])):
        by_protocol.setdefault(protocol_hash(rec["spec"]), []).append(rec)
    rows = [measured_row(recs) for _, recs in sorted(by_protocol.items())]

    tables: dict[str, Table] = {}
    for row in rows:
        if row.trains:
            proto = _table_protocol(row.protocol, True)
            tid = json_digest(proto, HASH_DIGITS)
            tables.setdefault(tid, Table(tid, proto["task"], _table_label(proto), proto)).rows.append(row)
    for row in (r for r in rows if not r.trains):
        homes = [t for t in tables.values()
                 if t.task == row.protocol["task"] and t.protocol["task_options"] == row.protocol["task_options"]]
        if not homes:
            proto = _table_protocol(row.protocol, False)
            tid = json_digest(proto, HASH_DIGITS)
            homes = [tables.setdefault(tid, Table(tid, proto["task"], _table_label(proto), proto))]
        for table in homes:
            table.rows.append(row)

    not_shown: list[str] = []
    cards = {task: published(task) for task in sorted({t.task for t in tables.values()})}
    for table in tables.values():
        extra, why = published_rows(table, cards[table.task])
        table.rows = sorted(table.rows + extra, key=_sort_key)
        not_shown += why
    ordered = sorted(tables.values(), key=lambda t: (t.task, t.label, t.table_id))
    return Board(ordered, len(records), sorted(invalid or [], key=lambda v: str(v.path)),
                 sorted(set(not_shown)))
