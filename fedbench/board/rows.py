"""The leaderboard's data: a board of tables, a table of rows, a row per protocol over its seeds.

Built by :mod:`fedbench.board.grouping`, written by :mod:`fedbench.board.leaderboard`
(Markdown, CSV) and :mod:`fedbench.board.html` (the page); nothing here reads files or formats text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedbench.board.stats import Summary
from fedbench.board.validate import Validation

# What a row aggregates over its seeds (each a :class:`Summary` in ``Row.stats``).
ACCURACY_STATS = ("headline", "headline_best_val", "global_acc", "heldout_acc_mean", "client_acc_mean",
                  "client_acc_worst", "class_acc_worst", "class_acc_std", "modality_acc_worst")
STAT_NAMES = (*ACCURACY_STATS, "total_bytes", "bytes_per_round", "trainable_params", "wall_seconds")


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
    # The code that ran (spec version 2): the method's class and version; "" and 0 for records of
    # spec version 1, which did not record it.
    method_class: str = ""
    method_version: int = 0
    # The commits the seeds ran from, short, sorted, unique ("-dirty": uncommitted changes).
    commits: list[str] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        return self.stats["headline"].mean


@dataclass
class Table:
    """One task protocol (task, task options, rounds, clients per round) and its rows, ranked."""

    table_id: str
    task: str
    label: str
    protocol: dict[str, Any]
    rows: list[Row] = field(default_factory=list)


@dataclass
class Board:
    """Every table, how many records they came from, and what was left out and why."""

    tables: list[Table]
    n_records: int
    invalid: list[Validation] = field(default_factory=list)
    published_not_shown: list[str] = field(default_factory=list)
