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
  without a global model). Within a table, rows are ranked only against rows of the same
  headline metric and the same backbone (:mod:`fedbench.board.ranking`), one rank group each.
- A diverged run (the record's ``diverged`` mark, or an older record that trained and has a
  null train loss in some round) is never averaged nor ranked: it is listed under its table.
- A table's chance level is 1 / the number of classes its records' partition names; a table
  is marked reduced where its task or options make it a smoke-test protocol (:func:`reduced_reasons`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedbench.board.published import published_rows, task_published
from fedbench.board.ranking import rank_group
from fedbench.board.rows import STAT_NAMES, Board, DivergedRun, RankGroup, Row, Table
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
HEADLINE_NAMES = {"heldout_acc_mean": "held-out domain accuracy", "global_acc": "global-model test accuracy",
                  "client_acc_mean": "mean client accuracy (each client's own model)"}
# Where timing lives in a record (not yet metrics of fedbench.core.metrics): seconds of each round,
# and of what comes before the rounds (loading the backbone, the data, encoding the inputs).
ROUND_SECONDS = m.Metric("round_seconds", ("timing", "round_seconds"), False,
                         "seconds of each round: training and evaluation", "seconds")
INPUT_SECONDS = tuple(m.Metric(name, ("timing", name), False, f"timing.{name}", "seconds")
                      for name in ("backbone_seconds", "data_seconds", "inputs_seconds"))
CLASS_ACC = m.Metric("class_acc", (*m.LAST, "class_acc"), True, "each class's accuracy, pooled test set")
TRAIN_LOSS_KEY = "train_loss"  # a round's mean client training loss (null: none, or not finite)
# What a task says of itself when it is a reduced data set, until tasks declare it (see reduced_reasons).
_REDUCED_WORDS = re.compile(r"\b(smoke[- ]tests?|demos?)\b", re.IGNORECASE)
# Options that cap the data, 0 meaning all of it (label_skew's max_train, PACS's max_per_domain, ...).
_SUBSAMPLE_OPTION = re.compile(r"^(max_\w+|samples_per_\w+)$")


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
    """Valid records under ``results_dir`` (sorted by path) and the verdicts on the invalid ones.

    A consistent diverged run has no problems and is returned with the valid ones: the board
    lists it apart (:func:`divergence`), where a reader sees it, rather than among broken files.
    """
    root = Path(results_dir)
    skip = [root / ABLATIONS_FOLDER] + ([] if include_ci else [root / CI_FOLDER])
    good, bad = [], []
    for path in record_files([root], skip=skip) if root.is_dir() else []:
        verdict = validate_file(path)
        if not verdict.problems and verdict.record is not None:
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
        **timing_seconds(record),
    }


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def timing_seconds(record: Mapping[str, Any]) -> dict[str, float | None]:
    """The rounds' time apart from their inputs' (a warm feature cache shortens only the latter).

    ``round_seconds``: the sum of ``timing.round_seconds`` (training and evaluation rounds);
    ``seconds_per_round``: that over the rounds run (0 rounds: the one evaluation);
    ``inputs_seconds``: ``timing.backbone_seconds + data_seconds + inputs_seconds``, the ones
    recorded; ``wall_seconds``: the whole run. None where the record has no such timing.
    """
    rounds = ROUND_SECONDS.read(record)
    per_round = [_seconds(x) for x in rounds] if isinstance(rounds, list) else []
    total = sum(x for x in per_round if x is not None) if per_round else None
    setup = [s for s in (_seconds(metric.read(record)) for metric in INPUT_SECONDS) if s is not None]
    return {"round_seconds": total,
            "seconds_per_round": total / max(len(per_round), 1) if total is not None else None,
            "inputs_seconds": sum(setup) if setup else None,
            "wall_seconds": _seconds(m.WALL_SECONDS.read(record))}


def divergence(record: Mapping[str, Any]) -> tuple[int | None, str] | None:
    """(round, reason) when the run diverged; None when it did not.

    The engine marks a run whose loss became non-finite with ``"diverged": {"round", "reason"}``;
    an older record carries no mark, so a run that trained and recorded a null train loss in a
    trained round counts as diverged too (NaN losses were stored as null).
    """
    mark = record.get("diverged")
    if mark is not None and mark is not False:
        details = mark if isinstance(mark, Mapping) else {}
        rnd = details.get("round")
        return (rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None,
                str(details.get("reason") or "marked diverged"))
    if (m.ROUNDS_RUN.read(record) or 0) > 0:
        for r in record["metrics"]["rounds"]:
            loss = r.get(TRAIN_LOSS_KEY)
            if r.get("round", 0) >= 1 and (not isinstance(loss, (int, float)) or not math.isfinite(loss)):
                return r.get("round"), "train loss is null or not finite (an older record, no divergence mark)"
    return None


