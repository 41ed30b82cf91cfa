"""CIFAR-10 and ``cifar10-dirichlet``: CIFAR-10 split over clients by Dirichlet label skew (the
NIID-Bench protocol of ``fedbench.tasks.label_skew``).

CIFAR-10 is read from the official python-pickle folder, a datasets.save_to_disk folder, or the
Hugging Face hub.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbench.core.registry import register_task
from fedbench.data.dataset import FederatedDataset, Task, TaskCard
from fedbench.data.sources import RawImages, hf_column, import_datasets
from fedbench.errors import DataError
from fedbench.tasks.label_skew import (
    NIID_BENCH,
    NIID_BENCH_TRAINING,
    NOT_TRANSCRIBED,
    LabelSkewOptions,
    build_label_skew,
    check_options,
)

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR10_PROMPT = "a photo of a {}."
# NIID-Bench's CIFAR-10 normalisation (per-channel mean and std of the train set, /255).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
_CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_HOWTO = (
    "Give the official python version of CIFAR-10 (the folder cifar-10-batches-py from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) with --set data_dir=PATH, or a "
    "datasets.save_to_disk folder, or run where the Hugging Face hub is reachable "
    "(--set hf_dataset=ID, default uoft-cs/cifar10)."
)
_CIFAR_NEEDS_DATASETS = "reading CIFAR-10 from the Hugging Face hub or a datasets folder"


@dataclass
class Cifar10Options(LabelSkewOptions):
    hf_dataset: str = "uoft-cs/cifar10"  # read when data_dir is empty


def load_cifar10(data_dir: str = "", hf_dataset: str = "uoft-cs/cifar10") -> RawImages:
    """CIFAR-10's official 50,000/10,000 split as uint8 [N,3,32,32]."""
    if not data_dir:
        return _cifar_from_hub(hf_dataset)
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data_dir {folder} is not a folder. {_CIFAR_HOWTO}")
    if (folder / "dataset_dict.json").is_file():
        return _cifar_from_disk(folder)
    if (folder / "state.json").is_file():
        raise DataError(
            f"data_dir {folder} is a datasets.save_to_disk folder of a single split; CIFAR-10 needs "
            f"a DatasetDict with 'train' and 'test' splits (save the whole DatasetDict)."
        )
    if (folder / "cifar-10-batches-py").is_dir():  # the folder the official tarball unpacks into
        folder = folder / "cifar-10-batches-py"
    return _cifar_from_pickles(folder)


def _cifar_from_pickles(folder: Path) -> RawImages:
    missing = [name for name in [*_CIFAR_BATCHES, "test_batch"] if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"data_dir {folder} is not the official cifar-10-batches-py folder: missing "
            f"{', '.join(missing)}. {_CIFAR_HOWTO}"
        )
    train = [_read_cifar_batch(folder / name) for name in _CIFAR_BATCHES]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    class_names = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        meta = _unpickle(folder / "batches.meta")
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or len(names) != 10:
            raise DataError(f"{folder / 'batches.meta'} has no list of 10 label_names. {_CIFAR_HOWTO}")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return RawImages(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=test_x,
        test_y=test_y,
        class_names=class_names,
        source=f"CIFAR-10 official python pickle batches (folder {folder.name})",
    )


