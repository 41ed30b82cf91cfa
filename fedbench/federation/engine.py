"""The federation engine: rounds, client sampling, the channel, evaluation.

It knows nothing about any one method. It builds the method twice, a server side and a client
side (see :mod:`fedbench.federation.method`), and per round: samples clients, lets the server
configure one message per client, hands the client side each sampled client's message, data and
private state (the cohort hook), sends the uploads back through the channel to the server's
``aggregate``, and scores the result.
"""

from __future__ import annotations

import gc
import math
import pickle
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedbench.data.dataset import FederatedDataset
from fedbench.errors import SpecError
from fedbench.federation.channel import Channel
from fedbench.federation.checkpoint import Checkpoints, CheckpointWarning
from fedbench.federation.evaluate import Evaluator, rounded
from fedbench.federation.method import (
    ClientContext,
    ClientJob,
    Message,
    Method,
    Payload,
    RunContext,
    ServerContext,
    ServerState,
    seeded_global_rng,
)
from fedbench.federation.rng import derive_seed, generator


def sample_clients(num_clients: int, sample: float | int, rng: np.random.Generator) -> list[int]:
    """Clients for one round: a fraction (float) or a count (int), drawn without replacement."""
    if isinstance(sample, float):
        if not 0 < sample <= 1:
            raise SpecError(f"sample={sample}: a fraction must be in (0, 1]")
        count = max(1, round(sample * num_clients))
    else:
        if not 1 <= sample <= num_clients:
            raise SpecError(f"sample={sample}: a client count must be in 1..{num_clients}")
        count = sample
    if count == num_clients:
        return list(range(num_clients))
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


def build_sides(method_cls: type[Method], hp: Any, ctx: RunContext) -> tuple[Method, Method]:
    """The server and client objects of a method, each built under the same seeded global RNG
    (module initialisers draw from it) so both start from the same weights; neither leaves the
    global RNG changed."""
    sides = []
    for side in ("server", "client"):
        with seeded_global_rng(derive_seed(ctx.seed, "init"), ctx.device):
            method = method_cls(hp, ctx)
        method.seal(side)
        sides.append(method)
    return sides[0], sides[1]


@dataclass
class RunOutput:
    rounds: list[dict[str, Any]]
    round_seconds: list[float]
    channel: Channel
    trainable_params: int
    trains: bool
    encode_seconds: float = 0.0  # the method's one-off encode_inputs
    client_seconds: list[float] = field(default_factory=list)  # per round: client updates
    server_seconds: list[float] = field(default_factory=list)  # per round: configure + aggregate
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)  # the server's own stages
    images: dict[str, Tensor] = field(default_factory=dict)  # grids the server shows (generated samples)
    diverged: dict[str, Any] | None = None  # {"round", "reason"}: the run stopped there
    resumed_from_round: int | None = None


@dataclass
class Loop:
    """Everything the round loop changes: what a checkpoint holds besides the method objects."""

    round: int
    state: ServerState
    server_rng: torch.Generator
    sampler: np.random.Generator
    channel: Channel = field(default_factory=Channel)
    client_states: dict[int, Payload] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    client_seconds: list[float] = field(default_factory=list)
    server_seconds: list[float] = field(default_factory=list)


def divergence(record: dict[str, Any], raw_train_loss: float | None) -> str | None:
    """Why a round's numbers say the model diverged, or None. A NaN or infinite loss cannot be
    averaged or ranked: the run stops rather than report accuracies of a broken model."""
    if raw_train_loss is not None and not math.isfinite(raw_train_loss):
        return f"train loss is {raw_train_loss}"
    if record.get("global_acc") is not None and record.get("global_loss") is None:
        return "test loss is not finite"
    return None


