"""Ranks a reader can trust: only among rows scored the same way, ties where seeds cannot tell rows apart.

- A rank compares rows of one headline metric and one backbone (a :class:`RankGroup`): a mean
  client accuracy of local training says nothing about a held-out accuracy, nor a digits-clip row
  about a row with no backbone.
- Each row's interval is the 95% confidence interval of its mean over seeds (a row of one seed
  has none: its mean is a point). Rows whose intervals overlap are never ranked apart, and
  overlap chains (A overlaps B, B overlaps C) share one rank, so no two overlapping rows differ
  in rank: competition ranking over the chains, ``1, =2, =2, 4``. Never alphabetical: the order
  among tied rows carries no meaning (equal means fall back to the protocol hash).
- The Pareto front (fewer bytes, higher accuracy) is computed within one group, and only where
  the group has two points or more (a front of one point says nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedbench.board.rows import RankGroup, Row
from fedbench.board.stats import Summary


def interval(s: Summary) -> tuple[float, float] | None:
    """The mean ± its 95% CI half-width; a point for one seed; None without a mean."""
    if s.mean is None:
        return None
    half = s.ci95 or 0.0
    return s.mean - half, s.mean + half


def tie_chains(summaries: Sequence[Summary]) -> list[int]:
    """A chain id per summary: summaries whose intervals overlap, directly or through others,
    share one (the connected components of the overlap graph; -1 for a summary without a mean)."""
    spans = [interval(s) for s in summaries]
    parent = list(range(len(spans)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(spans):
        for j in range(i + 1, len(spans)):
            b = spans[j]
            if a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]:  # touching overlaps
                parent[root(j)] = root(i)
    return [root(i) if span is not None else -1 for i, span in enumerate(spans)]


def competition_ranks(summaries: Sequence[Summary]) -> tuple[list[int | None], list[bool]]:
    """Ranks and tie marks of summaries given best first (mean descending).

    A chain's rank is 1 + the number of rows ranked above it; a row is tied when its chain has
    another row. Summaries without a mean are not ranked (None).
    """
    chains = tie_chains(summaries)
    size = {c: chains.count(c) for c in set(chains)}
    ranks: list[int | None] = []
    first_of: dict[int, int] = {}
    ranked = 0
    for chain in chains:
        if chain < 0:
            ranks.append(None)
            continue
        first_of.setdefault(chain, ranked + 1)
        ranks.append(first_of[chain])
        ranked += 1
    return ranks, [c >= 0 and size[c] > 1 for c in chains]


def rank_text(rank: int | None, tied: bool) -> str:
    """``3``, ``=3`` for a shared rank, ``—`` for a row that is not ranked."""
    if rank is None:
        return "—"
    return f"={rank}" if tied else str(rank)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, accuracy) that no other point dominates (as few bytes or fewer and as
    high an accuracy or higher, better on one), by bytes; equal points are on the front together."""
    def dominated(i: int) -> bool:
        (bi, ai) = points[i]
        return any(b <= bi and a >= ai and (b < bi or a > ai) for b, a in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], -points[i][1]))


def _front_flags(rows: list[Row]) -> list[bool]:
    candidates = [i for i, r in enumerate(rows) if r.kind == "measured" and r.score is not None
                  and r.stats["total_bytes"].mean is not None]
    flags = [False] * len(rows)
    if len(candidates) >= 2:
        front = pareto_front([(rows[i].stats["total_bytes"].mean, rows[i].score) for i in candidates])
        for k in front:
            flags[candidates[k]] = True
    return flags


def _display_key(row: Row) -> tuple[bool, float, str]:
    # Best mean first; rows without a score last; equal means by protocol hash, never by name.
    return row.score is None, -(row.score or 0.0), row.protocol_hash or row.label


def rank_group(headline: str, backbone: str, rows: list[Row]) -> RankGroup:
    """Order one group's rows best first and rank the measured ones (published rows are shown, not ranked)."""
    ordered = sorted(rows, key=_display_key)
    measured = [i for i, r in enumerate(ordered) if r.kind == "measured"]
    ranks, tied = competition_ranks([ordered[i].stats["headline"] for i in measured])
    all_ranks: list[int | None] = [None] * len(ordered)
    all_tied = [False] * len(ordered)
    for i, rank, tie in zip(measured, ranks, tied, strict=True):
        all_ranks[i], all_tied[i] = rank, tie
    return RankGroup(headline, backbone, ordered, all_ranks, all_tied, _front_flags(ordered))
