"""How the board package is put together: one set of number formatters, one definition of where a
metric lives in a record (import cycles and module sizes: tests/test_layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedbench.board
from fedbench.core import metrics as m
from fedbench.core.formatting import format_bytes, format_count, format_percent, format_seconds

BOARD = Path(fedbench.board.__file__).parent


@pytest.mark.parametrize("n, text", [
    (None, "—"), (0, "0 B"), (999, "999 B"), (999.9, "999 B"), (1000, "1.00 KB"), (35_695_200, "35.70 MB"),
    (2_595_400_000, "2.60 GB"), (5e12, "5.00 TB"), (3e15, "3000.00 TB"), (-1500, "-1.50 KB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n, text", [
    (None, "-"), (512, "512 B"), (1234, "1.2 KB"), (3_569_520, "3.6 MB"), (141_960_000_000, "142.0 GB"),
])
def test_format_bytes_for_terminal_output(n, text):
    assert format_bytes(n, digits=1, missing="-") == text


def test_other_formatters():
    assert format_percent(0.91234) == "91.23" and format_percent(None, missing="-") == "-"
    assert format_count(44426) == "44,426" and format_count(None) == "—"
    assert format_seconds(56.5242) == "56.5" and format_seconds(None) == "—"


def test_metrics_read_their_paths():
    record = {"metrics": {"final": {"last": {"global_acc": 0.9}, "best_val": None, "rounds_run": 2}},
              "comm": {"up_bytes": 10}, "timing": {"total_seconds": 1.5}}
    assert m.GLOBAL_ACC.read(record) == 0.9 and m.ROUNDS_RUN.read(record) == 2
    assert m.BUILTIN_METRICS["best_val_global_acc"].read(record) is None  # a null best_val block
    assert m.UP_BYTES.read(record) == 10 and m.DOWN_BYTES.read(record) is None
    assert m.WALL_SECONDS.read(record) == 1.5
    assert m.GLOBAL_ACC.at_best_val().path == ("metrics", "final", "best_val", "global_acc")
    with pytest.raises(ValueError):
        m.UP_BYTES.at_best_val()
