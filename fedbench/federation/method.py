"""The method interface: a server side and a client side, as in Flower's configure / aggregate
verbs and FedJAX's ``init`` / ``apply``.

A method is one class with a hyper-parameter dataclass. The engine builds it twice, once for each
side, from the same seed: a **server** object, on which it calls only the server functions, and a
**client** object, on which it calls only the client and evaluation functions. The two never see
each other, so anything the server keeps (``ServerState.private``, attributes set in
``aggregate``) cannot reach a client except through a message, and the client object is sealed
after construction, so a client update cannot carry one client's data to the next on ``self``:
what a client keeps between rounds is its own ``client_state``, handed back only to it.

Server side (one object, sees only messages):

- ``init(server)``                              -> :class:`ServerState`
- ``begin_round(state, clients, server)``       -> state, once a round before any message
- ``configure(state, client_id, server)``       -> the payload sent to one client (empty: none)
- ``aggregate(state, uploads, server)``         -> the new state, from the round's :class:`Message`\\ s
- ``global_model(state)``                       -> the payload the global model is scored with
- ``server_metrics(state)``                     -> extra deterministic numbers for the round's record
- ``stage_seconds()`` / ``images()``            -> the server's stage timings; image grids saved beside the record

Client side (one object serving every client in turn, sees one client at a time):

- ``encode_inputs(inputs)``                     -> once before round 1: a frozen per-sample map of the
  pool (activations below the trained layers), so no round recomputes it
- ``client_update(message, data, client_state, client)`` -> :class:`ClientResult`
- ``client_update_cohort(jobs)``                -> one result per job (default: a loop; an
  engine-level batched implementation may train many clients at once)
- ``personal_model(client_state, global_model)`` -> the payload a client is scored with
- ``predict(model, x)``                         -> logits of ``x`` under a payload
- ``modality_logits(model, x)``                 -> logits from each modality alone (multi-modal methods)

Every message crosses :class:`fedbench.federation.channel.Channel`, which serialises it and counts
its bytes, so anything a method wants to send must be a tensor in the payload.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fedbench.data.dataset import ClientData
from fedbench.errors import PrivacyError

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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Names of the inputs' modality axis ([N, M, D] features) for a method whose ``uses_views``
    # is true; ("image",) otherwise.
    modalities: tuple[str, ...] = ("image",)


@dataclass(frozen=True)
class Message:
    """A payload and the envelope that travels with it (client id, round, the sender's sample
    count on uploads). The channel serialises all of it and counts every byte."""

    payload: Payload
    client_id: int
    round: int
    num_samples: int = 0


@dataclass
class ServerState:
    """What the server holds: ``broadcast`` is what it may send, ``private`` never leaves it
    (a generator, server momentum, a server-side model; any Python object)."""

    broadcast: Payload
    private: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerContext:
    round: int  # 0 in init
    rng: torch.Generator  # the server's own stream: no client ever draws from it
    device: torch.device


@dataclass(frozen=True)
class ClientContext:
    client_id: int
    round: int
    rng: torch.Generator  # this client's stream for this round (data order, augmentation)
    device: torch.device
    global_seed: int  # seeds torch's global RNG, scoped to this update, for ops that take no generator

    def scoped_global_rng(self) -> AbstractContextManager[None]:
        """A context in which torch's global RNG (dropout and friends) is seeded for this client
        and restored afterwards, so no party draws from a stream another party left behind."""
        return seeded_global_rng(self.global_seed, self.device)


@dataclass
class ClientResult:
    upload: Payload  # empty: nothing is sent
    num_samples: int
    train_loss: float | None = None  # None: the method reports no training loss
    client_state: Payload | None = None  # kept for this client only, for the next round it is sampled


@dataclass(frozen=True)
class ClientJob:
    """One client's share of a round: what the cohort hook gets for each sampled client."""

    message: Message | None
    data: ClientData
    client_state: Payload | None
    context: ClientContext


