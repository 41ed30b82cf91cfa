"""Two results side by side with deltas: ``fedbench compare A B``.

- ``fedbench compare A.json B.json``: two records; what differs in their specs, then every
  headline metric of each and the delta B - A.
- ``fedbench compare --task T METHOD_A METHOD_B``: the two methods' leaderboard rows on task
  T (mean ± std over seeds, n). Both rows come from one task-protocol table; where the
  methods share several tables, the one where both have the most seeds is used (ties: the
  first in leaderboard order) and the others are listed with ``--table ID`` to pick one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedbench.board.grouping import build_board, load_records, timing_seconds
from fedbench.board.rows import Row, Table
from fedbench.board.stats import Summary
from fedbench.board.validate import validate_file
from fedbench.core import metrics as m
from fedbench.core.formatting import format_bytes, format_count, format_percent, format_seconds
from fedbench.errors import FedbenchError, ResultsError

# (label, metric): where each value lives in a record and how it prints come from the metric.
RECORD_METRICS: list[tuple[str, m.Metric]] = [
    ("held-out acc % (last)", m.HELDOUT_ACC_MEAN),
    ("held-out acc % (best-val)", m.BUILTIN_METRICS["best_val_heldout_acc_mean"]),
    ("global acc % (last)", m.GLOBAL_ACC),
    ("global acc % (best-val)", m.BUILTIN_METRICS["best_val_global_acc"]),
    ("client acc % mean", m.CLIENT_ACC_MEAN),
    ("client acc % weighted", m.CLIENT_ACC_WEIGHTED),
    ("client acc % worst", m.CLIENT_ACC_WORST),
    ("global loss", m.GLOBAL_LOSS),
    ("best-val round", m.BEST_VAL_ROUND),
    ("bytes up", m.UP_BYTES),
    ("bytes down", m.DOWN_BYTES),
    ("trainable params", m.TRAINABLE_PARAMS),
]
# Time, the rounds apart from their inputs (a warm feature cache shortens only the latter): (label, key
# of :func:`fedbench.board.grouping.timing_seconds`).
TIME_ROWS = [("round s", "round_seconds"), ("s / round", "seconds_per_round"), ("inputs s", "inputs_seconds"),
             ("wall s (whole run)", "wall_seconds")]


def _fmt(value: Any, unit: m.Unit) -> str:
    if value is None:
        return "—"
    if unit == "fraction":
        return format_percent(value)
    if unit == "bytes":
        return format_bytes(value)
    if unit == "count":
        return format_count(value)
    if unit == "loss":
        return f"{value:.4f}"
    return format_seconds(value)


def _delta(a: Any, b: Any, unit: m.Unit) -> str:
    if a is None or b is None:
        return ""
    d = b - a
    if unit == "fraction":
        return f"{100 * d:+.2f}"
    if unit == "bytes":
        return ("+" if d >= 0 else "-") + format_bytes(abs(d)) + (f" (x{b / a:.2f})" if a and b else "")
    if unit == "count":
        return f"{d:+,.0f}"
    return f"{d:+.4f}" if unit == "loss" else f"{d:+.1f}"


def _flat_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in ("method_options", "task_options")}
    out.update({f"method.{k}": v for k, v in spec.get("method_options", {}).items()})
    out.update({f"task.{k}": v for k, v in spec.get("task_options", {}).items()})
    return out


def side_by_side(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """Two records side by side: (spec keys that differ, with A's and B's value; metric rows A, B, B - A)."""
    sa, sb = _flat_spec(a["spec"]), _flat_spec(b["spec"])
    spec_rows = [(k, sa.get(k, "—"), sb.get(k, "—")) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    metric_rows = []
    for label, metric in RECORD_METRICS:
        va, vb = metric.read(a), metric.read(b)
        if va is None and vb is None:
            continue
        metric_rows.append((label, _fmt(va, metric.unit), _fmt(vb, metric.unit), _delta(va, vb, metric.unit)))
    ta, tb = timing_seconds(a), timing_seconds(b)
    for label, key in TIME_ROWS:
        if ta[key] is not None or tb[key] is not None:
            metric_rows.append((label, _fmt(ta[key], "seconds"), _fmt(tb[key], "seconds"),
                                _delta(ta[key], tb[key], "seconds")))
    return spec_rows, metric_rows


def _load(path: str | Path) -> dict[str, Any]:
    verdict = validate_file(path)
    if verdict.record is None:
        raise ResultsError(f"{path}: {'; '.join(verdict.problems)}")
    if not verdict.ok:
        print(f"warning: {path} fails validation: {'; '.join(verdict.problems)}")
    return verdict.record


def compare_paths(path_a: str | Path, path_b: str | Path) -> str:
    from tabulate import tabulate

    a, b = _load(path_a), _load(path_b)
    spec_rows, metric_rows = side_by_side(a, b)
    parts = [f"A: {path_a}", f"B: {path_b}", ""]
    if spec_rows:
        parts += [tabulate(spec_rows, headers=["spec", "A", "B"], tablefmt="simple", disable_numparse=True), ""]
    else:
        parts += ["same spec", ""]
    parts.append(tabulate(metric_rows, headers=["metric", "A", "B", "B - A"], tablefmt="simple",
                          disable_numparse=True))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------
# Two methods on one task, from the leaderboard's rows
# ------------------------------------------------------------------------------------------

# (label, key of Row.stats, unit)
ROW_METRICS: list[tuple[str, str, m.Unit]] = [
    ("headline acc %", "headline", "fraction"), ("best-val acc %", "headline_best_val", "fraction"),
    ("global acc %", "global_acc", "fraction"), ("client acc % mean", "client_acc_mean", "fraction"),
    ("client acc % worst", "client_acc_worst", "fraction"), ("total bytes", "total_bytes", "bytes"),
    ("bytes / round", "bytes_per_round", "bytes"), ("trainable params", "trainable_params", "count"),
    ("round s", "round_seconds", "seconds"), ("inputs s", "inputs_seconds", "seconds")]


def _pick(table: Table, method: str) -> Row | None:
    rows = [r for r in table.rows if r.kind == "measured" and r.method == method]
    return max(rows, key=lambda r: r.stats["headline"].n) if rows else None  # first of equals: the best row


def _row_cell(s: Summary, unit: m.Unit) -> str:
    text = _fmt(s.mean, unit)
    if s.std is not None and unit in ("fraction", "seconds"):
        text += f" ± {_fmt(s.std, unit)}"
    return text


def compare_methods(results_dir: str | Path, task: str, method_a: str, method_b: str,
                    table_id: str | None = None) -> str:
    from tabulate import tabulate

    records, _ = load_records(results_dir)
    board = build_board([(p, r) for p, r in records if r["spec"]["task"] == task])
    shared = [(t, _pick(t, method_a), _pick(t, method_b)) for t in board.tables]
    shared = [(t, a, b) for t, a, b in shared if a is not None and b is not None]
    if table_id:
        shared = [s for s in shared if s[0].table_id == table_id]
    if not shared:
        have = sorted({r["spec"]["method"] for _, r in records if r["spec"]["task"] == task})
        raise FedbenchError(f"no task protocol of {task!r} in {results_dir} has records of both {method_a!r} "
                            f"and {method_b!r}" + (f" with table {table_id}" if table_id else "")
                            + f"; methods recorded on {task}: {', '.join(have) or 'none'}")
    table, a, b = max(shared, key=lambda s: min(s[1].stats["headline"].n, s[2].stats["headline"].n))
    rows = [(label, _row_cell(a.stats[key], unit), _row_cell(b.stats[key], unit),
             _delta(a.stats[key].mean, b.stats[key].mean, unit)) for label, key, unit in ROW_METRICS]
    parts = [f"task protocol {table.table_id}: {table.label}",
             f"A: {a.label} [{a.backbone}], protocol {a.protocol_hash}, seeds {a.seeds}",
             f"B: {b.label} [{b.backbone}], protocol {b.protocol_hash}, seeds {b.seeds}", ""]
    parts.append(tabulate(rows, headers=["metric (mean ± std)", "A", "B", "B - A"], tablefmt="simple",
                          disable_numparse=True))
    if a.headline != b.headline:
        parts.append(f"\nnote: the headline is {a.headline} for A and {b.headline} for B")
    if (a.headline, a.backbone) != (b.headline, b.backbone):
        parts.append("note: the leaderboard does not rank these rows against each other (a rank compares one "
                     "headline metric on one backbone)")
    others = [t.table_id for t, _, _ in shared if t is not table]
    if others:
        parts.append(f"\nother task protocols with both methods (pick one with --table ID): {', '.join(others)}")
    return "\n".join(parts)
