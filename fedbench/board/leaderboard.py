"""The leaderboard: every record under ``results/`` -> ``leaderboard/`` (Markdown, CSV, HTML).

Links in the three files (record files, task cards) are relative to ``leaderboard/``, so they
resolve wherever the repository lives, on disk or served from the repository's root.

What a row and a table are, and which records count, is :mod:`fedbench.board.grouping`;
statistics over seeds are :mod:`fedbench.board.stats`; published numbers are
:mod:`fedbench.board.published`; the page is :mod:`fedbench.board.html`. This module writes the
Markdown and the CSV and puts the three files in place.

Output is a pure function of the records: no timestamps, stable order, fixed float formats.
"""

from __future__ import annotations

import json
from dataclasses import replace
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
from fedbench.board.grouping import build_board, load_records, row_label
from fedbench.board.html import FIGURES, render_html
from fedbench.board.ranking import rank_text
from fedbench.board.rows import STAT_NAMES, Board, DivergedRun, RankGroup, Row, Table
from fedbench.core.formatting import format_percent
from fedbench.core.results import atomic_write_bytes, atomic_write_text
from fedbench.errors import ResultsError


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _markdown_cell(column: Column, row: Row, page_dir: Path | None) -> str:
    """A column's text with the Markdown markup of its kind: tags in italics, hashes as code, links."""
    if column.header == "method":
        if row.kind == "published":
            return f"{_md(row.method)} *(published)*"
        return _md(row.label) + (f" *({row.fidelity})*" if row.fidelity == "adaptation" else "")
    if column.header == "protocol" and row.kind == "measured":
        return f"`{row.protocol_hash}`"
    if column.header == "commit" and row.commits:
        return " ".join(f"`{c}`" for c in row.commits)
    if column.header == "records" and row.record_paths:
        return " ".join(f"[{seed}]({relative_href(path, page_dir)})"
                        for seed, path in zip(row.seeds, row.record_paths, strict=True))
    return _md(column.text(row))


def _group_markdown(table: Table, group: RankGroup, page_dir: Path | None) -> list[str]:
    import pandas as pd

    columns = columns_for(group.rows)
    lines = [[rank_text(rank, tie), *(_markdown_cell(c, r, page_dir) for c in columns)]
             for r, rank, tie in zip(group.rows, group.ranks, group.tied, strict=True)]
    if table.chance is not None:
        chance = ["", *("*" + chance_text(table) + "*" if c.header == "method"
                        else f"*{format_percent(table.chance)}*" if c.header == "acc % (mean ± std)" else ""
                        for c in columns)]
        lines.insert(chance_position(group, table.chance), chance)
    frame = pd.DataFrame(lines, columns=["#", *(c.header for c in columns)])
    return [f"### {group_title(group)}", "", frame.to_markdown(index=False, disable_numparse=True), ""]


def _diverged_markdown(runs: list[DivergedRun], page_dir: Path | None) -> list[str]:
    return [f"Diverged runs, not ranked and not averaged ({len(runs)}):", ""] + [
        f"- {_md(d.label)} ({d.backbone}), seed {d.seed}" + ("" if d.round is None else f", round {d.round}")
        + f": {d.reason} — [record {d.spec_hash}]({relative_href(d.path, page_dir)})" for d in runs] + [""]


def render_markdown(board: Board, page_dir: Path | None = None) -> str:
    """The Markdown page; ``page_dir``: the folder it will be written to, which its links are relative to."""
    out = [
        "# fedbench leaderboard", "",
        intro_line(board) + " Accuracies in %: mean ± sample std over seeds; 95% CI is the half-width of "
        "the confidence interval of the mean (Student's t, n-1 df); n is the number of seeds. " + RANK_NOTE, "",
        ROWS_NOTE + " " + TIME_NOTE + " " + DIVERGED_NOTE + " Bytes are measured on the wire (up + down). Rows "
        "marked *published* are numbers from the papers, shown only where their stated protocol matches. Sections "
        "marked **REDUCED PROTOCOL** are smoke tests on reduced data or rounds. See `index.html` for sortable "
        "tables and plots.", "",
    ]
    if not board.tables:
        out += ["No records yet: run `fedbench sweep ...` or `fedbench run ...`.", ""]
    for table in board.tables:
        out += [f"## {table.label}" + (" — REDUCED PROTOCOL" if table.reduced else ""), "",
                f"Task protocol `{table.table_id}` · [task card: {table.task}](#task-{card_anchor(table.task)})"
                + (f" · chance {format_percent(table.chance)}%" if table.chance is not None else "") + ".", ""]
        if table.reduced:
            out += [f"**{reduced_text(table)}**", ""]
        for group in table.groups:
            out += _group_markdown(table, group, page_dir)
        if table.diverged:
            out += _diverged_markdown(table.diverged, page_dir)
        sources = sorted({r.source for r in table.rows if r.kind == "published" and r.source})
        out += [f"Published: {s}" for s in sources] + ([""] if sources else [])
    if board.diverged:
        out += ["## Diverged runs without a table", ""] + _diverged_markdown(board.diverged, page_dir)
    if board.published_not_shown:
        out += ["## Published numbers not shown", "",
                "Their stated protocol matches no table here:", ""]
        out += [f"- {line}" for line in board.published_not_shown] + [""]
    if board.invalid:
        out += ["## Invalid records (left out)", ""]
        out += [f"- `{v.path.as_posix()}`: {'; '.join(v.problems)}" for v in board.invalid] + [""]
    tasks = sorted({t.task for t in board.tables})
    for task in tasks:
        out += [f"## Task card: {task}", ""]
        out += [f"- **{k}**: {_md(v)}" for k, v in task_card_facts(task, [t for t in board.tables if t.task == task])]
        out += [""]
    return "\n".join(out)


