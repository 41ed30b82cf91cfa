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

from fedbench.board.leaderboard import Row, Summary, Table, build_board, fmt_bytes, load_records
from fedbench.board.validate import validate_file
from fedbench.errors import FedbenchError, ResultsError

RECORD_METRICS: list[tuple[str, tuple[str, ...], str]] = [
    # (label, path into the record, kind: pct | bytes | count | seconds | loss)
    ("held-out acc % (last)", ("metrics", "final", "last", "heldout_acc_mean"), "pct"),
    ("held-out acc % (best-val)", ("metrics", "final", "best_val", "heldout_acc_mean"), "pct"),
    ("global acc % (last)", ("metrics", "final", "last", "global_acc"), "pct"),
    ("global acc % (best-val)", ("metrics", "final", "best_val", "global_acc"), "pct"),
    ("client acc % mean", ("metrics", "final", "last", "client_acc_mean"), "pct"),
    ("client acc % weighted", ("metrics", "final", "last", "client_acc_weighted"), "pct"),
    ("client acc % worst", ("metrics", "final", "last", "client_acc_worst"), "pct"),
    ("global loss", ("metrics", "final", "last", "global_loss"), "loss"),
    ("best-val round", ("metrics", "final", "best_val_round"), "count"),
    ("bytes up", ("comm", "up_bytes"), "bytes"),
    ("bytes down", ("comm", "down_bytes"), "bytes"),
    ("trainable params", ("metrics", "final", "trainable_params"), "count"),
    ("wall s", ("timing", "total_seconds"), "seconds"),
]


def _get(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "bytes":
        return fmt_bytes(value)
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "loss":
        return f"{value:.4f}"
    return f"{value:.1f}"


def _delta(a: Any, b: Any, kind: str) -> str:
    if a is None or b is None:
        return ""
    d = b - a
    if kind == "pct":
        return f"{100 * d:+.2f}"
    if kind == "bytes":
        return ("+" if d >= 0 else "-") + fmt_bytes(abs(d)) + (f" (x{b / a:.2f})" if a and b else "")
    if kind == "count":
        return f"{d:+,.0f}"
    return f"{d:+.4f}" if kind == "loss" else f"{d:+.1f}"


def _flat_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in ("method_options", "task_options")}
    out.update({f"method.{k}": v for k, v in spec.get("method_options", {}).items()})
    out.update({f"task.{k}": v for k, v in spec.get("task_options", {}).items()})
    return out


def compare_records(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(spec rows that differ, metric rows) for two records."""
    sa, sb = _flat_spec(a["spec"]), _flat_spec(b["spec"])
    spec_rows = [(k, sa.get(k, "—"), sb.get(k, "—")) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    metric_rows = []
    for label, path, kind in RECORD_METRICS:
        va, vb = _get(a, path), _get(b, path)
        if va is None and vb is None:
            continue
        metric_rows.append((label, _fmt(va, kind), _fmt(vb, kind), _delta(va, vb, kind)))
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
    spec_rows, metric_rows = compare_records(a, b)
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

ROW_METRICS = [("headline acc %", "headline", "pct"), ("best-val acc %", "headline_best_val", "pct"),
               ("global acc %", "global_acc", "pct"), ("client acc % mean", "client_acc_mean", "pct"),
               ("client acc % worst", "client_acc_worst", "pct"), ("total bytes", "total_bytes", "bytes"),
               ("bytes / round", "bytes_per_round", "bytes"), ("trainable params", "trainable_params", "count"),
               ("wall s", "wall_seconds", "seconds")]


def _pick(table: Table, method: str) -> Row | None:
    rows = [r for r in table.rows if r.kind == "measured" and r.method == method]
    return max(rows, key=lambda r: r.stats["headline"].n) if rows else None  # first of equals: the best row


def _row_cell(s: Summary, kind: str) -> str:
    text = _fmt(s.mean, kind)
    if s.std is not None and kind in ("pct", "seconds"):
        text += f" ± {_fmt(s.std, kind)}"
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
    rows = [(label, _row_cell(a.stats[key], kind), _row_cell(b.stats[key], kind),
             _delta(a.stats[key].mean, b.stats[key].mean, kind)) for label, key, kind in ROW_METRICS]
    parts = [f"task protocol {table.table_id}: {table.label}",
             f"A: {a.label} [{a.backbone}], protocol {a.protocol_hash}, seeds {a.seeds}",
             f"B: {b.label} [{b.backbone}], protocol {b.protocol_hash}, seeds {b.seeds}", ""]
    parts.append(tabulate(rows, headers=["metric (mean ± std)", "A", "B", "B - A"], tablefmt="simple",
                          disable_numparse=True))
    if a.headline != b.headline:
        parts.append(f"\nnote: the headline is {a.headline} for A and {b.headline} for B")
    others = [t.table_id for t, _, _ in shared if t is not table]
    if others:
        parts.append(f"\nother task protocols with both methods (pick one with --table ID): {', '.join(others)}")
    return "\n".join(parts)
