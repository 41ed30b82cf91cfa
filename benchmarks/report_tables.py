"""What the method report scripts (``*_report.py``) share: reading committed records and printing
mean +- std over seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def load_records(folder: Path, pattern: str = "*.json") -> list[dict[str, Any]]:
    """The records under ``folder`` matching ``pattern``, in path order ([] when there is no folder)."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))] if folder.is_dir() else []


def mean_std(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± sample std`` of the values present, times ``scale``; one value alone; "—" for none."""
    xs = [v * scale for v in values if v is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"
