"""Local training (reference row): every client trains its own model on its own data only.

No communication: nothing crosses the channel, so bytes are zero, and there is no global
model (global accuracy is not reported); per-client accuracy uses each client's own model.
Same trainable part and optimiser as FedAvg; the "round" is a block of ``local_epochs`` epochs,
so curves line up with the federated rows.
"""

from __future__ import annotations

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData
from fedbench.federation.method import (
    ClientContext,
    ClientResult,
    Message,
    Payload,
    RunContext,
    ServerContext,
    ServerState,
)
from fedbench.federation.train import state_of


@register_method(
    "local",
    description="Local training only: each client trains its own model, nothing is communicated",
    fidelity="reference",
    source="standard reference row (e.g. NIID-Bench, FedCLIP tables)",
)
class Local(FedAvg):
    Hparams = FedAvgHparams

    def __init__(self, hp: FedAvgHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        # Every client starts from the same initial weights: the client side is built from the same
        # seed as the server, so these are the server's w_0, and nothing needs to be sent.
        self.initial_weights = state_of(self.model)

    def init(self, server: ServerContext) -> ServerState:
        return ServerState(broadcast={})  # nothing to broadcast: no message is ever sent

    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        loss = self.train_from(client_state if client_state is not None else self.initial_weights, data, client.rng)
        return ClientResult(upload={}, num_samples=len(data.train), train_loss=loss,
                            client_state=state_of(self.model))

    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        return state

    def global_model(self, state: ServerState) -> Payload | None:
        return None  # no global model: global and held-out accuracy are not reported

    def personal_model(self, client_state: Payload | None, global_model: Payload | None) -> Payload | None:
        return client_state
