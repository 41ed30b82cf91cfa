"""FedCLIP: Fast Generalization and Personalization for CLIP in Federated Learning.

Lu, Hu, Wang, Xie, IEEE Data Engineering Bulletin 2023 (arXiv 2302.13485); reproduction of the
released code (github.com/microsoft/PersonalizedFL, folder ``fedclip``, ``methods/fed_at_clip.py``
with ``--mode FedAtImg``).

Both CLIP encoders stay frozen; each client trains only an attention adapter on the image feature,
and only the adapter travels. Per round t, for every participating client k:

  server:   send the global adapter A_t
  client k: A <- A_t; a fresh Adam(lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight decay 0.2);
            one epoch over its shuffled training data in batches of 32, per batch (size >= 2):
              f  = frozen CLIP image features of the batch
              f' = normalise(A(f) * f),  A(f) = Softmax(Linear(Tanh(Linear(f))))
              t  = normalise(frozen text features of "a picture of a {label}" for each sample)
              L  = (CE(s f' t^T, arange(B)) + CE(s t f'^T, arange(B))) / 2,   s = CLIP's exp(logit_scale)
            send A
  server:   A_{t+1} = (1/K) sum_k A_k   (equal weights, not by sample count); send it back
  predict:  argmax_c cos(A(f) * f, text feature of class c)

Because the encoders are frozen and the released code's ViT has no dropout or batch norm, the
image features are the same every round: this implementation trains on the engine's cached
features (``input_kind`` "features"), so a round costs the adapter's arithmetic only.

Defaults are the paper's (its PACS runs: 200 rounds, ``--iters 200 --wk_iters 1 --lr 5e-5``). The
number of rounds stays the task's default (``default_rounds = None``); reproduce the paper's
table with ``fedbench run fedclip pacs --backbone openclip:ViT-B-32/openai --rounds 200``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbench.core.options import bounded
from fedbench.core.registry import register_method
from fedbench.data.dataset import ClientData, Split
from fedbench.errors import SpecError
from fedbench.federation.cohort import batched_clients_requested
from fedbench.federation.cohort_adam import LocalAdam, masked_mean, train_with_adam
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
from fedbench.federation.train import batched_logits, load_state, state_of, weighted_average
from fedbench.models.clip import clip_logit_scale


@dataclass(frozen=True)
class FedCLIPHparams:
    lr: float = bounded(5e-5, gt=0)
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.98, ge=0, lt=1)
    eps: float = bounded(1e-6, gt=0)
    weight_decay: float = bounded(0.2, ge=0)  # torch.optim.Adam's (L2 added to the gradient), as the released code
    batch_size: int = bounded(32, ge=2)
    local_epochs: int = bounded(1, ge=1)  # the released code's --wk_iters
    # Temperature of the contrastive loss and of the logits: 0 takes the backbone's own
    # exp(logit_scale) as the released code does (100 for OpenAI CLIP), 100 if it has none.
    logit_scale: float = bounded(0.0, ge=0)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.eps <= 0:
            raise ValueError("lr and eps must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.logit_scale < 0:
            raise ValueError("weight_decay and logit_scale must be >= 0")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: the contrastive loss of a single pair is zero")
        if self.local_epochs < 1:
            raise ValueError("local_epochs must be >= 1")


class AttentionAdapter(nn.Module):
    """``A(f) * f`` with ``A = Linear(d,d) -> Tanh -> Linear(d,d) -> Softmax(dim=1)``: 2d^2 + 2d weights."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=1))

    def forward(self, features: Tensor) -> Tensor:
        return self.attn(features) * features


