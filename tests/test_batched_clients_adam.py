"""The batched Adam engine (fedbench.federation.cohort_adam) against FedCLIP's client loop: the
same adapters and losses up to float reassociation, for clients of unequal sizes, batches of one
skipped, several epochs; and a whole run with FEDBENCH_BATCHED_CLIENTS=1 against one without."""

from __future__ import annotations

import pytest
import torch

from fedbench.baselines.fedclip import FedCLIP, FedCLIPHparams
from fedbench.data.dataset import Split
from fedbench.federation import cohort, cohort_adam
from fedbench.federation.cohort_adam import LocalAdam, _adam_step, train_with_adam
from fedbench.federation.method import RunContext
from fedbench.federation.train import load_state, state_of
from fedbench.harness.run import execute, resolve_spec

TOL = {"atol": 1e-6, "rtol": 1e-5}  # float reassociation of batched products, measured ~1e-9


def _fedclip(dim: int = 16, classes: int = 3, **hp) -> FedCLIP:
    torch.manual_seed(0)
    text = torch.randn(classes, dim)
    ctx = RunContext(num_classes=classes, class_names=[str(i) for i in range(classes)], prompts=[], num_clients=1,
                     input_kind="features", input_shape=(dim,), backbone=None, text_features=text)
    return FedCLIP(FedCLIPHparams(**hp), ctx)


def _adam_of(hp: FedCLIPHparams) -> LocalAdam:
    return LocalAdam(hp.local_epochs, hp.batch_size, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, min_batch=2)


def _loop(method: FedCLIP, start, x, y, seed):
    load_state(method.adapter, start)
    hp = method.hp
    optimizer = torch.optim.Adam(method.adapter.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                                 weight_decay=hp.weight_decay)
    loss = method.train_epochs(Split(x, y), optimizer, torch.Generator().manual_seed(seed))
    return state_of(method.adapter), loss


@pytest.mark.parametrize("epochs", [1, 2])
@pytest.mark.parametrize("chunk", [7, 3, 1])
def test_every_client_ends_where_the_loop_ends(epochs, chunk, monkeypatch):
    # 7 clients in one chunk, in chunks of 3 (the largest together), one at a time
    monkeypatch.setitem(cohort.CHUNK_BYTES, "cpu", chunk * 4 * (2 * 16 * 16 + 2 * 16))  # adapters of 16 dims
    chunks = []
    real_chunk = cohort_adam._train_chunk
    monkeypatch.setattr(cohort_adam, "_train_chunk", lambda *a: chunks.append(len(a[2])) or real_chunk(*a))
    # sizes: a short last batch (20, 45), a last batch of one that is skipped (33, 65), one sample
    # (never trains), several batches (97); distinct starts so a mix-up of clients shows
    method = _fedclip(local_epochs=epochs, lr=1e-2)
    sizes = [20, 33, 45, 1, 97, 65, 64]
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 16, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]
    starts = [{k: v + 0.1 * j for k, v in state_of(method.adapter).items()} for j in range(len(sizes))]
    trained, losses = train_with_adam(method.adapter, method.masked_batch_loss, starts, data,
                                      [torch.Generator().manual_seed(10 + j) for j in range(len(sizes))],
                                      _adam_of(method.hp))
    for j, (x, y) in enumerate(data):
        expected, loss = _loop(method, starts[j], x, y, 10 + j)
        for key in expected:
            torch.testing.assert_close(trained[j][key], expected[key], **TOL)
        if loss is None:
            assert losses[j] is None and sizes[j] == 1
        else:
            assert losses[j] == pytest.approx(loss, rel=1e-5)
        moved = max((expected[k] - starts[j][k]).abs().max().item() for k in expected)
        assert (moved > 1e-4) == (sizes[j] > 1)  # the comparison can tell a trained adapter from a start
    assert chunks == [chunk] * (7 // chunk) + ([7 % chunk] if 7 % chunk else [])


def test_the_functional_adam_step_is_torchs():
    torch.manual_seed(0)
    weights = torch.randn(3, 5, 4)
    adam = LocalAdam(1, 8, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.2)
    ours = {"w": weights.clone()}
    m, v = {"w": torch.zeros_like(weights)}, {"w": torch.zeros_like(weights)}
    theirs = [torch.nn.Parameter(weights[i].clone()) for i in range(3)]
    optimizers = [torch.optim.Adam([p], lr=0.05, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2) for p in theirs]
    steps = torch.zeros(3, dtype=torch.long)
    for t in range(4):
        grads = torch.randn(3, 5, 4)
        trains = torch.tensor([True, t != 1, True])  # client 1 skips step 1: no update, no step count
        steps += trains.long()  # after step 1, client 1 is a step behind: rows 0 and 2 each a run
        _adam_step(ours, m, v, {"w": grads.clone()}, trains, steps, adam)
        for i, (p, opt) in enumerate(zip(theirs, optimizers, strict=True)):
            if trains[i]:
                p.grad = grads[i].clone()
                opt.step()
    for i, p in enumerate(theirs):
        torch.testing.assert_close(ours["w"][i], p.detach(), atol=1e-7, rtol=1e-6)


def test_a_run_with_batched_clients_matches_the_loop(blobs_task, monkeypatch):
    spec = resolve_spec("fedclip", blobs_task, backbone="tiny-clip", rounds=3)
    monkeypatch.delenv("FEDBENCH_BATCHED_CLIENTS", raising=False)
    loop = execute(spec, None)
    import fedbench.baselines.fedclip as fedclip_module

    calls = []

    def spy(*args, **kw):
        calls.append(len(args[2]))
        return train_with_adam(*args, **kw)
    monkeypatch.setattr(fedclip_module, "train_with_adam", spy)
    execute(spec, None)
    assert calls == []  # not asked for: the loop
    monkeypatch.setenv("FEDBENCH_BATCHED_CLIENTS", "1")
    batched = execute(spec, None)
    assert calls == [4, 4, 4]  # each round's whole cohort at once
    for a, b in zip(loop["metrics"]["rounds"], batched["metrics"]["rounds"], strict=True):
        for key in ("global_acc", "global_loss", "train_loss", "client_acc_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert batched["comm"] == loop["comm"]
    assert batched["provenance"]["batched_clients"] is True and "batched_clients" not in loop["provenance"]


def test_a_bad_opt_in_value_is_refused_before_the_run(blobs_task, monkeypatch):
    from fedbench.errors import SpecError

    spec = resolve_spec("fedclip", blobs_task, backbone="tiny-clip", rounds=1)
    monkeypatch.setenv("FEDBENCH_BATCHED_CLIENTS", "yes")
    monkeypatch.setattr("fedbench.harness.run.TASKS", None)  # reading the task's data would fail loudly
    with pytest.raises(SpecError, match="FEDBENCH_BATCHED_CLIENTS"):
        execute(spec, None)
