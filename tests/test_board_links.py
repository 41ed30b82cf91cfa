"""The leaderboard on real records written by the engine: every link on the page (and in the
Markdown and CSV) resolves to an existing file or anchor from the folder the page lives in, and
records that differ in one key of their protocol are never averaged into one row."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedbench.board.grouping import build_board, load_records
from fedbench.board.leaderboard import write_leaderboard
from fedbench.core.results import write_record
from fedbench.core.spec import RunSpec
from fedbench.harness.sweep import sweep

FAST = ["local_epochs=1", "samples=200"]


@pytest.fixture(scope="module")
def engine_records(blobs_task, tmp_path_factory) -> list[dict[str, Any]]:
    """fedavg and local on blobs, two seeds each at 2 rounds, written by the real engine."""
    root = tmp_path_factory.mktemp("board-links")
    sweep(["fedavg", "local"], [blobs_task], [0, 1], FAST, 2, results_dir=root, progress=False, log=lambda _: None)
    return sorted((json.loads(p.read_text()) for p in root.rglob("*.json")),
                  key=lambda r: (r["spec"]["method"], r["spec"]["seed"]))


def _variant(record: dict[str, Any], **spec_changes: Any) -> dict[str, Any]:
    """A copy of ``record`` with its spec changed and its hash recomputed (a valid record of another protocol)."""
    rec = copy.deepcopy(record)
    for key, value in spec_changes.items():
        if key in ("method_options", "task_options"):
            rec["spec"][key] = {**rec["spec"][key], **value}
        else:
            rec["spec"][key] = value
    rec["spec_hash"] = RunSpec.from_dict(rec["spec"]).spec_hash
    return rec


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(found["id"])
        if tag == "a" and found.get("href"):
            self.hrefs.append(found["href"])


def test_every_link_resolves_from_the_page_folder(engine_records, tmp_path):
    repo = tmp_path / "repo"  # the committed layout: results/ and leaderboard/ side by side
    for rec in engine_records:
        write_record(rec, repo / "results")
    fedavg = next(r for r in engine_records if r["spec"]["method"] == "fedavg")
    diverged = _variant(fedavg, seed=7)
    diverged["diverged"] = {"round": 2, "reason": "loss became nan"}
    diverged_path = write_record(diverged, repo / "results")
    older = _variant(fedavg, seed=8)  # diverged before runs were marked: a null train loss, no mark
    older["metrics"]["rounds"][0]["train_loss"] = None
    write_record(older, repo / "results")
    board, _ = write_leaderboard(repo / "results", repo / "leaderboard")
    out = repo / "leaderboard"

    links = _Links()
    links.feed((out / "index.html").read_text(encoding="utf-8"))
    files = [h for h in links.hrefs if not h.startswith("#")]
    anchors = [h[1:] for h in links.hrefs if h.startswith("#")]
    assert not [h for h in files if "://" in h or h.startswith("/")], "links must be relative"
    missing = [h for h in files if not (out / h).is_file()]
    assert not missing, missing
    assert anchors and not [a for a in anchors if a not in links.ids], "a link to an anchor the page lacks"
    assert "card-blobs" in anchors  # each section links its task card

    # Each row's links are its own records: the seed in the link text is the seed of the record behind it.
    page = (out / "index.html").read_text(encoding="utf-8")
    seed_links = re.findall(r'<a href="([^"]+\.json)" title="record of seed (\d+)">(\d+)</a>', page)
    assert len(seed_links) == 4
    for href, seed, text in seed_links:
        assert json.loads((out / href).read_text())["spec"]["seed"] == int(seed) == int(text)
    rows = [r for t in board.tables for r in t.rows if r.kind == "measured"]
    linked = {h for h in files if h.endswith(".json")}
    for row in rows:
        hashes = {json.loads((out / h).read_text())["spec_hash"] for h in linked
                  if Path(h).stem in row.spec_hashes}
        assert hashes == set(row.spec_hashes) and len(hashes) == row.stats["headline"].n
    # The diverged run is linked from its note, and counted in no row; nor is the older unmarked one,
    # which the page lists (as diverged, or as an invalid record where validation refuses it).
    assert "../results/blobs/fedavg/" + diverged_path.name in files
    assert not [r for r in rows if {diverged["spec_hash"], older["spec_hash"]} & set(r.spec_hashes)]
    assert [r.stats["headline"].n for r in rows] == [2, 2]
    assert older["spec_hash"] in (out / "index.html").read_text(encoding="utf-8")

    markdown = (out / "README.md").read_text(encoding="utf-8")
    md_files = [h for h in re.findall(r"\]\(([^)#\s]+)\)", markdown)]
    assert any(h.endswith(".json") for h in md_files)
    assert not [h for h in md_files if not (out / h).is_file()]
    assert "(#task-card-blobs)" in markdown and "\n## Task card: blobs\n" in markdown

    import pandas as pd

    csv = pd.read_csv(out / "leaderboard.csv")
    assert all((out / h).is_file() for cell in csv["records"] for h in cell.split())


@pytest.mark.parametrize("change", [
    {"method_options": {"lr": 0.123}},
    {"task_options": {"alpha": 0.9}},
    {"backbone": "another-backbone"},
    {"method_version": 2},
], ids=["method option", "task option", "backbone", "method version"])
def test_records_that_differ_in_one_key_are_never_averaged(engine_records, tmp_path, change):
    """Two records of one seed, identical but for one key of their protocol: two rows of one seed each."""
    original = next(r for r in engine_records if r["spec"]["method"] == "fedavg" and r["spec"]["seed"] == 0)
    other = _variant(original, **change)
    assert other["spec_hash"] != original["spec_hash"]
    for rec in (original, other):
        write_record(rec, tmp_path)
    records, invalid = load_records(tmp_path)
    assert len(records) == 2 and not invalid
    board = build_board(records, published=lambda task: {})
    rows = [r for t in board.tables for r in t.rows if r.kind == "measured"]
    assert sorted(r.stats["headline"].n for r in rows) == [1, 1], "the two records were averaged into one row"
    assert sorted(h for r in rows for h in r.spec_hashes) == sorted([original["spec_hash"], other["spec_hash"]])
    assert len({r.protocol_hash for r in rows}) == 2
