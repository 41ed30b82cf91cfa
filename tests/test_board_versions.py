"""The leaderboard and method code: rows never average records of other method versions or
classes (nor version-1 records with version-2 ones), and each row shows its version and the
commits its seeds ran from, in the Markdown, the CSV and the page."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fedbench.board.grouping import build_board, load_records, short_commit
from fedbench.board.leaderboard import write_leaderboard
from fedbench.board.validate import validate_paths
from fedbench.core.results import write_record
from fedbench.core.spec import RunSpec
from fedbench.harness.sweep import sweep

FAST = ["local_epochs=1", "samples=200"]
COMMIT_A = "a1b2c3d4" + "0" * 32
COMMIT_B = "e5f6a7b8" + "1" * 32 + "-dirty"


@pytest.fixture(scope="module")
def pristine(blobs_task, tmp_path_factory) -> Path:
    """fedavg on blobs over two seeds, written by the real engine (spec version 2)."""
    root = tmp_path_factory.mktemp("board-versions")
    sweep(["fedavg"], [blobs_task], [0, 1], FAST, 2, results_dir=root, progress=False, log=lambda _: None)
    return root


def _records(root: Path) -> list[dict[str, Any]]:
    """The records under ``root`` in seed order."""
    return sorted((json.loads(p.read_text()) for p in root.rglob("*.json")), key=lambda r: r["spec"]["seed"])


def _name(label: str) -> str:
    """A label without its options: ``fedavg v1 (local_epochs=1)`` -> ``fedavg v1``."""
    return label.split(" (")[0]


def _variant(record: dict[str, Any], drop: tuple[str, ...] = (), commit: str | None = None,
             **spec_changes: Any) -> dict[str, Any]:
    """A copy of ``record`` as if run by other code: the spec changed, its hash recomputed."""
    rec = copy.deepcopy(record)
    rec["spec"].update(spec_changes)
    for key in drop:
        del rec["spec"][key]
    rec["spec_hash"] = RunSpec.from_dict(rec["spec"]).spec_hash
    if commit is not None:
        rec["provenance"]["git_commit"] = commit
    return rec


def _as_version_1(record: dict[str, Any]) -> dict[str, Any]:
    """The same run as a record made before specs named their method code."""
    return _variant(record, drop=("method_class", "method_version"), spec_version=1)


def _measured(board) -> list:
    return [r for t in board.tables for r in t.rows if r.kind == "measured"]


def test_method_versions_and_classes_are_never_averaged(pristine, tmp_path):
    originals = _records(pristine)
    assert {r["spec"]["method_version"] for r in originals} == {1} and len(originals) == 2
    for rec in originals:
        write_record(rec, tmp_path)
        write_record(_variant(rec, method_version=2), tmp_path)
        write_record(_as_version_1(rec), tmp_path)
        write_record(_variant(rec, method_class="plugins.fedavg.FedAvg"), tmp_path)
    assert all(v.ok for v in validate_paths([tmp_path])) and len(validate_paths([tmp_path])) == 8

    records, invalid = load_records(tmp_path)
    board = build_board(records, published=lambda task: {})
    rows = _measured(board)
    # Same options, same seeds: averaging across code would give one row of n = 8 (or 4).
    assert len(rows) == 4 and [r.stats["headline"].n for r in rows] == [2, 2, 2, 2]
    assert len(board.tables) == 1, "the task protocol is the same: one table, four rows"
    assert sorted((r.method_class, r.method_version) for r in rows) == sorted(
        [(originals[0]["spec"]["method_class"], 1), (originals[0]["spec"]["method_class"], 2),
         ("", 0), ("plugins.fedavg.FedAvg", 1)])
    assert len({r.protocol_hash for r in rows}) == 4
    spec_of = {rec["spec_hash"]: rec["spec"] for _, rec in records}
    for row in rows:
        versions = {(spec_of[h].get("method_class", ""), spec_of[h].get("method_version", 0)) for h in row.spec_hashes}
        assert versions == {(row.method_class, row.method_version)}, "a row mixes method code"
    assert sorted(_name(r.label) for r in rows) == ["fedavg v1", "fedavg v1", "fedavg v2", "fedavg v?"]


def test_a_version_1_record_is_a_row_of_its_own(pristine, tmp_path):
    first, second = _records(pristine)
    write_record(first, tmp_path)  # seed 0, spec version 2
    write_record(_as_version_1(second), tmp_path)  # seed 1, otherwise the same options, spec version 1
    board = build_board(load_records(tmp_path)[0], published=lambda task: {})
    rows = _measured(board)
    assert sorted((_name(r.label), r.seeds) for r in rows) == [("fedavg v1", [0]), ("fedavg v?", [1])]


def test_the_commit_column_lists_every_commit_of_a_row(pristine, tmp_path):
    first, second = _records(pristine)
    write_record(_variant(first, commit=COMMIT_A), tmp_path)
    write_record(_variant(second, commit=COMMIT_B), tmp_path)
    board, _ = write_leaderboard(tmp_path, tmp_path / "out")
    (row,) = _measured(board)
    assert row.commits == ["a1b2c3d4", "e5f6a7b8-dirty"] and row.stats["headline"].n == 2

    readme = (tmp_path / "out" / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("| 1 "))
    assert "fedavg v1" in line and "| `a1b2c3d4` `e5f6a7b8-dirty` |" in line
    assert "| commit" in readme

    import pandas as pd

    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert csv.loc[0, "commits"] == "a1b2c3d4 e5f6a7b8-dirty"
    assert csv.loc[0, "method_version"] == 1 and csv.loc[0, "method_class"] == first["spec"]["method_class"]

    page = (tmp_path / "out" / "index.html").read_text()
    assert '>commit</th>' in page and "<code>a1b2c3d4</code> <code>e5f6a7b8-dirty</code>" in page
    assert "fedavg v1" in page


def test_one_commit_is_listed_once(pristine, tmp_path):
    for rec in _records(pristine):
        write_record(_variant(rec, commit=COMMIT_A), tmp_path)
    (row,) = _measured(build_board(load_records(tmp_path)[0], published=lambda task: {}))
    assert row.commits == ["a1b2c3d4"]


@pytest.mark.parametrize("commit, short", [
    ("0123456789abcdef0123456789abcdef01234567", "01234567"),
    ("0123456789abcdef0123456789abcdef01234567-dirty", "01234567-dirty"),
    (None, "unknown"),
    ("", "unknown"),
])
def test_short_commit(commit, short):
    assert short_commit(commit) == short


def test_optional_columns_show_only_where_a_row_has_them(pristine, tmp_path):
    """Per-class and per-modality columns appear in a table only when one of its rows reports them."""
    for with_classes in (True, False):
        root = tmp_path / str(with_classes)
        for rec in _records(pristine):
            if not with_classes:  # as a record made before per-class accuracy existed
                for block in (*rec["metrics"]["rounds"], rec["metrics"]["final"]["last"],
                              rec["metrics"]["final"]["best_val"]):
                    for key in ("class_acc", "class_acc_worst", "class_acc_std"):
                        block.pop(key, None)
            write_record(rec, root)
        write_leaderboard(root, root / "board")
        header = next(line for line in (root / "board" / "README.md").read_text().splitlines()
                      if line.startswith("| #"))
        page = (root / "board" / "index.html").read_text()
        assert ("worst class %" in header) == with_classes == ("worst class %</th>" in page)
        assert "weakest modality %" not in header  # fedavg scores no modality alone


def test_a_records_image_grids_reach_the_page(pristine, tmp_path):
    """Grids a record lists beside itself (a generator's samples) are copied next to the page and shown."""
    from PIL import Image

    records = _records(pristine)
    for rec in records:
        rec["images"] = {"generated_last_round": f"{rec['spec_hash']}.generated_last_round.png"}
        path = write_record(rec, tmp_path / "results")
        grid = path.parent / rec["images"]["generated_last_round"]
        Image.new("L", (30, 30), color=rec["spec"]["seed"] * 100).save(grid)
    write_leaderboard(tmp_path / "results", tmp_path / "board")
    page = (tmp_path / "board" / "index.html").read_text()
    low = min(records, key=lambda r: r["spec"]["seed"])  # one grid per row: its lowest seed's
    copied = sorted((tmp_path / "board" / "generated").iterdir())
    assert [p.name for p in copied] == [f"blobs-fedavg-{low['spec_hash']}.generated_last_round.png"]
    assert Image.open(copied[0]).getpixel((0, 0)) == low["spec"]["seed"] * 100
    assert f'src="generated/{copied[0].name}"' in page and "Generated images" in page
    assert f"](generated/{copied[0].name})" in (tmp_path / "board" / "README.md").read_text()
