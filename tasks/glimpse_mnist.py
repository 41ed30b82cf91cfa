"""``rotated-mnist-glimpse``: Rotated MNIST where every sample carries two modalities of unequal
strength, the rotated digit ("image") and a glimpse of it ("glimpse": a coarse, noisy copy), so
that modality imbalance (FedCMI's setting: one modality learns fast and starves the other) can be
measured offline.

The glimpse is the same rotated digit averaged down to ``glimpse_size`` x ``glimpse_size`` cells,
blown back up to 28 x 28 (each cell a flat block) and overlaid with seeded Gaussian pixel noise
of standard deviation ``glimpse_noise`` (0..255 scale). Float64 numpy, round-half-up: the same
pixels on every CPU. Everything else is ``rotated-mnist``'s protocol: the same domains, the same
clients, the same splits, the same held-out rotation (the two tasks' indices are identical).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedbench.core.options import bounded
from fedbench.core.registry import register_task
from fedbench.data.dataset import FederatedDataset, TaskCard
from fedbench.data.sources import stream_rng
from fedbench.errors import SpecError
from fedbench.tasks.rotated_mnist import DOMAINBED, RotatedMnist, RotatedMnistOptions

STREAM_GLIMPSE_NOISE = 41  # its own generator: the noise never moves the dealing or the splits
GLIMPSE_SIZES = (1, 2, 4, 7, 14, 28)  # the divisors of 28: every cell covers whole pixels


@dataclass
class GlimpseMnistOptions(RotatedMnistOptions):
    """``rotated-mnist``'s options plus how weak the second modality is."""

    glimpse_size: int = bounded(7, ge=1, le=28)  # cells per side of the coarse copy (a divisor of 28)
    glimpse_noise: float = bounded(48.0, ge=0)  # std of the Gaussian pixel noise on the 0..255 scale

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.glimpse_size not in GLIMPSE_SIZES:
            raise SpecError(f"glimpse_size={self.glimpse_size}: must divide 28, one of {GLIMPSE_SIZES}")
        if not (0 <= self.glimpse_noise < float("inf")):
            raise SpecError(f"glimpse_noise={self.glimpse_noise}: must be a finite value >= 0 (0: no noise)")


def glimpse(images: Tensor, size: int, noise: float, rng: np.random.Generator) -> Tensor:
    """uint8 [N,C,H,W] -> its ``size`` x ``size`` block average, upsampled by repetition, plus noise."""
    x = images.numpy().astype(np.float64)
    n, c, h, w = x.shape
    cell_h, cell_w = h // size, w // size
    coarse = x.reshape(n, c, size, cell_h, size, cell_w).mean(axis=(3, 5))
    blocks = np.repeat(np.repeat(coarse, cell_h, axis=2), cell_w, axis=3)
    if noise > 0:
        blocks = blocks + noise * rng.standard_normal(blocks.shape)
    return torch.from_numpy(np.clip(np.floor(blocks + 0.5), 0, 255).astype(np.uint8))


@register_task("rotated-mnist-glimpse",
               description="Rotated MNIST with a second, weak modality per sample (a coarse noisy glimpse); offline",
               fidelity="protocol", source=DOMAINBED)
class GlimpseMnist(RotatedMnist):
    Options = GlimpseMnistOptions
    modalities = ("image", "glimpse")
    card = TaskCard(
        classes=RotatedMnist.card.classes,
        domains=RotatedMnist.card.domains,
        prompt_template=RotatedMnist.card.prompt_template,
        source=RotatedMnist.card.source,
        licence=RotatedMnist.card.licence,
        protocol=(
            "rotated-mnist's protocol and indices exactly, plus a second modality per sample: the same "
            "rotated digit averaged to glimpse_size x glimpse_size cells (default 7), upsampled by "
            "repetition to 28 x 28 and overlaid with Gaussian pixel noise of std glimpse_noise (default 48 "
            "on 0..255), seeded. What it is: a controlled modality-strength imbalance on data that installs "
            "offline, for methods built for imbalance (FedCMI). What it is not: two sensors. Both modalities "
            "come from one image and go through one frozen image tower, so they are far more correlated "
            "than audio and video, and the weak one adds little the strong one lacks; single-input methods "
            "see the image only. The glimpse's weakness is a knob, not a measurement of any real sensor."
        ),
        published={"_source": "none: a fedbench task"},
    )

    def load(self, options: GlimpseMnistOptions, seed: int) -> FederatedDataset:
        dataset = super().load(options, seed)
        rng = stream_rng(seed, STREAM_GLIMPSE_NOISE)
        dataset.views = {"glimpse": glimpse(dataset.images, options.glimpse_size, options.glimpse_noise, rng)}
        dataset.source += f"; glimpse {options.glimpse_size}x{options.glimpse_size} cells, noise std " \
                          f"{options.glimpse_noise:g}"
        return dataset
