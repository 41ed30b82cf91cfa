"""FedCMI's closing tables from committed records: beside the baselines, the ablation, the cost.

    python benchmarks/fedcmi_report.py [--results results]

Reads ``results/<task>/`` (the leaderboard rows) and ``results/ablations/<task>/fedcmi`` for
``rotated-mnist`` and ``rotated-mnist-glimpse`` on digits-clip, groups records by everything but
the seed and prints Markdown: mean +- std over seeds of held-out, global, worst-class accuracy,
the per-class spread, each modality's accuracy alone; seconds per round (client, server) and
bytes per round.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from report_tables import load_records, mean_std

FEDCMI_DEFAULTS = {"mode": "text-image", "infiltration": True, "temperature": "class-wise", "mu": 0.01}
FEATURE_METHODS = ("fedcmi", "fedavg", "fedprox", "fedclip", "zero-shot")


def _records(folder: Path, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    return [r for m in methods for r in load_records(folder / m)]


def _label(record: dict[str, Any]) -> str:
    spec = record["spec"]
    options = spec["method_options"]
    if spec["method"] == "fedcmi":
        changed = [f"{k}={options[k]}" for k, v in FEDCMI_DEFAULTS.items() if options.get(k) != v]
        return "fedcmi" + (f" ({', '.join(changed)})" if changed else "")
    trainable = options.get("trainable")
    extra = " (lr=0.001, logit_scale=100)" if spec["method"] == "fedclip" and options.get("lr") != 5e-5 else ""
    return spec["method"] + (f"-{trainable}" if trainable else "") + extra


def table(records: list[dict[str, Any]]) -> list[str]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["spec"]["backbone"] == "digits-clip" and r["spec"]["method_options"].get("trainable") in (None, "head"):
            rows[_label(r)].append(r)
    out = ["| method | n | held-out % | global % | worst class % | class spread (std) % | image alone % "
           "| glimpse alone % | s / round (client, server) | bytes / round (up + down) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label, group in sorted(rows.items()):
        last = [g["metrics"]["final"]["last"] for g in group]
        modality = [x.get("modality_acc") or {} for x in last]
        timing = [g["timing"] for g in group]
        rounds = group[0]["metrics"]["final"]["rounds_run"]
        if rounds:
            per_round = statistics.mean(statistics.mean(t["round_seconds"]) for t in timing)
            client = statistics.mean(statistics.mean(t["client_seconds"]) for t in timing)
            server = statistics.mean(statistics.mean(t["server_seconds"]) for t in timing)
            cost = f"{per_round:.3f} ({client:.3f}, {server:.3f})"
            comm = group[0]["comm"]
            size = f"{(comm['up_bytes'] + comm['down_bytes']) / rounds / 1e3:,.1f} KB"
        else:
            cost, size = "no rounds", "0"
        out.append(f"| {label} | {len(group)} | {mean_std([x.get('heldout_acc_mean') for x in last])} "
                   f"| {mean_std([x.get('global_acc') for x in last])} "
                   f"| {mean_std([x.get('class_acc_worst') for x in last])} "
                   f"| {mean_std([x.get('class_acc_std') for x in last])} "
                   f"| {mean_std([m.get('image') for m in modality])} "
                   f"| {mean_std([m.get('glimpse') for m in modality])} | {cost} | {size} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    root = Path(args.results)
    for task in ("rotated-mnist", "rotated-mnist-glimpse"):
        print(f"## {task} (digits-clip, 50 rounds): leaderboard rows\n")
        print("\n".join(table(_records(root / task, FEATURE_METHODS))) + "\n")
        ablations = _records(root / "ablations" / task, ("fedcmi",))
        if ablations:
            print(f"## {task}: FedCMI ablation\n")
            print("\n".join(table(_records(root / task, ("fedcmi",)) + ablations)) + "\n")


if __name__ == "__main__":
    main()
