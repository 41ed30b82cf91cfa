"""What a leaderboard table shows: its columns, each row's cell text and sort value.

The Markdown table (:mod:`fedbench.board.leaderboard`) and the HTML table
(:mod:`fedbench.board.html`) both draw :data:`COLUMNS`, each adding only its own markup, so
the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbench.board.grouping import HEADLINE_NAMES, version_tag
from fedbench.board.rows import Board, RankGroup, Row, Table
from fedbench.board.stats import Summary
from fedbench.core.formatting import MISSING, format_bytes, format_count, format_percent, format_seconds
from fedbench.core.registry import TASKS


def mean_std_percent(s: Summary) -> str:
    """``91.90 ± 1.10``: mean and sample std as percents (the mean alone for one seed)."""
    text = format_percent(s.mean)
    return text if s.mean is None or s.std is None else f"{text} ± {format_percent(s.std)}"


def ci_percent(s: Summary) -> str:
    return MISSING if s.ci95 is None else f"± {format_percent(s.ci95)}"


def mean_count(s: Summary) -> str:
    return format_count(s.mean)


def mean_seconds(s: Summary) -> str:
    return format_seconds(s.mean)


def seeds_text(row: Row) -> str:
    """How many seeds the row averages, and how many more diverged (never averaged)."""
    if row.kind != "measured":
        return MISSING
    extra = f" (+{len(row.diverged_seeds)} diverged)" if row.diverged_seeds else ""
    return f"{row.stats['headline'].n}{extra}"


def fine_seconds(s: Summary) -> str:
    """Seconds with two decimals below 10 s (a round of a feature-level method takes milliseconds)."""
    return MISSING if s.mean is None else (f"{s.mean:.2f}" if abs(s.mean) < 10 else format_seconds(s.mean))


def records_text(row: Row) -> str:
    """The seeds whose record files the row links (renderers make each one a link)."""
    return " ".join(str(seed) for seed in row.seeds) if row.record_paths else MISSING


def commits_text(row: Row) -> str:
    return " ".join(row.commits) if row.commits else MISSING


@dataclass(frozen=True)
class Column:
    """One column: its header, whether it sorts as a number, a row's text and sort value (None: last)."""

    header: str
    numeric: bool
    text: Callable[[Row], str]
    sort: Callable[[Row], Any]
    optional: bool = False  # shown only in tables where some row has a value (metrics few methods report)


def _text_column(header: str, text: Callable[[Row], str]) -> Column:
    return Column(header, False, text, text)


def _stat_column(header: str, stat: str, fmt: Callable[[Summary], str], optional: bool = False) -> Column:
    return Column(header, True, lambda r: fmt(r.stats[stat]), lambda r: r.stats[stat].mean, optional)


def _bytes_column(header: str, stat: str) -> Column:
    return Column(header, True, lambda r: format_bytes(r.stats[stat].mean), lambda r: r.stats[stat].mean)


# A rank group's table: its headline metric and backbone are the group's, named in its heading.
COLUMNS: tuple[Column, ...] = (
    _text_column("method", lambda r: r.label),
    Column("version", True, lambda r: version_tag(r.method_version) if r.kind == "measured" else MISSING,
           lambda r: r.method_version if r.kind == "measured" else None),
    _stat_column("acc % (mean ± std)", "headline", mean_std_percent),
    Column("95% CI", True, lambda r: ci_percent(r.stats["headline"]), lambda r: r.stats["headline"].ci95),
    Column("n", True, seeds_text, lambda r: r.stats["headline"].n if r.kind == "measured" else None),
    # Beside n: each seed's record file (renderers link them), so a number leads to its source.
    Column("records", False, records_text, lambda r: r.seeds[0] if r.record_paths else None),
    _stat_column("best-val acc %", "headline_best_val", mean_std_percent),
    _stat_column("worst client %", "client_acc_worst", mean_std_percent),
    _stat_column("worst class %", "class_acc_worst", mean_std_percent, optional=True),
    _stat_column("class spread %", "class_acc_std", mean_std_percent, optional=True),
    _stat_column("weakest modality %", "modality_acc_worst", mean_std_percent, optional=True),
    _bytes_column("total bytes", "total_bytes"),
    _bytes_column("bytes / round", "bytes_per_round"),
    _stat_column("trainable params", "trainable_params", mean_count),
    _stat_column("round s", "round_seconds", mean_seconds),
    _stat_column("s / round", "seconds_per_round", fine_seconds),
    _stat_column("inputs s", "inputs_seconds", fine_seconds),
    _text_column("protocol", lambda r: r.protocol_hash or "published"),
    _text_column("commit", commits_text),
)


