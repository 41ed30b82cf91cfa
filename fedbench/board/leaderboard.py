"""The leaderboard: every record under ``results/`` -> ``leaderboard/`` (Markdown, CSV, HTML).

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

from fedbench.board.cells import ROWS_NOTE, Column, columns_for, intro_line, ranks
from fedbench.board.grouping import build_board, load_records, row_label
from fedbench.board.html import FIGURES, render_html
from fedbench.board.rows import STAT_NAMES, Board, Row
from fedbench.core.results import atomic_write_bytes, atomic_write_text
from fedbench.errors import ResultsError


def _markdown_cell(column: Column, row: Row) -> str:
    """A column's text with the Markdown markup of its kind: tags in italics, hashes as code."""
    if column.header == "method":
        if row.kind == "published":
            return f"{row.method} *(published)*"
        return row.label + (f" *({row.fidelity})*" if row.fidelity == "adaptation" else "")
    if column.header == "protocol" and row.kind == "measured":
        return f"`{row.protocol_hash}`"
    if column.header == "commit" and row.commits:
        return " ".join(f"`{c}`" for c in row.commits)
    return column.text(row)


def _markdown_cells(row: Row, rank: int | None, columns: list[Column]) -> list[str]:
    return ["—" if rank is None else str(rank), *(_markdown_cell(c, row) for c in columns)]


def render_markdown(board: Board) -> str:
    import pandas as pd

    out = [
        "# fedbench leaderboard", "",
        intro_line(board) + " Accuracies in %: mean ± sample std over seeds; 95% CI is the half-width of "
        "the confidence interval of the mean (Student's t, n-1 df); n is the number of seeds. " + ROWS_NOTE
        + " `headline` names the metric: held-out domain accuracy, else global-model accuracy, else mean client "
        "accuracy. Bytes are measured on the wire (up + down); wall time depends on the machine. Rows marked "
        "*published* are numbers from the papers, shown only where their stated protocol matches. See "
        "`index.html` for sortable tables and plots.", "",
    ]
    if not board.tables:
        out += ["No records yet: run `fedbench sweep ...` or `fedbench run ...`.", ""]
    for table in board.tables:
        out += [f"## {table.label}", "", f"Task protocol `{table.table_id}`.", ""]
        columns = columns_for(table.rows)
        frame = pd.DataFrame([_markdown_cells(r, k, columns) for r, k in zip(table.rows, ranks(table.rows),
                                                                             strict=True)],
                             columns=["#", *(c.header for c in columns)])
        out += [frame.to_markdown(index=False, disable_numparse=True), ""]
        sources = sorted({r.source for r in table.rows if r.kind == "published" and r.source})
        out += [f"Published: {s}" for s in sources] + ([""] if sources else [])
    if board.published_not_shown:
        out += ["## Published numbers not shown", "",
                "Their stated protocol matches no table here:", ""]
        out += [f"- {line}" for line in board.published_not_shown] + [""]
    if board.invalid:
        out += ["## Invalid records (left out)", ""]
        out += [f"- `{v.path.as_posix()}`: {'; '.join(v.problems)}" for v in board.invalid] + [""]
    return "\n".join(out)


def _csv_number(x: float | None) -> float | int | None:
    """Integers stay integers; other numbers keep 8 decimals (no float noise in the file)."""
    if x is None:
        return None
    return int(x) if float(x).is_integer() else round(x, 8)


def board_frame(board: Board) -> Any:
    """One CSV line per row of every table, raw numbers (fractions, bytes, seconds)."""
    import pandas as pd

    lines = []
    for table in board.tables:
        for row in table.rows:
            line: dict[str, Any] = {
                "task": table.task, "table": table.table_id, "table_label": table.label, "kind": row.kind,
                "method": row.method, "method_version": row.method_version,  # 0: not recorded
                "label": row.label, "backbone": row.backbone, "fidelity": row.fidelity,
                "protocol": row.protocol_hash, "headline_metric": row.headline,
                "n": row.stats["headline"].n, "seeds": " ".join(map(str, row.seeds)),
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
            line["source"] = row.source
            lines.append(line)
    return pd.DataFrame(lines)


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
    markdown = render_markdown(board) + "".join(
        f"\n## Generated images\n\n{caption}\n\n" + " ".join(f"![{f}]({f})" for f in files) + "\n"
        for caption, files in generated)
    for name, text in (("README.md", markdown),
                       ("leaderboard.csv", board_frame(board).to_csv(index=False, lineterminator="\n")),
                       ("index.html", render_html(board, [f for f in FIGURES if (out / f).is_file()], generated))):
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
