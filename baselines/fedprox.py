"""FedProx: Federated Optimization in Heterogeneous Networks.

Li et al., MLSys 2020 (arXiv 1812.06127); reproduction. FedAvg whose client loss adds the
proximal term (mu/2) * ||w - w_global||^2, keeping local models near the global one.
mu = 0.01 is NIID-Bench's tuned value for label skew (grid {0.001, 0.01, 0.1, 1}); other
defaults are FedAvg's (NIID-Bench).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.core.options import bounded
from fedbench.core.registry import register_method
from fedbench.federation.method import Payload


@dataclass(frozen=True)
class FedProxHparams(FedAvgHparams):
    mu: float = bounded(0.01, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise ValueError("mu must be >= 0")


@register_method(
    "fedprox",
    description="FedProx: FedAvg plus a proximal term (mu/2)||w - w_global||^2 in the client loss",
    fidelity="reproduction",
    source="Li et al. 2020, arXiv 1812.06127; mu from NIID-Bench (arXiv 2102.02079)",
)
class FedProx(FedAvg):
    Hparams = FedProxHparams

    def local_loss_term(self, global_state: Payload):
        anchors = global_state  # the global weights as received this round
        mu = self.hp.mu

        def proximal(model: nn.Module) -> torch.Tensor:
            params = dict(model.named_parameters())
            return (mu / 2) * sum(((params[k] - w) ** 2).sum() for k, w in anchors.items())

        return proximal

    def cohort_proximal_mu(self) -> float | None:
        # The batched engine adds (mu/2)||w - w_global||^2 itself; a subclass with another loss keeps the loop.
        plain = (type(self).client_update is FedAvg.client_update and type(self).train_from is FedAvg.train_from
                 and type(self).local_loss_term is FedProx.local_loss_term)
        return self.hp.mu if plain else None
