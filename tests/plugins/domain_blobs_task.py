"""A small leave-one-domain-out plugin task for protocol tests (``--set heldout=all``).

Three domains of Gaussian blobs drawn as 1x16x16 "images"; each domain shifts the brightness,
one client per domain, one domain held out and tested whole.
"""

from dataclasses import dataclass

import numpy as np
import torch

from fedbench.core.registry import register_task
from fedbench.data.dataset import ClientIndices, FederatedDataset, Task, TaskCard
from fedbench.data.partition import split_fractions
from fedbench.errors import SpecError

DOMAINS = ["dim", "mid", "bright"]


@dataclass(frozen=True)
class DomainBlobsOptions:
    heldout: str = "dim"
    per_domain: int = 90

    def __post_init__(self) -> None:
        if self.heldout not in DOMAINS:
            raise SpecError(f"heldout={self.heldout!r}: one of {', '.join(DOMAINS)}")


@register_task("domain-blobs", description="three domains of synthetic blobs, leave one out (test plugin)",
               fidelity="protocol", source="tests/plugins/domain_blobs_task.py")
class DomainBlobs(Task):
    Options = DomainBlobsOptions
    domains = DOMAINS
    default_rounds = 2
    clients_configurable = False
    card = TaskCard(classes="3 blobs", domains=", ".join(DOMAINS), prompt_template="a photo of a {}.",
                    source="synthetic", licence="-", protocol="leave one domain out",
                    published={"FedCLIP": {"dim": 90.0, "mid": 80.0, "bright": 70.0, "mean": 80.0},
                               "FedAvg (CLIP, full fine-tune)": {"mean": 50.0}, "_source": "made up for tests"})

    def load(self, options: DomainBlobsOptions, seed: int) -> FederatedDataset:
        rng = np.random.default_rng([seed, 8])
        n, k = options.per_domain * len(DOMAINS), 3
        labels = rng.integers(0, k, size=n)
        centers = rng.uniform(60, 190, size=(k, 256))
        shift = np.repeat(np.array([-50.0, 0.0, 50.0]), options.per_domain)[:, None]
        pixels = np.clip(centers[labels] + shift + rng.normal(0, 20, size=(n, 256)), 0, 255).astype(np.uint8)
        clients, held = [], {}
        for d, name in enumerate(DOMAINS):
            idx = np.arange(d * options.per_domain, (d + 1) * options.per_domain)
            if name == options.heldout:
                held[name] = torch.from_numpy(idx)
                continue
            train, val, test = split_fractions(idx, [0.6, 0.2, 0.2], rng)
            clients.append(ClientIndices(*(torch.from_numpy(np.sort(p)) for p in (train, val, test)), domain=name))
        return FederatedDataset(images=torch.from_numpy(pixels.reshape(n, 1, 16, 16)),
                                labels=torch.from_numpy(labels).long(), class_names=["a", "b", "c"], clients=clients,
                                global_test=torch.cat([c.test for c in clients]), heldout=held, domains=list(DOMAINS),
                                source="synthetic")
