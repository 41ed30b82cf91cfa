"""The leaderboard: statistics over seeds, protocol grouping, published rows, the three outputs,
and the HTML page in headless Chromium (sorting, plots, no console errors, a screenshot)."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedbench.board.grouping import build_board, load_records
from fedbench.board.html import render_html
from fedbench.board.leaderboard import write_leaderboard
from fedbench.board.ranking import pareto_front
from fedbench.board.stats import summarize, t975
from fedbench.harness.sweep import sweep

FAST = ["local_epochs=1", "samples=200"]


@pytest.fixture(scope="module")
def results(blobs_task, tmp_path_factory) -> Path:
    """Four protocols on blobs: fedavg, fedprox and local over 3 seeds at 2 rounds, fedavg over 2 seeds
    at 3 rounds (a different protocol: must never be averaged with the first)."""
    root = tmp_path_factory.mktemp("board-results")
    quiet = dict(results_dir=root, progress=False, log=lambda _: None)
    sweep(["fedavg", "fedprox", "local"], [blobs_task], [0, 1, 2], FAST, 2, **quiet)
    sweep(["fedavg"], [blobs_task], [0, 1], FAST, 3, **quiet)
    return root


def _rows(board):
    return [(t, r) for t in board.tables for r in t.rows]


# ---------------------------------------------------------------- statistics


def test_ci_half_width_for_a_known_sample():
    s = summarize([0.70, 0.72, 0.74, None])  # None (a metric a seed lacks) is not a zero
    assert s.n == 3 and s.mean == pytest.approx(0.72) and s.std == pytest.approx(0.02)
    # t_{0.975, 2} = 4.302653; half-width = t * s / sqrt(n)
    assert s.ci95 == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert s.ci95 == pytest.approx(0.0496828, abs=1e-6)
    one = summarize([0.5])
    assert (one.mean, one.std, one.ci95, one.n) == (0.5, None, None, 1)
    assert summarize([]).n == 0


def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 30, 31, 35, 45, 59, 75, 100, 121, 500, 10_000):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df


def test_pareto_front():
    points = [(0, 0.5), (100, 0.4), (100, 0.7), (1000, 0.6), (5000, 0.9), (5000, 0.8)]
    assert pareto_front(points) == [0, 2, 4]
    assert pareto_front([(10, 0.5), (10, 0.5), (20, 0.5)]) == [0, 1]  # equal points: neither dominates


# ---------------------------------------------------------------- grouping


def test_protocols_are_never_averaged(results):
    records, invalid = load_records(results)
    assert len(records) == 11 and not invalid
    board = build_board(records, published=lambda task: {})
    assert len(board.tables) == 2  # 2 rounds and 3 rounds are two task protocols
    measured = [(t, r) for t, r in _rows(board) if r.kind == "measured"]
    assert sorted((t.protocol["rounds"], r.method, r.stats["headline"].n) for t, r in measured) == [
        (2, "fedavg", 3), (2, "fedprox", 3), (2, "local", 3), (3, "fedavg", 2)]
    spec_of = {rec["spec_hash"]: rec["spec"] for _, rec in records}
    for _, row in measured:
        protocols = {json.dumps({k: v for k, v in spec_of[h].items() if k != "seed"}, sort_keys=True)
                     for h in row.spec_hashes}
        assert len(protocols) == 1, "a row mixes protocols"
    assert len({r.protocol_hash for _, r in measured}) == 4


def test_headline_and_aggregates_come_from_the_records(results):
    records, _ = load_records(results)
    board = build_board(records, published=lambda task: {})
    row = next(r for t, r in _rows(board) if r.method == "fedavg" and t.protocol["rounds"] == 2)
    accs = [rec["metrics"]["final"]["last"]["global_acc"] for _, rec in records
            if rec["spec"]["method"] == "fedavg" and rec["spec"]["rounds"] == 2]
    assert row.headline == "global_acc" and row.stats["headline"] == summarize(accs)
    local = next(r for _, r in _rows(board) if r.method == "local")
    assert local.headline == "client_acc_mean" and local.stats["total_bytes"].mean == 0
    assert row.stats["bytes_per_round"].mean == row.stats["total_bytes"].mean / 2
    assert [rnd for rnd, _ in row.curve] == [1, 2]


def test_rows_rank_only_against_the_same_headline(results):
    records, _ = load_records(results)
    board = build_board(records, published=lambda task: {})
    table = next(t for t in board.tables if t.protocol["rounds"] == 2)
    # local (mean client accuracy, usually higher) is ranked in a group of its own, never against
    # the global-accuracy rows
    assert [(g.headline, sorted(r.method for r in g.rows)) for g in table.groups] == [
        ("global_acc", ["fedavg", "fedprox"]), ("client_acc_mean", ["local"])]
    assert table.groups[1].ranks == [1]


def test_invalid_and_ci_records_are_left_out(results, tmp_path):
    root = Path(shutil.copytree(results, tmp_path / "results"))
    bad = sorted((root / "blobs" / "local").glob("*.json"))[0]
    record = json.loads(bad.read_text())
    record["metrics"]["final"]["last"]["client_acc_mean"] = 1.7
    bad.write_text(json.dumps(record))
    ci = root / "ci" / "blobs" / "fedavg"
    ci.mkdir(parents=True)
    good = sorted((root / "blobs" / "fedavg").glob("*.json"))[0]
    shutil.copy(good, ci / good.name)
    records, invalid = load_records(root)
    assert len(records) == 10 and [v.path for v in invalid] == [bad]
    assert len(load_records(root, include_ci=True)[0]) == 11
    board, _ = write_leaderboard(root, tmp_path / "out")
    assert "Invalid records (left out)" in (tmp_path / "out" / "README.md").read_text()
    assert board.n_records == 10


# ---------------------------------------------------------------- published numbers


def _card(backbone: str, **protocol) -> dict:
    return {"_source": "Someone et al. 2024, Table 1", "_metric": "global accuracy (%)",
            "_protocol": {"backbone": backbone, **protocol},
            "PaperAvg": {"mean": 61.5}, "PaperProx": 0.55}


def test_published_rows_only_where_the_protocol_matches(results):
    records, _ = load_records(results)
    board = build_board(records, published=lambda task: _card("none", rounds=3))
    by_rounds = {t.protocol["rounds"]: t for t in board.tables}
    shown = [r for r in by_rounds[3].rows if r.kind == "published"]
    assert sorted((r.method, r.stats["headline"].mean) for r in shown) == [("PaperAvg", 0.615), ("PaperProx", 0.55)]
    assert all("Someone et al." in r.source for r in shown)
    assert not [r for r in by_rounds[2].rows if r.kind == "published"]
    assert any("PaperAvg (rounds 3 (table: 2))" in line for line in board.published_not_shown)

    other = build_board(records, published=lambda task: _card("openclip:ViT-B-32/openai"))
    assert not [r for _, r in _rows(other) if r.kind == "published"]
    assert any("no measured row with backbone openclip:ViT-B-32/openai" in x for x in other.published_not_shown)
    unstated = build_board(records, published=lambda task: {"PaperAvg": 61.5})
    assert not [r for _, r in _rows(unstated) if r.kind == "published"]
    assert any("does not state the backbone" in x for x in unstated.published_not_shown)


def test_published_value_by_task_option(results):
    records, _ = load_records(results)
    card = {"_protocol": {"backbone": "none"}, "_value_by": "clients", "Paper": {"4": 70.0, "8": 60.0, "mean": 65.0}}
    board = build_board(records, published=lambda task: card)
    values = {r.stats["headline"].mean for _, r in _rows(board) if r.kind == "published"}
    assert values == {0.70}  # blobs runs have 4 clients


# ---------------------------------------------------------------- outputs


def test_outputs_are_deterministic_and_complete(results, tmp_path):
    # Two copies of a repository, each with its results/ and leaderboard/: the same bytes (links are relative).
    here = Path(shutil.copytree(results, tmp_path / "a" / "results"))
    moved = Path(shutil.copytree(results, tmp_path / "elsewhere" / "deeper" / "results"))
    _, first = write_leaderboard(here, here.parent / "leaderboard")
    write_leaderboard(moved, moved.parent / "leaderboard")
    for path in first:
        assert path.read_bytes() == (moved.parent / "leaderboard" / path.name).read_bytes(), path.name
    out = here.parent / "leaderboard"
    readme = (out / "README.md").read_text()
    assert readme.count("\n## blobs") == 2 and "Generated from 11 records" in readme
    assert "± " in readme and "95% CI" in readme
    import pandas as pd

    csv = pd.read_csv(out / "leaderboard.csv")
    assert len(csv) == 4 and set(csv["n"]) == {2, 3}
    assert {"headline_mean", "headline_std", "headline_ci95", "total_bytes_mean", "protocol", "rank", "rank_group",
            "chance", "round_seconds_mean", "inputs_seconds_mean", "records"} <= set(csv.columns)
    page = (out / "index.html").read_text()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert str(tmp_path) not in page and str(tmp_path) not in readme  # no absolute path of this machine
    # One table per rank group: (global_acc: fedavg, fedprox) and (client_acc_mean: local) at 2 rounds,
    # fedavg at 3; an accuracy-vs-bytes plot only for the group of two rows, a convergence plot each.
    assert page.count('<table class="board"') == 3 and page.count('<svg class="plot"') == 4


# ---------------------------------------------------------------- the page in a browser

CHROMIUM = next((c for c in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if c and os.path.exists(c)), None)
REQUIRE_BROWSER = os.environ.get("FEDBENCH_REQUIRE_BROWSER") == "1"

# Installed before the page's own script: records errors and console.error calls.
_CAPTURE = """<script>window.__fbErrors = [];
window.addEventListener('error', function (e) { window.__fbErrors.push(String(e.message)); });
var __fbConsoleError = console.error;
console.error = function () { window.__fbErrors.push(Array.prototype.join.call(arguments, ' '));
  __fbConsoleError.apply(console, arguments); };</script>"""

# Runs after the page's script: clicks headers, reads the row order, inspects the plots.
_PROBE = """<script>(function () {
  var table = document.querySelector('table.board');
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function idx(name) { return heads.map(function (h) { return h.textContent; }).indexOf(name); }
  function rows() { return Array.prototype.filter.call(table.tBodies[0].rows,
                                                        function (r) { return !r.classList.contains('chance'); }); }
  function col(i) { return rows().map(function (r) { return r.cells[i].getAttribute('data-sort'); }); }
  function chanceAt() {
    var all = Array.prototype.slice.call(table.tBodies[0].rows);
    return all.findIndex(function (r) { return r.classList.contains('chance'); });
  }
  var m = idx('method'), a = idx('acc % (mean ± std)'), out = {};
  out.initial = col(m);
  heads[m].click(); out.methodFirst = col(m); out.methodAria = heads[m].getAttribute('aria-sort');
  heads[m].click(); out.methodSecond = col(m);
  heads[a].click(); out.accFirst = col(a); out.accAria = heads[a].getAttribute('aria-sort');
  out.chanceAt = chanceAt();
  out.chance = parseFloat(table.querySelector('tr.chance').cells[a].getAttribute('data-sort'));
  heads[a].click(); out.accSecond = col(a);
  var svgs = document.querySelectorAll('svg.plot');
  out.svgs = svgs.length;
  out.sizes = Array.prototype.map.call(svgs, function (s) {
    var b = s.getBoundingClientRect(); return [b.width, b.height]; });
  out.points = document.querySelectorAll('svg.plot circle').length;
  out.curves = document.querySelectorAll('svg.plot polyline.curve').length;
  out.fronts = document.querySelectorAll('svg.plot path.pareto').length;
  out.frontPoints = document.querySelectorAll('svg.plot circle.front').length;
  out.published = document.querySelectorAll('tr.published').length;
  out.errors = window.__fbErrors;
  var pre = document.createElement('pre'); pre.id = 'fb-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def _page_console(stderr: str, page: Path) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line and page.name in line]


@pytest.mark.skipif(CHROMIUM is None and not REQUIRE_BROWSER,
                    reason="headless Chromium not installed (apt-get install -y chromium); "
                           "set FEDBENCH_REQUIRE_BROWSER=1 to make this a failure")
def test_html_page_in_headless_chromium(results, tmp_path):
    assert CHROMIUM, "FEDBENCH_REQUIRE_BROWSER=1 but no chromium binary was found"
    records, _ = load_records(results)
    board = build_board(records, published=lambda task: _card("none", rounds=2))
    page = tmp_path / "index.html"
    page.write_text(render_html(board), encoding="utf-8")

    probe = tmp_path / "probe.html"
    text = page.read_text(encoding="utf-8")
    probe.write_text(text.replace("<head>", "<head>" + _CAPTURE, 1).replace("</body>", _PROBE + "</body>", 1),
                     encoding="utf-8")
    run = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile-1")
    found = re.search(r'<pre id="fb-probe">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the probe did not run; chromium said:\n{run.stderr[-3000:]}"
    out = json.loads(html.unescape(found.group(1)))

    assert out["errors"] == [] and not _page_console(run.stderr, probe), (out["errors"], run.stderr[-3000:])
    # The first table (2 rounds, global accuracy): fedavg, fedprox and two published rows, and chance.
    labels = out["initial"]
    assert out["methodFirst"] == sorted(labels, key=str.casefold) and out["methodAria"] == "ascending"
    assert out["methodSecond"] == sorted(labels, key=str.casefold, reverse=True)
    accs = [float(x) for x in out["accFirst"]]
    assert accs == sorted(accs, reverse=True) and out["accAria"] == "descending"
    # Sorted by accuracy, the chance row stays where its accuracy puts it (1/4 classes: 25%).
    assert out["chance"] == 0.25 and out["chanceAt"] == sum(a >= 0.25 for a in accs)
    assert [float(x) for x in out["accSecond"]] == sorted(accs)
    assert out["published"] == 2
    # Plots: per rank group, laid out with a size; the front only in the group of two rows.
    assert out["svgs"] == 4 and all(w > 100 and h > 100 for w, h in out["sizes"])
    assert out["points"] > 0 and out["curves"] == 4 and out["fronts"] == 1 and out["frontPoints"] >= 1

    shots = Path(os.environ.get("FEDBENCH_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "leaderboard.png"
    run = _chromium(["--window-size=1400,1600", f"--screenshot={shot}", page.as_uri()], tmp_path / "profile-2")
    assert shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-3000:]
    assert not _page_console(run.stderr, page), run.stderr[-3000:]
    print(f"leaderboard screenshot: {shot}")


# ---------------------------------------------------------------- fedbench compare


def test_compare_two_records_and_two_methods(results, capsys):
    from fedbench.cli.main import main

    fedavg = sorted((results / "blobs" / "fedavg").glob("*.json"))[0]
    local = sorted((results / "blobs" / "local").glob("*.json"))[0]
    assert main(["compare", str(fedavg), str(local)]) == 0
    out = capsys.readouterr().out
    assert "method" in out and "bytes up" in out and "B - A" in out
    assert main(["compare", "--task", "blobs", "fedavg", "local", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "seeds [0, 1, 2]" in out and "headline acc %" in out  # the 2-round table: both have 3 seeds
    assert main(["compare", "--task", "blobs", "fedavg", "fedclip", "--results-dir", str(results)]) == 2
    assert "no task protocol" in capsys.readouterr().err


def test_a_figure_beside_the_board_is_shown_on_the_page(tmp_path):
    from fedbench.board.leaderboard import write_leaderboard

    (tmp_path / "results").mkdir()
    out = tmp_path / "board"
    write_leaderboard(tmp_path / "results", out)
    assert "digits_t2i_grid.png" not in (out / "index.html").read_text()
    out.joinpath("digits_t2i_grid.png").write_bytes(b"\x89PNG")
    write_leaderboard(tmp_path / "results", out)
    assert '<img src="digits_t2i_grid.png"' in (out / "index.html").read_text()
