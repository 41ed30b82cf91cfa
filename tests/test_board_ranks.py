"""The leaderboard ranks honestly: only within one headline metric and one backbone, never apart
where intervals overlap, never alphabetically; the Pareto front within one group; a chance line
in every table and plot; round time apart from encoding; diverged runs listed, never averaged;
reduced protocols labelled.

Records here are built in memory (the board reads no more than these fields) and grouped with
:func:`build_board` directly; tests/test_board_links.py writes real engine records to disk.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from fedbench.board.compare import side_by_side
from fedbench.board.grouping import build_board, divergence, reduced_reasons
from fedbench.board.html import render_html
from fedbench.board.leaderboard import board_frame, render_markdown
from fedbench.board.ranking import competition_ranks, rank_text, tie_chains
from fedbench.board.stats import summarize
from fedbench.core.spec import RunSpec

T_2 = 4.302653  # Student's t, 0.975 quantile, 2 degrees of freedom (three seeds)


def record(method: str = "fedavg", seed: int = 0, acc: float = 0.5, *, headline: str = "global_acc",
           backbone: str = "none", total_bytes: int = 1000, classes: int | None = 4, rounds: int = 2,
           method_options: dict[str, Any] | None = None, train_loss: float | None = 0.5, trains: bool = True,
           round_seconds: tuple[float, ...] = (1.0, 1.0), inputs_seconds: float = 0.5,
           extra: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """A minimal record of ``method`` scoring ``acc`` on ``headline`` in its last round (``trains=False``:
    a zero-shot record, one evaluation at round 0)."""
    spec = RunSpec(method=method, task="synthetic", backbone=backbone, seed=seed, rounds=rounds, sample=1.0,
                   method_options=method_options or {}, method_class=f"plugins.{method}", method_version=1)
    trained = rounds if trains else 0
    rows = ([{"round": r, headline: acc, "train_loss": train_loss} for r in range(1, rounds + 1)] if trains
            else [{"round": 0, headline: acc, "train_loss": None}])
    rec: dict[str, Any] = {
        "spec": spec.to_dict(), "spec_hash": spec.spec_hash, "schema_version": 1,
        "metrics": {"rounds": rows, "final": {"last": dict(rows[-1]), "best_val": None, "rounds_run": trained,
                                              "trainable_params": 10}},
        "comm": {"up_bytes": total_bytes // 2, "down_bytes": total_bytes - total_bytes // 2},
        "timing": {"round_seconds": list(round_seconds), "inputs_seconds": inputs_seconds, "data_seconds": 0.0,
                   "total_seconds": sum(round_seconds) + inputs_seconds},
        "provenance": {"git_commit": "0123456789abcdef" * 2 + "01234567"},
        "partition": {"class_histograms": [[1] * classes]} if classes else {},
        **(extra or {}),
    }
    return Path("results/synthetic") / method / f"{spec.spec_hash}.json", rec


def seeds(method: str, values: list[float], **kw: Any) -> list[tuple[Path, dict[str, Any]]]:
    return [record(method, seed, v, **kw) for seed, v in enumerate(values)]


def board_of(*recs: list[tuple[Path, dict[str, Any]]]):
    return build_board([r for group in recs for r in group], published=lambda task: {})


def one_table(board):
    (table,) = board.tables
    return table


def group_of(table, method: str):
    return next(g for g in table.groups if any(r.method == method for r in g.rows))


def placing(group, method: str) -> str:
    i = next(k for k, r in enumerate(group.rows) if r.method == method)
    return rank_text(group.ranks[i], group.tied[i])


# ---------------------------------------------------------------- ranking scope


def test_a_rank_compares_one_headline_metric_and_one_backbone():
    board = board_of(seeds("fedavg", [0.79, 0.80, 0.81]), seeds("fedprox", [0.69, 0.70, 0.71]),
                     seeds("fedclip", [0.59, 0.60, 0.61], backbone="clip-a"),
                     seeds("local", [0.94, 0.95, 0.96], headline="client_acc_mean"))
    table = one_table(board)
    assert [(g.headline, g.backbone, [r.method for r in g.rows]) for g in table.groups] == [
        ("global_acc", "clip-a", ["fedclip"]), ("global_acc", "none", ["fedavg", "fedprox"]),
        ("client_acc_mean", "none", ["local"])]
    # Every group ranks from 1: local's 95% is not above fedavg's 80%, fedclip's 60% not below fedprox's 70%.
    assert [g.ranks for g in table.groups] == [[1], [1, 2], [1]]
    csv = board_frame(board)
    assert dict(zip(csv["method"], csv["rank"], strict=True)) == {"fedclip": "1", "fedavg": "1", "fedprox": "2",
                                                                  "local": "1"}
    assert dict(zip(csv["method"], csv["rank_group"], strict=True))["fedclip"] == "global_acc | clip-a"
    # The Markdown: one table per group, each under a heading naming its metric and backbone.
    markdown = render_markdown(board)
    assert markdown.count("### global-model test accuracy · backbone none") == 1
    assert markdown.count("### mean client accuracy (each client's own model) · backbone none") == 1
    assert re.search(r"\| 1 +\| local v1 ", markdown) and re.search(r"\| 2 +\| fedprox v1 ", markdown)
    assert render_html(board).count('<table class="board"') == 3


# ---------------------------------------------------------------- ties and overlapping intervals


def test_overlapping_intervals_are_not_ranked_apart():
    # Three seeds at mean ± d: std d, 95% CI half-width t * d / sqrt(3) = 0.0248 for d = 0.01.
    assert summarize([0.89, 0.90, 0.91]).ci95 == pytest.approx(T_2 * 0.01 / math.sqrt(3))
    board = board_of(
        seeds("a-first", [0.89, 0.90, 0.91]),   # [0.8752, 0.9248]
        seeds("b-middle", [0.85, 0.86, 0.87]),  # [0.8352, 0.8848]: overlaps a-first
        seeds("c-chain", [0.81, 0.82, 0.83]),   # [0.7952, 0.8448]: overlaps b-middle, not a-first
        seeds("d-apart", [0.69, 0.70, 0.71]),   # [0.6752, 0.7248]: overlaps none
        seeds("e-point", [0.50]), seeds("f-point", [0.50]),  # one seed each, equal means: a tie
        seeds("g-last", [0.40]))
    group = one_table(board).groups[0]
    order = [r.method for r in group.rows]
    assert order[:4] == ["a-first", "b-middle", "c-chain", "d-apart"] and order[-1] == "g-last"
    # A chain of overlaps shares one rank, so no two overlapping rows differ in rank.
    assert [placing(group, m) for m in ("a-first", "b-middle", "c-chain", "d-apart", "g-last")] == [
        "=1", "=1", "=1", "4", "7"]
    assert placing(group, "e-point") == placing(group, "f-point") == "=5"
    assert "| =1 " in render_markdown(board) and ">=1</td>" in render_html(board)
    assert "marked =k" in render_markdown(board)  # the legend says what = means


def test_ties_are_never_broken_alphabetically():
    # Identical scores: both rows share the rank, whichever name sorts first.
    for low, high in (("aaa", "zzz"), ("zzz", "aaa")):
        group = one_table(board_of(seeds(low, [0.7, 0.7, 0.7]), seeds(high, [0.7, 0.7, 0.7]))).groups[0]
        assert placing(group, low) == placing(group, high) == "=1"
    # Different scores: the better row first and ranked first, whatever its name.
    group = one_table(board_of(seeds("aaa", [0.60, 0.61, 0.62]), seeds("zzz", [0.80, 0.81, 0.82]))).groups[0]
    assert [r.method for r in group.rows] == ["zzz", "aaa"] and group.ranks == [1, 2] and group.tied == [False] * 2


def test_tie_chains_and_competition_ranks():
    points = [summarize([x]) for x in (0.9, 0.9, 0.8, 0.7, 0.7, 0.7)]
    assert competition_ranks(points) == ([1, 1, 3, 4, 4, 4], [True, True, False, True, True, True])
    # Touching intervals overlap: [0.8, 0.9] and [0.7, 0.8].
    touching = [summarize([0.8, 0.9]), summarize([0.7, 0.8])]
    touching = [s.__class__(s.mean, s.std, 0.05, s.n) for s in touching]
    assert len(set(tie_chains(touching))) == 1
    assert competition_ranks([summarize([])]) == ([None], [False])


# ---------------------------------------------------------------- Pareto front


def test_the_pareto_front_is_computed_within_one_group():
    board = board_of(
        seeds("local", [0.99], headline="client_acc_mean", total_bytes=0),  # would dominate all on one plot
        seeds("zero-shot", [0.95], backbone="clip-a", total_bytes=0, trains=False),
        seeds("fedavg", [0.80], total_bytes=1_000), seeds("fedprox", [0.70], total_bytes=2_000),
        seeds("fedbig", [0.85], total_bytes=50_000))
    table = one_table(board)
    fronts = {r.method: on for g in table.groups for r, on in zip(g.rows, g.on_front, strict=True)}
    # fedprox: more bytes and lower accuracy than fedavg; local and zero-shot are alone in their groups.
    assert fronts == {"fedbig": True, "fedavg": True, "fedprox": False, "local": False, "zero-shot": False}
    page = render_html(board)
    ringed = re.findall(r'<circle [^>]*class="front"[^>]*><title>([^<]*)</title>', page)
    assert sorted(t.split(" (")[0] for t in ringed) == ["fedavg v1", "fedbig v1"]
    assert page.count('<path class="pareto"') == 1  # the one group with points to compare
    assert dict(zip(board_frame(board)["method"], board_frame(board)["pareto_front"], strict=True))["local"] == False  # noqa: E712


# ---------------------------------------------------------------- chance level


def test_a_chance_line_in_every_table_and_plot():
    board = board_of(seeds("fedavg", [0.60, 0.62], classes=5), seeds("fedprox", [0.10, 0.12], classes=5),
                     seeds("local", [0.70], classes=5, headline="client_acc_mean"))
    table = one_table(board)
    assert table.num_classes == 5 and table.chance == pytest.approx(0.2)
    markdown = render_markdown(board)
    lines = [x for x in markdown.splitlines() if x.startswith("| ") and "v1" in x or "chance (1/5)" in x]
    # The chance row sits among the rows by its accuracy: fedavg above it, fedprox below it.
    assert [("fedavg" in x, "chance" in x, "fedprox" in x) for x in lines[:3]] == [
        (True, False, False), (False, True, False), (False, False, True)]
    assert "*20.00*" in lines[1]
    page = render_html(board)
    assert page.count('<tr class="chance"') == len(table.groups) == 2
    assert page.count('<line class="chance"') == page.count('<svg class="plot"') == 3  # two groups, one with 2 rows
    assert set(board_frame(board)["chance"]) == {0.2}


def test_no_chance_line_where_the_records_do_not_say_or_disagree():
    for board in (board_of(seeds("fedavg", [0.6], classes=None)),
                  board_of(seeds("fedavg", [0.6], classes=4), seeds("fedprox", [0.5], classes=10))):
        assert one_table(board).chance is None
        assert '<tr class="chance"' not in render_html(board) and "chance (1/" not in render_markdown(board)


# ---------------------------------------------------------------- time


def test_round_time_is_shown_apart_from_encoding():
    # The same protocol, cache cold then warm: encoding 95 s, then 1 s; the rounds 3 s both times.
    cold = record("fedclip", 0, 0.5, round_seconds=(1.0, 2.0), inputs_seconds=95.0)
    warm = record("fedclip", 1, 0.5, round_seconds=(1.5, 1.5), inputs_seconds=1.0)
    (row,) = one_table(build_board([cold, warm], published=lambda task: {})).rows
    assert row.stats["round_seconds"].mean == pytest.approx(3.0) and row.stats["round_seconds"].std == 0
    assert row.stats["seconds_per_round"].mean == pytest.approx(1.5)
    assert row.stats["inputs_seconds"].mean == pytest.approx(48.0)
    board = build_board([cold, warm], published=lambda task: {})
    header = next(x for x in render_markdown(board).splitlines() if x.startswith("| #"))
    assert "| round s " in header and "| s / round " in header and "| inputs s " in header
    assert "wall" not in header
    line = next(x for x in render_markdown(board).splitlines() if "fedclip v1" in x and x.startswith("| "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    names = [c.strip() for c in header.strip("|").split("|")]
    assert cells[names.index("round s")] == "3.0" and cells[names.index("inputs s")] == "48.0"
    csv = board_frame(board)
    assert csv.loc[0, "round_seconds_mean"] == 3 and csv.loc[0, "inputs_seconds_mean"] == 48
    _, metric_rows = side_by_side(cold[1], warm[1])
    by_label = {label: (a, b) for label, a, b, _ in metric_rows}
    assert by_label["round s"] == ("3.0", "3.0") and by_label["inputs s"] == ("95.0", "1.0")


# ---------------------------------------------------------------- diverged runs


def test_diverged_runs_are_listed_never_averaged_nor_ranked():
    marked = record("fedavg", 2, 0.10, extra={"diverged": {"round": 2, "reason": "loss became nan"}})
    older = record("fedprox", 1, 0.05, train_loss=None)  # an older record: null losses, no mark
    alone = record("fedbad", 0, 0.99, extra={"diverged": {"round": 1, "reason": "loss became inf"}})
    zero_shot = record("zero-shot", 0, 0.3, trains=False)  # trains nothing: a null loss is no divergence
    assert divergence(zero_shot[1]) is None and divergence(older[1])[0] == 1
    board = build_board([*seeds("fedavg", [0.80, 0.82]), marked, *seeds("fedprox", [0.70]), older, alone, zero_shot],
                        published=lambda task: {})
    table = one_table(board)
    rows = {r.method: r for r in table.rows}
    assert "fedbad" not in rows  # its only seed diverged: no row, no rank
    assert rows["fedavg"].stats["headline"].mean == pytest.approx(0.81) and rows["fedavg"].seeds == [0, 1]
    assert rows["fedavg"].diverged_seeds == [2] and rows["fedprox"].diverged_seeds == [1]
    assert rows["zero-shot"].stats["headline"].n == 1 and not rows["zero-shot"].diverged_seeds
    assert [(d.label, d.seed, d.round) for d in table.diverged] == [
        ("fedavg v1", 2, 2), ("fedbad v1", 0, 1), ("fedprox v1", 1, 1)]
    assert "loss became nan" in table.diverged[0].reason and "null" in table.diverged[2].reason
    markdown, page = render_markdown(board), render_html(board)
    assert "Diverged runs, not ranked and not averaged (3):" in markdown and "2 (+1 diverged)" in markdown
    assert '<div class="diverged">' in page and "loss became inf" in page
    assert "3 diverged runs listed, not ranked" in markdown


# ---------------------------------------------------------------- reduced protocols


def test_reduced_protocols_are_labelled():
    assert any("40 real PACS images" in r for r in reduced_reasons("pacs-mini", {"heldout": "art_painting"}, 20))
    assert reduced_reasons("rotated-mnist", {"heldout": "75"}, 50) == []
    assert reduced_reasons("mnist-dirichlet", {"max_train": 6000, "max_test": 0}, 50) == [
        "subsampled data: max_train=6000 (default: all)"]
    assert reduced_reasons("mnist-dirichlet", {}, 10) == ["10 rounds, fewer than the task's default of 50"]
    assert reduced_reasons("not-registered-here", {}, 1) == []

    board = board_of(seeds("fedavg", [0.5]))
    one_table(board).reduced = ["reduced data: a demo"]
    assert "## synthetic · 2 rounds — REDUCED PROTOCOL" in render_markdown(board)
    assert '<span class="reduced">REDUCED PROTOCOL</span></h2>' in render_html(board)
    assert set(board_frame(board)["reduced"]) == {"reduced data: a demo"}
