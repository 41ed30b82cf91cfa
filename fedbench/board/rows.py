"""The leaderboard's data: a board of tables, a table of rows, a row per protocol over its seeds.

Built by :mod:`fedbench.board.grouping`, written by :mod:`fedbench.board.leaderboard`
(Markdown, CSV) and :mod:`fedbench.board.html` (the page); nothing here reads files or formats text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbench.board.stats import Summary
from fedbench.board.validate import Validation

# What a row aggregates over its seeds (each a :class:`Summary` in ``Row.stats``).
ACCURACY_STATS = ("headline", "headline_best_val", "global_acc", "heldout_acc_mean", "client_acc_mean",
                  "client_acc_worst", "class_acc_worst", "class_acc_std", "modality_acc_worst")
# Time: the training rounds (round_seconds, per round) apart from setting up their inputs (loading the
# backbone and the data, encoding features: inputs_seconds), which a warm feature cache shortens;
# wall_seconds is the whole run and stays in the CSV only.
TIME_STATS = ("round_seconds", "seconds_per_round", "inputs_seconds", "wall_seconds")
STAT_NAMES = (*ACCURACY_STATS, "total_bytes", "bytes_per_round", "trainable_params", *TIME_STATS)


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
    # The record file of each seed, in seed order (as read: the page links them relative to itself).
    record_paths: list[Path] = field(default_factory=list)
    # Seeds of this protocol whose run diverged: listed, never averaged into ``stats``.
    diverged_seeds: list[int] = field(default_factory=list)
    num_classes: int | None = None  # what the records' partition says (None: not recorded)

    @property
    def score(self) -> float | None:
        return self.stats["headline"].mean


@dataclass
class RankGroup:
    """The rows of one table scored the same way (one headline metric, one backbone): the only
    rows a rank compares. Per row, in display order: its rank (None: not ranked), whether it
    shares that rank (its 95% interval overlaps another's), whether it is on the Pareto front."""

    headline: str
    backbone: str
    rows: list[Row]
    ranks: list[int | None]
    tied: list[bool]
    on_front: list[bool]


@dataclass(frozen=True)
class DivergedRun:
    """A record whose run diverged (marked by the engine, or an older one with a null train loss)."""

    path: Path
    label: str
    backbone: str
    seed: int
    spec_hash: str
    round: int | None
    reason: str


@dataclass
class Table:
    """One task protocol (task, task options, rounds, clients per round): its rows, in rank groups."""

    table_id: str
    task: str
    label: str
    protocol: dict[str, Any]
    rows: list[Row] = field(default_factory=list)  # every group's rows, group after group
    groups: list[RankGroup] = field(default_factory=list)
    diverged: list[DivergedRun] = field(default_factory=list)
    num_classes: int | None = None  # None: the records do not say, or disagree
    reduced: list[str] = field(default_factory=list)  # why this is a reduced (smoke-test) protocol

    @property
    def chance(self) -> float | None:
        """The accuracy of a uniform random guess, 1 / number of classes."""
        return 1 / self.num_classes if self.num_classes else None


@dataclass
class Board:
    """Every table, how many records they came from, and what was left out and why."""

    tables: list[Table]
    n_records: int
    invalid: list[Validation] = field(default_factory=list)
    published_not_shown: list[str] = field(default_factory=list)
    diverged: list[DivergedRun] = field(default_factory=list)  # those with no table of their protocol
