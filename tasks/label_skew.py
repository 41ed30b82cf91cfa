"""The label-skew protocol (NIID-Bench style): a dataset's official train set split over clients
by Dirichlet(alpha) label skew, its official test set the global test set.

Protocol (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental Study",
ICDE 2022; partition ``noniid-labeldir``): the official train set is split over ``clients``
clients with Dirichlet(``alpha``) label skew (``fedbench.data.partition.dirichlet_label_skew``); the
official test set is the global test set. On top of NIID-Bench we give every client a
validation split (``val_fraction`` of its share; 0 restores NIID-Bench exactly) and a test split
(the official test set divided so each client's test labels follow its train labels), so
per-client and best-round metrics can be reported.

The pool handed to the engine is the train pool followed by the test set, so every image is
stored (and encoded by a frozen backbone) once. The tasks that use it: ``mnist-dirichlet``
(``fedbench.tasks.mnist``) and ``cifar10-dirichlet`` (``fedbench.tasks.cifar``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedbench.core.options import bounded
from fedbench.data import partition
from fedbench.data.dataset import ClientIndices, FederatedDataset
from fedbench.data.sources import RawImages, stream_rng, subsample
from fedbench.errors import DataError, SpecError

PARTITIONS = ("dirichlet", "iid", "quantity")

# Each use of randomness gets its own generator, np.random.default_rng([seed, STREAM]), so that
# changing one option (say val_fraction) does not reshuffle what another option decided.
_STREAM_TRAIN_SUBSAMPLE = 1
_STREAM_TEST_SUBSAMPLE = 2
_STREAM_PARTITION = 3
_STREAM_VAL = 4
_STREAM_CLIENT_TEST = 5

NIID_BENCH = "Li et al., Federated Learning on Non-IID Data Silos (ICDE 2022), arXiv 2102.02079"
NIID_BENCH_TRAINING = (
    "NIID-Bench training defaults: all clients every round, batch 64, SGD lr 0.01 momentum 0.9, "
    "10 local epochs, 50 rounds, seeds 0..2."
)
NOT_TRANSCRIBED = {
    "_source": "NIID-Bench Table 3 (simple-cnn, 10 parties, Dir(0.5)) reports FedAvg, FedProx, "
    "SCAFFOLD and FedNova on this setting; the numbers are not copied here until checked "
    "against the paper."
}


@dataclass
class LabelSkewOptions:
    """Options of the label-skew tasks (each field is a ``--set key=value``)."""

    clients: int = bounded(10, ge=1)
    alpha: float = bounded(0.5, gt=0)  # Dirichlet concentration: 0.1 strong skew, 0.5 NIID-Bench default
    partition: str = "dirichlet"  # dirichlet | iid | quantity (NIID-Bench iid-diff-quantity)
    min_samples: int = bounded(10, ge=0)  # redraw the partition until every client holds this many
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # of each client's share, held out for validation
    max_train: int = bounded(0, ge=0)  # 0 = all; else a seeded subsample of the train set, before partitioning
    max_test: int = bounded(0, ge=0)  # 0 = all; else a seeded subsample of the test set
    data_dir: str = ""  # a local copy in the dataset's official layout


# --------------------------------------------------------------------------------------------
# The protocol: subsample, partition, carve validation, match test labels.
# --------------------------------------------------------------------------------------------


def check_options(options: LabelSkewOptions, seed: int) -> None:
    """Reject impossible options before any data is read."""
    if options.partition not in PARTITIONS:
        raise SpecError(f"partition must be one of {', '.join(PARTITIONS)}, got {options.partition!r}.")
    if options.clients < 1:
        raise SpecError(f"clients must be >= 1, got {options.clients}.")
    if options.partition != "iid" and not options.alpha > 0:
        raise SpecError(f"alpha must be > 0 (e.g. 0.1 or 0.5), got {options.alpha}.")
    if not 0 <= options.val_fraction < 1:
        raise SpecError(f"val_fraction must be in [0, 1), got {options.val_fraction}.")
    for key in ("min_samples", "max_train", "max_test"):
        if getattr(options, key) < 0:
            raise SpecError(f"{key} must be >= 0, got {getattr(options, key)}.")
    if seed < 0:
        raise SpecError(f"seed must be >= 0, got {seed}.")


def _partition(labels: np.ndarray, options: LabelSkewOptions, seed: int) -> list[np.ndarray]:
    rng = stream_rng(seed, _STREAM_PARTITION)
    n = len(labels)
    if options.partition == "dirichlet":
        return partition.dirichlet_label_skew(
            labels, options.clients, options.alpha, rng, min_samples=options.min_samples
        )
    if options.partition == "quantity":
        return partition.quantity_skew(
            n, options.clients, options.alpha, rng, min_samples=options.min_samples
        )
    parts = partition.iid(n, options.clients, rng)
    if min(len(p) for p in parts) < options.min_samples:
        raise DataError(
            f"an IID split of {n} samples over {options.clients} clients gives some client fewer "
            f"than min_samples={options.min_samples}. Use fewer clients or more data."
        )
    return parts


def build_label_skew(
    raw: RawImages,
    options: LabelSkewOptions,
    seed: int,
    *,
    prompt_template: str,
    pixel_mean: tuple[float, ...] | None = None,
    pixel_std: tuple[float, ...] | None = None,
    train_augment: str | None = None,
) -> FederatedDataset:
    """Apply the label-skew protocol to a dataset's official train/test sets."""
    check_options(options, seed)
    num_classes = len(raw.class_names)
    keep_train = subsample(len(raw.train_y), options.max_train, stream_rng(seed, _STREAM_TRAIN_SUBSAMPLE))
    keep_test = subsample(len(raw.test_y), options.max_test, stream_rng(seed, _STREAM_TEST_SUBSAMPLE))
    train_y, test_y = raw.train_y[keep_train], raw.test_y[keep_test]
    n_train = len(train_y)

    parts = _partition(train_y, options, seed)

    # Validation is carved from each client's own share: a client never sees another's data.
    val_rng = stream_rng(seed, _STREAM_VAL)
    train_val = [
        partition.split_fractions(p, [1.0 - options.val_fraction, options.val_fraction], val_rng)
        for p in parts
    ]

    # Each client's test follows its whole share's label mix (train + val), so the test split
    # does not move when val_fraction does.
    client_tests = partition.match_label_distribution(
        test_y, [train_y[p] for p in parts], num_classes, stream_rng(seed, _STREAM_CLIENT_TEST)
    )

    def as_index(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.sort(a).astype(np.int64))

    clients = [
        ClientIndices(train=as_index(tr), val=as_index(va), test=as_index(te + n_train))
        for (tr, va), te in zip(train_val, client_tests, strict=True)
    ]
    images = np.concatenate([raw.train_x[keep_train], raw.test_x[keep_test]])
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    stats: dict[str, Any] = {
        "partition": options.partition,
        "alpha": options.alpha if options.partition != "iid" else None,
        "sizes": [len(p) for p in parts],
        "class_histograms": partition.class_histograms(train_y, parts, num_classes),
        "split_sizes": [
            {"train": len(tr), "val": len(va), "test": len(te)}
            for (tr, va), te in zip(train_val, client_tests, strict=True)
        ],
        "test_class_histograms": partition.class_histograms(test_y, client_tests, num_classes),
    }
    return FederatedDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        class_names=list(raw.class_names),
        clients=clients,
        global_test=torch.arange(n_train, n_train + len(test_y), dtype=torch.int64),
        prompt_template=prompt_template,
        source=raw.source,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        train_augment=train_augment,
        partition_stats=stats,
    )

