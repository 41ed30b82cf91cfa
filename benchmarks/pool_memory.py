"""Memory of a decoded image pool, in memory against memory-mapped (fedbench.data.pool).

    python benchmarks/pool_memory.py [--gib 2]

Each way runs in its own process: ``stack_resized`` decodes a pool of about ``--gib`` GiB of
224 px images (synthetic arrays, so the figure is the pool's, not a decoder's), then the data
fingerprint hashes it. Reported from /proc/self/status (Linux): the process's anonymous memory
(what only swap could free) after decoding and its peak over the whole run, and the seconds of
each step. The fingerprint formula before this change (``tobytes()`` of the whole pool) runs
beside the sliced one, to show the copy it made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def one(gib: float, mapped: bool) -> dict[str, float]:
    import numpy as np

    from fedbench.data.pool import pixels_fingerprint
    from fedbench.data.sources import stack_resized

    size = 224
    n = int(gib * 2**30 // (3 * size * size))
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    images = stack_resized((frame for _ in range(n)), n, size)
    decoded_s = time.perf_counter() - t0
    anon_after_decode = _status_kib("RssAnon")
    t0 = time.perf_counter()
    sliced = pixels_fingerprint(images)
    sliced_s = time.perf_counter() - t0
    anon_peak_sliced = _status_kib("RssAnon")
    t0 = time.perf_counter()
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode() + str(images.dtype).encode())
    whole = images.contiguous().numpy().tobytes()
    anon_with_copy = _status_kib("RssAnon")
    h.update(whole)
    del whole
    copied_s = time.perf_counter() - t0
    assert h.hexdigest()[:16] == sliced
    return {"mapped": mapped, "images": n, "pool_gib": images.numel() / 2**30, "decode_s": decoded_s,
            "anon_after_decode_gib": anon_after_decode / 2**20, "fingerprint_s": sliced_s,
            "anon_fingerprint_gib": anon_peak_sliced / 2**20, "old_fingerprint_s": copied_s,
            "anon_old_fingerprint_gib": anon_with_copy / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--one", choices=["memory", "mapped"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.gib, args.one == "mapped")))
        return
    from tabulate import tabulate

    rows = []
    with tempfile.TemporaryDirectory() as pools:
        for way, ram_gib in (("memory", str(args.gib * 2)), ("mapped", "0")):
            env = {**os.environ, "FEDBENCH_POOL_RAM_GB": ram_gib, "FEDBENCH_POOL_DIR": pools}
            out = subprocess.run([sys.executable, __file__, "--gib", str(args.gib), "--one", way],
                                 capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(tabulate([["mapped" if r["mapped"] else "in memory", r["images"], f"{r['pool_gib']:.2f}",
                     f"{r['decode_s']:.2f}", f"{r['anon_after_decode_gib']:.2f}", f"{r['fingerprint_s']:.2f}",
                     f"{r['anon_fingerprint_gib']:.2f}", f"{r['old_fingerprint_s']:.2f}",
                     f"{r['anon_old_fingerprint_gib']:.2f}"] for r in rows],
                   headers=["pool", "images", "GiB", "decode s", "anon GiB", "fingerprint s", "anon GiB",
                            "old fingerprint s", "anon GiB (copy)"]))


if __name__ == "__main__":
    main()
