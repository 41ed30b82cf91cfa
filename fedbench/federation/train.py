"""The local training loop shared by methods that run minibatch SGD on a client's data."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedbench.data.dataset import Split
from fedbench.models.task_models import augment_crop_flip

ExtraLoss = Callable[[nn.Module], Tensor]


def run_local_epochs(
    model: nn.Module,
    inputs: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    rng: torch.Generator,
    augment: str | None = None,
    extra_loss: ExtraLoss | None = None,
) -> float:
    """``epochs`` passes of shuffled minibatches (last partial batch kept, as a DataLoader with
    ``drop_last=False``). ``inputs`` maps stored inputs (uint8 pixels or features) to model input.
    Returns the mean cross-entropy over the last epoch's batches."""
    model.train()
    n = len(split)
    last_epoch_losses: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=rng)
        losses = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = split.x[idx]
            if augment == "crop-flip":
                x = augment_crop_flip(x, rng)
            logits = model(inputs(x))
            loss = F.cross_entropy(logits, split.y[idx])
            total = loss if extra_loss is None else loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(loss.item())
        if epoch == epochs - 1:
            last_epoch_losses = losses
    return float(sum(last_epoch_losses) / max(len(last_epoch_losses), 1))


@torch.no_grad()
def batched_logits(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 1024) -> Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors of a model (what FedAvg-style methods communicate)."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def load_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def weighted_average(states: list[dict[str, Tensor]], weights: Tensor) -> dict[str, Tensor]:
    """sum_k w_k * state_k with w normalised to sum to one, in float64, stacked per tensor (no Python
    loop over clients per element)."""
    w = weights.double() / weights.double().sum()
    first = states[0]
    if not first:
        return {}
    # One float64 stack reused by every tensor, filled by stack's out= (which converts as it copies):
    # the same values in the same layout as stacking per-client .double() copies, so the same sums
    # bit for bit, without a fresh [K, ...] float64 temporary per client and per tensor.
    buffer = _average_workspace(len(states) * max(v.numel() for v in first.values()),
                                next(iter(first.values())).device)
    w = w.to(buffer.device)
    out = {}
    for key, value in first.items():
        stacked = buffer[: len(states) * value.numel()].view(len(states), *value.shape)
        torch.stack([s[key] for s in states], out=stacked)
        out[key] = torch.tensordot(w, stacked, dims=1).to(value.dtype)
    return out


_workspaces = threading.local()  # per thread: two federations in two threads never share a buffer


def _average_workspace(numel: int, device: torch.device) -> Tensor:
    """A float64 buffer of at least ``numel`` elements on ``device``, kept for the next round: a
    fresh one each round is page faults on every element (measured at 1,000 FedCLIP clients, a
    131 MB stack: 0.10-0.50 s of a round's server time, against 0.05 s reused)."""
    kept = getattr(_workspaces, "by_device", None)
    if kept is None:
        kept = _workspaces.by_device = {}
    buffer = kept.get(device)
    if buffer is None or buffer.numel() < numel:
        kept[device] = None  # free the old one before the larger is allocated
        buffer = kept[device] = torch.empty(numel, dtype=torch.float64, device=device)
    return buffer
