"""Metrics that every record carries, registered so that tables and checks can name them.

Each metric reads a value from a record's ``metrics.final`` block; ``higher_is_better`` tells
leaderboards how to sort and regression checks which way is worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedbench.core.registry import register_metric


@dataclass(frozen=True)
class Metric:
    name: str
    path: tuple[str, ...]  # keys into the record
    higher_is_better: bool
    description: str

    def read(self, record: dict[str, Any]) -> Any:
        value: Any = record
        for key in self.path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value


_METRICS = [
    Metric("global_acc", ("metrics", "final", "last", "global_acc"), True,
           "accuracy of the global model on the pooled test set, last round"),
    Metric("best_val_global_acc", ("metrics", "final", "best_val", "global_acc"), True,
           "global-model test accuracy at the round with the best validation accuracy"),
    Metric("heldout_acc_mean", ("metrics", "final", "last", "heldout_acc_mean"), True,
           "accuracy on the held-out domain(s), last round (leave-one-domain-out tasks)"),
    Metric("best_val_heldout_acc_mean", ("metrics", "final", "best_val", "heldout_acc_mean"), True,
           "held-out domain accuracy at the best-validation round"),
    Metric("client_acc_mean", ("metrics", "final", "last", "client_acc_mean"), True,
           "mean over clients of each client's test accuracy (its own model where it has one)"),
    Metric("client_acc_weighted", ("metrics", "final", "last", "client_acc_weighted"), True,
           "client test accuracy weighted by client test size"),
    Metric("client_acc_worst", ("metrics", "final", "last", "client_acc_worst"), True,
           "the worst client's test accuracy"),
    Metric("global_loss", ("metrics", "final", "last", "global_loss"), False,
           "cross-entropy of the global model on the pooled test set, last round"),
    Metric("up_bytes", ("comm", "up_bytes"), False, "bytes sent client->server, whole run (measured)"),
    Metric("down_bytes", ("comm", "down_bytes"), False, "bytes sent server->client, whole run (measured)"),
    Metric("trainable_params", ("metrics", "final", "trainable_params"), False,
           "parameters trained on a client"),
]

for _m in _METRICS:
    register_metric(_m.name, description=_m.description)(_m)
