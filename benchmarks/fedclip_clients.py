"""FedCLIP rounds per second and peak memory at 10, 100 and 1,000 clients, on cached features.

    python benchmarks/fedclip_clients.py [--clients 10 100 1000] [--rounds 3] [--threads 1] [--engine both]

Each client count runs in its own process (so each peak resident set is its own): a real
``execute`` of FedCLIP on mnist-dirichlet (all 60k MNIST training images, Dirichlet 0.5, the
offline digits-clip backbone, features from the cache, which the first run fills). The total
work of a round is the same at every client count (one epoch over all training data, split
among more clients), so the ratio of seconds per round against 10 clients is the per-client
overhead: the engine's per-client Python loop, message serialisation and optimiser set-up.
Rounds after the first are timed (median); evaluation is off except at the last round.

``--engine both`` (the default) runs every client count twice, the client loop and the batched
engine (``FEDBENCH_BATCHED_CLIENTS=1``), one after the other, and gives the loop/batched ratio of
that run; ``loop`` or ``batched`` runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile


def one(clients: int, rounds: int, threads: int, cache_dir: str) -> dict[str, float]:
    import torch

    from fedbench.harness.run import execute, resolve_spec

    torch.set_num_threads(threads)
    spec = resolve_spec("fedclip", "mnist-dirichlet", clients=clients, rounds=rounds, eval_every=rounds)
    record = execute(spec, None, cache_dir=cache_dir)
    timing = record["timing"]
    timed = slice(1, None) if rounds > 1 else slice(None)
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "clients": clients,
        "round_s": statistics.median(timing["round_seconds"][timed]),
        "client_s": statistics.median(timing["client_seconds"][timed]),
        "server_s": statistics.median(timing["server_seconds"][timed]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20,
        "global_acc": record["metrics"]["final"]["last"]["global_acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: a temporary folder)")
    parser.add_argument("--engine", choices=["both", "loop", "batched"], default="both")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.rounds, args.threads, args.cache_dir)))
        return
    from tabulate import tabulate

    engines = ["loop", "batched"] if args.engine == "both" else [args.engine]
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        rows = []
        for n in args.clients:
            for engine in engines:
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                       "FEDBENCH_BATCHED_CLIENTS": "1" if engine == "batched" else "0"}
                out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds),
                                      "--threads", str(args.threads), "--cache-dir", cache],
                                     capture_output=True, text=True, env=env, check=True)
                rows.append({"engine": engine, **json.loads(out.stdout.strip().splitlines()[-1])})
    loop_s = {r["clients"]: r["round_s"] for r in rows if r["engine"] == "loop"}
    base = rows[0]["round_s"]
    table = []
    for r in rows:
        speedup = f"{loop_s[r['clients']] / r['round_s']:.2f}x" if r["clients"] in loop_s else "-"
        table.append([r["clients"], r["engine"], f"{1 / r['round_s']:.2f}", f"{r['round_s']:.3f}",
                      f"{r['round_s'] / base:.2f}x", speedup, f"{r['client_s']:.3f}", f"{r['server_s']:.3f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['global_acc']:.4f}"])
    print(tabulate(table, headers=["clients", "engine", "rounds/s", "s/round",
                                   f"vs {rows[0]['clients']} {rows[0]['engine']}", "loop/this", "client s",
                                   "server s", "peak RSS MB", "global acc"]))

if __name__ == "__main__":
    main()