@contextmanager
def frozen_long_lived_objects() -> Iterator[None]:
    """The objects alive before the rounds (data, client splits, models, features) hidden from the
    cyclic garbage collector while the rounds run. A round makes thousands of short-lived objects
    (messages, jobs) at 1,000 clients, and each full collection then walked every long-lived one
    too: measured, 0.35 s a round of FedCLIP's 1.2. Nothing is kept alive longer: reference
    counting still frees them, and they are handed back to the collector afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_federation(
    method_cls: type[Method],
    hp: Any,
    ctx: RunContext,
    dataset: FederatedDataset,
    inputs: Tensor,
    *,
    rounds: int,
    sample: float | int,
    eval_every: int = 1,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> RunOutput:
    seed, device = ctx.seed, ctx.device
    server, client = build_sides(method_cls, hp, ctx)
    t_encode = time.perf_counter()
    inputs = client.encode_inputs(inputs.to(device))
    encode_seconds = time.perf_counter() - t_encode
    clients = dataset.client_data(inputs)
    evaluate = Evaluator(dataset, inputs, client)
    # Rebuilt identically by every start, so a checkpoint refers to them instead of storing them.
    shared = {"ctx": ctx, "backbone": ctx.backbone, "text_features": ctx.text_features, "hp": hp}
    resumed = checkpoints.load(shared) if checkpoints is not None else None
    if resumed is not None:
        resumed_from, (loop, server_attrs, client_attrs) = resumed
        server.__dict__.update(server_attrs)  # the objects are sealed: restore past __setattr__
        client.__dict__.update(client_attrs)
    else:
        resumed_from = None
        server_rng = generator(seed, "server")
        state = server.init(ServerContext(0, server_rng, device))
        loop = Loop(0, state, server_rng, np.random.default_rng(derive_seed(seed, "client-sampling")))
    diverged: dict[str, Any] | None = None

    def finish(record: dict[str, Any], t0: float) -> None:
        loop.seconds.append(time.perf_counter() - t0)
        loop.history.append(record)
        if checkpoints is not None and diverged is None and checkpoints.due(loop.round, rounds):
            save_checkpoint()
        if on_round:  # after the checkpoint: a round reported is a round a resume need not redo
            on_round(record)

    def save_checkpoint() -> None:
        assert checkpoints is not None
        try:
            checkpoints.save(loop.round, (loop, server.__dict__, client.__dict__), shared)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            warnings.warn(f"could not write the checkpoint {checkpoints.path} ({exc}); this run goes on "
                          f"without checkpoints", CheckpointWarning, stacklevel=3)
            checkpoints.every = 0

    def output() -> RunOutput:
        return RunOutput(loop.history, loop.seconds, loop.channel, client.trainable_parameters(), method_cls.trains,
                         encode_seconds, loop.client_seconds, loop.server_seconds, server.stage_seconds(),
                         server.images(), diverged, resumed_from)

    if not method_cls.trains:
        t0 = time.perf_counter()
        scores = evaluate(server.global_model(loop.state), loop.client_states)
        finish({"round": 0, **scores, "up_bytes": 0, "down_bytes": 0}, t0)
        return output()

    channel = loop.channel
    with frozen_long_lived_objects():
        for r in range(loop.round + 1, rounds + 1):
            t0 = time.perf_counter()
            chosen = sample_clients(len(clients), sample, loop.sampler)
            at_server = ServerContext(r, loop.server_rng, device)
            state = server.begin_round(loop.state, chosen, at_server)
            jobs = []
            for cid in chosen:
                payload = server.configure(state, cid, at_server)
                message = channel.down(Message(payload, cid, r), device) if payload else None
                rng, global_seed = generator(seed, "data", r, cid), derive_seed(seed, "client", r, cid)
                context = ClientContext(cid, r, rng, device, global_seed)
                jobs.append(ClientJob(message, clients[cid], loop.client_states.get(cid), context))
            t_clients = time.perf_counter()
            results = client.client_update_cohort(jobs)
            t_server = time.perf_counter()
            loop.client_seconds.append(t_server - t_clients)
            uploads, losses, counts = [], [], []
            for job, result in zip(jobs, results, strict=True):
                cid = job.data.client_id
                if result.client_state is not None:
                    loop.client_states[cid] = result.client_state
                if result.upload:
                    uploads.append(channel.up(Message(result.upload, cid, r, result.num_samples), device))
                if result.train_loss is not None:  # None: the method reports no training loss
                    losses.append(result.train_loss)
                    counts.append(result.num_samples)
            if uploads:
                state = server.aggregate(state, uploads, at_server)
            loop.state, loop.round = state, r
            loop.server_seconds.append(time.perf_counter() - t_server + (t_clients - t0))
            comm = channel.end_round()
            record: dict[str, Any] = {"round": r, "clients": chosen}
            raw_loss = float(np.average(losses, weights=counts)) if counts and sum(counts) else None
            reason = divergence({}, raw_loss)
            if r % eval_every == 0 or r == rounds or reason:
                record.update(evaluate(server.global_model(state), loop.client_states))
            extra = server.server_metrics(state)
            if extra:
                record["server"] = extra
            record["train_loss"] = rounded(raw_loss)
            record.update(comm)
            reason = reason or divergence(record, raw_loss)
            if reason:
                diverged = {"round": r, "reason": reason}
            finish(record, t0)
            if diverged:
                break
    return output()