class Method:
    """Base class. Subclasses set ``Hparams`` (and ``version``) and implement the server and client
    functions; the defaults below fit a method with one global model sent to every client."""

    Hparams: ClassVar[type]
    # Bumped whenever the method's math or a random stream it draws changes: it is part of the spec,
    # so records made by other versions are never averaged with this one or skipped by a sweep.
    version: ClassVar[int] = 1
    # Overrides the task's default number of rounds (the paper's own protocol), when set.
    default_rounds: ClassVar[int | None] = None
    # False for methods that do not train (zero-shot): the engine then runs no round.
    trains: ClassVar[bool] = True

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

    @classmethod
    def uses_views(cls, hp: Any) -> bool:
        """True: on a multi-modal task the inputs are every modality's features stacked, [N, M, D]
        (``RunContext.modalities`` names them); False: the first modality (the image) only."""
        return False

    @classmethod
    def check_task(cls, hp: Any, task: Any) -> None:
        """Refuse a task (its class: ``task.modalities`` and friends) these options cannot run on
        (raise SpecError); called when the spec is resolved, before any data is read."""

    @classmethod
    def check_backbone(cls, hp: Any, backbone: Any) -> None:
        """Refuse options the backbone cannot honour (raise SpecError); called before any data is read."""

    # --- server side ---------------------------------------------------------------------------
    def init(self, server: ServerContext) -> ServerState:
        raise NotImplementedError

    def begin_round(self, state: ServerState, clients: Sequence[int], server: ServerContext) -> ServerState:
        return state

    def configure(self, state: ServerState, client_id: int, server: ServerContext) -> Payload:
        return state.broadcast

    def aggregate(self, state: ServerState, uploads: list[Message], server: ServerContext) -> ServerState:
        raise NotImplementedError

    def global_model(self, state: ServerState) -> Payload | None:
        """The model scored on the pooled test set and held-out domains; None: there is none."""
        return state.broadcast

    def server_metrics(self, state: ServerState) -> dict[str, Any]:
        """Numbers the server reports each round (a function of the run's seed: no wall times)."""
        return {}

    def stage_seconds(self) -> dict[str, list[float]]:
        """Wall seconds of the server's own stages, per round, by name (recorded under ``timing``)."""
        return {}

    def images(self) -> dict[str, Tensor]:
        """uint8 image batches [N, C, H, W] by name, saved as PNG grids beside the record."""
        return {}

    # --- client side ---------------------------------------------------------------------------
    def encode_inputs(self, inputs: Tensor) -> Tensor:
        """The pool's inputs as the client side trains and predicts on them; must be a frozen,
        per-sample map (each client could compute its own share locally). Default: unchanged."""
        return inputs

    def client_update(
        self, message: Message | None, data: ClientData, client_state: Payload | None, client: ClientContext
    ) -> ClientResult:
        raise NotImplementedError

    def client_update_cohort(self, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        """Train a round's clients. Override only with an implementation whose results equal this
        loop's (a test should hold it): the engine and the records assume they do."""
        results = []
        for job in jobs:
            with job.context.scoped_global_rng():
                results.append(self.client_update(job.message, job.data, job.client_state, job.context))
        return results

    def personal_model(self, client_state: Payload | None, global_model: Payload | None) -> Payload | None:
        """The model a client is scored with on its own splits; None: the global model."""
        return None

    def predict(self, model: Payload, x: Tensor) -> Tensor:
        raise NotImplementedError

    def modality_logits(self, model: Payload, x: Tensor) -> dict[str, Tensor]:
        """Logits from each modality alone, by name (scored as ``modality_acc``); {}: not separable."""
        return {}

    def trainable_parameters(self) -> int:
        """Number of trained parameters on one client (reported in every record)."""
        return 0

    # --- the privacy boundary --------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_sealed_as"):
            raise PrivacyError(
                f"{type(self).__name__}.{name} = ...: the {self.__dict__['_sealed_as']} side of a method may not "
                f"keep new state on the method object once the run has started (it would carry one client's "
                f"data to another, or the server's to a client). Build models in __init__, and return what a "
                f"client keeps as ClientResult.client_state."
            )
        super().__setattr__(name, value)

    def seal(self, side: str) -> None:
        """Called by the engine once the object is built: no new attributes from now on."""
        self.__dict__["_sealed_as"] = side


@contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """``torch.random.fork_rng`` seeded with ``seed``: the global state is restored on exit."""
    if device.type != "cpu":
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
        return
    # On CPU only the default generator matters: saving and seeding it directly draws the same
    # stream as fork_rng + manual_seed at a thirtieth of the cost (measured 3 us vs 109 us per
    # client, which a 1,000-client round pays 1,000 times).
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)
