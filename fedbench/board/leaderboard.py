"""The leaderboard: every record under ``results/`` -> ``leaderboard/`` (Markdown, CSV, HTML).

Rules a reader can rely on:

- Only valid records count (:func:`fedbench.board.validate.check_record`, location included); the
  rest are listed, never silently used. ``results/ci/`` holds the regression suite's
  reference records (``fedbench check``), a separate suite on purpose-small data: it is left
  out unless ``include_ci`` (so the task name ``ci`` is reserved).
- A row is one protocol: the whole spec except the seed (method and its options, task and
  its options, backbone, rounds, clients per round, evaluation interval). Its hash is the
  ``protocol`` column. Records that differ in anything but the seed are never averaged.
- A table is one task protocol (task, task options, rounds, clients per round). Rows that
  train nothing (zero-shot: ``rounds_run == 0``) appear in every table of their task with
  the same task options, since rounds and sampling do not touch them.
- Seeds aggregate as mean, sample standard deviation (ddof=1) and the half-width of the 95%
  confidence interval of the mean from Student's t with n-1 degrees of freedom, taken from
  a built-in table of the 0.975 quantile (df 1-30, 40, 60, 120, inf; interpolated linearly
  in 1/df between entries, error < 1e-4), so SciPy is not needed. n = 1 gives no spread.
- The headline is held-out domain accuracy (mean over held-out domains) where the task has
  held-out domains, else global-model test accuracy, else the mean client accuracy (methods
  without a global model). The column ``headline`` names which one each row uses.
- Published numbers come from each task's ``TaskCard.published`` and are shown, marked
  *published*, only beside a table whose protocol they match (see :func:`published_rows`).

Output is a pure function of the records: no timestamps, stable order, fixed float formats.
This module reads, groups and writes Markdown and CSV; ``fedbench.board.html`` draws
the page.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedbench.board.validate import Validation, record_files, validate_file
from fedbench.core.results import atomic_write_text
from fedbench.errors import ResultsError

# ------------------------------------------------------------------------------------------
# Statistics over seeds
# ------------------------------------------------------------------------------------------

# Student's t, 0.975 quantile (two-sided 95%), by degrees of freedom.
_T975 = {
    1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
    8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787,
    15: 2.131450, 16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614,
    22: 2.073873, 23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407,
    29: 2.045230, 30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930,
}
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("t975 needs df >= 1")
    if df in _T975:
        return _T975[df]
    knots = [(d, _T975[d]) for d in (30, 40, 60, 120)] + [(math.inf, _Z975)]
    for (a, ta), (b, tb) in itertools.pairwise(knots):
        if a < df < b:
            inv_b = 0.0 if b == math.inf else 1 / b
            w = (1 / df - inv_b) / (1 / a - inv_b)
            return tb + w * (ta - tb)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1) and 95% CI half-width over ``n`` seeds; None where undefined."""

    mean: float | None
    std: float | None
    ci95: float | None
    n: int


def summarize(values: Iterable[float | None]) -> Summary:
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Summary(None, None, None, 0)
    if len(xs) == 1:
        return Summary(xs[0], None, None, 1)
    std = statistics.stdev(xs)
    return Summary(statistics.fmean(xs), std, t975(len(xs) - 1) * std / math.sqrt(len(xs)), len(xs))


# ------------------------------------------------------------------------------------------
# Reading records, grouping them into protocols
# ------------------------------------------------------------------------------------------

CI_FOLDER = "ci"
ACCURACY_STATS = ("headline", "headline_best_val", "global_acc", "heldout_acc_mean", "client_acc_mean",
                  "client_acc_worst")
