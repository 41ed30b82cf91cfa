"""The activation cache: LoRA methods run the frozen stages below their adapters once per run.

    pytest benchmarks/test_bench_activation_cache.py --benchmark-enable -s

Measured side by side in one process, on rotated-mnist (the full protocol's data, digits-clip):
the client work of one round (every client, one update each) with the cache against the same
work running the frozen stages at every step (the numbers are equal: tests hold that). Reported
as a ratio, plus the one-off encoding the cache costs.
"""

from __future__ import annotations

import time

import pytest
import torch

from fedbench.core.registry import METHODS, TASKS
from fedbench.federation.engine import build_sides
from fedbench.federation.method import ClientContext, Message, RunContext, ServerContext


def _client_round_seconds(method: str, backbone, dataset, text, **options) -> tuple[float, float]:
    cls = METHODS.get(method).obj
    hp = cls.Hparams(**options)
    ctx = RunContext(num_classes=dataset.num_classes, class_names=list(dataset.class_names),
                     prompts=dataset.prompts(), num_clients=len(dataset.clients), input_kind="pixels",
                     input_shape=tuple(dataset.images.shape[1:]), backbone=backbone, text_features=text)
    server, client = build_sides(cls, hp, ctx)
    state = server.init(ServerContext(0, torch.Generator().manual_seed(0), ctx.device))
    t0 = time.perf_counter()
    inputs = client.encode_inputs(dataset.images)
    encode = time.perf_counter() - t0
    clients = dataset.client_data(inputs)
    t0 = time.perf_counter()
    for cid, data in enumerate(clients):
        message = Message(server.configure(state, cid, None), cid, 1)
        client.client_update(message, data, None, ClientContext(cid, 1, torch.Generator().manual_seed(cid),
                                                                ctx.device, cid))
    return time.perf_counter() - t0, encode


@pytest.mark.parametrize("method, options", [
    ("modality-broadcast", {}),
    ("fedavg", {"trainable": "lora", "local_epochs": 1}),
])
def test_activation_cache_speedup(benchmark, monkeypatch, method, options):
    from fedbench.models.backbones import create_backbone

    backbone = create_backbone("digits-clip")
    task = TASKS.get("rotated-mnist").obj
    dataset = task().load(task.Options(), 0)
    text = backbone.encode_text(dataset.prompts())
    if method == "fedavg":
        from fedbench.models.clip import FrozenStages

        cached, encode = _client_round_seconds(method, backbone, dataset, text, **options)
        monkeypatch.setattr(FrozenStages, "MAX_CACHE_BYTES", 0)  # no cache: the frozen stages run every step
        full, _ = _client_round_seconds(method, backbone, dataset, text, **options)
    else:
        cached, encode = _client_round_seconds(method, backbone, dataset, text, **options)
        full, _ = _client_round_seconds(method, backbone, dataset, text, cache_activations=False, **options)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"cached_seconds": cached, "full_forward_seconds": full, "speedup": full / cached,
                                 "encode_once_seconds": encode})
    print(f"\n{method}: client round {cached:.2f}s cached vs {full:.2f}s full forward "
          f"(x{full / cached:.2f}); one-off encoding {encode:.2f}s")
    assert full > cached
