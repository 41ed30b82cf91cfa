"""Local training (reference row): every client trains its own model on its own data only.

No communication: nothing crosses the channel, so bytes are zero, and there is no global
model (global accuracy is not reported); per-client accuracy uses each client's own model.
Same trainable part and optimiser as FedAvg; the "round" is a block of ``local_epochs`` epochs,
so curves line up with the federated rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData
from fedbench.federation.method import (
    ClientContext,
    ClientJob,
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

    def client_update_cohort(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        # Opt-in batched engine (FEDBENCH_BATCHED_CLIENTS=1): each client from its own weights.
        starts = [job.client_state if job.client_state is not None else self.initial_weights for job in jobs]
        batched = self.train_batched(jobs, starts)
        if batched is None:
            return super().client_update_cohort(jobs)  # no message: FedAvg's hook runs the loop
        return [ClientResult(upload={}, num_samples=len(job.data.train), train_loss=loss, client_state=w)
                for job, w, loss in zip(jobs, *batched, strict=True)]

    def cohort_proximal_mu(self) -> float | None:
        return 0.0 if type(self).client_update is Local.client_update and self.trains_plainly() else None

    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        return state

    def global_model(self, state: ServerState) -> Payload | None:
        return None  # no global model: global and held-out accuracy are not reported

    def personal_model(self, client_state: Payload | None, global_model: Payload | None) -> Payload | None:
        return client_state