def clip_contrastive_loss(image: Tensor, text: Tensor, logit_scale: float) -> Tensor:
    """CLIP's symmetric loss over a batch of (image, text) pairs, rows already unit-norm.

    Targets are ``arange(B)``: two samples of one class have identical text rows, yet each
    counts as the other's negative, as in the released code.
    """
    logits = logit_scale * image @ text.T
    targets = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@register_method(
    "fedclip",
    description="FedCLIP: frozen CLIP, attention adapter on the image feature, adapters averaged equally",
    fidelity="reproduction",
    source="Lu et al. 2023, arXiv 2302.13485; released code github.com/microsoft/PersonalizedFL (fedclip/)",
)
class FedCLIP(Method):
    Hparams = FedCLIPHparams
    default_rounds = None  # the task's default; the paper ran 200 rounds on PACS (--rounds 200)

    @classmethod
    def input_kind(cls, hp: FedCLIPHparams) -> str:
        return "features"

    def __init__(self, hp: FedCLIPHparams, ctx: RunContext) -> None:
        super().__init__(hp, ctx)
        if ctx.text_features is None:
            raise SpecError("fedclip needs the class prompts' text features: run it with a backbone (--backbone NAME)")
        dim = int(ctx.input_shape[-1])
        if ctx.text_features.shape[1] != dim:
            raise SpecError(f"fedclip: image features have {dim} dims but text features "
                            f"{ctx.text_features.shape[1]}; the backbone's towers must share one space")
        # [num_classes, D], one row per prompt
        self.text = F.normalize(ctx.text_features.float(), dim=-1).to(ctx.device)
        self.logit_scale = hp.logit_scale or clip_logit_scale(ctx.backbone)
        self.adapter = AttentionAdapter(dim).to(ctx.device)  # one module serves every client in turn

    # server: A_0 from the seeded initialiser
    def init(self, server: ServerContext) -> ServerState:
        return ServerState(broadcast=state_of(self.adapter))

    def embed(self, features: Tensor) -> Tensor:
        """Adapted, unit-norm image features."""
        return F.normalize(self.adapter(features.float()), dim=-1)

    # client k: A <- A_t; one epoch of the contrastive loss with a fresh Adam; send A
    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        load_state(self.adapter, message.payload)
        # A fresh optimiser every round: the released code builds its Adam inside the round loop,
        # so no moment estimate survives from one round to the next.
        optimizer = torch.optim.Adam(
            self.adapter.parameters(), lr=self.hp.lr, betas=(self.hp.beta1, self.hp.beta2), eps=self.hp.eps,
            weight_decay=self.hp.weight_decay,
        )
        loss = self.train_epochs(data.train, optimizer, client.rng)
        # Only the adapter is sent: the equal-weight average needs no sample count.
        return ClientResult(upload=state_of(self.adapter), num_samples=len(data.train), train_loss=loss)

    def train_epochs(self, train: Split, optimizer: torch.optim.Optimizer, rng: torch.Generator) -> float | None:
        """``local_epochs`` shuffled passes; returns the mean loss of the last epoch's batches (None
        when no batch trained: not a NaN, which the engine would read as divergence)."""
        self.adapter.train()
        n, losses = len(train), []
        for _ in range(self.hp.local_epochs):
            losses = []
            order = torch.randperm(n, generator=rng)
            for start in range(0, n, self.hp.batch_size):
                idx = order[start : start + self.hp.batch_size]
                if len(idx) < 2:  # the released code skips batches of one (len(text) > 1)
                    continue
                text = self.text[train.y[idx]]
                loss = clip_contrastive_loss(self.embed(train.x[idx]), text, self.logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return sum(losses) / len(losses) if losses else None

    def client_update_cohort(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        # Opt-in (FEDBENCH_BATCHED_CLIENTS=1): every client's adapter trained at once, equal to the
        # loop above up to float reassociation.
        if not batched_clients_requested() or any(job.message is None for job in jobs):
            return super().client_update_cohort(jobs)
        adam = LocalAdam(self.hp.local_epochs, self.hp.batch_size, self.hp.lr, self.hp.beta1, self.hp.beta2,
                         self.hp.eps, self.hp.weight_decay, min_batch=2)
        trained, losses = train_with_adam(
            self.adapter, self.masked_batch_loss, [job.message.payload for job in jobs],
            [(job.data.train.x.float(), job.data.train.y) for job in jobs], [job.context.rng for job in jobs], adam)
        return [ClientResult(upload=a, num_samples=len(job.data.train), train_loss=loss)
                for job, a, loss in zip(jobs, trained, losses, strict=True)]

    def masked_batch_loss(self, adapter: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor,
                          mask: Tensor) -> Tensor:
        """The contrastive loss of one client's padded batch: padded samples are neither rows nor
        negatives (their logits are -inf), and the mean is over the real rows."""
        image = F.normalize(torch.func.functional_call(adapter, params, (x,)), dim=-1)
        logits = self.logit_scale * image @ self.text[y].T
        padded = mask[None, :] == 0
        # -log softmax at the diagonal: cross-entropy against arange(B), each direction
        rows = -logits.masked_fill(padded, -torch.inf).log_softmax(dim=1).diagonal()
        cols = -logits.T.masked_fill(padded, -torch.inf).log_softmax(dim=1).diagonal()
        return (masked_mean(rows, mask) + masked_mean(cols, mask)) / 2

    # server: A_{t+1} = (1/K) sum_k A_k
    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        return ServerState(broadcast=weighted_average([m.payload for m in uploads], torch.ones(len(uploads))))

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        load_state(self.adapter, model)
        self.adapter.eval()
        return batched_logits(lambda b: self.logit_scale * self.embed(b) @ self.text.T, x)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter.parameters())
