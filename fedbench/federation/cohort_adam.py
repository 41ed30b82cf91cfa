"""All clients of a round trained at once with Adam: the batched engine for feature-level heads.

A method whose clients train a small model on cached features (FedCLIP's adapter) spends a
round in per-step overhead when clients are trained one after another: a 1,000-client round of
FedCLIP on MNIST is 2,000 Adam steps of 32 samples each. Here the K clients' parameters are
stacked along a leading axis and one step of all of them is one ``vmap`` of the loss, one backward
of the summed losses, and torch's own functional Adam (its fused kernel) on the stacked tensors.

Equivalence with the loop (tests/test_batched_clients_adam.py holds it):

- minibatches: :func:`fedbench.federation.cohort.minibatch_plan` draws every client's shuffles
  from its own generator exactly as the loop does;
- a batch smaller than ``min_batch`` (FedCLIP skips batches of one) and a client that has run out
  of steps take no step: no gradient, no weight decay, no moment update, no step count;
- Adam: ``torch.optim.adam.adam``, the function ``torch.optim.Adam`` steps with (L2 weight decay
  added to the gradient, bias corrections from each client's own step count), with a fresh state
  per round as the method's loop builds it;
- the loss each client reports is the mean over the last epoch's trained batches, None if none.

Results equal the loop's up to float reassociation (batched matrix products sum in another
order, the fused kernel rounds its update once), not bit for bit; it is opt-in
(``FEDBENCH_BATCHED_CLIENTS=1``) for that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.optim.adam import adam as functional_adam

from fedbench.federation.cohort import (
    clients_per_chunk,
    in_chunks,
    last_epoch_means,
    minibatch_plan,
    stacked,
    unstacked,
)

# loss(model, params, x [B, ...], y [B], mask [B]) -> the mean loss over the real samples
ClientLoss = Callable[[nn.Module, dict[str, Tensor], Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LocalAdam:
    """What every client runs: ``epochs`` shuffled passes in batches of ``batch_size`` with a fresh
    ``torch.optim.Adam(lr, betas, eps, weight_decay)``; batches under ``min_batch`` are skipped."""

    epochs: int
    batch_size: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    min_batch: int = 1


def train_with_adam(model: nn.Module, loss: ClientLoss, starts: Sequence[dict[str, Tensor]],
                    data: Sequence[tuple[Tensor, Tensor]], rngs: Sequence[torch.Generator],
                    adam: LocalAdam) -> tuple[list[dict[str, Tensor]], list[float | None]]:
    """Train client j from ``starts[j]`` on ``data[j]`` = (x, y) with generator ``rngs[j]``; return
    each client's trained parameters and last-epoch mean loss, in job order."""
    if not starts:
        return [], []
    return in_chunks(lambda s, d, r: _train_chunk(model, loss, s, d, r, adam), starts, data, rngs,
                     clients_per_chunk(list(starts[0].values()), data[0][0].device))