def _csv_number(x: float | None) -> float | int | None:
    """Integers stay integers; other numbers keep 8 decimals (no float noise in the file)."""
    if x is None:
        return None
    return int(x) if float(x).is_integer() else round(x, 8)


def board_frame(board: Board, page_dir: Path | None = None) -> Any:
    """One CSV line per row of every table, raw numbers (fractions, bytes, seconds); ``rank`` is the
    row's rank within its group (``=k``: shared; empty: not ranked), ``rank_group`` the group's
    headline metric and backbone."""
    import pandas as pd

    lines = []
    for table in board.tables:
        for group in table.groups:
            for row, rank, tied, front in zip(group.rows, group.ranks, group.tied, group.on_front, strict=True):
                lines.append(_csv_line(table, group, row, "" if rank is None else rank_text(rank, tied), front,
                                       page_dir))
    return pd.DataFrame(lines)


def _csv_line(table: Table, group: RankGroup, row: Row, rank: str, front: bool, page_dir: Path | None
              ) -> dict[str, Any]:
    line: dict[str, Any] = {
        "task": table.task, "table": table.table_id, "table_label": table.label, "kind": row.kind,
        "rank": rank, "rank_group": f"{group.headline} | {group.backbone}", "pareto_front": front,
        "method": row.method, "method_version": row.method_version,  # 0: not recorded
        "label": row.label, "backbone": row.backbone, "fidelity": row.fidelity,
        "protocol": row.protocol_hash, "headline_metric": row.headline,
        "n": row.stats["headline"].n, "seeds": " ".join(map(str, row.seeds)),
        "diverged_seeds": " ".join(map(str, row.diverged_seeds)),
        "chance": _csv_number(table.chance), "reduced": "; ".join(table.reduced),
    }
    for name in STAT_NAMES:
        s = row.stats[name]
        for part in ("mean", "std", "ci95"):
            line[f"{name}_{part}"] = _csv_number(getattr(s, part))
    line["method_options"] = json.dumps(row.protocol.get("method_options", {}), sort_keys=True)
    line["task_options"] = json.dumps(table.protocol["task_options"], sort_keys=True)
    line["rounds"], line["sample"] = table.protocol["rounds"], table.protocol["sample"]
    line["method_class"] = row.method_class
    line["spec_hashes"] = " ".join(row.spec_hashes)
    line["commits"] = " ".join(row.commits)
    line["records"] = " ".join(relative_href(p, page_dir) for p in row.record_paths)
    line["source"] = row.source
    return line


def write_leaderboard(results_dir: str | Path = "results", out: str | Path = "leaderboard",
                      include_ci: bool = False) -> tuple[Board, list[Path]]:
    """Read ``results_dir``, write README.md, leaderboard.csv and index.html into ``out``."""
    if not Path(results_dir).is_dir():
        raise ResultsError(f"no results directory {results_dir}; pass --results-dir DIR (the folder that "
                           f"`fedbench run` / `fedbench sweep` wrote into)")
    records, invalid = load_records(results_dir, include_ci=include_ci)
    # Paths relative to the results folder keep the output the same wherever the repo lives.
    root = Path(results_dir)
    invalid = [replace(v, path=v.path.relative_to(root)) if v.path.is_relative_to(root) else v for v in invalid]
    board = build_board(records, invalid)
    out = Path(out)
    generated = copy_record_images(records, out)
    written = []
    markdown = render_markdown(board, out) + "".join(
        f"\n## Generated images\n\n{caption}\n\n" + " ".join(f"![{f}]({f})" for f in files) + "\n"
        for caption, files in generated)
    for name, text in (("README.md", markdown),
                       ("leaderboard.csv", board_frame(board, out).to_csv(index=False, lineterminator="\n")),
                       ("index.html", render_html(board, [f for f in FIGURES if (out / f).is_file()], generated,
                                                  out))):
        atomic_write_text(out / name, text)
        written.append(out / name)
    return board, written


def copy_record_images(records: list[tuple[Path, dict[str, Any]]], out: Path) -> list[tuple[str, list[str]]]:
    """The image grids records list (a generator's samples), one record per method, task and options
    (the lowest seed), copied under ``out/generated/`` so the page stands alone; (caption, files) each."""
    chosen: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
    for path, record in records:
        if not record.get("images"):
            continue
        spec = record["spec"]
        key = (spec["task"], row_label(spec))
        if key not in chosen or spec["seed"] < chosen[key][1]["spec"]["seed"]:
            chosen[key] = (path, record)
    shown = []
    for (task, label), (path, record) in sorted(chosen.items()):
        files = []
        for file in sorted(record["images"].values()):
            source = path.parent / file
            if source.is_file():
                target = Path("generated") / f"{task}-{record['spec']['method']}-{file}"
                atomic_write_bytes(out / target, source.read_bytes())
                files.append(target.as_posix())
        if files:
            names = ", ".join(sorted(record["images"]))
            shown.append((f"{label} on {task}, seed {record['spec']['seed']}, {record['spec']['rounds']} rounds "
                          f"({names}; record {record['spec_hash']}).", files))
    return shown
