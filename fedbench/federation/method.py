"""The method interface (FedJAX's ``init`` / ``apply`` habit, split into its two sides).

A method is a class with a hyper-parameter dataclass and five functions:

- ``init()``                          -> the server state (a dict of tensors)
- ``broadcast(state, client_id)``     -> what the server sends one client
- ``client_update(down, data, client_state, rng)`` -> :class:`ClientResult` (runs on one
  client: sees the message it was sent, its own :class:`~fedbench.data.dataset.ClientData` and its own
  private state from earlier rounds, nothing else)
- ``server_update(state, uploads)``   -> the new server state (sees only the messages)
- ``predict(state, x, client_state)`` -> logits, used by the evaluator

Every ``down`` and ``upload`` crosses :class:`fedbench.federation.channel.Channel`, which serialises it and
counts its bytes, so anything a method wants to send must be a tensor in the payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fedbench.data.dataset import ClientData

Payload = dict[str, Tensor]
InputKind = Literal["pixels", "features"]


@dataclass
class RunContext:
    """Facts about the run that every party may know (nothing client-private)."""

    num_classes: int
    class_names: list[str]
    prompts: list[str]
    num_clients: int
    input_kind: InputKind
    input_shape: tuple[int, ...]  # per example: (C, H, W) pixels or (D,) features
    backbone: Any | None = None  # fedbench.models.backbones backbone when the method uses one
    text_features: Tensor | None = None  # [num_classes, D] frozen prompt embeddings
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    train_augment: str | None = None
    seed: int = 0


@dataclass
class ClientResult:
    upload: Payload
    num_samples: int
    train_loss: float = float("nan")
    client_state: Payload | None = None  # kept on the client for the next round it is sampled
    extra: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``Hparams`` and implement the five functions."""

    Hparams: ClassVar[type]
    # Bumped whenever the method's math or a random stream it draws changes: it is part of the spec,
    # so records made by other versions are never averaged with this one or skipped by a sweep.
    version: ClassVar[int] = 1
    # Methods with no single global model (local training) set this False: no global accuracy.
    has_global_model: ClassVar[bool] = True
    # Overrides the task's default number of rounds (the paper's own protocol), when set.
    default_rounds: ClassVar[int | None] = None

    def __init__(self, hp: Any, ctx: RunContext) -> None:
        self.hp = hp
        self.ctx = ctx

    # What the engine must prepare for this method, decided from the hyper-parameters alone.
    @classmethod
    def input_kind(cls, hp: Any) -> InputKind:
        return "pixels"

    @classmethod
    def needs_backbone(cls, hp: Any) -> bool:
        return cls.input_kind(hp) == "features"

    def init(self) -> Payload:
        raise NotImplementedError

    def broadcast(self, state: Payload, client_id: int) -> Payload:
        return state

    def client_update(
        self, down: Payload, data: ClientData, client_state: Payload | None, rng: torch.Generator
    ) -> ClientResult:
        raise NotImplementedError

    def server_update(self, state: Payload, uploads: list[Payload]) -> Payload:
        raise NotImplementedError

    def predict(self, state: Payload, x: Tensor, client_state: Payload | None = None) -> Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        """Number of trained parameters on one client (reported in every record)."""
        return 0

    def rounds_needed(self) -> bool:
        """False for methods that do not train (zero-shot): the engine then runs no round."""
        return True
