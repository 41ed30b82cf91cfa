"""modality-broadcast's closing tables from committed records: the ablation and the per-round cost.

    python benchmarks/modality_broadcast_report.py [--results results]

Reads ``results/rotated-mnist/`` (the leaderboard rows) and ``results/ablations/rotated-mnist/``
(the ablation runs, kept off the leaderboard's ranks), groups records by everything but the seed
and prints Markdown: mean +- std over seeds of held-out, global and mean personalised client
accuracy; seconds per round (client / server) and bytes per round, beside FedCLIP's.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from report_tables import load_records, mean_std

DEFAULTS = {"text_steps": 10, "aggregation": "query", "personal_layers": 1, "local_epochs": 1}


def _label(record: dict[str, Any]) -> str:
    spec = record["spec"]
    options = spec["method_options"]
    if spec["method"] == "modality-broadcast":
        changed = [f"{k}={options[k]}" for k, v in DEFAULTS.items() if options.get(k) != v]
        return "modality-broadcast" + (f" ({', '.join(changed)})" if changed else "")
    trainable = options.get("trainable")
    extra = f" ({', '.join(f'{k}={v}' for k, v in sorted(options.items()) if k in ('lr', 'logit_scale'))})" \
        if spec["method"] == "fedclip" and options.get("lr") != 5e-5 else ""
    return spec["method"] + (f"-{trainable}" if trainable else "") + extra


def table(records: list[dict[str, Any]], backbone: str) -> list[str]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["spec"]["backbone"] in (backbone, "none") or r["spec"]["method"] == "modality-broadcast":
            rows[_label(r)].append(r)
    out = ["| method | n | held-out % | global % | client % (mean, personalised) | s / round (client, server) "
           "| bytes / round (up + down) |", "|---|---|---|---|---|---|---|"]
    for label, group in sorted(rows.items(), key=lambda kv: kv[0]):
        last = [g["metrics"]["final"]["last"] for g in group]
        timing = [g["timing"] for g in group]
        rounds = max(1, group[0]["metrics"]["final"]["rounds_run"])
        per_round = statistics.mean(statistics.mean(t["round_seconds"]) for t in timing)
        if all(t.get("client_seconds") for t in timing):  # records made before the split have none
            client = statistics.mean(statistics.mean(t["client_seconds"]) for t in timing)
            server = statistics.mean(statistics.mean(t["server_seconds"]) for t in timing)
            split = f" ({client:.2f}, {server:.2f})"
        else:
            split = ""
        comm = group[0]["comm"]
        bytes_per_round = (comm["up_bytes"] + comm["down_bytes"]) / rounds
        out.append(f"| {label} | {len(group)} | {mean_std([x.get('heldout_acc_mean') for x in last])} "
                   f"| {mean_std([x.get('global_acc') for x in last])} "
                   f"| {mean_std([x.get('client_acc_mean') for x in last])} "
                   f"| {per_round:.2f}{split} | {bytes_per_round / 1e3:,.1f} KB |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    root = Path(args.results)
    for task, backbone in (("rotated-mnist", "digits-clip"), ("pacs-mini", "offline-pair")):
        main_rows = load_records(root / task, "*/*.json")
        print(f"## {task} ({backbone}): leaderboard rows\n")
        print("\n".join(table(main_rows, backbone)) + "\n")
        ablations = load_records(root / "ablations" / task, "*/*.json")
        if ablations:
            mine = [r for r in main_rows if r["spec"]["method"] == "modality-broadcast"]
            print(f"## {task}: ablation\n")
            print("\n".join(table(mine + ablations, backbone)) + "\n")


if __name__ == "__main__":
    main()
