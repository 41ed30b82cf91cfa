"""The page's plots, inline SVG drawn here (nothing external), one pair per rank group.

A plot shows only rows of one headline metric and one backbone (a :class:`RankGroup`), so its
y axis is one metric and its Pareto front compares like with like:

- headline accuracy against total bytes communicated (log scale; zero-byte rows in a band on
  the left; 95% CI bars; the group's Pareto front, fewer bytes and higher accuracy, as a dashed
  staircase with its points ringed), shown where the group has two measured rows or more;
- headline accuracy per round (mean over seeds; rows that train nothing and published numbers
  as flat lines).

Both draw the chance level (1 / number of classes) as a dotted grey line.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedbench.board.rows import RankGroup, Row
from fedbench.core.formatting import format_bytes

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
CHANCE_COLOR = "#777777"
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


def _x_title(fr: _Frame, title: str) -> str:
    return (f'<text class="label" x="{_f((fr.x0 + fr.x1) / 2)}" y="{_f(fr.height - 8)}" '
            f'text-anchor="middle">{_E(title)}</text>')


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


def _chance_line(fr: _Frame, y: float, chance: float) -> str:
    return (f'<line class="chance" x1="{_f(fr.x0)}" y1="{_f(y)}" x2="{_f(fr.x1)}" y2="{_f(y)}" '
            f'stroke="{CHANCE_COLOR}" stroke-width="1.5" stroke-dasharray="2 3">'
            f'<title>chance: {100 * chance:.2f}% (a uniform random guess)</title></line>')


def _chance_item(chance: float) -> tuple[str, str, str]:
    return CHANCE_COLOR, f"chance {100 * chance:.1f}%", "dot"


def _byte_points(group: RankGroup) -> list[tuple[int, Row]]:
    return [(i, r) for i, r in enumerate(group.rows) if r.kind == "measured" and r.score is not None
            and r.stats["total_bytes"].mean is not None]


def plotted_points(group: RankGroup) -> int:
    """How many rows the accuracy-vs-bytes plot of ``group`` shows."""
    return len(_byte_points(group))


def svg_accuracy_vs_bytes(group: RankGroup, colors: Mapping[int, str], title: str,
                          chance: float | None = None) -> str:
    """Headline accuracy (mean, 95% CI bars) against total bytes (log scale), the group's Pareto front marked."""
    fr = _Frame()
    pts = _byte_points(group)
    if not pts:
        return _svg(fr, title, ['<text x="20" y="40">no measured rows</text>'])
    accs = [100 * r.score for _, r in pts]
    cis = [100 * (r.stats["headline"].ci95 or 0) for _, r in pts]
    extra = [100 * chance] if chance is not None else []
    lo, hi = _y_range([a - 2 for a in accs] + [a + 2 for a in accs] + extra)  # wide CIs (n=2) are clipped
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
    body.append(_x_title(fr, "total bytes up + down (log scale)"))
    if chance is not None:
        body.append(_chance_line(fr, y_of(100 * chance), chance))

    xy = [(r.stats["total_bytes"].mean, a) for (_, r), a in zip(pts, accs, strict=True)]
    front = sorted((k for k, (i, _) in enumerate(pts) if group.on_front[i]), key=lambda k: (xy[k][0], -xy[k][1]))
    if front:  # the front as a staircase: for a byte budget, the best accuracy any front point reaches
        steps: list[str] = []
        prev_y: float | None = None
        for k in front:
            x, y = x_of(xy[k][0]), y_of(xy[k][1])
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
    items = [(colors[i], r.label, "point") for i, r in pts]
    items += [("#111", "Pareto front", "dash")] if front else []
    items += [_chance_item(chance)] if chance is not None else []
    return _svg(fr, title, body + _legend(fr, items))


def svg_convergence(group: RankGroup, colors: Mapping[int, str], title: str, chance: float | None = None) -> str:
    """Headline accuracy per round (mean over seeds); zero-shot and published rows as flat lines."""
    fr = _Frame()
    curves = [(i, r) for i, r in enumerate(group.rows) if r.kind == "measured" and r.trains and r.curve]
    flats = [(i, r) for i, r in enumerate(group.rows) if (not r.trains or r.kind == "published")
             and r.score is not None]
    values = [100 * v for _, r in curves for _, v in r.curve] + [100 * r.score for _, r in flats]
    if not values:
        return _svg(fr, title, ['<text x="20" y="40">no rounds recorded</text>'])
    lo, hi = _y_range(values + ([100 * chance] if chance is not None else []))
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
    body.append(_x_title(fr, "round"))
    if chance is not None:
        body.append(_chance_line(fr, y_of(100 * chance), chance))
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
    items += [_chance_item(chance)] if chance is not None else []
    return _svg(fr, title, body + _legend(fr, items))