def num_classes(record: Mapping[str, Any]) -> int | None:
    """The number of classes: ``partition.num_classes`` where a record states it, else the length of
    the partition's class histograms (the built-in tasks record them), else of the per-class
    accuracies (methods with a global model); None where none is recorded."""
    partition = record.get("partition")
    stated = partition.get("num_classes") if isinstance(partition, Mapping) else None
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:  # where a record states it
        return stated
    hists = partition.get("class_histograms") if isinstance(partition, Mapping) else None
    if isinstance(hists, list) and hists and isinstance(hists[0], list) and hists[0]:
        return len(hists[0])
    per_class = CLASS_ACC.read(record)
    return len(per_class) if isinstance(per_class, list) and per_class else None


def reduced_reasons(task: str, task_options: Mapping[str, Any], rounds: int | None) -> list[str]:
    """Why a task protocol is reduced (a smoke test, not a benchmark result); [] when it is not.

    Tasks do not declare this yet: the task's description or card source calling it a smoke
    test or demo counts, as do options that subsample its data (``max_*``, ``samples_per_*``
    above their default of 0, all) and fewer rounds than the task's default. A task card field
    ``reduced`` (text: why) is read first where a task has one.
    """
    try:
        entry = TASKS.get(task)
        card = entry.obj.card
    except Exception:  # a task from a plugin not installed here: nothing to read
        return []
    reasons = []
    declared = getattr(card, "reduced", None)
    if declared:
        reasons.append(str(declared) if isinstance(declared, str) else "the task card marks it reduced")
    elif _REDUCED_WORDS.search(f"{entry.description} {card.source}"):
        reasons.append(f"reduced data: {entry.description}")
    defaults = _option_defaults("task", task) or {}
    for name, value in sorted(task_options.items()):
        if (_SUBSAMPLE_OPTION.match(name) and defaults.get(name) == 0 and isinstance(value, int)
                and not isinstance(value, bool) and value > 0):
            reasons.append(f"subsampled data: {name}={value} (default: all)")
    default_rounds = getattr(entry.obj, "default_rounds", None)
    if rounds is not None and isinstance(default_rounds, int) and rounds < default_rounds:
        reasons.append(f"{rounds} rounds, fewer than the task's default of {default_rounds}")
    return reasons


def _curve(records: list[Mapping[str, Any]], headline: str) -> list[tuple[int, float]]:
    key = _HEADLINE_METRICS[headline][0].path[-1]  # a round's row uses the same keys as the last block
    per_round: dict[int, list[float]] = {}
    for rec in records:
        for r in rec["metrics"]["rounds"]:
            if r.get(key) is not None:
                per_round.setdefault(r["round"], []).append(r[key])
    return [(rnd, statistics.fmean(v)) for rnd, v in sorted(per_round.items())]


def measured_row(records: list[Mapping[str, Any]], paths: list[Path] | None = None) -> Row:
    """Aggregate the records of one protocol (each one seed, none diverged) into a row; ``paths``:
    their files, in the same order."""
    first = records[0]
    spec = first["spec"]
    if len({protocol_hash(r["spec"]) for r in records}) != 1:
        raise ValueError("measured_row: the records do not share one protocol")
    headline = headline_metric(first)
    per_record = [_record_stats(r, headline) for r in records]
    stats = {name: summarize(s[name] for s in per_record) for name in STAT_NAMES}
    commits = {short_commit((r.get("provenance") or {}).get("git_commit")) for r in records}
    by_seed = sorted(zip([r["spec"]["seed"] for r in records], paths or [], strict=False))
    classes = {num_classes(r) for r in records} - {None}
    return Row(
        kind="measured", method=spec["method"], label=row_label(spec), backbone=spec["backbone"],
        headline=headline, stats=stats, protocol_hash=protocol_hash(spec),
        protocol=protocol_of(spec), seeds=sorted(r["spec"]["seed"] for r in records),
        spec_hashes=sorted(r["spec_hash"] for r in records), curve=_curve(records, headline),
        fidelity=str(first.get("fidelity") or ""), trains=(m.ROUNDS_RUN.read(first) or 0) > 0,
        method_class=str(spec.get("method_class") or ""),
        method_version=int(spec.get("method_version", UNVERSIONED)), commits=sorted(commits),
        record_paths=[p for _, p in by_seed], num_classes=classes.pop() if len(classes) == 1 else None,
    )


