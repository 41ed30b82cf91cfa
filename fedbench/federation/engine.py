"""The federation engine: rounds, client sampling, the channel, evaluation.

It knows nothing about any one method. It builds the method twice, a server side and a client
side (see :mod:`fedbench.federation.method`), and per round: samples clients, lets the server
configure one message per client, hands the client side each sampled client's message, data and
private state (the cohort hook), sends the uploads back through the channel to the server's
``aggregate``, and scores the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from fedbench.data.dataset import FederatedDataset
from fedbench.errors import SpecError
from fedbench.federation.channel import Channel
from fedbench.federation.evaluate import Evaluator, rounded
from fedbench.federation.method import (
    ClientContext,
    ClientJob,
    Message,
    Method,
    Payload,
    RunContext,
    ServerContext,
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
) -> RunOutput:
    seed, device = ctx.seed, ctx.device
    server, client = build_sides(method_cls, hp, ctx)
    t_encode = time.perf_counter()
    inputs = client.encode_inputs(inputs.to(device))
    encode_seconds = time.perf_counter() - t_encode
    clients = dataset.client_data(inputs)
    channel = Channel()
    evaluate = Evaluator(dataset, inputs, client)
    server_rng = generator(seed, "server")
    state = server.init(ServerContext(0, server_rng, device))
    client_states: dict[int, Payload] = {}
    history: list[dict[str, Any]] = []
    seconds: list[float] = []

    def finish(record: dict[str, Any], t0: float) -> None:
        seconds.append(time.perf_counter() - t0)
        history.append(record)
        if on_round:
            on_round(record)

    client_seconds: list[float] = []
    server_seconds: list[float] = []

    def output() -> RunOutput:
        return RunOutput(history, seconds, channel, client.trainable_parameters(), method_cls.trains,
                         encode_seconds, client_seconds, server_seconds, server.stage_seconds(), server.images())

    if not method_cls.trains:
        t0 = time.perf_counter()
        finish({"round": 0, **evaluate(server.global_model(state), client_states), "up_bytes": 0, "down_bytes": 0}, t0)
        return output()

    sampler = np.random.default_rng(derive_seed(seed, "client-sampling"))
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        chosen = sample_clients(len(clients), sample, sampler)
        at_server = ServerContext(r, server_rng, device)
        state = server.begin_round(state, chosen, at_server)
        jobs = []
        for cid in chosen:
            payload = server.configure(state, cid, at_server)
            message = channel.down(Message(payload, cid, r), device) if payload else None
            rng, global_seed = generator(seed, "data", r, cid), derive_seed(seed, "client", r, cid)
            context = ClientContext(cid, r, rng, device, global_seed)
            jobs.append(ClientJob(message, clients[cid], client_states.get(cid), context))
        t_clients = time.perf_counter()
        results = client.client_update_cohort(jobs)
        t_server = time.perf_counter()
        client_seconds.append(t_server - t_clients)
        uploads, losses, counts = [], [], []
        for job, result in zip(jobs, results, strict=True):
            cid = job.data.client_id
            if result.client_state is not None:
                client_states[cid] = result.client_state
            if result.upload:
                uploads.append(channel.up(Message(result.upload, cid, r, result.num_samples), device))
            losses.append(result.train_loss)
            counts.append(result.num_samples)
        if uploads:
            state = server.aggregate(state, uploads, at_server)
        server_seconds.append(time.perf_counter() - t_server + (t_clients - t0))
        comm = channel.end_round()
        record: dict[str, Any] = {"round": r, "clients": chosen}
        if r % eval_every == 0 or r == rounds:
            record.update(evaluate(server.global_model(state), client_states))
        extra = server.server_metrics(state)
        if extra:
            record["server"] = extra
        record["train_loss"] = rounded(float(np.average(losses, weights=counts))) if counts else None
        record.update(comm)
        finish(record, t0)
    return output()