STAT_NAMES = (*ACCURACY_STATS, "total_bytes", "bytes_per_round", "trainable_params", "wall_seconds")


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def protocol_of(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A row's protocol: the spec without its seed."""
    return {k: v for k, v in spec.items() if k != "seed"}


HEADLINES = ("heldout_acc_mean", "global_acc", "client_acc_mean")  # in order of preference


def headline_metric(last: Mapping[str, Any]) -> str:
    for name in HEADLINES:
        if last.get(name) is not None:
            return name
    return "client_acc_mean"


def load_records(results_dir: str | Path, include_ci: bool = False
                 ) -> tuple[list[tuple[Path, dict[str, Any]]], list[Validation]]:
    """Valid records under ``results_dir`` (sorted by path) and the verdicts on the invalid ones."""
    root = Path(results_dir)
    skip = [] if include_ci else [root / CI_FOLDER]
    good, bad = [], []
    for path in record_files([root], skip=skip) if root.is_dir() else []:
        verdict = validate_file(path)
        if verdict.ok and verdict.record is not None:
            good.append((path, verdict.record))
        else:
            bad.append(verdict)
    return good, bad


@dataclass
class Row:
    """One line of a table: a measured protocol over its seeds, or a published number."""

    kind: str  # "measured" | "published"
    method: str
    label: str
    backbone: str
    headline: str  # which metric the headline is
    stats: dict[str, Summary]
    protocol_hash: str = ""
    protocol: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    spec_hashes: list[str] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (round, mean headline over seeds)
    fidelity: str = ""
    source: str = ""
    trains: bool = True

    @property
    def score(self) -> float | None:
        return self.stats["headline"].mean


@dataclass
class Table:
    table_id: str
    task: str
    label: str
    protocol: dict[str, Any]
    rows: list[Row] = field(default_factory=list)


@dataclass
class Board:
    tables: list[Table]
    n_records: int
    invalid: list[Validation] = field(default_factory=list)
    published_not_shown: list[str] = field(default_factory=list)


def _option_defaults(kind: str, name: str) -> dict[str, Any] | None:
    """Defaults of a registered method's Hparams / task's Options; None when not registered here."""
    from fedbench.core.registry import METHODS, TASKS

    try:
        entry = (METHODS if kind == "method" else TASKS).get(name)
        cls = entry.obj.Hparams if kind == "method" else entry.obj.Options
        return {f.name: f.default for f in fields(cls)}
    except Exception:  # unknown name, a plugin not installed here, a broken plugin: show every option
        return None


def _options_text(options: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> str:
    shown = {k: v for k, v in sorted(options.items()) if defaults is None or defaults.get(k, object()) != v}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _row_label(spec: Mapping[str, Any]) -> str:
    opts = _options_text(spec["method_options"], _option_defaults("method", spec["method"]))
    return f"{spec['method']} ({opts})" if opts else spec["method"]


def _table_label(proto: Mapping[str, Any]) -> str:
    opts = _options_text(proto["task_options"], _option_defaults("task", proto["task"]))
    parts = [proto["task"] + (f" ({opts})" if opts else "")]
    parts.append("no training rounds" if proto["rounds"] is None else f"{proto['rounds']} rounds")
    if proto["sample"] is not None and proto["sample"] != 1.0:
        parts.append(f"clients per round {proto['sample']}")
    return " · ".join(parts)


def _record_stats(record: Mapping[str, Any], headline: str) -> dict[str, float | None]:
    final = record["metrics"]["final"]
    last, best = final["last"], final.get("best_val") or {}
    total = record["comm"]["up_bytes"] + record["comm"]["down_bytes"]
    rounds_run = final["rounds_run"]
    return {
        "headline": last.get(headline),
        "headline_best_val": best.get(headline),
        "global_acc": last.get("global_acc"),
        "heldout_acc_mean": last.get("heldout_acc_mean"),
        "client_acc_mean": last.get("client_acc_mean"),
        "client_acc_worst": last.get("client_acc_worst"),
        "total_bytes": total,
        "bytes_per_round": total / rounds_run if rounds_run else 0,
        "trainable_params": final["trainable_params"],
        "wall_seconds": (record.get("timing") or {}).get("total_seconds"),
    }


def _curve(records: list[Mapping[str, Any]], headline: str) -> list[tuple[int, float]]:
    per_round: dict[int, list[float]] = {}
    for rec in records:
        for r in rec["metrics"]["rounds"]:
            if r.get(headline) is not None:
                per_round.setdefault(r["round"], []).append(r[headline])
    return [(rnd, statistics.fmean(v)) for rnd, v in sorted(per_round.items())]


def measured_row(records: list[Mapping[str, Any]]) -> Row:
    """Aggregate the records of one protocol (each one seed) into a row."""
    first = records[0]
    spec = first["spec"]
    headline = headline_metric(first["metrics"]["final"]["last"])
    per_record = [_record_stats(r, headline) for r in records]
    stats = {name: summarize(s[name] for s in per_record) for name in STAT_NAMES}
    return Row(
        kind="measured", method=spec["method"], label=_row_label(spec), backbone=spec["backbone"],
        headline=headline, stats=stats, protocol_hash=_short_hash(protocol_of(spec)),
        protocol=protocol_of(spec), seeds=sorted(r["spec"]["seed"] for r in records),
        spec_hashes=sorted(r["spec_hash"] for r in records), curve=_curve(records, headline),
        fidelity=str(first.get("fidelity") or ""), trains=first["metrics"]["final"]["rounds_run"] > 0,
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


# ------------------------------------------------------------------------------------------
# Published reference numbers
# ------------------------------------------------------------------------------------------

PROTOCOL_KEYS = ("backbone", "rounds", "sample", "task_options")


def task_published(task: str) -> Mapping[str, Any]:
    """``TaskCard.published`` of a registered task ({} when the task is not registered here)."""
    from fedbench.core.registry import TASKS

    try:
        return dict(TASKS.get(task).obj.card.published or {})
    except Exception:  # a task from a plugin not installed here has no card to read
        return {}


def _as_fraction(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    value = value / 100 if value > 1 else float(value)  # papers print percents
    return value if 0 <= value <= 1 else None


def _protocol_mismatch(stated: Mapping[str, Any], table: Table, backbones: set[str]) -> str | None:
    """Why a published number's stated protocol does not match ``table`` (None: it matches)."""
    unknown = set(stated) - set(PROTOCOL_KEYS)
    if unknown:
        return f"_protocol keys {sorted(unknown)} cannot be checked (known: {', '.join(PROTOCOL_KEYS)})"
    if "backbone" not in stated:
        return "_protocol does not state the backbone"
    if stated["backbone"] not in backbones:
        return f"no measured row with backbone {stated['backbone']}"
    for key in ("rounds", "sample"):
        if key in stated and stated[key] != table.protocol[key]:
            return f"{key} {stated[key]} (table: {table.protocol[key]})"
    for key, value in dict(stated.get("task_options") or {}).items():
        if table.protocol["task_options"].get(key) != value:
            return f"task option {key}={value} (table: {table.protocol['task_options'].get(key)})"
    return None


def published_rows(table: Table, published: Mapping[str, Any]) -> tuple[list[Row], list[str]]:
    """Rows for the published numbers whose stated protocol matches ``table``, and why others don't.

    ``TaskCard.published`` convention (keys starting with ``_`` are metadata)::

        {"_source": "Lu et al. 2023, arXiv 2302.13485, Table 2",   # citation shown with the rows
         "_metric": "held-out domain accuracy (%)",                 # free text, shown with the source
         "_protocol": {"backbone": "openclip:ViT-B-32/openai",      # required: what was measured
                       "rounds": 200},                              # optional: rounds, sample, task_options
         "_value_by": "heldout",                                    # optional: entries are keyed by
                                                                    # this task option's value
         "FedCLIP": {"art_painting": 95.15, "cartoon": 95.36, "mean": 95.24},
         "FedAvg (CLIP)": {"mean": 81.55}}                          # or just a number

    Without ``_value_by`` an entry's number is its ``headline`` or ``mean`` key (or the entry
    itself); with it, the number under the table's value of that task option (a table holding
    out ``cartoon`` shows 95.36; an entry without that key is not shown there). An entry may
    carry its own ``_protocol`` (merged over the shared one), ``_source``, and ``_headline``
    (the metric it reports, e.g. ``heldout_acc_mean``; rows with another headline do not
    match). Values above 1 are read as percents. A number whose backbone is not stated is never
    shown: a ViT-B/32 number beside an offline-backbone row would mislead.
    """
    shared_protocol = dict(published.get("_protocol") or {})
    shared_source = str(published.get("_source") or "")
    metric_text = str(published.get("_metric") or "")
    value_by = published.get("_value_by")
    measured = [r for r in table.rows if r.kind == "measured"]
    backbones = {r.backbone for r in measured}
    rows, not_shown = [], []
    for name, entry in sorted(published.items()):
        if name.startswith("_"):
            continue
        meta = entry if isinstance(entry, Mapping) else {}
        if value_by:
            key = str(table.protocol["task_options"].get(str(value_by)))
            raw = meta.get(key) if meta else None
        else:
            raw = meta.get("headline", meta.get("mean")) if meta else entry
        value = _as_fraction(raw)
        if value is None:
            continue
        stated = {**shared_protocol, **dict(meta.get("_protocol") or {})}
        why = _protocol_mismatch(stated, table, backbones)
        metric = str(meta.get("_headline") or "")
        headlines = {r.headline for r in measured if r.backbone == stated.get("backbone")}
        if why is None and metric and metric not in headlines:
            why = f"it reports {metric}, the table's rows report {', '.join(sorted(headlines))}"
        if why is not None:
            not_shown.append(f"{table.task} / {table.table_id}: {name} ({why})")
            continue
        source = str(meta.get("_source") or shared_source)
        rows.append(Row(kind="published", method=name, label=f"{name} (published)", backbone=stated["backbone"],
                        headline=metric or "—",
                        stats={**{n: Summary(None, None, None, 0) for n in STAT_NAMES},
                               "headline": Summary(value, None, None, 0)},
                        fidelity="published", source=source + (f" ({metric_text})" if metric_text else ""),
                        trains=True))
    return rows, not_shown


# ------------------------------------------------------------------------------------------
# The board
# ------------------------------------------------------------------------------------------


def build_board(
    records: list[tuple[Path, dict[str, Any]]],
    invalid: list[Validation] | None = None,
    published: Callable[[str], Mapping[str, Any]] = task_published,
) -> Board:
    """Group valid records into protocol rows and task-protocol tables, add matching published rows."""
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for _, rec in sorted(records, key=lambda pr: str(pr[0])):
        by_protocol.setdefault(_short_hash(protocol_of(rec["spec"])), []).append(rec)
    rows = [measured_row(recs) for _, recs in sorted(by_protocol.items())]

    tables: dict[str, Table] = {}
    for row in rows:
        if row.trains:
            proto = _table_protocol(row.protocol, True)
            tid = _short_hash(proto)
            tables.setdefault(tid, Table(tid, proto["task"], _table_label(proto), proto)).rows.append(row)
    for row in (r for r in rows if not r.trains):
        homes = [t for t in tables.values()
                 if t.task == row.protocol["task"] and t.protocol["task_options"] == row.protocol["task_options"]]
        if not homes:
            proto = _table_protocol(row.protocol, False)
            tid = _short_hash(proto)
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


# ------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def fmt_pm(s: Summary, scale: float = 100, digits: int = 2) -> str:
    if s.mean is None:
        return "—"
    text = f"{scale * s.mean:.{digits}f}"
    return text if s.std is None else f"{text} ± {scale * s.std:.{digits}f}"


def fmt_ci(s: Summary) -> str:
    return "—" if s.ci95 is None else f"± {100 * s.ci95:.2f}"


def fmt_count(s: Summary) -> str:
    return "—" if s.mean is None else f"{s.mean:,.0f}"


def fmt_secs(s: Summary) -> str:
    return "—" if s.mean is None else f"{s.mean:.1f}"


def _method_cell(row: Row) -> str:
    if row.kind == "published":
        return f"{row.method} *(published)*"
    return row.label + (f" *({row.fidelity})*" if row.fidelity == "adaptation" else "")


COLUMNS = ("#", "method", "backbone", "headline", "acc % (mean ± std)", "95% CI", "n", "best-val acc %",
           "worst client %", "total bytes", "bytes / round", "trainable params", "wall s", "protocol")


def _display_cells(row: Row, rank: int | None) -> list[str]:
    st = row.stats
    return [
        "—" if rank is None else str(rank), _method_cell(row), row.backbone, row.headline,
        fmt_pm(st["headline"]), fmt_ci(st["headline"]), str(st["headline"].n) if row.kind == "measured" else "—",
        fmt_pm(st["headline_best_val"]), fmt_pm(st["client_acc_worst"]), fmt_bytes(st["total_bytes"].mean),
        fmt_bytes(st["bytes_per_round"].mean), fmt_count(st["trainable_params"]), fmt_secs(st["wall_seconds"]),
        f"`{row.protocol_hash}`" if row.kind == "measured" else "published",
    ]


def _ranks(table: Table) -> list[int | None]:
    out, rank = [], 0
    for row in table.rows:
        if row.kind == "measured":
            rank += 1
            out.append(rank)
        else:
            out.append(None)
    return out


def intro_line(board: Board) -> str:
    return (f"Generated from {board.n_records} records"
            + (f" ({len(board.invalid)} invalid records left out)" if board.invalid else "") + ".")


def render_markdown(board: Board) -> str:
    import pandas as pd

    out = [
        "# fedbench leaderboard", "",
        intro_line(board) + " Accuracies in %: mean ± sample std over seeds; 95% CI is the half-width of "
        "the confidence interval of the mean (Student's t, n-1 df); n is the number of seeds. "
        "Each table is one task protocol; each row one protocol (its hash in the last column): records "
        "that differ in anything but the seed are never averaged. `headline` names the metric: held-out "
        "domain accuracy, else global-model accuracy, else mean client accuracy. Bytes are measured on "
        "the wire (up + down); wall time depends on the machine. Rows marked *published* are numbers "
        "from the papers, shown only where their stated protocol matches. See `index.html` for "
        "sortable tables and plots.", "",
    ]
    if not board.tables:
        out += ["No records yet: run `fedbench sweep ...` or `fedbench run ...`.", ""]
    for table in board.tables:
        out += [f"## {table.label}", "", f"Task protocol `{table.table_id}`.", ""]
        frame = pd.DataFrame([_display_cells(r, k) for r, k in zip(table.rows, _ranks(table), strict=True)],
                             columns=list(COLUMNS))
        out += [frame.to_markdown(index=False, disable_numparse=True), ""]
        sources = sorted({r.source for r in table.rows if r.kind == "published" and r.source})
        out += [f"Published: {s}" for s in sources] + ([""] if sources else [])
    if board.published_not_shown:
        out += ["## Published numbers not shown", "",
                "Their stated protocol matches no table here:", ""]
        out += [f"- {line}" for line in board.published_not_shown] + [""]
    if board.invalid:
        out += ["## Invalid records (left out)", ""]
        out += [f"- `{v.path.as_posix()}`: {'; '.join(v.problems)}" for v in board.invalid] + [""]
    return "\n".join(out)


def _csv_number(x: float | None) -> float | int | None:
    """Integers stay integers; other numbers keep 8 decimals (no float noise in the file)."""
    if x is None:
        return None
    return int(x) if float(x).is_integer() else round(x, 8)


def board_frame(board: Board) -> Any:
    """One CSV line per row of every table, raw numbers (fractions, bytes, seconds)."""
    import pandas as pd

    lines = []
    for table in board.tables:
        for row in table.rows:
            line: dict[str, Any] = {
                "task": table.task, "table": table.table_id, "table_label": table.label, "kind": row.kind,
                "method": row.method, "label": row.label, "backbone": row.backbone, "fidelity": row.fidelity,
                "protocol": row.protocol_hash, "headline_metric": row.headline,
                "n": row.stats["headline"].n, "seeds": " ".join(map(str, row.seeds)),
            }
            for name in STAT_NAMES:
                s = row.stats[name]
                for part in ("mean", "std", "ci95"):
                    line[f"{name}_{part}"] = _csv_number(getattr(s, part))
            line["method_options"] = json.dumps(row.protocol.get("method_options", {}), sort_keys=True)
            line["task_options"] = json.dumps(table.protocol["task_options"], sort_keys=True)
            line["rounds"], line["sample"] = table.protocol["rounds"], table.protocol["sample"]
            line["spec_hashes"] = " ".join(row.spec_hashes)
            line["source"] = row.source
            lines.append(line)
    return pd.DataFrame(lines)


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def write_leaderboard(results_dir: str | Path = "results", out: str | Path = "leaderboard",
                      include_ci: bool = False) -> tuple[Board, list[Path]]:
    """Read ``results_dir``, write README.md, leaderboard.csv and index.html into ``out``."""
    if not Path(results_dir).is_dir():
        raise ResultsError(f"no results directory {results_dir}; pass --results-dir DIR (the folder that "
                           f"`fedbench run` / `fedbench sweep` wrote into)")
    records, invalid = load_records(results_dir, include_ci=include_ci)
    # Paths relative to the results folder keep the output the same wherever the repo lives.
    root = Path(results_dir)
    invalid = [replace(v, path=v.path.relative_to(root)) if v.path.is_relative_to(root) else v for v in invalid]
    board = build_board(records, invalid)
    from fedbench.board.html import render_html

    out = Path(out)
    written = []
    for name, text in (("README.md", render_markdown(board)),
                       ("leaderboard.csv", board_frame(board).to_csv(index=False, lineterminator="\n")),
                       ("index.html", render_html(board))):
        atomic_write_text(out / name, text)
        written.append(out / name)
    return board, written
