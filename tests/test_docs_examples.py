"""The worked example in CONTRIBUTING.md runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

from fedbench.core.registry import include
from fedbench.harness.run import execute, resolve_spec

CONTRIBUTING = Path(__file__).parents[1] / "CONTRIBUTING.md"


def test_contributing_fedavgm_runs_and_reduces_to_fedavg(blobs_task, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", CONTRIBUTING.read_text(encoding="utf-8"), flags=re.S)
    (code,) = [b for b in blocks if '@register_method("fedavgm"' in b]
    plugin = tmp_path / "fedavgm.py"
    plugin.write_text(code, encoding="utf-8")
    include(plugin)
    sets = ["local_epochs=1", "batch_size=32", "lr=0.05"]

    def final_loss(method: str, *extra: str) -> float:
        record = execute(resolve_spec(method, blobs_task, rounds=3, sets=[*sets, *extra]), None)
        return record["metrics"]["rounds"][-1]["global_loss"]

    assert final_loss("fedavgm", "server_momentum=0") == final_loss("fedavg")
    assert final_loss("fedavgm") != final_loss("fedavg")
