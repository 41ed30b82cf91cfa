"""What a leaderboard table shows: its columns, each row's cell text and sort value.

The Markdown table (:mod:`fedbench.board.leaderboard`) and the HTML table
(:mod:`fedbench.board.html`) both draw :data:`COLUMNS`, each adding only its own markup, so
the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedbench.board.rows import Board, Row
from fedbench.board.stats import Summary
from fedbench.core.formatting import MISSING, format_bytes, format_count, format_percent, format_seconds


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
    return str(row.stats["headline"].n) if row.kind == "measured" else MISSING


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


COLUMNS: tuple[Column, ...] = (
    _text_column("method", lambda r: r.label),
    _text_column("backbone", lambda r: r.backbone),
    _text_column("headline", lambda r: r.headline),
    _stat_column("acc % (mean ± std)", "headline", mean_std_percent),
    Column("95% CI", True, lambda r: ci_percent(r.stats["headline"]), lambda r: r.stats["headline"].ci95),
    Column("n", True, seeds_text, lambda r: r.stats["headline"].n if r.kind == "measured" else None),
    _stat_column("best-val acc %", "headline_best_val", mean_std_percent),
    _stat_column("worst client %", "client_acc_worst", mean_std_percent),
    _stat_column("worst class %", "class_acc_worst", mean_std_percent, optional=True),
    _stat_column("class spread %", "class_acc_std", mean_std_percent, optional=True),
    _stat_column("weakest modality %", "modality_acc_worst", mean_std_percent, optional=True),
    _bytes_column("total bytes", "total_bytes"),
    _bytes_column("bytes / round", "bytes_per_round"),
    _stat_column("trainable params", "trainable_params", mean_count),
    _stat_column("wall s", "wall_seconds", mean_seconds),
    _text_column("protocol", lambda r: r.protocol_hash or "published"),
    _text_column("commit", commits_text),
)


def columns_for(rows: list[Row]) -> list[Column]:
    """The columns one table shows: every column, less the optional ones no row has a value for."""
    return [c for c in COLUMNS if not c.optional or any(c.sort(r) is not None for r in rows)]


def ranks(rows: list[Row]) -> list[int | None]:
    """1, 2, ... for the measured rows in order; None for published ones (they are not ranked)."""
    out, rank = [], 0
    for row in rows:
        if row.kind == "measured":
            rank += 1
            out.append(rank)
        else:
            out.append(None)
    return out


def intro_line(board: Board) -> str:
    return (f"Generated from {board.n_records} records"
            + (f" ({len(board.invalid)} invalid records left out)" if board.invalid else "") + ".")


# The part of the explanation the Markdown and HTML notes share, after their accuracy sentences.
ROWS_NOTE = ("Each table is one task protocol; each row one protocol (its hash in the protocol column): records "
             "that differ in anything but the seed, the method's version included, are never averaged. The method "
             "cell names the method's version (v? for records made before methods declared one); the commit "
             "column lists the commits its seeds ran from (-dirty: with uncommitted changes).")
