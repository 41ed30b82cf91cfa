"""The leaderboard page: a section per task protocol, within it one sortable table and two plots
per rank group (one headline metric, one backbone), then the task cards, as one static
``index.html`` with nothing external (inline CSS, inline vanilla JS, inline SVG from
:mod:`fedbench.board.plots`), so it opens from ``file://`` and renders the same offline.

Links are relative to the page's folder: each row's record files (``../results/...`` for the
committed board, served from the repository) and each section's task card (an anchor on the page).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbench.board.cells import (
    DIVERGED_NOTE,
    RANK_NOTE,
    ROWS_NOTE,
    TIME_NOTE,
    Column,
    card_anchor,
    chance_position,
    chance_text,
    columns_for,
    group_title,
    intro_line,
    reduced_text,
    relative_href,
    task_card_facts,
)
from fedbench.board.plots import PALETTE, plotted_points, svg_accuracy_vs_bytes, svg_convergence
from fedbench.board.ranking import rank_text
from fedbench.board.rows import Board, DivergedRun, RankGroup, Row, Table
from fedbench.core.formatting import format_percent

_E = html.escape
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#222;max-width:1400px}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2.5rem}
p.note{color:#555;max-width:60rem;font-size:.9rem}
table.board{border-collapse:collapse;font-size:.78rem;margin:.5rem 0 1rem}
table.board th,table.board td{border-bottom:1px solid #ddd;padding:.26rem .36rem;text-align:right;white-space:nowrap}
table.board th{cursor:pointer;user-select:none;background:#f4f4f4;position:sticky;top:0;white-space:normal;
vertical-align:bottom;min-width:2.2rem;max-width:5.6rem}
table.board th[aria-sort=ascending]::after{content:" \\25B2"}
table.board th[aria-sort=descending]::after{content:" \\25BC"}
table.board td.text,table.board th.text{text-align:left}
table.board td.text{white-space:normal;max-width:15rem}
table.board td.method{min-width:9.5rem}table.board code{white-space:nowrap}
tr.published td{font-style:italic;color:#666;background:#fbfaf3}
span.swatch{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.35em}
span.tag{font-size:.7rem;border:1px solid #bbb;border-radius:3px;padding:0 .25rem;margin-left:.3rem;color:#555}
code{font-size:.8rem}
div.scroll{overflow-x:auto}
div.plots{display:flex;flex-wrap:wrap;gap:1rem}
svg.plot{background:#fff;border:1px solid #e3e3e3}
svg .axis{stroke:#444}svg .grid{stroke:#eee}svg .tick{font-size:11px;fill:#444}
svg .label{font-size:12px;fill:#222}svg .legend{font-size:11px;fill:#222}
svg .pareto{fill:none;stroke:#111;stroke-width:1.2;stroke-dasharray:6 3}
h3{font-size:1rem;margin:1.6rem 0 .3rem}
tr.chance td{color:#666;background:#f6f6f6;font-style:italic;border-top:1px dashed #999;border-bottom:1px dashed #999}
td.rank{font-weight:600}
span.reduced{font-size:.75rem;font-weight:600;color:#fff;background:#b5532a;border-radius:3px;padding:.1rem .4rem;
margin-left:.6rem;vertical-align:middle;letter-spacing:.03em}
p.reduced{color:#8a3a17;background:#fdf1ea;border-left:4px solid #b5532a;padding:.4rem .6rem;max-width:60rem;
font-size:.9rem}
div.diverged{font-size:.85rem;color:#7a2020;background:#fdf3f3;border-left:4px solid #c44;padding:.3rem .7rem;
max-width:60rem}
div.diverged ul{margin:.2rem 0}
dl.card{display:grid;grid-template-columns:14rem 1fr;gap:.25rem 1rem;font-size:.85rem;max-width:75rem}
dl.card dt{font-weight:600;color:#444}dl.card dd{margin:0}
"""

# Click a header to sort by it; click again to reverse. Numbers sort by data-sort, empty last.
_JS = """
(function () {
  function value(cell) {
    var raw = cell.getAttribute('data-sort');
    return raw === null ? cell.textContent.trim() : raw;
  }
  function sortBy(table, th, col) {
    var numeric = th.getAttribute('data-type') === 'num';
    var current = th.getAttribute('aria-sort');
    var dir = current ? (current === 'ascending' ? 'descending' : 'ascending')
                      : (numeric ? 'descending' : 'ascending');
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    var sign = dir === 'ascending' ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a.cells[col]), y = value(b.cells[col]);
      if (x === '' || y === '') { return (x === '') - (y === ''); }
      var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return sign * c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.board'), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.addEventListener('click', function () { sortBy(table, th, col); });
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter') { sortBy(table, th, col); } });
    });
  });
})();
"""

