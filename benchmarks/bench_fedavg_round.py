"""One FedAvg round of mnist-dirichlet (simple-cnn), timed three ways in one process, against the
machine's measured fp32 GEMM rate:

- fedbench sequential: the engine's default client loop (one model object, client after client);
- fedbench batched: the same round with FEDBENCH_BATCHED_CLIENTS=1 (every client at once);
- plain PyTorch: a NIID-Bench-style per-client loop (a model, a DataLoader, an SGD per client).

    OMP_NUM_THREADS=2 python benchmarks/bench_fedavg_round.py               # the default protocol
    OMP_NUM_THREADS=2 python benchmarks/bench_fedavg_round.py --max-train 3000 --local-epochs 1

A plain script, not a timed test: the figures depend on the machine and its load. Ratios are
against the sequential path measured in the same run. FLOPs count the useful arithmetic only
(forward FLOPs from the layer shapes, times 3 for forward + backward, times the sample-passes);
the batched path's padded slots are not counted.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedbench.core.registry import TASKS
from fedbench.federation.cohort import BATCHED_CLIENTS_ENV
from fedbench.harness.run import execute, resolve_spec
from fedbench.models.task_models import SimpleCNN


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """fp32 torch.matmul of two n x n matrices: 2 n^3 FLOPs each (best of ``repeats``)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_flops(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """FLOPs of one sample's forward pass (2 per multiply-add) from each conv and linear layer's
    shapes, read off a forward pass with hooks (pooling, ReLU and the loss are not counted)."""
    total = 0

    def hook(layer: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            per_output = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            total += 2 * out[0].numel() * per_output
        elif isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, *sample_shape))
    for h in handles:
        h.remove()
    return total


def fedbench_round(spec: Any, batched: bool, device: str) -> float:
    """Client seconds of round 1 as the engine times it (the cohort's training, nothing else)."""
    os.environ[BATCHED_CLIENTS_ENV] = "1" if batched else "0"
    try:
        record = execute(spec, None, device=device)
    finally:
        os.environ.pop(BATCHED_CLIENTS_ENV, None)
    return float(record["timing"]["client_seconds"][0])


def plain_round(spec: Any, dataset: Any, device: torch.device) -> float:
    """NIID-Bench's client loop in plain PyTorch: per client a model loaded with the global
    weights, a shuffling DataLoader over its (pre-scaled) images and a fresh SGD optimiser."""
    hp = spec.method_options
    global_model = SimpleCNN(1, 28, 10).to(device)
    _sync(device)
    t0 = time.perf_counter()
    for c in dataset.clients:
        model = SimpleCNN(1, 28, 10).to(device)
        model.load_state_dict(global_model.state_dict())
        images = (dataset.images[c.train].float() / 255).to(device)
        loader = DataLoader(TensorDataset(images, dataset.labels[c.train].to(device)),
                            batch_size=hp["batch_size"], shuffle=True)
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
        model.train()
        for _ in range(hp["local_epochs"]):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-train", type=int, default=0, help="subsample MNIST's train set (0: all 60k)")
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every path runs there)")
    parser.add_argument("--skip-plain", action="store_true", help="skip the (slow) plain PyTorch loop")
    args = parser.parse_args()
    device = torch.device(args.device)

    sets = [f"max_train={args.max_train}", f"local_epochs={args.local_epochs}", f"clients={args.clients}"]
    spec = resolve_spec("fedavg", "mnist-dirichlet", rounds=1, sets=sets)
    task = TASKS.get(spec.task).obj
    dataset = task().load(task.Options(**spec.task_options), spec.seed)
    sizes = [len(c.train) for c in dataset.clients]
    passes = sum(sizes) * spec.method_options["local_epochs"]
    flops = 3 * forward_flops(SimpleCNN(1, 28, 10), (1, 28, 28)) * passes

    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} CPU threads; mnist-dirichlet "
          f"{args.clients} clients (train sizes {min(sizes)}..{max(sizes)}, total {sum(sizes)}), "
          f"{args.local_epochs} local epochs, "
          f"batch {spec.method_options['batch_size']}")
    gemm = gemm_gflops(device)
    print(f"fp32 GEMM 2048x2048: {gemm:.1f} GFLOP/s; round arithmetic {flops / 1e12:.3f} TFLOP "
          f"({passes} sample-passes) = {flops / gemm / 1e9:.2f} s at the GEMM rate")

    # Warm-up (lazy initialisation of kernels and the data source) on a tiny round, untimed.
    warm = resolve_spec("fedavg", "mnist-dirichlet", rounds=1, sets=["max_train=500", "local_epochs=1"])
    fedbench_round(warm, False, args.device), fedbench_round(warm, True, args.device)
    seconds = {"fedbench sequential": fedbench_round(spec, False, args.device),
               "fedbench batched": fedbench_round(spec, True, args.device)}
    if not args.skip_plain:
        seconds["plain PyTorch loop"] = plain_round(spec, dataset, device)
    sequential = seconds["fedbench sequential"]
    print(f"{'path':<22}{'seconds':>10}{'speed-up':>10}{'GFLOP/s':>10}{'of GEMM':>10}")
    for name, s in seconds.items():
        rate = flops / s / 1e9
        print(f"{name:<22}{s:>10.2f}{sequential / s:>9.2f}x{rate:>10.1f}{rate / gemm:>9.1%}")


if __name__ == "__main__":
    main()
