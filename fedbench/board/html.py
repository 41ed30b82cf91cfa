"""The leaderboard page: one sortable table per task protocol and two plots per table, as one
static ``index.html`` with nothing external (inline CSS, inline vanilla JS, inline SVG drawn
here), so it opens from ``file://`` and renders the same offline.

Plots: headline accuracy against total bytes communicated (log scale; zero-byte rows in a band
on the left; 95% CI bars; the Pareto front, fewer bytes and higher accuracy, as a dashed
staircase with its points ringed), and headline accuracy per round (mean over seeds; rows
that train nothing and published numbers as flat lines).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedbench.board.cells import ROWS_NOTE, Column, columns_for, intro_line
from fedbench.board.rows import Board, Row, Table
from fedbench.core.formatting import format_bytes

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
_E = html.escape


def _f(x: float) -> str:
    return f"{x:.1f}"


@dataclass(frozen=True)
class _Frame:
    """A plot area inside an SVG of ``width`` x ``height`` pixels."""

    width: int = 640
    height: int = 360
    left: int = 56
    right: int = 190
    top: int = 20
    bottom: int = 46

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top


def _y_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    lo, hi = max(0.0, math.floor(lo / 5) * 5), min(100.0, math.ceil(hi / 5) * 5)
    if hi - lo < 5:
        lo, hi = max(0.0, hi - 10), max(10.0, lo + 10)
    return lo, hi


def _y_axis(fr: _Frame, lo: float, hi: float, title: str) -> list[str]:
    step = 5 if hi - lo <= 30 else 10
    parts = [f'<line class="axis" x1="{_f(fr.x0)}" y1="{_f(fr.y0)}" x2="{_f(fr.x0)}" y2="{_f(fr.y1)}"/>']
    v = lo
    while v <= hi + 1e-9:
        y = fr.y0 - (v - lo) / (hi - lo) * (fr.y0 - fr.y1)
        parts.append(f'<line class="grid" x1="{_f(fr.x0)}" y1="{_f(y)}" x2="{_f(fr.x1)}" y2="{_f(y)}"/>')
        parts.append(f'<text class="tick" x="{_f(fr.x0 - 6)}" y="{_f(y + 4)}" text-anchor="end">{v:g}</text>')
        v += step
    parts.append(f'<text class="label" transform="translate(14,{_f((fr.y0 + fr.y1) / 2)}) rotate(-90)" '
                 f'text-anchor="middle">{_E(title)}</text>')
    return parts


def _legend(fr: _Frame, items: list[tuple[str, str, str]]) -> list[str]:
    """``items``: (colour, text, style) with style "point", "line", "dash" or "dot"."""
    parts = []
    for i, (color, text, style) in enumerate(items):
        y = fr.y1 + 10 + 18 * i
        x = fr.x1 + 14
        if style == "point":
            parts.append(f'<circle cx="{_f(x + 8)}" cy="{_f(y)}" r="5" fill="{color}"/>')
        else:
            dash = {"line": "", "dash": ' stroke-dasharray="6 3"', "dot": ' stroke-dasharray="2 3"'}[style]
            parts.append(f'<line x1="{_f(x)}" y1="{_f(y)}" x2="{_f(x + 16)}" y2="{_f(y)}" stroke="{color}" '
                         f'stroke-width="2"{dash}/>')
        label = text if len(text) <= 26 else text[:25] + "…"
        parts.append(f'<text class="legend" x="{_f(x + 22)}" y="{_f(y + 4)}">{_E(label)}<title>{_E(text)}</title>'
                     f'</text>')
    return parts


def _svg(fr: _Frame, title: str, body: list[str]) -> str:
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{fr.width}" height="{fr.height}" '
            f'viewBox="0 0 {fr.width} {fr.height}" role="img" aria-label="{_E(title)}"><title>{_E(title)}</title>'
            + "".join(body) + "</svg>")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both counts (fewer bytes, higher accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def svg_accuracy_vs_bytes(table: Table, colors: Mapping[int, str]) -> str:
    """Headline accuracy (mean, 95% CI bars) against total bytes (log scale), Pareto front marked."""
    fr = _Frame()
    title = f"Accuracy vs bytes communicated — {table.label}"
    pts = [(i, r) for i, r in enumerate(table.rows) if r.kind == "measured" and r.score is not None
           and r.stats["total_bytes"].mean is not None]
    if not pts:
        return _svg(fr, title, ['<text x="20" y="40">no measured rows</text>'])
    accs = [100 * r.score for _, r in pts]
    cis = [100 * (r.stats["headline"].ci95 or 0) for _, r in pts]
    lo, hi = _y_range([a - 2 for a in accs] + [a + 2 for a in accs])  # wide CIs (n=2) are clipped
    positive = [r.stats["total_bytes"].mean for _, r in pts if r.stats["total_bytes"].mean > 0]
    d0 = math.floor(math.log10(min(positive)) - 0.15) if positive else 0  # keep points off the edges
    d1 = max(math.ceil(math.log10(max(positive)) + 0.15) if positive else 1, d0 + 1)
    zero_band = 64  # zero-byte rows (local, zero-shot) sit in a band left of the log axis
    xa = fr.x0 + zero_band

    def x_of(b: float) -> float:
        return fr.x0 + zero_band / 4 if b <= 0 else xa + (math.log10(b) - d0) / (d1 - d0) * (fr.x1 - xa)

    def y_of(a: float) -> float:
        return fr.y0 - (a - lo) / (hi - lo) * (fr.y0 - fr.y1)

    body = _y_axis(fr, lo, hi, "headline accuracy %")
    body.append(f'<line class="axis" x1="{_f(fr.x0)}" y1="{_f(fr.y0)}" x2="{_f(fr.x1)}" y2="{_f(fr.y0)}"/>')
    body.append(f'<text class="tick" x="{_f(fr.x0 + zero_band / 4)}" y="{_f(fr.y0 + 16)}" '
                f'text-anchor="middle">0 B</text>')
    body.append(f'<line class="grid" x1="{_f(xa - 8)}" y1="{_f(fr.y0 - 4)}" x2="{_f(xa - 14)}" '
                f'y2="{_f(fr.y0 + 4)}"/>')  # axis break between the zero band and the log scale
    for d in range(d0, d1 + 1):
        x = x_of(10.0 ** d)
        body.append(f'<line class="grid" x1="{_f(x)}" y1="{_f(fr.y0)}" x2="{_f(x)}" y2="{_f(fr.y1)}"/>')
        body.append(f'<text class="tick" x="{_f(x)}" y="{_f(fr.y0 + 16)}" text-anchor="middle">'
                    f'{10 ** (d % 3)} {("B", "KB", "MB", "GB", "TB", "PB")[min(d // 3, 5)]}</text>')
    body.append(f'<text class="label" x="{_f((fr.x0 + fr.x1) / 2)}" y="{_f(fr.height - 8)}" '
                f'text-anchor="middle">total bytes up + down (log scale)</text>')

    xy = [(r.stats["total_bytes"].mean, a) for (_, r), a in zip(pts, accs, strict=True)]
    front = pareto_front(xy)
    # The front as a staircase: for a byte budget, the best accuracy any front point reaches.
    steps: list[str] = []
    prev_y: float | None = None
    for i in front:
        x, y = x_of(xy[i][0]), y_of(xy[i][1])
        steps.append(f"M{_f(x)},{_f(y)}" if prev_y is None else f"L{_f(x)},{_f(prev_y)} L{_f(x)},{_f(y)}")
        prev_y = y
    steps.append(f"L{_f(fr.x1)},{_f(prev_y if prev_y is not None else fr.y0)}")
    body.append(f'<path class="pareto" d="{" ".join(steps)}"/>')
    for k, ((i, r), (b, a), ci) in enumerate(zip(pts, xy, cis, strict=True)):
        x, y, color = x_of(b), y_of(a), colors[i]
        if ci:  # the 95% CI bar, clipped to the plot
            body.append(f'<line x1="{_f(x)}" y1="{_f(y_of(max(lo, a - ci)))}" x2="{_f(x)}" '
                        f'y2="{_f(y_of(min(hi, a + ci)))}" stroke="{color}" stroke-width="1.5"/>')
        ring = ' class="front" stroke="#111" stroke-width="2"' if k in front else ""
        body.append(f'<circle cx="{_f(x)}" cy="{_f(y)}" r="5" fill="{color}"{ring}><title>{_E(r.label)} '
                    f'({_E(r.backbone)}): {a:.2f}% at {_E(format_bytes(b))}</title></circle>')
    items = [(colors[i], r.label, "point") for i, r in pts] + [("#111", "Pareto front", "dash")]
    return _svg(fr, title, body + _legend(fr, items))


def svg_convergence(table: Table, colors: Mapping[int, str]) -> str:
    """Headline accuracy per round (mean over seeds); zero-shot and published rows as flat lines."""
    fr = _Frame()
    title = f"Accuracy per round (mean over seeds) — {table.label}"
    curves = [(i, r) for i, r in enumerate(table.rows) if r.kind == "measured" and r.trains and r.curve]
    flats = [(i, r) for i, r in enumerate(table.rows) if (not r.trains or r.kind == "published")
             and r.score is not None]
    values = [100 * v for _, r in curves for _, v in r.curve] + [100 * r.score for _, r in flats]
    if not values:
        return _svg(fr, title, ['<text x="20" y="40">no rounds recorded</text>'])
    lo, hi = _y_range(values)
    r_max = max([rnd for _, r in curves for rnd, _ in r.curve] + [1])
    r_min = min([rnd for _, r in curves for rnd, _ in r.curve] + [r_max - 1])
    r_min = min(r_min, r_max - 1)

    def x_of(rnd: float) -> float:
        return fr.x0 + (rnd - r_min) / (r_max - r_min) * (fr.x1 - fr.x0)

    def y_of(a: float) -> float:
        return fr.y0 - (a - lo) / (hi - lo) * (fr.y0 - fr.y1)

    body = _y_axis(fr, lo, hi, "headline accuracy %")
    body.append(f'<line class="axis" x1="{_f(fr.x0)}" y1="{_f(fr.y0)}" x2="{_f(fr.x1)}" y2="{_f(fr.y0)}"/>')
    step = max(1, math.ceil((r_max - r_min) / 10))
    for rnd in range(r_min, r_max + 1, step):
        body.append(f'<text class="tick" x="{_f(x_of(rnd))}" y="{_f(fr.y0 + 16)}" text-anchor="middle">{rnd}'
                    f'</text>')
    body.append(f'<text class="label" x="{_f((fr.x0 + fr.x1) / 2)}" y="{_f(fr.height - 8)}" '
                f'text-anchor="middle">round</text>')
    items = []
    for i, r in curves:
        pts = " ".join(f"{_f(x_of(rnd))},{_f(y_of(100 * v))}" for rnd, v in r.curve)
        body.append(f'<polyline class="curve" points="{pts}" fill="none" stroke="{colors[i]}" stroke-width="2">'
                    f'<title>{_E(r.label)}</title></polyline>')
        for rnd, v in r.curve:
            body.append(f'<circle cx="{_f(x_of(rnd))}" cy="{_f(y_of(100 * v))}" r="2.5" fill="{colors[i]}">'
                        f'<title>{_E(r.label)}, round {rnd}: {100 * v:.2f}%</title></circle>')
        items.append((colors[i], r.label, "line"))
    for i, r in flats:
        y = y_of(100 * r.score)
        dash = "2 3" if r.kind == "published" else "6 3"
        body.append(f'<line class="flat" x1="{_f(fr.x0)}" y1="{_f(y)}" x2="{_f(fr.x1)}" y2="{_f(y)}" '
                    f'stroke="{colors[i]}" stroke-width="2" stroke-dasharray="{dash}">'
                    f'<title>{_E(r.label)}: {100 * r.score:.2f}%</title></line>')
        items.append((colors[i], r.label, "dot" if r.kind == "published" else "dash"))
    return _svg(fr, title, body + _legend(fr, items))


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;color:#222;max-width:1400px}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2.5rem}
p.note{color:#555;max-width:60rem;font-size:.9rem}
table.board{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}
table.board th,table.board td{border-bottom:1px solid #ddd;padding:.3rem .55rem;text-align:right;white-space:nowrap}
table.board th{cursor:pointer;user-select:none;background:#f4f4f4;position:sticky;top:0}
table.board th[aria-sort=ascending]::after{content:" \\25B2"}
table.board th[aria-sort=descending]::after{content:" \\25BC"}
table.board td.text,table.board th.text{text-align:left}
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


def _html_cell(column: Column, row: Row, color: str) -> str:
    """A column's text, escaped, with the HTML markup of its kind: swatch and tag, hashes as code."""
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
    cls = "" if column.numeric else _TEXT_CLASS
    return f'<td{cls} data-sort="{_E(_sort_attr(column.sort(row)))}">{content}</td>'