_TEXT_CLASS = ' class="text"'


def _sort_attr(value: Any) -> str:
    if value is None:
        return ""
    return repr(round(float(value), 9)) if isinstance(value, (int, float)) else str(value)


def _html_cell(column: Column, row: Row, color: str, page_dir: Path | None) -> str:
    """A column's text, escaped, with the HTML markup of its kind: swatch and tag, hashes as code, links."""
    content = _E(column.text(row))
    if column.header == "method":
        tag = "published" if row.kind == "published" else row.fidelity
        title = f' title="{_E(row.source)}"' if row.source else ""
        content = (f'<span class="swatch" style="background:{color}"></span>{content}'
                   + (f'<span class="tag"{title}>{_E(tag)}</span>' if tag else ""))
    elif column.header == "protocol" and row.protocol_hash:
        content = f"<code>{content}</code>"
    elif column.header == "commit" and row.commits:
        content = " ".join(f"<code>{_E(c)}</code>" for c in row.commits)
    elif column.header == "records" and row.record_paths:
        content = " ".join(f'<a href="{_E(relative_href(path, page_dir))}" title="record of seed {seed}">{seed}</a>'
                           for seed, path in zip(row.seeds, row.record_paths, strict=True))
    cls = "" if column.numeric else ' class="text method"' if column.header == "method" else _TEXT_CLASS
    return f'<td{cls} data-sort="{_E(_sort_attr(column.sort(row)))}">{content}</td>'


def _chance_row(columns: list[Column], table: Table) -> str:
    cells = ['<td class="rank" data-sort=""></td>']
    for c in columns:
        if c.header == "method":
            cells.append(f'<td class="text" data-sort="">{_E(chance_text(table))}</td>')
        elif c.header == "acc % (mean ± std)":
            cells.append(f'<td data-sort="{_E(_sort_attr(table.chance))}">{_E(format_percent(table.chance))}</td>')
        else:
            cells.append(f'<td{"" if c.numeric else _TEXT_CLASS} data-sort=""></td>')
    return '<tr class="chance" title="a uniform random guess over the classes">' + "".join(cells) + "</tr>"


