"""Scoring one round: the global model where there is one, each client's personalised model
where it has one, held-out domains with the global model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedbench.data.dataset import FederatedDataset
from fedbench.federation.method import Method, Payload


def rounded(x: float | None) -> float | None:
    """Six decimals in records; NaN (nothing to score) and infinities (JSON has none) are stored as None."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass
class Evaluator:
    """Scores models on every split, predicting each example at most once per model per round.

    ``method`` is the client-side method object: models are run where they would be deployed.
    """

    dataset: FederatedDataset
    inputs: Tensor
    method: Method

    def __post_init__(self) -> None:
        ds = self.dataset
        self.labels = ds.labels.to(self.inputs.device)
        self.val_idx = torch.cat([c.val for c in ds.clients])
        parts = [ds.global_test, self.val_idx, *[c.test for c in ds.clients], *ds.heldout.values()]
        self.eval_idx = torch.unique(torch.cat(parts))
        self.pos = torch.full((len(ds.labels),), -1, dtype=torch.int64)
        self.pos[self.eval_idx] = torch.arange(len(self.eval_idx))

    def _scores(self, logits: Tensor, pos: Tensor, idx: Tensor) -> tuple[float, float]:
        if len(idx) == 0:
            return float("nan"), float("nan")
        lg, y = logits[pos[idx]], self.labels[idx]
        return (lg.argmax(1) == y).double().mean().item(), F.cross_entropy(lg.float(), y).item()

    def _class_scores(self, logits: Tensor) -> dict[str, Any]:
        """Each class's accuracy on the pooled test set, its worst and its spread (population std
        over the classes present): the fairness a class-balanced method aims at."""
        idx = self.dataset.global_test
        if len(idx) == 0:
            return {}
        y = self.labels[idx]
        hit = (logits[self.pos[idx]].argmax(1) == y).double()
        counts = torch.bincount(y, minlength=self.dataset.num_classes).double()
        acc = torch.bincount(y, weights=hit, minlength=self.dataset.num_classes) / counts.clamp(min=1)
        present = acc[counts > 0]
        per_class = zip(acc.tolist(), counts.tolist(), strict=True)
        return {"class_acc": [rounded(a) if n > 0 else None for a, n in per_class],
                "class_acc_worst": rounded(present.min().item()),
                "class_acc_std": rounded(present.std(unbiased=False).item())}

    def _modality_scores(self, model: Payload) -> dict[str, Any]:
        """The global model's pooled-test accuracy from each modality alone, where the method can say."""
        idx = self.dataset.global_test
        per_modality = self.method.modality_logits(model, self.inputs[idx]) if len(idx) else {}
        if not per_modality:
            return {}
        y = self.labels[idx]
        acc = {name: rounded((lg.argmax(1) == y).double().mean().item()) for name, lg in per_modality.items()}
        return {"modality_acc": acc, "modality_acc_worst": min(acc.values())}

    def __call__(self, global_model: Payload | None, client_states: dict[int, Payload]) -> dict[str, Any]:
        ds, m = self.dataset, self.method
        out: dict[str, Any] = {}
        global_logits = None
        if global_model is not None:
            global_logits = m.predict(global_model, self.inputs[self.eval_idx])
            out["global_acc"], out["global_loss"] = map(rounded, self._scores(global_logits, self.pos, ds.global_test))
            out["val_acc"] = rounded(self._scores(global_logits, self.pos, self.val_idx)[0])
            out.update(self._class_scores(global_logits))
            out.update(self._modality_scores(global_model))
            if ds.heldout:
                held = {d: rounded(self._scores(global_logits, self.pos, i)[0]) for d, i in sorted(ds.heldout.items())}
                out["heldout_acc"] = held
                out["heldout_acc_mean"] = rounded(float(np.mean(list(held.values()))))
        accs, sizes, val_correct, val_total = [], [], 0.0, 0
        for cid, c in enumerate(ds.clients):
            own = m.personal_model(client_states.get(cid), global_model)
            if own is not None:  # personalised model: score on its own client's splits only
                idx = torch.cat([c.val, c.test])
                logits = m.predict(own, self.inputs[idx])
                pos = torch.full((len(ds.labels),), -1, dtype=torch.int64)
                pos[idx] = torch.arange(len(idx))
            elif global_logits is not None:
                logits, pos = global_logits, self.pos
            else:
                continue  # a client never trained has no model of its own
            accs.append(self._scores(logits, pos, c.test)[0])
            sizes.append(len(c.test))
            if len(c.val):
                val_correct += self._scores(logits, pos, c.val)[0] * len(c.val)
                val_total += len(c.val)
        if accs:
            a, w = np.array(accs), np.array(sizes, dtype=np.float64)
            out["client_acc_mean"] = rounded(float(np.nanmean(a)))
            out["client_acc_weighted"] = rounded(float(np.nansum(a * w) / w.sum()))
            out["client_acc_worst"] = rounded(float(np.nanmin(a)))
            out["client_acc"] = [rounded(x) for x in accs]
        if global_model is None and val_total:
            out["val_acc"] = rounded(val_correct / val_total)
        return out