def _train_chunk(model: nn.Module, loss: ClientLoss, starts: Sequence[dict[str, Tensor]],
                 data: Sequence[tuple[Tensor, Tensor]], rngs: Sequence[torch.Generator],
                 adam: LocalAdam) -> tuple[list[dict[str, Tensor]], list[float | None]]:
    k = len(starts)
    plan = minibatch_plan([len(y) for _, y in data], rngs, adam.epochs, adam.batch_size)
    pooled_x = torch.cat([x for x, _ in data])
    pooled_y = torch.cat([y for _, y in data])
    device = pooled_x.device
    params = stacked(starts, plan, list(starts[0]), device)
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    index_all, mask_all = plan.index.to(device), plan.mask.to(device)
    # [T, K] on the CPU, for control flow without a device sync: the client-steps that train (a
    # batch of at least min_batch real samples; a finished client's slots are all padding), and
    # each client's Adam step count once step t is taken
    counted = plan.mask.sum(2) >= adam.min_batch
    counts = counted.cumsum(0)

    def one_client(p: dict[str, Tensor], x: Tensor, y: Tensor, m: Tensor) -> Tensor:
        return loss(model, p, x, y, m)

    # vmap for the forward only; one backward of the summed losses gives every client its own
    # gradient (clients share no parameter), faster on CPU than vmap over grad.
    losses_of = vmap(one_client)
    losses = torch.zeros(len(plan.active), k, device=device)  # [T, K], read once at the end
    for t, active in enumerate(plan.active):
        trains_here = counted[t, :active]
        if not bool(trains_here.any()):
            continue
        trains = trains_here.to(device)
        index, mask = index_all[t, :active], mask_all[t, :active]
        x, y = pooled_x[index], pooled_y[index]
        leaves = {n: p[:active].detach().requires_grad_(True) for n, p in params.items()}
        step_losses = losses_of(leaves, x, y, mask)
        torch.where(trains, step_losses, 0.0).sum().backward()
        grads = {n: leaf.grad for n, leaf in leaves.items()}
        _adam_step(params, exp_avg, exp_avg_sq, grads, trains_here, counts[t, :active], adam)
        losses[t, :active] = step_losses.detach()
    return unstacked(params, plan), last_epoch_means(losses, counted, plan, adam.epochs)


def _adam_step(params: dict[str, Tensor], exp_avg: dict[str, Tensor], exp_avg_sq: dict[str, Tensor],
               grads: dict[str, Tensor], trains: Tensor, counts: Tensor, adam: LocalAdam) -> None:
    """One ``torch.optim.Adam`` step (L2 weight decay, no amsgrad) of the first ``len(trains)``
    stacked clients, in place, through torch's own functional Adam: the clients ``trains`` marks
    take it, each with its own step count ``counts`` (after this step) for the bias corrections;
    the others keep their parameters and moments. ``trains`` and ``counts`` are on the CPU, so
    grouping the rows costs no device sync.

    Rows that train with one step count form a run (usually the whole stack), passed as slices.
    On CPU and CUDA it is torch's fused kernel: one pass over parameters, gradients and moments
    instead of one per operation (measured on CPU, 127 FedCLIP adapters: 9 ms a step with the
    single-tensor rule, 2 ms fused)."""
    device = next(iter(params.values())).device
    lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
    for start, stop, count in _runs(trains, counts):
        for n, p in params.items():
            for out, tensor in zip(lists, (p, grads[n], exp_avg[n], exp_avg_sq[n]), strict=False):
                out.append(tensor[start:stop])
            # one step tensor per entry: Adam adds this step's 1 to each (a shared one would count it
            # once per parameter)
            lists[4].append(torch.tensor(float(count - 1), device=device))
    if not lists[0]:
        return
    params_of, grads_of, exp_avgs, exp_avg_sqs, steps = lists
    functional_adam(params_of, grads_of, exp_avgs, exp_avg_sqs, [], steps,
                    fused=device.type in ("cpu", "cuda"), amsgrad=False, beta1=adam.beta1, beta2=adam.beta2,
                    lr=adam.lr, weight_decay=adam.weight_decay, eps=adam.eps, maximize=False)


def _runs(trains: Tensor, counts: Tensor) -> list[tuple[int, int, int]]:
    """(start, stop, count): maximal runs of consecutive rows that train, with one step count."""
    runs: list[tuple[int, int, int]] = []
    for row, (on, count) in enumerate(zip(trains.tolist(), counts.tolist(), strict=True)):
        if not on:
            continue
        if runs and runs[-1][1] == row and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], row + 1, count)
        else:
            runs.append((row, row + 1, count))
    return runs


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the real samples (mask 1); 0 when there are none. ``where``, not a
    product: a padded sample's value may be infinite, and inf * 0 is NaN."""
    return torch.where(mask > 0, values, 0.0).sum() / mask.sum().clamp(min=1)

