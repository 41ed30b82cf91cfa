"""Exact checks of arithmetic that a learning curve cannot hold: each test computes its expected
value by hand (plain PyTorch autograd, numpy, or a closed form) on tiny inputs and compares it
with what the real method, engine or partitioner returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.baselines.fedprox import FedProx, FedProxHparams
from fedbench.baselines.local import Local
from fedbench.data.dataset import ClientData, ClientIndices, FederatedDataset, Split
from fedbench.data.partition import dirichlet_label_skew, quantity_skew
from fedbench.errors import DataError
from fedbench.federation.channel import Channel
from fedbench.federation.engine import run_federation, sample_clients
from fedbench.federation.evaluate import Evaluator
from fedbench.federation.method import (
    ClientContext,
    Message,
    RunContext,
    ServerContext,
    ServerState,
    seeded_global_rng,
)
from fedbench.federation.rng import derive_seed, generator
from fedbench.federation.train import state_of
from fedbench.models.task_models import SimpleCNN

SEED = 0
CPU = torch.device("cpu")
SIDE, CLASSES = 16, 4  # the smallest square input SimpleCNN accepts


def _ctx(num_clients: int) -> RunContext:
    return RunContext(num_classes=CLASSES, class_names=list("abcd"), prompts=[], num_clients=num_clients,
                      input_kind="pixels", input_shape=(1, SIDE, SIDE), seed=SEED)


def _images(labels: Tensor, seed: int) -> Tensor:
    """uint8 1x16x16 images whose mean brightness depends on the class (so gradients are not tiny)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 60, (len(labels), 1, SIDE, SIDE), generator=g)
    return (noise + 50 * labels.view(-1, 1, 1, 1)).to(torch.uint8)


def _dataset(train_sizes: list[int], test_size: int = 4) -> FederatedDataset:
    """One pool; client k holds ``train_sizes[k]`` train, 2 val and ``test_size`` test examples."""
    total = sum(train_sizes) + len(train_sizes) * (2 + test_size)
    labels = torch.arange(total) % CLASSES
    clients, start = [], 0
    for n in train_sizes:
        idx = torch.arange(start, start + n + 2 + test_size)
        clients.append(ClientIndices(idx[:n], idx[n : n + 2], idx[n + 2 :]))
        start += len(idx)
    return FederatedDataset(images=_images(labels, 1), labels=labels, class_names=list("abcd"), clients=clients,
                            global_test=torch.cat([c.test for c in clients]))


def _built(method_cls, hp, num_clients: int):
    """A method object built as the engine builds it (its model drawn from the run's "init" stream)."""
    with seeded_global_rng(derive_seed(SEED, "init"), CPU):
        return method_cls(hp, _ctx(num_clients))


def _model_with(weights: dict[str, Tensor]) -> SimpleCNN:
    model = SimpleCNN(1, SIDE, CLASSES)
    model.load_state_dict(weights)  # SimpleCNN has parameters only, all trainable
    return model