def columns_for(rows: list[Row]) -> list[Column]:
    """The columns one table shows: every column, less the optional ones no row has a value for."""
    return [c for c in COLUMNS if not c.optional or any(c.sort(r) is not None for r in rows)]


def group_title(group: RankGroup) -> str:
    """``held-out domain accuracy · backbone digits-clip``: what every rank in the group compares."""
    return f"{HEADLINE_NAMES.get(group.headline, group.headline)} · backbone {group.backbone}"


def chance_text(table: Table) -> str:
    return f"chance (1/{table.num_classes})" if table.num_classes else ""


def chance_position(group: RankGroup, chance: float) -> int:
    """Where the chance line sits among the group's rows (after every row scoring at least chance)."""
    return sum(1 for r in group.rows if r.score is not None and r.score >= chance)


def intro_line(board: Board) -> str:
    n_diverged = len(board.diverged) + sum(len(t.diverged) for t in board.tables)
    left_out = [f"{len(board.invalid)} invalid records left out"] if board.invalid else []
    left_out += [f"{n_diverged} diverged runs listed, not ranked"] if n_diverged else []
    return f"Generated from {board.n_records} records" + (f" ({'; '.join(left_out)})" if left_out else "") + "."


# The part of the explanation the Markdown and HTML notes share, after their accuracy sentences.
ROWS_NOTE = ("Each section is one task protocol; each row one protocol (its hash in the protocol column): records "
             "that differ in anything but the seed, the method's version included, are never averaged. The "
             "version column names the method code's version (v? for records made before methods declared one); "
             "the commit column lists the commits its seeds ran from (-dirty: with uncommitted changes); the "
             "records column links each seed's record file, named by its seed.")
RANK_NOTE = ("A rank (#) compares only rows of one headline metric and one backbone, each such group its own "
             "table. Rows whose 95% confidence intervals overlap (directly or through a chain of overlaps) are not "
             "ranked apart: they share a rank, marked =k, and the order among them carries no meaning; a row of "
             "one seed has no interval and is compared by its mean alone. Published numbers are not ranked. The "
             "chance row is 1/(number of classes), the accuracy of a uniform random guess.")
TIME_NOTE = ("Times depend on the machine. round s: the training rounds (sum of timing.round_seconds, training and "
             "evaluation); s / round: the same per round; inputs s: loading the backbone and the data and encoding "
             "the inputs (timing.backbone_seconds + data_seconds + inputs_seconds), which a warm feature cache "
             "shortens.")
DIVERGED_NOTE = ("Diverged runs (a non-finite loss; older records: a null train loss in a trained round) are never "
                 "averaged nor ranked; they are listed under their table and counted in n as +k diverged.")


def reduced_text(table: Table) -> str:
    return ("Reduced protocol, a smoke test, not comparable with full-size results: " + "; ".join(table.reduced)
            + ".") if table.reduced else ""



def relative_href(path: Path, page_dir: Path | None) -> str:
    """``path`` as a link from a page in ``page_dir`` (relative, so the repository can live anywhere;
    as given where no relative path exists, e.g. another drive)."""
    if page_dir is None:
        return path.as_posix()
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(page_dir).resolve())).as_posix()
    except ValueError:
        return path.as_posix()


def card_anchor(task: str) -> str:
    """The id of a task's card on the page (Markdown: the heading ``Task card: TASK`` gives ``task-card-...``)."""
    return "card-" + re.sub(r"[^a-z0-9-]+", "-", task.lower())


def task_card_facts(table_task: str, tables: list[Table]) -> list[tuple[str, str]]:
    """(field, text) of a task's card for the page: what the registry says, and what the records say."""
    facts: list[tuple[str, str]] = []
    try:
        entry = TASKS.get(table_task)
        card = entry.obj.card
    except Exception:  # a task from a plugin not installed here
        facts.append(("card", "not available: the task is not registered in this installation"))
    else:
        facts += [("description", entry.description), ("fidelity", entry.fidelity), ("follows", entry.source),
                  ("code", entry.origin), ("classes", card.classes), ("domains", card.domains),
                  ("prompt template", card.prompt_template), ("data source", card.source),
                  ("licence", card.licence), ("protocol", card.protocol)]
    classes = sorted({t.num_classes for t in tables if t.num_classes})
    if classes:
        facts.append(("number of classes (records)", ", ".join(map(str, classes))
                      + " · chance " + ", ".join(f"{100 / k:.2f}%" for k in classes)))
    reduced = sorted({reason for t in tables for reason in t.reduced})
    if reduced:
        facts.append(("reduced protocols on this board", "; ".join(reduced)))
    return [(k, v) for k, v in facts if v]