def _unpickle(path: Path) -> Any:
    # The official CIFAR-10 python version is a set of pickles, so this reads the official format;
    # it is only ever called on files in the folder the user named with data_dir (unpickling
    # runs code, so never point it at files of unknown origin), never on anything downloaded.
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise DataError(
            f"{path} is not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc}). {_CIFAR_HOWTO}"
        ) from exc


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise DataError(f"{path} has no b'data' and b'labels' entries. {_CIFAR_HOWTO}")
    x = np.asarray(data)
    y = np.asarray(labels, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DataError(
            f"{path}: data is {x.dtype} {x.shape} with {len(y)} labels; expected uint8 [N,3072] "
            f"with N labels. {_CIFAR_HOWTO}"
        )
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 0..9. {_CIFAR_HOWTO}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major: that is [3,32,32].
    return x.reshape(-1, 3, 32, 32), y


def _cifar_from_disk(folder: Path) -> RawImages:
    datasets = import_datasets(_CIFAR_HOWTO, reading=_CIFAR_NEEDS_DATASETS)
    try:
        dd = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(
            f"cannot read the datasets folder {folder} ({type(exc).__name__}: {exc}). {_CIFAR_HOWTO}"
        ) from exc
    return _cifar_from_dataset_dict(dd, f"CIFAR-10 from a datasets.save_to_disk folder ({folder.name})")


def _cifar_from_hub(hf_dataset: str) -> RawImages:
    datasets = import_datasets(_CIFAR_HOWTO, reading=_CIFAR_NEEDS_DATASETS)
    # Offline behaviour follows the caller's HF_HUB_OFFLINE / HF_DATASETS_OFFLINE settings.
    try:
        dd = datasets.load_dataset(hf_dataset)
    except Exception as exc:
        raise DataError(
            f"could not load the Hugging Face dataset {hf_dataset!r} ({type(exc).__name__}: {exc}). "
            f"{_CIFAR_HOWTO}"
        ) from exc
    return _cifar_from_dataset_dict(dd, f"Hugging Face dataset {hf_dataset}")


def _cifar_from_dataset_dict(dd: Any, source: str) -> RawImages:
    splits = {}
    for split in ("train", "test"):
        if split not in dd:
            raise DataError(f"{source} has no {split!r} split (it has {', '.join(dd)}). {_CIFAR_HOWTO}")
        splits[split] = _dataset_arrays(dd[split], f"{source}, split {split!r}")
    label_feature = dd["train"].features.get(hf_column(dd["train"], ("label", "labels"), source, _CIFAR_HOWTO))
    names = getattr(label_feature, "names", None)
    class_names = list(names) if names and len(names) == 10 else list(CIFAR10_CLASSES)
    return RawImages(
        train_x=splits["train"][0],
        train_y=splits["train"][1],
        test_x=splits["test"][0],
        test_y=splits["test"][1],
        class_names=class_names,
        source=source,
    )


def _dataset_arrays(ds: Any, where: str, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    image_col = hf_column(ds, ("img", "image"), where, _CIFAR_HOWTO)
    label_col = hf_column(ds, ("label", "labels"), where, _CIFAR_HOWTO)
    # The numpy format decodes images into [B,H,W,C] uint8 arrays, one chunk at a time.
    fmt = ds.with_format("numpy", columns=[image_col, label_col])
    xs, ys = [], []
    for start in range(0, len(ds), chunk):
        batch = fmt[start : start + chunk]
        x = np.asarray(batch[image_col])
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3):
            raise DataError(
                f"{where}: images decode to {x.dtype} {x.shape[1:]}, expected 32x32 RGB uint8. {_CIFAR_HOWTO}"
            )
        xs.append(x.transpose(0, 3, 1, 2))
        ys.append(np.asarray(batch[label_col], dtype=np.int64))
    if not xs:
        raise DataError(f"{where} is empty. {_CIFAR_HOWTO}")
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


@register_task(
    "cifar10-dirichlet",
    description="CIFAR-10 over clients with Dirichlet label skew (NIID-Bench protocol)",
    fidelity="protocol",
    source=NIID_BENCH,
)
class Cifar10Dirichlet(Task):
    """CIFAR-10 split over clients by Dirichlet(alpha) label skew, the NIID-Bench protocol."""

    Options = Cifar10Options
    check_options = staticmethod(check_options)  # cross-field checks, run when the spec resolves
    default_rounds = 50
    card = TaskCard(
        classes=", ".join(CIFAR10_CLASSES),
        domains="none (label skew only)",
        prompt_template=CIFAR10_PROMPT,
        source=(
            "CIFAR-10 (Krizhevsky 2009): the official 50,000 train / 10,000 test 32x32 colour "
            "images, from the official python pickle folder (--set data_dir=PATH), a "
            "datasets.save_to_disk folder, or the Hugging Face dataset uoft-cs/cifar10."
        ),
        licence="CIFAR-10: no licence stated by its authors; free to use for research.",
        protocol=(
            "NIID-Bench noniid-labeldir: Dirichlet(alpha=0.5) label skew over 10 clients, redrawn "
            "until every client holds >= 10 samples. Adaptation: 10% of each client's share is "
            "its validation split (val_fraction=0 restores NIID-Bench), and each client's test "
            "split is the official test set divided to follow its label mix; the global test set "
            "is the official test set. Pixel models: NIID-Bench's normalisation (mean "
            "[125.3,123.0,113.9]/255, std [63.0,62.1,66.7]/255) and train augmentation (pad 4, "
            "random 32x32 crop, horizontal flip). " + NIID_BENCH_TRAINING
        ),
        published=NOT_TRANSCRIBED,
    )

    def load(self, options: Cifar10Options, seed: int) -> FederatedDataset:
        check_options(options, seed)
        raw = load_cifar10(options.data_dir, options.hf_dataset)
        return build_label_skew(
            raw,
            options,
            seed,
            prompt_template=CIFAR10_PROMPT,
            pixel_mean=CIFAR10_MEAN,
            pixel_std=CIFAR10_STD,
            train_augment="crop-flip",
        )
