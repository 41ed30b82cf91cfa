"""What a task hands the engine: one pool of examples and, per client, index lists into it.

Keeping one pool (instead of a copy per client) means a frozen backbone encodes every image
exactly once (see ``fedbench.models.cache``), and the data fingerprint is one hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from fedbench.data.pool import pixels_fingerprint


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split. ``x`` is uint8 pixels [N,C,H,W] or float features [N,D]."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class ClientIndices:
    """One client's share of the pool, as indices (int64) into ``FederatedDataset.images``."""

    train: Tensor
    val: Tensor
    test: Tensor
    domain: str | None = None


@dataclass(frozen=True)
class ClientData:
    """What one client holds. A client update sees only this object of its own client."""

    client_id: int
    train: Split
    val: Split
    test: Split
    domain: str | None = None


@dataclass
class FederatedDataset:
    """A task's data after partitioning, ready for the engine.

    ``global_test`` is the pooled test set the global model is scored on (the official test set
    where the task has one). ``heldout`` maps each held-out domain to the indices tested whole
    with the server model (leave-one-domain-out protocols).
    """

    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]
    class_names: list[str]
    clients: list[ClientIndices]
    global_test: Tensor
    prompt_template: str = "a photo of a {}."
    heldout: dict[str, Tensor] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    source: str = ""
    # Pixel normalisation for models trained from pixels (None: x/255 only, as torchvision ToTensor).
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    # Train-time augmentation for pixel models ("crop-flip": pad 4 + random crop + h-flip), or None.
    train_augment: str | None = None
    partition_stats: dict[str, Any] = field(default_factory=dict)
    # Further modalities of the same samples, row-aligned with ``images`` (uint8, same layout), by
    # name: e.g. {"glimpse": a degraded copy}. Empty for one-modality tasks. Methods that take one
    # input see ``images``; a method whose ``uses_views`` is true sees every modality.
    views: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prompts(self) -> list[str]:
        return [self.prompt_template.format(name) for name in self.class_names]

    @property
    def modalities(self) -> tuple[str, ...]:
        """``("image", *views)``: the order a multi-modal method's inputs are stacked in."""
        return ("image", *self.views)

    def fingerprint(self) -> str:
        """Hash of the pool (pixels and labels) and of every split: same data, same partition."""
        h = hashlib.sha256()
        h.update(pixels_fingerprint(self.images).encode())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        for c in self.clients:
            for idx in (c.train, c.val, c.test):
                h.update(idx.numpy().astype(np.int64).tobytes())
                h.update(b"|")
        h.update(self.global_test.numpy().astype(np.int64).tobytes())
        for name in sorted(self.heldout):
            h.update(name.encode())
            h.update(self.heldout[name].numpy().astype(np.int64).tobytes())
        for name in sorted(self.views):  # none on one-modality tasks: their fingerprints are unchanged
            h.update(b"view:" + name.encode())
            h.update(pixels_fingerprint(self.views[name]).encode())
        return h.hexdigest()[:16]

    def client_data(self, inputs: Tensor) -> list[ClientData]:
        """Materialise each client's splits from ``inputs`` (pixels or cached features, row-aligned)."""
        labels = self.labels.to(inputs.device)
        out = []
        for cid, c in enumerate(self.clients):
            out.append(
                ClientData(
                    client_id=cid,
                    train=Split(inputs[c.train], labels[c.train]),
                    val=Split(inputs[c.val], labels[c.val]),
                    test=Split(inputs[c.test], labels[c.test]),
                    domain=c.domain,
                )
            )
        return out


@dataclass(frozen=True)
class TaskCard:
    """What a reader needs to trust a task: where its data came from and what others measured."""

    classes: str
    domains: str
    prompt_template: str
    source: str
    licence: str
    protocol: str
    # Published reference numbers: {"method name": {"metric or domain": value, ...}, "_source": ...}
    published: dict[str, Any] = field(default_factory=dict)


class Task:
    """A registered task: an options dataclass (every protocol choice) and a ``load`` function.

    Subclasses set ``Options`` (a dataclass whose fields are ``--set`` keys with their defaults,
    numeric ones declared with :func:`fedbench.core.options.bounded`), ``card``,
    ``default_rounds``, and implement ``load``. Checks across fields go in an optional
    ``check_options(options, seed)`` staticmethod, which ``resolve_spec`` runs before any data
    is read.
    """

    Options: ClassVar[type]
    card: ClassVar[TaskCard]
    default_rounds: ClassVar[int] = 10
    # A task whose client count is fixed by its protocol (one client per domain) sets this False.
    clients_configurable: ClassVar[bool] = True
    # The backbone a CLIP-style method uses on this task when --backbone is not given
    # (None: fedbench's offline default).
    default_backbone: ClassVar[str | None] = None
    # The modalities each sample carries (what ``FederatedDataset.modalities`` will say), known
    # before any data is read so that a method can refuse a task that lacks what it needs.
    modalities: ClassVar[tuple[str, ...]] = ("image",)

    def load(self, options: Any, seed: int) -> FederatedDataset:
        raise NotImplementedError
