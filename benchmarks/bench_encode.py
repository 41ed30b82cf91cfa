"""Encode throughput of the frozen backbones, and what the feature cache saves.

    python benchmarks/bench_encode.py                       # offline-pair and ViT-B/32 (random init)
    python benchmarks/bench_encode.py --backbones tiny-clip --batches 5

Prints images/s of ``encode_image`` (preprocess included) at one batch size, and the wall time
of a first (miss: encode and write) and a second (hit: memory-map, verify, read) feature-cache
call on the same images, with their ratio. Throughput depends on the crop size, not on the
pixels, so random images stand in for a data set. ``openclip:ViT-B-32`` is random-init: the
same compute as the real model, without weights that this machine cannot fetch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch
from tabulate import tabulate

from fedbench.models.backbones import Backbone, create_backbone
from fedbench.models.cache import FeatureCache

DEFAULT_BACKBONES = ("offline-pair", "openclip:ViT-B-32")


@dataclass
class EncodeResult:
    backbone: str
    batch_size: int
    images_per_s: float
    seconds_per_batch: float


@dataclass
class CacheResult:
    backbone: str
    images: int
    first_s: float
    second_s: float

    @property
    def ratio(self) -> float:
        return self.first_s / max(self.second_s, 1e-9)


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def measure_encode(backbone: Backbone, batch_size: int = 64, batches: int = 2, warmup: int = 1) -> EncodeResult:
    """Best-of-``batches`` time of one ``encode_image`` call on ``batch_size`` 224-px images."""
    images = random_images(batch_size, 224)
    for _ in range(warmup):  # first calls pay for allocator growth and oneDNN kernel selection
        backbone.encode_image(images, batch_size=batch_size)
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        backbone.encode_image(images, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return EncodeResult(backbone.name, batch_size, batch_size / best, best)


def measure_cache(backbone: Backbone, n: int = 128, size: int = 32) -> CacheResult:
    """First (encode + write) vs second (verified read) feature-cache call on ``n`` images."""
    images = random_images(n, size, seed=1)
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root)
        start = time.perf_counter()
        cache.features(backbone, images, progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        cache.features(backbone, images, progress=False)
        second = time.perf_counter() - start
        assert cache.stats.images_encoded == n, "the second call encoded images again"
    return CacheResult(backbone.name, n, first, second)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="timed batches (best one counts)")
    parser.add_argument("--cache-images", type=int, default=128)
    parser.add_argument("--cache-backbone", default="offline-pair")
    args = parser.parse_args(argv)

    rows = []
    for name in args.backbones:
        r = measure_encode(create_backbone(name), args.batch_size, args.batches)
        rows.append([r.backbone, r.batch_size, f"{r.images_per_s:.1f}", f"{r.seconds_per_batch:.2f}"])
    print(f"encode_image on CPU ({torch.get_num_threads()} threads), 224 px, preprocess included")
    print(tabulate(rows, headers=["backbone", "batch", "images/s", "s/batch"]))

    c = measure_cache(create_backbone(args.cache_backbone), args.cache_images)
    print(f"\nfeature cache, {c.images} images, {c.backbone}")
    print(
        tabulate(
            [["first (encode + write)", f"{c.first_s:.3f}"], ["second (read + verify)", f"{c.second_s:.4f}"]],
            headers=["call", "seconds"],
        )
    )
    print(f"ratio first/second: {c.ratio:.0f}x")


if __name__ == "__main__":
    main()