def _table_protocol(spec: Mapping[str, Any], trains: bool) -> dict[str, Any]:
    return {"task": spec["task"], "task_options": dict(spec["task_options"]),
            "rounds": spec["rounds"] if trains else None, "sample": spec["sample"] if trains else None}


def _rank_groups(rows: list[Row]) -> list[RankGroup]:
    """One group per (headline metric, backbone) of the measured rows, in headline order then by
    backbone; a published row joins the group of its backbone and metric (no metric stated: the
    first group of its backbone)."""
    def order(key: tuple[str, str]) -> tuple[int, str]:
        return (HEADLINES.index(key[0]) if key[0] in HEADLINES else len(HEADLINES)), key[1]

    members: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.kind == "measured":
            members.setdefault((row.headline, row.backbone), []).append(row)
    keys = sorted(members, key=order)
    for row in rows:
        if row.kind != "measured":
            home = next((k for k in keys if k == (row.headline, row.backbone)), None) or next(
                (k for k in keys if k[1] == row.backbone), None)
            if home is not None:  # published_rows shows only numbers whose backbone a measured row has
                members[home].append(row)
    return [rank_group(headline, backbone, members[(headline, backbone)]) for headline, backbone in keys]


def _table_of(proto: Mapping[str, Any], tables: dict[str, Table]) -> Table:
    tid = json_digest(proto, HASH_DIGITS)
    if tid not in tables:
        tables[tid] = Table(tid, proto["task"], _table_label(proto), dict(proto),
                            reduced=reduced_reasons(proto["task"], proto["task_options"], proto["rounds"]))
    return tables[tid]


def build_board(
    records: list[tuple[Path, dict[str, Any]]],
    invalid: list[Validation] | None = None,
    published: Callable[[str], Mapping[str, Any]] = task_published,
) -> Board:
    """Group valid records into protocol rows and task-protocol tables, rank them within groups of one
    headline metric and backbone, add matching published rows, and list the diverged runs apart."""
    by_protocol: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    diverged: list[tuple[dict[str, Any], DivergedRun]] = []
    for path, rec in sorted(records, key=lambda pr: str(pr[0])):
        verdict = divergence(rec)
        if verdict is None:
            by_protocol.setdefault(protocol_hash(rec["spec"]), []).append((path, rec))
        else:
            spec = rec["spec"]
            diverged.append((rec, DivergedRun(path, row_label(spec), spec["backbone"], spec["seed"],
                                              rec["spec_hash"], *verdict)))
    rows = [measured_row([r for _, r in pairs], [p for p, _ in pairs]) for _, pairs in sorted(by_protocol.items())]
    by_hash = {r.protocol_hash: r for r in rows}
    for rec, run in diverged:
        row = by_hash.get(protocol_hash(rec["spec"]))
        if row is not None:
            row.diverged_seeds = sorted([*row.diverged_seeds, run.seed])

    tables: dict[str, Table] = {}
    for row in rows:
        if row.trains:
            _table_of(_table_protocol(row.protocol, True), tables).rows.append(row)
    for row in (r for r in rows if not r.trains):
        homes = [t for t in tables.values()
                 if t.task == row.protocol["task"] and t.protocol["task_options"] == row.protocol["task_options"]]
        for table in homes or [_table_of(_table_protocol(row.protocol, False), tables)]:
            table.rows.append(row)
    orphans = []
    for rec, run in diverged:
        tid = json_digest(_table_protocol(rec["spec"], True), HASH_DIGITS)
        (tables[tid].diverged if tid in tables else orphans).append(run)

    not_shown: list[str] = []
    cards = {task: published(task) for task in sorted({t.task for t in tables.values()})}
    for table in tables.values():
        extra, why = published_rows(table, cards[table.task])
        table.groups = _rank_groups(table.rows + extra)
        table.rows = [r for g in table.groups for r in g.rows]
        classes = {r.num_classes for r in table.rows if r.kind == "measured"} - {None}
        table.num_classes = classes.pop() if len(classes) == 1 else None  # rows that disagree: no chance line
        table.diverged.sort(key=lambda d: (d.label, d.seed, d.spec_hash))
        not_shown += why
    ordered = sorted(tables.values(), key=lambda t: (t.task, t.label, t.table_id))
    return Board(ordered, len(records), sorted(invalid or [], key=lambda v: str(v.path)),
                 sorted(set(not_shown)), sorted(orphans, key=lambda d: str(d.path)))
