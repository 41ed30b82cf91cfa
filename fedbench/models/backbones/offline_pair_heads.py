"""How the offline pair joins its image tower to its text space without image-text pairs.

Both heads are fitted from what the towers already know (the ImageNet classifier rows and the
text embeddings of the class prompts): see :class:`~fedbench.models.backbones.offline_pair.OfflinePairBackbone`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SoftLabelBridge(nn.Module):
    """``softmax(classifier(f) / tau) @ class_text``: an image lands on the text embeddings of
    the ImageNet classes it looks like, weighted by the classifier's belief."""

    def __init__(self, classifier: nn.Linear, class_text: Tensor, tau: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("class_text", class_text)
        self.tau = tau

    def forward(self, features: Tensor) -> Tensor:
        return torch.softmax(self.classifier(features) / self.tau, dim=-1) @ self.class_text


class RidgeProjection(nn.Module):
    """A linear map 1280 -> 384 fitted in closed form (no images): see ``fit_ridge``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight.T)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features)


class OfflineImageTower(nn.Module):
    """EfficientNet-Lite0 trunk (pooled 1280-d features) followed by the joining head."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, pixels: Tensor) -> Tensor:
        # channels_last: oneDNN's depthwise convolutions run ~1.4x faster on CPU in this layout.
        return self.head(self.trunk(pixels.contiguous(memory_format=torch.channels_last)))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``stem``, one stage per block stack (``blocks0``...), ``neck`` (1280-d pooled), ``join``.

        Written after timm's ``EfficientNet.forward_features`` / ``forward_head`` (timm 1.0):
        conv_stem, bn1, blocks, conv_head, bn2 (BatchNormAct2d: BN + ReLU6), global_pool (flattens),
        dropout when ``drop_rate`` > 0, classifier (Identity once reset). The modules are the
        trunk's own, so a deep copy of the list copies them together."""
        t = self.trunk
        blocks = [(f"blocks{i}", block) for i, block in enumerate(t.blocks)]
        return [("stem", _Stem(t)), *blocks, ("neck", _Neck(t)), ("join", self.head)]


class _Stem(nn.Module):
    """channels_last (as :class:`OfflineImageTower` does), conv_stem, bn1."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = trunk.conv_stem, trunk.bn1

    def forward(self, pixels: Tensor) -> Tensor:
        return self.bn1(self.conv_stem(pixels.contiguous(memory_format=torch.channels_last)))


class _Neck(nn.Module):
    """conv_head, bn2, then timm's ``forward_head`` (global pool, dropout, classifier)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.conv_head, self.bn2 = trunk.conv_head, trunk.bn2
        self.global_pool, self.classifier = trunk.global_pool, trunk.classifier
        self.drop_rate = float(getattr(trunk, "drop_rate", 0.0))

    def forward(self, x: Tensor) -> Tensor:
        x = self.global_pool(self.bn2(self.conv_head(x)))
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)


def fit_ridge(classifier_weight: Tensor, class_text: Tensor, lam: float, center: bool = True) -> Tensor:
    """W [1280, 384] = argmin ||C W - T||^2 + lam ||W||^2 in closed form.

    C holds the ImageNet classifier rows, T the unit text embeddings of the class prompts, so
    each class's weight row is mapped onto its name's embedding. ``center`` subtracts the mean
    row from C and T first: the prompt embeddings share a large common part (their mean row has
    norm 0.59 for unit rows: every prompt says "a photo of a ...") while the classifier rows
    nearly cancel (mean row norm 0.01 vs 2.3), so uncentred ridge spends its fit on a direction
    no image carries. Centring gains 10-20 points of top-1 (see OfflinePairBackbone).
    """
    c, t = classifier_weight.double(), class_text.double()
    if center:
        c, t = c - c.mean(0), t - t.mean(0)
    gram = c.T @ c + lam * torch.eye(c.shape[1], dtype=c.dtype)
    return torch.linalg.solve(gram, c.T @ t).float()
