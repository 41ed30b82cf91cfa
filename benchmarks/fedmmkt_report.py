"""FedMMKT's closing tables from committed records: beside the baselines, the ablation, the
generator metrics over rounds, and the time per round split into its stages.

    python benchmarks/fedmmkt_report.py [--results results]

Reads ``results/rotated-mnist/`` (leaderboard rows: FedMMKT, FedMMKT without co-enhancement,
FedAvg-head, FedCLIP, the CNN FedAvg) and ``results/ablations/rotated-mnist/fedmmkt``; groups by
everything but the seed; prints Markdown (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from report_tables import load_records, mean_std

DEFAULTS = {"finetune": "weighted", "synth_per_class": 5}


def _label(record: dict[str, Any]) -> str:
    spec = record["spec"]
    options = spec["method_options"]
    if spec["method"] == "fedmmkt":
        changed = [f"{k}={options[k]}" for k, v in DEFAULTS.items() if options.get(k) != v]
        return "fedmmkt" + (f" ({', '.join(changed)})" if changed else "")
    extra = " (lr=0.001, logit_scale=100)" if spec["method"] == "fedclip" and options.get("lr") != 5e-5 else ""
    trainable = options.get("trainable")
    return spec["method"] + (f"-{trainable}" if trainable else "") + extra


def _grouped(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        rows[_label(r)].append(r)
    return dict(sorted(rows.items()))


def accuracy_table(records: list[dict[str, Any]]) -> list[str]:
    out = ["| method | n | held-out % | global % | worst client % | worst class % | generated acc % (round 1 → last) "
           "| image-text cosine (round 1 → last) | bytes / round |", "|---|---|---|---|---|---|---|---|---|"]
    for label, group in _grouped(records).items():
        last = [g["metrics"]["final"]["last"] for g in group]
        rounds = group[0]["metrics"]["final"]["rounds_run"] or 1
        comm = group[0]["comm"]
        server = [[r.get("server") or {} for r in g["metrics"]["rounds"]] for g in group]

        def first_last(key: str, scale: float, digits: int, server=server) -> str:
            if not all(s and key in s[0] for s in server):
                return "—"
            return (f"{mean_std([s[0][key] for s in server], scale, digits)} → "
                    f"{mean_std([s[-1][key] for s in server], scale, digits)}")

        out.append(f"| {label} | {len(group)} | {mean_std([x.get('heldout_acc_mean') for x in last])} "
                   f"| {mean_std([x.get('global_acc') for x in last])} "
                   f"| {mean_std([x.get('client_acc_worst') for x in last])} "
                   f"| {mean_std([x.get('class_acc_worst') for x in last])} | {first_last('generated_acc', 100, 1)} "
                   f"| {first_last('generated_clip_score', 1, 4)} "
                   f"| {(comm['up_bytes'] + comm['down_bytes']) / rounds / 1e3:,.1f} KB |")
    return out


def time_table(records: list[dict[str, Any]]) -> list[str]:
    stages = ("generation", "distillation", "generator_finetune", "generator_metrics")
    out = ["| method | n | s / round | clients | " + " | ".join(stages) + " |", "|---" * (4 + len(stages)) + "|"]
    for label, group in _grouped(records).items():
        timing = [g["timing"] for g in group]
        if not timing[0]["round_seconds"] or "server_stages" not in timing[0]:
            continue

        def mean_of(values: list[list[float]]) -> str:
            return f"{statistics.mean(statistics.mean(v) for v in values):.3f}" if all(values) else "—"

        cells = [mean_of([t["server_stages"].get(s, []) for t in timing]) for s in stages]
        out.append(f"| {label} | {len(group)} | {mean_of([t['round_seconds'] for t in timing])} "
                   f"| {mean_of([t['client_seconds'] for t in timing])} | " + " | ".join(cells) + " |")
    return out


def curve(records: list[dict[str, Any]], every: int = 10) -> list[str]:
    out = ["| method | round | held-out % | generated acc % | image-text cosine | ensemble agreement |",
           "|---|---|---|---|---|---|"]
    for label, group in _grouped(records).items():
        n = len(group[0]["metrics"]["rounds"])
        for i in sorted({0, *range(every - 1, n, every), n - 1}):
            rows = [g["metrics"]["rounds"][i] for g in group]
            server = [r.get("server") or {} for r in rows]
            out.append(f"| {label} | {rows[0]['round']} | {mean_std([r.get('heldout_acc_mean') for r in rows])} "
                       f"| {mean_std([s.get('generated_acc') for s in server], 100, 1)} "
                       f"| {mean_std([s.get('generated_clip_score') for s in server], 1, 4)} "
                       f"| {mean_std([s.get('synth_agreement') for s in server], 1, 3)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    root = Path(args.results) / "rotated-mnist"
    board = [r for m in ("fedmmkt", "fedavg", "fedclip") for r in load_records(root / m)
             if r["spec"]["backbone"] in ("digits-clip", "none")
             and r["spec"]["method_options"].get("trainable") in (None, "head", "simple-cnn")]
    mine = [r for r in board if r["spec"]["method"] == "fedmmkt"]
    ablations = mine + load_records(Path(args.results) / "ablations" / "rotated-mnist" / "fedmmkt")
    print("## rotated-mnist (digits-clip, 50 rounds): FedMMKT beside the baselines\n")
    print("\n".join(accuracy_table(board)) + "\n")
    print("## FedMMKT ablation\n")
    print("\n".join(accuracy_table(ablations)) + "\n")
    print("## Time per round, by stage (seconds)\n")
    print("\n".join(time_table(ablations)) + "\n")
    print("## The generator over rounds (mean over seeds)\n")
    print("\n".join(curve(ablations)) + "\n")


if __name__ == "__main__":
    main()
