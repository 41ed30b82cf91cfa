"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data.

McMahan et al., AISTATS 2017 (arXiv 1602.05629), Algorithm 1; reproduction.
Hyper-parameter defaults follow NIID-Bench (Li et al., ICDE 2022, arXiv 2102.02079), the
protocol this benchmark's label-skew tasks reproduce: SGD lr 0.01, momentum 0.9, batch 64,
10 local epochs, weight decay 1e-5 (NIID-Bench's ``--reg`` default).

Algorithm, per round t:
  server: send the global weights w_t to the sampled clients S_t
  client k: w_k <- w_t; E epochs of minibatch SGD on its own data; send w_k and n_k
  server: w_{t+1} = sum_k n_k w_k / sum_k n_k
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedbench.core.options import bounded
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData
from fedbench.federation.cohort import LocalSGD, batched_clients_requested, train_cohort
from fedbench.federation.method import (
    ClientContext,
    ClientJob,
    ClientResult,
    Message,
    Method,
    Payload,
    RunContext,
    ServerContext,
    ServerState,
)
from fedbench.federation.train import (
    ExtraLoss,
    batched_logits,
    load_state,
    run_local_epochs,
    state_of,
    weighted_average,
)
from fedbench.models.task_models import build_task_model

Trainable = Literal["simple-cnn", "head", "lora", "full"]


@dataclass(frozen=True)
class FedAvgHparams:
    trainable: Trainable = "simple-cnn"
    local_epochs: int = bounded(10, ge=1)
    batch_size: int = bounded(64, ge=1)
    lr: float = bounded(0.01, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(1e-5, ge=0)
    lora_rank: int = bounded(4, ge=1)  # used by trainable=lora only

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@register_method(
    "fedavg",
    description="FedAvg: local SGD epochs, server averages weights by client sample count",
    fidelity="reproduction",
    source="McMahan et al. 2017, arXiv 1602.05629; defaults from NIID-Bench (arXiv 2102.02079)",
)
class FedAvg(Method):
    Hparams = FedAvgHparams
    version = 1

    @classmethod
    def input_kind(cls, hp: FedAvgHparams) -> str:
        # A trainable head sits on frozen, cached features; the others see pixels.
        return "features" if hp.trainable == "head" else "pixels"

    @classmethod
    def needs_backbone(cls, hp: FedAvgHparams) -> bool:
        return hp.trainable != "simple-cnn"

    def __init__(self, hp: FedAvgHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        # One model object serves every client in turn; its weights come from the message.
        model, inputs = build_task_model(hp.trainable, ctx, lora_rank=hp.lora_rank)
        self.model, self.inputs = model.to(ctx.device), inputs.to(ctx.device)

    def encode_inputs(self, inputs: Tensor) -> Tensor:
        # LoRA on a CLIP tower: the frozen stages below the adapted ones run once per run, not per step.
        # Not with augmentation, which must see the pixels anew every epoch.
        encode_once = getattr(self.inputs, "encode_once", None)
        return encode_once(inputs) if encode_once and not self.ctx.train_augment else inputs

    # server: w_0 from the seeded initialiser
    def init(self, server: ServerContext) -> ServerState:
        return ServerState(broadcast=state_of(self.model))

    # client k: w_k <- w_t; E epochs of SGD on its own data; send w_k (n_k travels in the envelope)
    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        loss = self.train_from(message.payload, data, client.rng, extra_loss=self.local_loss_term(message.payload))
        return ClientResult(upload=state_of(self.model), num_samples=len(data.train), train_loss=loss)

    def client_update_cohort(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        # Opt-in (FEDBENCH_BATCHED_CLIENTS=1): all clients at once, equal to the loop up to float
        # reassociation; any option the batched engine does not reproduce keeps the loop.
        batched = None if any(job.message is None for job in jobs) else self.train_batched(
            jobs, [job.message.payload for job in jobs])
        if batched is None:
            return super().client_update_cohort(jobs)
        return [ClientResult(upload=w, num_samples=len(job.data.train), train_loss=loss)
                for job, w, loss in zip(jobs, *batched, strict=True)]

    def train_batched(self, jobs: Sequence[ClientJob], starts: Sequence[Payload]) -> tuple[list, list] | None:
        """Every job's weights and loss after ``train_from(starts[j], ...)``, by the batched engine;
        None (run the loop) unless it is requested and reproduces this client update's options."""
        mu = self.cohort_proximal_mu()
        if (not batched_clients_requested() or mu is None or self.hp.trainable not in ("simple-cnn", "head")
                or (self.ctx.train_augment and self.input_kind(self.hp) == "pixels")):
            return None
        sgd = LocalSGD(self.hp.local_epochs, self.hp.batch_size, self.hp.lr, self.hp.momentum,
                       self.hp.weight_decay, mu)
        return train_cohort(self.model, self.inputs, starts, [(job.data.train.x, job.data.train.y) for job in jobs],
                            [job.context.rng for job in jobs], sgd)

    def cohort_proximal_mu(self) -> float | None:
        """The proximal weight the batched engine adds to the client loss (0: none), or None when
        this class's client update is not plain FedAvg's and so must run in the loop."""
        return 0.0 if type(self).client_update is FedAvg.client_update and self.trains_plainly() else None

    def trains_plainly(self) -> bool:
        """Whether local training is this class's SGD epochs with no extra loss term (what the
        batched engine reproduces); a subclass that changes either runs the loop."""
        return type(self).train_from is FedAvg.train_from and type(self).local_loss_term is FedAvg.local_loss_term

    def local_loss_term(self, global_weights: Payload) -> ExtraLoss | None:
        """Extra client loss term (none for FedAvg; FedProx overrides)."""
        return None

    def train_from(self, start: Payload, data: ClientData, rng: torch.Generator,
                   extra_loss: ExtraLoss | None = None) -> float:
        """E local epochs of SGD on the client's train split, starting from ``start``."""
        load_state(self.model, start)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=self.hp.lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay
        )
        return run_local_epochs(
            self.model, self.inputs, data.train, optimizer, self.hp.local_epochs, self.hp.batch_size,
            rng, augment=self.ctx.train_augment if self.input_kind(self.hp) == "pixels" else None,
            extra_loss=extra_loss,
        )

    # server: w_{t+1} = sum_k n_k w_k / sum_k n_k
    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        weights = torch.tensor([m.num_samples for m in uploads], dtype=torch.float32)
        return ServerState(broadcast=weighted_average([m.payload for m in uploads], weights))

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        load_state(self.model, model)
        self.model.eval()
        return batched_logits(lambda b: self.model(self.inputs(b)), x)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
