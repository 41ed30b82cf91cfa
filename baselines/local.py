"""Local training (reference row): every client trains its own model on its own data only.

No communication: nothing crosses the channel, so bytes are zero, and there is no global
model (global accuracy is not reported); per-client accuracy uses each client's own model.
Same trainable part and optimiser as FedAvg; the "round" is a block of ``local_epochs`` epochs,
so curves line up with the federated rows.
"""

from __future__ import annotations

import torch

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData
from fedbench.federation.method import ClientResult, Payload
from fedbench.federation.train import state_of


@register_method(
    "local",
    description="Local training only: each client trains its own model, nothing is communicated",
    fidelity="reference",
    source="standard reference row (e.g. NIID-Bench, FedCLIP tables)",
)
class Local(FedAvg):
    Hparams = FedAvgHparams
    has_global_model = False

    def broadcast(self, state: Payload, client_id: int) -> Payload:
        return {}

    def client_update(
        self, down: Payload, data: ClientData, client_state: Payload | None, rng: torch.Generator
    ) -> ClientResult:
        # Every client starts from the same initial weights (the server's init, never sent).
        loss = self.train_from(client_state if client_state is not None else self.initial_state, data, rng)
        return ClientResult(upload={}, num_samples=len(data.train), train_loss=loss,
                            client_state=state_of(self.model))

    def init(self) -> Payload:
        self.initial_state = state_of(self.model)
        return {}

    def server_update(self, state: Payload, uploads: list[Payload]) -> Payload:
        return state