def _html_table(table: Table, colors: Mapping[int, str]) -> str:
    columns = columns_for(table.rows)
    head = "".join(f'<th data-type="{"num" if c.numeric else "text"}"{"" if c.numeric else _TEXT_CLASS} '
                   f'scope="col">{_E(c.header)}</th>' for c in columns)
    body = [f'<tr class="{_E(row.kind)}">' + "".join(_html_cell(c, row, colors[i]) for c in columns) + "</tr>"
            for i, row in enumerate(table.rows)]
    return (f'<table class="board" id="table-{table.table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


# Figures that the offline models' own scripts save beside the leaderboard, shown when present.
FIGURES = {
    "digits_t2i_grid.png": ("Generated digits: digits-t2i, the in-repo text-to-image model (pretrained on MNIST "
                            "train), one row per class prompt 'a photo of the number: \"k\".', seed 0 "
                            "(benchmarks/digits_t2i_eval.py)."),
}


def render_html(board: Board, figures: list[str] = (), generated: list[tuple[str, list[str]]] = ()) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>fedbench leaderboard</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>fedbench leaderboard</h1>",
        f'<p class="note">{_E(intro_line(board))} Accuracies in %: mean ± sample std over seeds; 95% CI is the '
        f"half-width of the confidence interval of the mean (Student's t). {_E(ROWS_NOTE)} Rows tagged "
        "<em>published</em> are numbers from papers, shown only where their stated protocol matches. Click a "
        "column header to sort.</p>",
    ]
    if not board.tables:
        parts.append("<p>No records yet.</p>")
    for table in board.tables:
        colors = {i: "#888888" if r.kind == "published" else PALETTE[i % len(PALETTE)]
                  for i, r in enumerate(table.rows)}
        parts += [f'<section id="s-{table.table_id}"><h2>{_E(table.label)}</h2>',
                  f'<p class="note">Task protocol <code>{table.table_id}</code>.</p>',
                  '<div class="scroll">', _html_table(table, colors), "</div>", '<div class="plots">',
                  svg_accuracy_vs_bytes(table, colors), svg_convergence(table, colors), "</div>"]
        sources = sorted({r.source for r in table.rows if r.kind == "published" and r.source})
        parts += [f'<p class="note">Published: {_E(s)}</p>' for s in sources]
        parts.append("</section>")
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
    parts += [f"<script>{_JS}</script>", "</body></html>", ""]
    return "\n".join(parts)