def _html_group_table(table: Table, group: RankGroup, colors: Mapping[int, str], page_dir: Path | None,
                      table_dom_id: str) -> str:
    columns = columns_for(group.rows)
    head = '<th data-type="num" scope="col" title="rank within this table; =k: shared rank">#</th>' + "".join(
        f'<th data-type="{"num" if c.numeric else "text"}"{"" if c.numeric else _TEXT_CLASS} '
        f'scope="col">{_E(c.header)}</th>' for c in columns)
    body = []
    for i, row in enumerate(group.rows):
        rank = group.ranks[i]
        body.append(f'<tr class="{_E(row.kind)}{" tied" if group.tied[i] else ""}">'
                    f'<td class="rank" data-sort="{"" if rank is None else rank}">'
                    f'{_E(rank_text(rank, group.tied[i]))}</td>'
                    + "".join(_html_cell(c, row, colors[i], page_dir) for c in columns) + "</tr>")
    if table.chance is not None:
        body.insert(chance_position(group, table.chance), _chance_row(columns, table))
    return (f'<table class="board" id="{table_dom_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _diverged_html(runs: Sequence[DivergedRun], page_dir: Path | None) -> str:
    items = "".join(
        f"<li>{_E(d.label)} ({_E(d.backbone)}), seed {d.seed}"
        + ("" if d.round is None else f", round {d.round}") + f": {_E(d.reason)} — "
        f'<a href="{_E(relative_href(d.path, page_dir))}">record {_E(d.spec_hash)}</a></li>' for d in runs)
    return (f'<div class="diverged"><p>Diverged runs, not ranked and not averaged ({len(runs)}):</p>'
            f"<ul>{items}</ul></div>")


def _section(table: Table, page_dir: Path | None) -> list[str]:
    badge = '<span class="reduced">REDUCED PROTOCOL</span>' if table.reduced else ""
    parts = [f'<section id="s-{table.table_id}"><h2>{_E(table.label)}{badge}</h2>',
             f'<p class="note">Task protocol <code>{table.table_id}</code> · '
             f'<a href="#{card_anchor(table.task)}">task card: {_E(table.task)}</a>'
             + (f" · chance {format_percent(table.chance)}%" if table.chance is not None else "") + "</p>"]
    if table.reduced:
        parts.append(f'<p class="reduced">{_E(reduced_text(table))}</p>')
    for k, group in enumerate(table.groups):
        colors = {i: "#888888" if r.kind == "published" else PALETTE[i % len(PALETTE)]
                  for i, r in enumerate(group.rows)}
        title = group_title(group)
        dom_id = f"table-{table.table_id}" + (f"-{k}" if k else "")
        # Accuracy against bytes needs two measured rows to compare; one row's number is in its table.
        versus_bytes = [svg_accuracy_vs_bytes(group, colors, f"Accuracy vs bytes — {table.label} — {title}",
                                              table.chance)] if plotted_points(group) >= 2 else []
        parts += [f'<h3 id="g-{table.table_id}-{k}">{_E(title)}</h3>', '<div class="scroll">',
                  _html_group_table(table, group, colors, page_dir, dom_id), "</div>", '<div class="plots">',
                  *versus_bytes,
                  svg_convergence(group, colors, f"Accuracy per round — {table.label} — {title}", table.chance),
                  "</div>"]
    if table.diverged:
        parts.append(_diverged_html(table.diverged, page_dir))
    sources = sorted({r.source for r in table.rows if r.kind == "published" and r.source})
    parts += [f'<p class="note">Published: {_E(s)}</p>' for s in sources]
    parts.append("</section>")
    return parts


def _task_cards(board: Board) -> list[str]:
    parts = ['<section id="task-cards"><h2>Task cards</h2>']
    for task in sorted({t.task for t in board.tables}):
        facts = task_card_facts(task, [t for t in board.tables if t.task == task])
        parts.append(f'<div class="card" id="{card_anchor(task)}"><h3>Task card: {_E(task)}</h3><dl class="card">'
                     + "".join(f"<dt>{_E(k)}</dt><dd>{_E(v)}</dd>" for k, v in facts) + "</dl></div>")
    parts.append("</section>")
    return parts


# Figures that the offline models' own scripts save beside the leaderboard, shown when present.
FIGURES = {
    "digits_t2i_grid.png": ("Generated digits: digits-t2i, the in-repo text-to-image model (pretrained on MNIST "
                            "train), one row per class prompt 'a photo of the number: \"k\".', seed 0 "
                            "(benchmarks/digits_t2i_eval.py)."),
}


def render_html(board: Board, figures: Sequence[str] = (), generated: Sequence[tuple[str, list[str]]] = (),
                page_dir: Path | None = None) -> str:
    """The page; ``page_dir``: the folder it will be written to, which its links are relative to."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>fedbench leaderboard</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>fedbench leaderboard</h1>",
        f'<p class="note">{_E(intro_line(board))} Accuracies in %: mean ± sample std over seeds; 95% CI is the '
        f"half-width of the confidence interval of the mean (Student's t). {_E(RANK_NOTE)}</p>",
        f'<p class="note">{_E(ROWS_NOTE)} {_E(TIME_NOTE)} {_E(DIVERGED_NOTE)} Rows tagged <em>published</em> are '
        "numbers from papers, shown only where their stated protocol matches. Sections marked "
        '<span class="reduced">REDUCED PROTOCOL</span> are smoke tests on reduced data or rounds. Click a column '
        "header to sort.</p>",
    ]
    if not board.tables:
        parts.append("<p>No records yet.</p>")
    for table in board.tables:
        parts += _section(table, page_dir)
    if board.diverged:
        parts += ["<h2>Diverged runs without a table</h2>", _diverged_html(board.diverged, page_dir)]
    for name in figures:
        caption = _E(FIGURES[name])
        parts.append(f'<section class="figure"><h2>Figure</h2><img src="{_E(name)}" alt="{caption}" '
                     f'style="image-rendering: pixelated; width: 420px"><p class="note">{caption}</p></section>')
    for caption, files in generated:  # a generator's samples, saved beside its record
        images = "".join(f'<img src="{_E(f)}" alt="{_E(f)}" style="image-rendering: pixelated; width: 300px; '
                         f'margin-right: 12px">' for f in files)
        parts.append(f'<section class="figure"><h2>Generated images</h2>{images}'
                     f'<p class="note">{_E(caption)}</p></section>')
    if board.published_not_shown:
        parts.append("<h2>Published numbers not shown</h2><ul>"
                     + "".join(f"<li>{_E(x)}</li>" for x in board.published_not_shown) + "</ul>")
    if board.invalid:
        parts.append("<h2>Invalid records (left out)</h2><ul>"
                     + "".join(f"<li><code>{_E(v.path.as_posix())}</code>: {_E('; '.join(v.problems))}</li>"
                               for v in board.invalid) + "</ul>")
    if board.tables:
        parts += _task_cards(board)
    parts += [f"<script>{_JS}</script>", "</body></html>", ""]
    return "\n".join(parts)
