"""Re-run committed records under the current code and say, per record, what moved.

    python benchmarks/rerun_records.py results/pacs-mini/fedclip/*.json --out /tmp/rerun
    python benchmarks/rerun_records.py $(find results -name '*.json' -not -path '*/ci/*') --out results

Each record's spec is run again as it was recorded (a spec of version 1 is upgraded to name the
current method class and version, its options unchanged) with one torch thread, and the new
record is written under ``--out``. The report compares the scores (every metric except the byte
counts, which the envelope of core v2 changed by design) with the old record: ``identical`` means
bit-identical, else the largest absolute difference. Records made on another machine (other CPU
kernels: ``provenance.machine.cpu_capability`` / ``cpu_flags``) can differ in the last digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch

from fedbench.core.registry import METHODS, method_identity
from fedbench.core.results import load_record, write_record
from fedbench.core.spec import RunSpec
from fedbench.harness.run import execute


def current_spec(recorded: dict[str, Any]) -> RunSpec:
    spec = RunSpec.from_dict(recorded)
    if spec.spec_version >= 2:
        return spec
    return dataclasses.replace(spec, spec_version=2, **method_identity(METHODS.get(spec.method).obj))


def scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """Every metric but the per-round byte counts, flattened to ``path -> value``."""
    out: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not k.endswith("_bytes"):
                    walk(v, f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = value

    walk(metrics, "metrics")
    return out


def largest_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = scores(old), scores(new)
    if a == b:
        return "identical"
    if a.keys() != b.keys():
        return f"different keys: {sorted(set(a) ^ set(b))[:3]}"
    gaps = [(abs(x - y), k) for k, x in a.items() for y in [b[k]] if x != y and isinstance(x, (int, float))
            and isinstance(y, (int, float))]
    other = [k for k, x in a.items() if x != b[k] and not isinstance(x, (int, float))]
    worst = max(gaps) if gaps else (0.0, other[0] if other else "?")
    return f"max |diff| {worst[0]:.3g} at {worst[1]} ({len(gaps) + len(other)} values differ)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--out", required=True, help="results folder the new records are written to")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.records:
        old = load_record(path)
        t0 = time.perf_counter()
        new = execute(current_spec(old["spec"]), None)
        new.pop("path", None)
        written = write_record(new, args.out)
        print(json.dumps({"old": path, "new": str(written), "seconds": round(time.perf_counter() - t0, 1),
                          "scores": largest_difference(old["metrics"], new["metrics"])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
