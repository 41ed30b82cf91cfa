"""Published reference numbers beside the measured rows, only where their stated protocol matches.

Numbers come from each task's ``TaskCard.published`` (the convention is in :func:`published_rows`).
A number is shown, marked *published*, only beside a table whose protocol it matches; the others
are listed with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedbench.board.rows import STAT_NAMES, Row, Table
from fedbench.board.stats import NO_VALUES, Summary
from fedbench.core.registry import TASKS

PROTOCOL_KEYS = ("backbone", "rounds", "sample", "task_options")


def task_published(task: str) -> Mapping[str, Any]:
    """``TaskCard.published`` of a registered task ({} when the task is not registered here)."""
    try:
        return dict(TASKS.get(task).obj.card.published or {})
    except Exception:  # a task from a plugin not installed here has no card to read
        return {}


def _as_fraction(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    value = value / 100 if value > 1 else float(value)  # papers print percents
    return value if 0 <= value <= 1 else None


def _protocol_mismatch(stated: Mapping[str, Any], table: Table, backbones: set[str]) -> str | None:
    """Why a published number's stated protocol does not match ``table`` (None: it matches)."""
    unknown = set(stated) - set(PROTOCOL_KEYS)
    if unknown:
        return f"_protocol keys {sorted(unknown)} cannot be checked (known: {', '.join(PROTOCOL_KEYS)})"
    if "backbone" not in stated:
        return "_protocol does not state the backbone"
    if stated["backbone"] not in backbones:
        return f"no measured row with backbone {stated['backbone']}"
    for key in ("rounds", "sample"):
        if key in stated and stated[key] != table.protocol[key]:
            return f"{key} {stated[key]} (table: {table.protocol[key]})"
    for key, value in dict(stated.get("task_options") or {}).items():
        if table.protocol["task_options"].get(key) != value:
            return f"task option {key}={value} (table: {table.protocol['task_options'].get(key)})"
    return None


def published_rows(table: Table, published: Mapping[str, Any]) -> tuple[list[Row], list[str]]:
    """Rows for the published numbers whose stated protocol matches ``table``, and why others don't.

    ``TaskCard.published`` convention (keys starting with ``_`` are metadata)::

        {"_source": "Lu et al. 2023, arXiv 2302.13485, Table 2",   # citation shown with the rows
         "_metric": "held-out domain accuracy (%)",                 # free text, shown with the source
         "_protocol": {"backbone": "openclip:ViT-B-32/openai",      # required: what was measured
                       "rounds": 200},                              # optional: rounds, sample, task_options
         "_value_by": "heldout",                                    # optional: entries are keyed by
                                                                    # this task option's value
         "FedCLIP": {"art_painting": 95.15, "cartoon": 95.36, "mean": 95.24},
         "FedAvg (CLIP)": {"mean": 81.55}}                          # or just a number

    Without ``_value_by`` an entry's number is its ``headline`` or ``mean`` key (or the entry
    itself); with it, the number under the table's value of that task option (a table holding
    out ``cartoon`` shows 95.36; an entry without that key is not shown there). An entry may
    carry its own ``_protocol`` (merged over the shared one), ``_source``, and ``_headline``
    (the metric it reports, e.g. ``heldout_acc_mean``; rows with another headline do not
    match). Values above 1 are read as percents. A number whose backbone is not stated is never
    shown: a ViT-B/32 number beside an offline-backbone row would mislead.
    """
    shared_protocol = dict(published.get("_protocol") or {})
    shared_source = str(published.get("_source") or "")
    metric_text = str(published.get("_metric") or "")
    value_by = published.get("_value_by")
    measured = [r for r in table.rows if r.kind == "measured"]
    backbones = {r.backbone for r in measured}
    rows, not_shown = [], []
    for name, entry in sorted(published.items()):
        if name.startswith("_"):
            continue
        meta = entry if isinstance(entry, Mapping) else {}
        if value_by:
            key = str(table.protocol["task_options"].get(str(value_by)))
            raw = meta.get(key) if meta else None
        else:
            raw = meta.get("headline", meta.get("mean")) if meta else entry
        value = _as_fraction(raw)
        if value is None:
            continue
        stated = {**shared_protocol, **dict(meta.get("_protocol") or {})}
        why = _protocol_mismatch(stated, table, backbones)
        metric = str(meta.get("_headline") or "")
        headlines = {r.headline for r in measured if r.backbone == stated.get("backbone")}
        if why is None and metric and metric not in headlines:
            why = f"it reports {metric}, the table's rows report {', '.join(sorted(headlines))}"
        if why is not None:
            not_shown.append(f"{table.task} / {table.table_id}: {name} ({why})")
            continue
        source = str(meta.get("_source") or shared_source)
        rows.append(Row(kind="published", method=name, label=f"{name} (published)", backbone=stated["backbone"],
                        headline=metric or "—",
                        stats={**{n: NO_VALUES for n in STAT_NAMES}, "headline": Summary(value, None, None, 0)},
                        fidelity="published", source=source + (f" ({metric_text})" if metric_text else ""),
                        trains=True))
    return rows, not_shown