def _plain_sgd(start: dict[str, Tensor], x: Tensor, y: Tensor, hp: FedAvgHparams,
               rng: torch.Generator) -> dict[str, Tensor]:
    """The textbook client: a fresh SGD optimiser, E epochs of shuffled minibatches of x/255."""
    model = _model_with(start)
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    for _ in range(hp.local_epochs):
        order = torch.randperm(len(y), generator=rng)
        for i in range(0, len(y), hp.batch_size):
            batch = order[i : i + hp.batch_size]
            loss = F.cross_entropy(model(x[batch].float() / 255.0), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _initial_weights() -> dict[str, Tensor]:
    """w_0 as the engine draws it: the model built under the run's seeded "init" stream."""
    with seeded_global_rng(derive_seed(SEED, "init"), CPU):
        return state_of(SimpleCNN(1, SIDE, CLASSES))


def _max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --- FedProx: the proximal term is (mu/2) * ||w - w_t||^2 --------------------------------------


def test_fedprox_proximal_term_is_half_mu_times_the_squared_distance_and_its_gradient_is_mu_times_it():
    mu = 0.3
    method = _built(FedProx, FedProxHparams(mu=mu), 1)
    g = torch.Generator().manual_seed(2)
    deltas = {k: torch.randn(p.shape, generator=g) for k, p in method.model.named_parameters()}
    anchors = {k: p.detach() + deltas[k] for k, p in method.model.named_parameters()}  # w_t = w + delta

    value = method.local_loss_term(anchors)(method.model)
    expected = mu / 2 * sum(float(np.sum(d.double().numpy() ** 2)) for d in deltas.values())
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    for k, p in method.model.named_parameters():  # d/dw (mu/2)||w - w_t||^2 = mu (w - w_t) = -mu delta
        assert torch.allclose(p.grad, -mu * deltas[k], atol=1e-6)


def test_fedprox_client_update_is_sgd_on_cross_entropy_plus_the_proximal_gradient():
    # Two full-batch epochs of plain SGD: step 1 starts at w_t, where the proximal gradient is zero;
    # step 2 adds mu (w_1 - w_t). Computed here with autograd on the cross-entropy only.
    mu, lr = 5.0, 0.1
    hp = FedProxHparams(mu=mu, lr=lr, momentum=0.0, weight_decay=0.0, local_epochs=2, batch_size=64)
    method = _built(FedProx, hp, 1)
    y = torch.arange(24) % CLASSES
    x = _images(y, 3)
    empty = Split(x[:0], y[:0])
    data = ClientData(0, Split(x, y), empty, empty)
    w_t = state_of(method.model)
    client = ClientContext(0, 1, torch.Generator().manual_seed(4), CPU, 0)
    upload = method.client_update(Message(w_t, 0, 1), data, None, client).upload

    def ce_grad(weights: dict[str, Tensor]) -> dict[str, Tensor]:
        model = _model_with(weights)
        F.cross_entropy(model(x.float() / 255.0), y).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    g0 = ce_grad(w_t)
    w1 = {k: w_t[k] - lr * g0[k] for k in w_t}
    g1 = ce_grad(w1)
    prox_step = {k: lr * mu * (w1[k] - w_t[k]) for k in w_t}
    w2 = {k: w1[k] - lr * g1[k] - prox_step[k] for k in w_t}
    assert _max_abs_diff(upload, w2) < 1e-6
    # The proximal part of the step is far above the tolerance, so a wrong mu/2 cannot pass.
    assert max(v.abs().max().item() for v in prox_step.values()) > 1e-4


# --- local: each client keeps its own model from round to round ----------------------------------


def test_local_clients_continue_from_their_own_model_each_round():
    hp = FedAvgHparams(local_epochs=2, batch_size=4, lr=0.05)
    dataset = _dataset([10, 14])
    seen: dict[tuple[int, int], dict[str, Tensor]] = {}

    class RecordingLocal(Local):
        def client_update(self, message, data, client_state, client):
            result = super().client_update(message, data, client_state, client)
            seen[(data.client_id, client.round)] = result.client_state
            return result

    out = run_federation(RecordingLocal, hp, _ctx(2), dataset, dataset.images, rounds=2, sample=1.0)
    w0 = _initial_weights()
    for cid, c in enumerate(dataset.clients):
        x, y = dataset.images[c.train], dataset.labels[c.train]
        w1 = _plain_sgd(w0, x, y, hp, generator(SEED, "data", 1, cid))
        w2 = _plain_sgd(w1, x, y, hp, generator(SEED, "data", 2, cid))
        assert _max_abs_diff(seen[(cid, 1)], w1) < 1e-6
        assert _max_abs_diff(seen[(cid, 2)], w2) < 1e-6
        restarted = _plain_sgd(w0, x, y, hp, generator(SEED, "data", 2, cid))
        assert _max_abs_diff(restarted, w2) > 1e-3  # the test tells continuing from restarting
        # and each client is scored with its own round-2 model on its own test split
        with torch.no_grad():
            hits = _model_with(w2)(dataset.images[c.test].float() / 255.0).argmax(1) == dataset.labels[c.test]
        assert out.rounds[-1]["client_acc"][cid] == pytest.approx(hits.double().mean().item(), abs=1e-6)


# --- evaluation: client_acc_weighted weights each client's accuracy by its test count ------------


def test_client_acc_weighted_weights_each_client_by_its_test_samples():
    # Three clients' test splits, a model that predicts class 0 for every input: a client's accuracy
    # is its share of class-0 test examples (1, 1/2, 1/4 on 2, 6, 4 examples).
    tests = [[0, 0], [0, 0, 0, 1, 2, 3], [0, 1, 2, 3]]
    labels = torch.tensor([y for t in tests for y in t])
    bounds = np.cumsum([0, *map(len, tests)])
    none = torch.zeros(0, dtype=torch.int64)
    clients = [ClientIndices(none, none, torch.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    dataset = FederatedDataset(images=_images(labels, 5), labels=labels, class_names=list("abcd"),
                               clients=clients, global_test=torch.arange(len(labels)))
    method = _built(FedAvg, FedAvgHparams(), 3)
    always_zero = state_of(method.model)
    always_zero["fc3.weight"] = torch.zeros_like(always_zero["fc3.weight"])
    always_zero["fc3.bias"] = torch.tensor([1.0, 0.0, 0.0, 0.0])

    out = Evaluator(dataset, dataset.images, method)(always_zero, {})
    accs = np.array([np.mean(np.array(t) == 0) for t in tests])
    sizes = np.array([len(t) for t in tests], dtype=float)
    assert out["client_acc"] == pytest.approx(accs.tolist())
    assert out["client_acc_weighted"] == pytest.approx(float(np.sum(accs * sizes) / sizes.sum()), abs=1e-6)
    # Count-weighted over clients = pooled over all client test examples; the plain mean is apart.
    assert out["client_acc_weighted"] == pytest.approx(float(np.mean(labels.numpy() == 0)), abs=1e-6)
    assert out["client_acc_mean"] == pytest.approx(float(accs.mean()), abs=1e-6)
    assert abs(accs.mean() - out["client_acc_weighted"]) > 0.05
    assert out["client_acc_worst"] == pytest.approx(float(accs.min()))


# --- client sampling: without replacement ------------------------------------------------------


@pytest.mark.parametrize("sample, count", [(9, 9), (0.5, 5), (2, 2)])
def test_sampled_clients_are_distinct(sample, count):
    for seed in range(200):
        chosen = sample_clients(10, sample, np.random.default_rng(seed))
        assert len(chosen) == count and len(set(chosen)) == count, (seed, chosen)
        assert chosen == sorted(chosen) and all(0 <= c < 10 for c in chosen)


# --- Dirichlet partition: a draw whose smallest client holds exactly min_samples is accepted ------


def test_dirichlet_accepts_a_draw_at_exactly_min_samples_and_redraws_one_below():
    labels = np.repeat(np.arange(4), 30)
    seed = 3
    first = dirichlet_label_skew(labels, 4, 1.0, np.random.default_rng(seed), min_samples=0, max_redraws=1)
    smallest = min(len(p) for p in first)
    assert 0 < smallest < 30  # a real boundary: a small client that is not empty

    at = dirichlet_label_skew(labels, 4, 1.0, np.random.default_rng(seed), min_samples=smallest, max_redraws=1)
    assert all(np.array_equal(a, b) for a, b in zip(at, first, strict=True))  # the first draw, kept
    with pytest.raises(DataError, match=f"best smallest client: {smallest}"):
        dirichlet_label_skew(labels, 4, 1.0, np.random.default_rng(seed), min_samples=smallest + 1, max_redraws=1)


def test_one_client_holding_exactly_min_samples_is_accepted():
    # Closed form: one client gets every sample, so its size is exactly n = min_samples.
    labels = np.repeat(np.arange(4), 5)
    (part,) = dirichlet_label_skew(labels, 1, 0.5, np.random.default_rng(0), min_samples=20, max_redraws=1)
    assert sorted(part.tolist()) == list(range(20))
    (part,) = quantity_skew(20, 1, 0.5, np.random.default_rng(0), min_samples=20)
    assert sorted(part.tolist()) == list(range(20))


# --- FedAvg: w_{t+1} = sum_k n_k w_k / sum_k n_k --------------------------------------------------


def test_fedavg_aggregate_is_the_sample_count_weighted_mean():
    method = _built(FedAvg, FedAvgHparams(), 3)
    shapes = {k: p.shape for k, p in method.model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    counts = [1, 3, 6]
    payloads = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in counts]
    channel = Channel()  # the counts travel in the envelope, as in a run
    uploads = [channel.up(Message(p, cid, 1, n)) for cid, (p, n) in enumerate(zip(payloads, counts, strict=True))]
    state = method.aggregate(ServerState(broadcast={}), uploads, ServerContext(1, torch.Generator(), CPU))

    n = np.array(counts, dtype=np.float64)
    for k in shapes:
        stacked = np.stack([p[k].double().numpy() for p in payloads])
        expected = np.tensordot(n / n.sum(), stacked, axes=1)
        got = state.broadcast[k]
        assert got.dtype == torch.float32 and got.shape == shapes[k]
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
        assert np.abs(stacked.mean(0) - expected).max() > 0.1  # an unweighted mean would be far off


def test_a_fedavg_round_averages_plain_sgd_client_updates_by_train_count():
    hp = FedAvgHparams(local_epochs=1, batch_size=4, lr=0.05)
    dataset = _dataset([6, 18])
    averaged: list[dict[str, Tensor]] = []

    class RecordingFedAvg(FedAvg):
        def aggregate(self, state, uploads, server):
            new = super().aggregate(state, uploads, server)
            averaged.append(new.broadcast)
            return new

    run_federation(RecordingFedAvg, hp, _ctx(2), dataset, dataset.images, rounds=1, sample=1.0)
    w0 = _initial_weights()
    updates, counts = [], []
    for cid, c in enumerate(dataset.clients):
        updates.append(_plain_sgd(w0, dataset.images[c.train], dataset.labels[c.train], hp,
                                  generator(SEED, "data", 1, cid)))
        counts.append(len(c.train))
    total = sum(counts)
    expected = {k: sum(n / total * u[k].double() for n, u in zip(counts, updates, strict=True)) for k in w0}
    assert _max_abs_diff(averaged[0], expected) < 1e-6
