"""A batched client engine: every client of a round trained at once as one stacked model.

The sequential path (:func:`fedbench.federation.train.run_local_epochs`) trains client after
client through one model object, one small step at a time. Here the K clients' parameters are
stacked along a leading axis (as ``torch.func.stack_module_state`` does) and one step of all of
them is one gradient of every client's loss, followed by a functional SGD step on the stacked
tensors. The gradient comes from the model's own ``stacked_forward`` where it has one (SimpleCNN:
the K copies as channels-last grouped convolutions and batched matrix products, one backward of
the summed losses), else from a ``vmap`` of ``grad(functional_call(model, ...))``, which works for
any model without buffers.

Equivalence with the sequential path, step by step:

- minibatch orders: each client draws ``torch.randperm(n, generator=rng)`` once per epoch from its
  own round generator, exactly as the loop does, so every client sees the same batches in the same
  order;
- unequal sizes: client k runs ``epochs * ceil(n_k / B)`` steps. Clients are sorted by step count,
  so at global step t the clients still training are a prefix of the stack; the others take no
  step at all (no gradient, no weight decay, no momentum), as if they had stopped;
- a short last batch: padded slots carry mask 0 and the loss divides by the real count, so the
  mean cross-entropy is over the batch's real samples only;
- SGD: the update of ``torch.optim.SGD`` (no dampening, no Nesterov): g += wd * w;
  buf = momentum * buf + g (buf = g on the first step); w -= lr * buf;
- FedProx: the proximal term (mu / 2) ||w - w_global||^2 is part of each client's loss.

Results equal the sequential ones up to float reassociation (batched convolutions sum in another
order), not bit for bit; tests/test_batched_clients.py states and holds the tolerance, on both
forwards.

Speed (benchmarks/bench_fedavg_round.py measures it side by side): on a few CPU cores a round of
simple-cnn on mnist-dirichlet is about 2x faster than the loop through SimpleCNN's stacked
forward; through vmap it is no faster than the loop, because vmap's grouped convolutions run in
NCHW, where mkldnn is no faster per sample than the loop's small ones. The rest of a step is still
the convolution and max-pool kernels; on an accelerator one kernel per layer for the whole cohort
replaces K small launches.

Opt-in: the environment variable ``FEDBENCH_BATCHED_CLIENTS=1``. It is not a spec field, so specs,
their hashes and committed records are untouched; a method still decides per round whether its
options are ones this engine reproduces and falls back to the loop otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedbench.errors import SpecError

BATCHED_CLIENTS_ENV = "FEDBENCH_BATCHED_CLIENTS"
# A chunk of clients trained at once holds at most this many bytes of stacked parameters. On CPU a
# stack past a few MB makes every step's fresh gradient new memory the kernel must page in
# (measured: 1,000 FedCLIP adapters at once 1.24 s a round, in chunks of 100 0.72 s); an
# accelerator wants as many clients per kernel as fit.
CHUNK_BYTES = {"cpu": 16 * 2**20}
ACCELERATOR_CHUNK_BYTES = 2**30


def batched_clients_requested() -> bool:
    """True when ``FEDBENCH_BATCHED_CLIENTS=1``; unset, empty or 0: the sequential loop."""
    value = os.environ.get(BATCHED_CLIENTS_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise SpecError(f"{BATCHED_CLIENTS_ENV}={value!r}: set it to 1 (train a round's clients at once) "
                    f"or 0 / unset (one after another).")


@dataclass(frozen=True)
class LocalSGD:
    """The local optimisation every client runs: E epochs of minibatch SGD (torch.optim.SGD's rule)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    mu: float = 0.0  # FedProx's proximal weight; 0: plain FedAvg


@dataclass(frozen=True)
class Plan:
    """Every client's minibatches, laid out by global step. Clients are in ``order`` (most steps
    first), so at step t the training clients are the first ``active[t]`` of the stack."""

    order: list[int]  # position in the stack -> index of the job
    steps: list[int]  # per stacked client: its number of steps
    index: Tensor  # [T, K, B] int64 rows of the pooled inputs (padding points at a real row)
    mask: Tensor  # [T, K, B] 1.0 for a real sample, 0.0 for padding
    active: list[int]  # per step: how many clients (a prefix of the stack) take it


def minibatch_plan(sizes: Sequence[int], rngs: Sequence[torch.Generator], epochs: int, batch_size: int) -> Plan:
    """The sequential loop's shuffles (one randperm per client per epoch, from its own generator),
    as pooled row indices: client j's rows start at ``sum(sizes[:j])``."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    batches_per_epoch = [-(-n // batch_size) for n in sizes]
    order = sorted(range(len(sizes)), key=lambda j: -batches_per_epoch[j])  # stable: ties keep job order
    steps = [epochs * batches_per_epoch[j] for j in order]
    total = steps[0] if steps else 0
    index = torch.zeros(total, len(sizes), batch_size, dtype=torch.long)
    mask = torch.zeros(total, len(sizes), batch_size)
    for slot, j in enumerate(order):
        n = sizes[j]
        index[:, slot, :] = offsets[j]  # padding reads the client's first row, weighted 0
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=rngs[j]) + offsets[j]
            for b, start in enumerate(range(0, n, batch_size)):
                rows = perm[start : start + batch_size]
                t = epoch * batches_per_epoch[j] + b
                index[t, slot, : len(rows)] = rows
                mask[t, slot, : len(rows)] = 1.0
    active = [sum(1 for s in steps if s > t) for t in range(total)]
    return Plan(order, steps, index, mask, active)


def clients_per_chunk(params: Sequence[Tensor], device: torch.device) -> int:
    """How many clients of a model with ``params`` one chunk trains at once on ``device``."""
    per_client = sum(p.numel() * 4 for p in params)  # stacked in float32
    budget = CHUNK_BYTES.get(torch.device(device).type, ACCELERATOR_CHUNK_BYTES)
    return max(1, budget // max(per_client, 1))


Trained = tuple[list[dict[str, Tensor]], list]
ChunkTrainer = Callable[[list[dict[str, Tensor]], list[tuple[Tensor, Tensor]], list[torch.Generator]], Trained]


def in_chunks(train: ChunkTrainer, starts: Sequence[dict[str, Tensor]], data: Sequence[tuple[Tensor, Tensor]],
              rngs: Sequence[torch.Generator], chunk: int) -> Trained:
    """``train(starts, data, rngs)`` on chunks of at most ``chunk`` clients, largest first (so a chunk's
    clients run about as many steps as each other), results put back in job order. Clients share
    nothing while they train, so the chunking changes no number; it bounds the memory one step
    touches by the chunk, not by the number of clients."""
    order = sorted(range(len(data)), key=lambda j: -len(data[j][1]))
    params: list[dict[str, Tensor]] = [{} for _ in data]
    losses: list = [None for _ in data]
    for start in range(0, len(order), chunk):
        jobs = order[start : start + chunk]
        trained = train([starts[j] for j in jobs], [data[j] for j in jobs], [rngs[j] for j in jobs])
        for j, p, loss in zip(jobs, *trained, strict=True):
            params[j], losses[j] = p, loss
    return params, losses


def stacked(starts: Sequence[dict[str, Tensor]], plan: Plan, names: Sequence[str],
            device: torch.device) -> dict[str, Tensor]:
    """[K, ...] per parameter in stack order (what torch.func.stack_module_state builds from modules)."""
    return {k: torch.stack([starts[j][k].detach().to(device, torch.float32) for j in plan.order]) for k in names}


def unstacked(params: dict[str, Tensor], plan: Plan) -> list[dict[str, Tensor]]:
    """Each client's own parameters again, in job order."""
    out: list[dict[str, Tensor]] = [{} for _ in plan.order]
    for slot, j in enumerate(plan.order):
        out[j] = {k: v[slot].clone() for k, v in params.items()}
    return out


def last_epoch_means(losses: Tensor, counted: Tensor, plan: Plan, epochs: int) -> list[float | None]:
    """Per job, the mean of ``losses[t, slot]`` over its last epoch's steps that ``counted`` marks
    (what the loops report), None where none is marked. ``losses``, ``counted``: [T, K], stack order."""
    losses, counted = losses.cpu(), counted.cpu()
    out: list[float | None] = [None for _ in plan.order]
    for slot, j in enumerate(plan.order):
        end = plan.steps[slot]
        window = slice(end - end // epochs, end)
        vals = losses[window, slot][counted[window, slot]].tolist()
        out[j] = sum(vals) / len(vals) if vals else None
    return out


def _client_loss(model: nn.Module, mu: float):
    """Loss of one client on one (padded) minibatch: masked mean cross-entropy (+ proximal term).
    Returns (total, cross-entropy): the gradient is of the total, the reported loss is the CE."""

    def loss(params: dict[str, Tensor], anchor: dict[str, Tensor], x: Tensor, y: Tensor,
             mask: Tensor) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, params, (x,))
        ce = (F.cross_entropy(logits, y, reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)
        total = ce
        if mu:
            total = ce + (mu / 2) * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
        return total, ce

    return loss


def _stacked_client_losses(model: nn.Module, mu: float):
    """The same per-client losses and gradients as ``vmap(grad(_client_loss))``, from a model's own
    ``stacked_forward`` (K copies of its forward at once): clients share no parameter, so one
    backward of the summed losses gives each client the gradient of its own loss."""
    forward = _stacked_forward_of(model)

    def step(params: dict[str, Tensor], anchors: dict[str, Tensor], x: Tensor, y: Tensor,
             mask: Tensor) -> tuple[dict[str, Tensor], tuple[None, Tensor]]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        logits = forward(leaves, x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(mask)
        ce = (ce * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        total = ce.sum()
        if mu:
            total = total + (mu / 2) * sum(((leaves[k] - anchors[k]) ** 2).sum() for k in leaves)
        grads = torch.autograd.grad(total, list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), (None, ce.detach())

    return step


def _stacked_forward_of(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor] | None:
    """``model.stacked_forward`` when the class that defines it also defines the ``forward`` in use
    (a subclass that changes ``forward`` but inherits ``stacked_forward`` would train another
    network than it evaluates), else None: the generic vmap path."""
    for cls in type(model).__mro__:
        if "stacked_forward" in vars(cls):
            return model.stacked_forward if type(model).forward is vars(cls).get("forward") else None
    return None


@torch.no_grad()
def _sgd_step(params: dict[str, Tensor], bufs: dict[str, Tensor], grads: dict[str, Tensor], a: int,
              sgd: LocalSGD) -> None:
    """torch.optim.SGD's update on the first ``a`` clients of the stack, in place. The buffers start
    at zero, so the first step's momentum * 0 + g is exactly SGD's buf = g."""
    for k, p in params.items():
        w = p[:a]
        g = grads[k]
        if sgd.weight_decay:
            g = g.add(w, alpha=sgd.weight_decay)
        if sgd.momentum:
            g = bufs[k][:a].mul_(sgd.momentum).add_(g)
        w.add_(g, alpha=-sgd.lr)


def train_cohort(model: nn.Module, inputs: nn.Module, starts: Sequence[dict[str, Tensor]],
                 splits: Sequence[tuple[Tensor, Tensor]], rngs: Sequence[torch.Generator],
                 sgd: LocalSGD) -> tuple[list[dict[str, Tensor]], list[float]]:
    """Train client j from ``starts[j]`` on its split ``splits[j] = (x, y)`` with its generator
    ``rngs[j]``; returns each client's trained parameters and its mean cross-entropy over the last
    epoch's batches (as :func:`~fedbench.federation.train.run_local_epochs` reports it).

    ``model`` supplies the architecture only (its own weights are not read or changed); it must hold
    no buffers and draw no randomness in training (vmap refuses a random op), as SimpleCNN does."""
    if any(True for _ in model.buffers()):
        raise SpecError(f"{type(model).__name__} has buffers (batch norm?): the batched client engine "
                        f"trains parameters only; unset FEDBENCH_BATCHED_CLIENTS for this model.")
    device = next(model.parameters()).device
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    return in_chunks(lambda s, d, r: _train_chunk(model, inputs, s, d, r, sgd, list(trainable), device),
                     starts, splits, rngs, clients_per_chunk(list(trainable.values()), device))


def _train_chunk(model: nn.Module, inputs: nn.Module, starts: Sequence[dict[str, Tensor]],
                 splits: Sequence[tuple[Tensor, Tensor]], rngs: Sequence[torch.Generator], sgd: LocalSGD,
                 names: list[str], device: torch.device) -> tuple[list[dict[str, Tensor]], list[float]]:
    plan = minibatch_plan([len(y) for _, y in splits], rngs, sgd.epochs, sgd.batch_size)
    pool_x = torch.cat([x for x, _ in splits]).to(device)
    pool_y = torch.cat([y for _, y in splits]).to(device)
    params = stacked(starts, plan, names, device)
    anchors = {k: v.clone() for k, v in params.items()}  # each client's start: FedProx's w_global
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    if _stacked_forward_of(model) is not None:
        step = _stacked_client_losses(model, sgd.mu)
    else:
        step = vmap(grad_and_value(_client_loss(model, sgd.mu), has_aux=True), randomness="error")
    index, mask = plan.index.to(device), plan.mask.to(device)
    losses = torch.zeros(len(plan.active), len(starts), device=device)  # read once at the end: no sync per step
    for t, a in enumerate(plan.active):
        rows = index[t, :a]
        x = inputs(pool_x[rows.flatten()]).unflatten(0, (a, sgd.batch_size))
        grads, (_, ce) = step({k: v[:a] for k, v in params.items()}, {k: v[:a] for k, v in anchors.items()},
                              x, pool_y[rows], mask[t, :a])
        _sgd_step(params, bufs, grads, a, sgd)
        losses[t, :a] = ce.detach()
    counted = torch.arange(len(plan.active))[:, None] < torch.tensor(plan.steps)[None, :]  # every step trains
    # a client with no sample reports 0.0, as run_local_epochs does
    last = [0.0 if m is None else m for m in last_epoch_means(losses, counted, plan, sgd.epochs)]
    return unstacked(params, plan), last

