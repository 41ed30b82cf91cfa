"""Metrics that every record carries, registered so that tables and checks can name them.

This is the one place that says where a metric lives in a record: the leaderboard and
``fedbench compare`` read values through these definitions, never through paths of their own.
Each metric reads a value by its ``path`` of keys into the record; ``higher_is_better`` tells
leaderboards how to sort and regression checks which way is worse (None for counts and round
numbers, which are neither); ``unit`` tells a table how to print it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from fedbench.core.registry import register_metric

Unit = Literal["fraction", "loss", "bytes", "count", "seconds"]

FINAL = ("metrics", "final")
LAST = (*FINAL, "last")  # the last evaluated round
BEST_VAL = (*FINAL, "best_val")  # the round with the best validation accuracy


@dataclass(frozen=True)
class Metric:
    name: str
    path: tuple[str, ...]  # keys into the record
    higher_is_better: bool | None
    description: str
    unit: Unit = "fraction"

    def read(self, record: Mapping[str, Any]) -> Any:
        """The value at ``path``; None where any key on the way is missing (or a block is null)."""
        value: Any = record
        for key in self.path:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return value

    def at_best_val(self, description: str = "") -> Metric:
        """The same last-round metric read at the best-validation round instead."""
        if self.path[:len(LAST)] != LAST:
            raise ValueError(f"{self.name} is not a last-round metric")
        return replace(self, name=f"best_val_{self.name}", path=BEST_VAL + self.path[len(LAST):],
                       description=description or f"{self.name} at the best-validation round")


GLOBAL_ACC = Metric("global_acc", (*LAST, "global_acc"), True,
                    "accuracy of the global model on the pooled test set, last round")
HELDOUT_ACC_MEAN = Metric("heldout_acc_mean", (*LAST, "heldout_acc_mean"), True,
                          "accuracy on the held-out domain(s), last round (leave-one-domain-out tasks)")
CLIENT_ACC_MEAN = Metric("client_acc_mean", (*LAST, "client_acc_mean"), True,
                         "mean over clients of each client's test accuracy (its own model where it has one)")
CLIENT_ACC_WEIGHTED = Metric("client_acc_weighted", (*LAST, "client_acc_weighted"), True,
                             "client test accuracy weighted by client test size")
CLIENT_ACC_WORST = Metric("client_acc_worst", (*LAST, "client_acc_worst"), True, "the worst client's test accuracy")
CLASS_ACC_WORST = Metric("class_acc_worst", (*LAST, "class_acc_worst"), True,
                         "the worst class's accuracy on the pooled test set (global model), last round")
CLASS_ACC_STD = Metric("class_acc_std", (*LAST, "class_acc_std"), False,
                       "spread of per-class accuracy on the pooled test set (std over classes), last round")
MODALITY_ACC_WORST = Metric("modality_acc_worst", (*LAST, "modality_acc_worst"), True,
                            "pooled-test accuracy from the weakest modality alone (multi-modal methods), last round")
GLOBAL_LOSS = Metric("global_loss", (*LAST, "global_loss"), False,
                     "cross-entropy of the global model on the pooled test set, last round", "loss")
UP_BYTES = Metric("up_bytes", ("comm", "up_bytes"), False, "bytes sent client->server, whole run (measured)",
                  "bytes")
DOWN_BYTES = Metric("down_bytes", ("comm", "down_bytes"), False, "bytes sent server->client, whole run (measured)",
                    "bytes")
TRAINABLE_PARAMS = Metric("trainable_params", (*FINAL, "trainable_params"), False, "parameters trained on a client",
                          "count")
ROUNDS_RUN = Metric("rounds_run", (*FINAL, "rounds_run"), None, "training rounds run (0: nothing trained)", "count")
BEST_VAL_ROUND = Metric("best_val_round", (*FINAL, "best_val_round"), None,
                        "the round with the best validation accuracy", "count")
WALL_SECONDS = Metric("wall_seconds", ("timing", "total_seconds"), False,
                      "wall-clock seconds of the whole run (depends on the machine)", "seconds")

BUILTIN_METRICS: dict[str, Metric] = {m.name: m for m in [
    GLOBAL_ACC,
    GLOBAL_ACC.at_best_val("global-model test accuracy at the round with the best validation accuracy"),
    HELDOUT_ACC_MEAN,
    HELDOUT_ACC_MEAN.at_best_val("held-out domain accuracy at the best-validation round"),
    CLIENT_ACC_MEAN,
    CLIENT_ACC_MEAN.at_best_val("mean client test accuracy at the best-validation round"),
    CLIENT_ACC_WEIGHTED,
    CLIENT_ACC_WORST,
    CLASS_ACC_WORST,
    CLASS_ACC_STD,
    MODALITY_ACC_WORST,
    GLOBAL_LOSS,
    UP_BYTES,
    DOWN_BYTES,
    TRAINABLE_PARAMS,
    ROUNDS_RUN,
    BEST_VAL_ROUND,
    WALL_SECONDS,
]}

for _m in BUILTIN_METRICS.values():
    register_metric(_m.name, description=_m.description)(_m)
