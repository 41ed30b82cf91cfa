"""Personalised FedAvgM: server momentum (private) and one message per client (an example plugin).

Server momentum is FedAvgM (Hsu et al. 2019, arXiv 1909.06335, Algorithm 1); the per-client mix is
our illustration of per-client aggregation. Per round t:
  server: send client k  (1 - mix) w_t + mix u_k   (u_k: k's last upload, kept privately)
  client k: E epochs of SGD from what it received; send w_k (n_k in the envelope)
  server: d = w_t - sum_k n_k w_k / sum_k n_k;  v <- beta v + d;  w_{t+1} = w_t - server_lr v

    fedbench --include docs/examples/personal_fedavgm.py run personal-fedavgm TASK
"""

from dataclasses import dataclass

import torch

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.core.registry import register_method
from fedbench.federation.method import Message, Payload, ServerContext, ServerState


@dataclass(frozen=True)
class PersonalFedAvgMHparams(FedAvgHparams):
    beta: float = 0.9  # server momentum
    server_lr: float = 1.0
    mix: float = 0.5  # share of a client's own last upload in its message

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 <= self.beta < 1 and 0 <= self.mix <= 1 and self.server_lr > 0):
            raise ValueError("need 0 <= beta < 1, 0 <= mix <= 1, server_lr > 0")


@register_method("personal-fedavgm", description="FedAvgM with per-client messages (example plugin)",
                 fidelity="adaptation", source="docs/examples/personal_fedavgm.py")
class PersonalFedAvgM(FedAvg):
    Hparams = PersonalFedAvgMHparams

    def init(self, server: ServerContext) -> ServerState:
        weights = super().init(server).broadcast
        momentum = {k: torch.zeros_like(v) for k, v in weights.items()}
        return ServerState(broadcast=weights, private={"momentum": momentum, "last_upload": {}})

    def configure(self, state: ServerState, client_id: int, server: ServerContext) -> Payload:
        own = state.private["last_upload"].get(client_id)
        if own is None:
            return state.broadcast
        return {k: (1 - self.hp.mix) * w + self.hp.mix * own[k] for k, w in state.broadcast.items()}

    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        average = super().aggregate(state, uploads, server).broadcast
        momentum = state.private["momentum"]
        for k, w in state.broadcast.items():
            momentum[k] = self.hp.beta * momentum[k] + (w - average[k])
        weights = {k: w - self.hp.server_lr * momentum[k] for k, w in state.broadcast.items()}
        last = {**state.private["last_upload"], **{m.client_id: m.payload for m in uploads}}
        return ServerState(broadcast=weights, private={"momentum": momentum, "last_upload": last})
