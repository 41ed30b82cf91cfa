"""The federation engine: rounds, client sampling, the channel, evaluation.

It knows nothing about any one method: it calls the method's ``init``, ``broadcast``,
``client_update``, ``server_update`` and ``predict`` and hands each side only what is its own.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.data.dataset import FederatedDataset
from fedbench.errors import SpecError
from fedbench.federation.channel import Channel
from fedbench.federation.method import Method, Payload


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the run seed and a stream name: streams never share random numbers."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


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


def _r(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


@dataclass
class Evaluator:
    """Scores a server state (and clients' private states) on every split, predicting each
    example at most once per model per round."""

    dataset: FederatedDataset
    inputs: Tensor
    method: Method

    def __post_init__(self) -> None:
        ds = self.dataset
        self.val_idx = torch.cat([c.val for c in ds.clients])
        parts = [ds.global_test, self.val_idx, *[c.test for c in ds.clients], *ds.heldout.values()]
        self.eval_idx = torch.unique(torch.cat(parts))
        self.pos = torch.full((len(ds.labels),), -1, dtype=torch.int64)
        self.pos[self.eval_idx] = torch.arange(len(self.eval_idx))

    def _scores(self, logits: Tensor, pos: Tensor, idx: Tensor) -> tuple[float, float]:
        if len(idx) == 0:
            return float("nan"), float("nan")
        lg, y = logits[pos[idx]], self.dataset.labels[idx]
        return (lg.argmax(1) == y).double().mean().item(), F.cross_entropy(lg.float(), y).item()

    def __call__(self, state: Payload, client_states: dict[int, Payload]) -> dict[str, Any]:
        ds, m = self.dataset, self.method
        out: dict[str, Any] = {}
        global_logits = None
        if m.has_global_model:
            global_logits = m.predict(state, self.inputs[self.eval_idx])
            out["global_acc"], out["global_loss"] = map(_r, self._scores(global_logits, self.pos, ds.global_test))
            out["val_acc"] = _r(self._scores(global_logits, self.pos, self.val_idx)[0])
            if ds.heldout:
                held = {d: _r(self._scores(global_logits, self.pos, i)[0]) for d, i in sorted(ds.heldout.items())}
                out["heldout_acc"] = held
                out["heldout_acc_mean"] = _r(float(np.mean(list(held.values()))))
        accs, sizes, val_correct, val_total = [], [], 0.0, 0
        for cid, c in enumerate(ds.clients):
            own = client_states.get(cid)
            if own is not None:  # personalised model: score on its own client's splits only
                idx = torch.cat([c.val, c.test])
                logits = m.predict(state, self.inputs[idx], own)
                pos = torch.full((len(ds.labels),), -1, dtype=torch.int64)
                pos[idx] = torch.arange(len(idx))
            elif global_logits is not None:
                logits, pos = global_logits, self.pos
            else:
                continue  # a client never trained has no model of its own
            accs.append(self._scores(logits, pos, c.test)[0])
            sizes.append(len(c.test))
            if len(c.val):
                val_correct += self._scores(logits, pos, c.val)[0] * len(c.val)
                val_total += len(c.val)
        if accs:
            a, w = np.array(accs), np.array(sizes, dtype=np.float64)
            out["client_acc_mean"] = _r(float(np.nanmean(a)))
            out["client_acc_weighted"] = _r(float(np.nansum(a * w) / w.sum()))
            out["client_acc_worst"] = _r(float(np.nanmin(a)))
            out["client_acc"] = [_r(x) for x in accs]
        if not m.has_global_model and val_total:
            out["val_acc"] = _r(val_correct / val_total)
        return out


@dataclass
class RunOutput:
    rounds: list[dict[str, Any]]
    round_seconds: list[float]
    channel: Channel
    final_state: Payload = field(default_factory=dict)


def run_federation(
    method: Method,
    dataset: FederatedDataset,
    inputs: Tensor,
    *,
    seed: int,
    rounds: int,
    sample: float | int,
    eval_every: int = 1,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> RunOutput:
    clients = dataset.client_data(inputs)
    channel = Channel()
    evaluate = Evaluator(dataset, inputs, method)
    torch.manual_seed(derive_seed(seed, "init"))  # module initialisers draw from the global RNG
    state = method.init()
    client_states: dict[int, Payload] = {}
    history: list[dict[str, Any]] = []
    seconds: list[float] = []

    if not method.rounds_needed():
        t0 = time.perf_counter()
        record = {"round": 0, **evaluate(state, client_states), "up_bytes": 0, "down_bytes": 0}
        seconds.append(time.perf_counter() - t0)
        history.append(record)
        if on_round:
            on_round(record)
        return RunOutput(history, seconds, channel, state)

    sampler = np.random.default_rng(derive_seed(seed, "client-sampling"))
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        chosen = sample_clients(len(clients), sample, sampler)
        uploads, losses, counts = [], [], []
        for cid in chosen:
            down = channel.down(cid, method.broadcast(state, cid)) if method.has_global_model else {}
            torch.manual_seed(derive_seed(seed, "client", r, cid))  # dropout and friends
            result = method.client_update(down, clients[cid], client_states.get(cid), generator(seed, "data", r, cid))
            if result.client_state is not None:
                client_states[cid] = result.client_state
            if result.upload:
                uploads.append(channel.up(cid, result.upload))
            losses.append(result.train_loss)
            counts.append(result.num_samples)
        if uploads:
            state = method.server_update(state, uploads)
        comm = channel.end_round()
        record: dict[str, Any] = {"round": r, "clients": chosen}
        if r % eval_every == 0 or r == rounds:
            record.update(evaluate(state, client_states))
        record["train_loss"] = _r(float(np.average(losses, weights=counts))) if counts else None
        record.update(comm)
        seconds.append(time.perf_counter() - t0)
        history.append(record)
        if on_round:
            on_round(record)
    return RunOutput(history, seconds, channel, state)
