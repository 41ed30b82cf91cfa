"""A small synthetic plugin task used by the tests to exercise ``--include``.

Gaussian blobs drawn as 1x16x16 "images": separable, so a model that trains must beat chance.
"""

from dataclasses import dataclass

import numpy as np
import torch

from fedbench.core.registry import register_task
from fedbench.data.dataset import ClientIndices, FederatedDataset, Task, TaskCard
from fedbench.data.partition import dirichlet_label_skew, split_fractions
from fedbench.errors import SpecError


@dataclass(frozen=True)
class BlobsOptions:
    clients: int = 4
    alpha: float = 0.5
    samples: int = 600
    val_fraction: float = 0.2


@register_task("blobs", description="synthetic Gaussian blobs as 16x16 images (test plugin)", fidelity="protocol",
               source="tests/plugins/blobs_task.py")
class Blobs(Task):
    Options = BlobsOptions
    card = TaskCard(classes="4 blobs", domains="-", prompt_template="a photo of a {}.", source="synthetic",
                    licence="-", protocol="Dirichlet label skew")
    default_rounds = 3

    def load(self, options: BlobsOptions, seed: int) -> FederatedDataset:
        if options.alpha <= 0:
            raise SpecError("alpha must be > 0")
        rng = np.random.default_rng([seed, 7])
        n, k = options.samples, 4
        labels = rng.integers(0, k, size=n)
        centers = rng.uniform(40, 215, size=(k, 256))
        pixels = np.clip(centers[labels] + rng.normal(0, 30, size=(n, 256)), 0, 255).astype(np.uint8)
        images = torch.from_numpy(pixels.reshape(n, 1, 16, 16))
        n_test = n // 4
        train_pool = np.arange(n_test, n)
        parts = dirichlet_label_skew(labels[train_pool], options.clients, options.alpha, rng)
        clients = []
        test_parts = np.array_split(np.arange(n_test), options.clients)
        for part, test in zip(parts, test_parts, strict=True):
            train, val = split_fractions(train_pool[part], [1 - options.val_fraction, options.val_fraction], rng)
            clients.append(ClientIndices(torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(test)))
        return FederatedDataset(images=images, labels=torch.from_numpy(labels).long(),
                                class_names=["a", "b", "c", "d"], clients=clients,
                                global_test=torch.arange(n_test), source="synthetic")
