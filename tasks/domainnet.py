"""``domainnet``: DomainNet (Peng et al. 2019) as federated by FedBN (Li et al. 2021, arXiv
2102.07623): a class subset, one client per domain, the official train/test lists, optionally
one domain held out.

DomainNet is read from a local folder in the official layout or from a Hugging Face dataset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedbench.core.options import bounded
from fedbench.core.registry import register_task
from fedbench.data import partition
from fedbench.data.dataset import ClientIndices, FederatedDataset, Task, TaskCard
from fedbench.data.sources import (
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
from fedbench.errors import DataError, SpecError
from fedbench.tasks.domain_shift import (
    STREAM_SUBSAMPLE,
    STREAM_VAL,
    check_image_size,
    check_nonnegative,
    index_tensor,
    pick_domain,
)

DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
# FedBN's 10-class subset (its released code's class list, in its label order).
FEDBN_CLASSES = ["bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                 "wine_glass", "zebra"]  # fmt: skip
DOMAINNET_PROMPT = "a photo of a {}."
FEDBN = "Li et al., FedBN (ICLR 2021), arXiv 2102.07623"
_DOMAINNET_HOWTO = (
    "Give the official DomainNet layout with --set data_dir=PATH: PATH/<domain>/<class>/*.jpg plus "
    "PATH/<domain>_train.txt and PATH/<domain>_test.txt, one 'relative/path.jpg label' per line "
    "(domains clipart, infograph, painting, quickdraw, real, sketch; --set domains=... for fewer), "
    "or a Hugging Face dataset with --set hf_dataset=ID (splits train and test; columns image, "
    "label, domain)."
)


@dataclass
class DomainNetOptions:
    """Options of ``domainnet`` (each field is a ``--set key=value``)."""

    classes: str = "fedbn10"  # fedbn10 | all | a comma list of class folder names
    domains: str = "all"  # all | a comma list of domains (one client each)
    heldout: str = ""  # '' = no held-out domain; else that domain is tested whole
    val_fraction: float = bounded(0.2, ge=0, lt=1)  # of each client's official train list
    image_size: int = bounded(224, ge=8, le=1024)
    max_per_domain: int = bounded(0, ge=0)  # 0 = all; else a seeded subsample per domain (train and test lists alike)
    data_dir: str = ""
    hf_dataset: str = ""

    def __post_init__(self) -> None:
        self.classes = self.classes.strip()
        if self.classes.lower() in ("fedbn10", "all"):
            self.classes = self.classes.lower()
        else:
            # Folder names use '_' ("ice_cream"); accept the spaced spelling too.
            names = [c.strip().replace(" ", "_") for c in self.classes.split(",") if c.strip()]
            if not names or len(set(names)) != len(names):
                raise SpecError(f"classes={self.classes!r}: expected fedbn10, all, or a comma list of "
                                f"distinct class folder names (e.g. bird,teapot,zebra).")
            self.classes = ",".join(names)
        if self.domains.strip().lower() == "all":
            self.domains = "all"
        else:
            picked = [pick_domain(d, DOMAINNET_DOMAINS, {}, False, "domains") for d in self.domains.split(",")]
            if len(set(picked)) != len(picked):
                raise SpecError(f"domains={self.domains!r}: a domain is listed twice.")
            self.domains = ",".join(d for d in DOMAINNET_DOMAINS if d in picked)  # canonical order
        self.heldout = pick_domain(self.heldout, self.domain_list(), {}, allow_none=True)
        if not 0 <= self.val_fraction < 1:
            raise SpecError(f"val_fraction={self.val_fraction}: must be in [0, 1).")
        check_image_size(self.image_size)
        check_nonnegative("max_per_domain", self.max_per_domain)
        if self.data_dir and self.hf_dataset:
            raise SpecError("give either data_dir or hf_dataset, not both.")

    def domain_list(self) -> list[str]:
        return list(DOMAINNET_DOMAINS) if self.domains == "all" else self.domains.split(",")


@dataclass
class DomainNetEntries:
    """The official lists of the chosen domains, before decoding: per entry domain, split
    ('train'/'test'), class folder name, official label, and where it came from (for errors)."""

    domain: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    class_name: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # "clipart_train.txt line 12" or "train row 12"
    read: Callable[[np.ndarray], Iterable[np.ndarray]] | None = None  # entry numbers -> RGB arrays
    key: tuple = ()  # identifies the source for the in-memory pool cache
    source: str = ""

    def add(self, domain: str, split: str, class_name: str, label: int, where: str) -> None:
        self.domain.append(domain)
        self.split.append(split)
        self.class_name.append(class_name)
        self.label.append(label)
        self.where.append(where)


_LINE = re.compile(r"^(\S+)\s+(-?\d+)$")


def domainnet_folder_entries(root: Path, domains: Sequence[str]) -> DomainNetEntries:
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a folder. {_DOMAINNET_HOWTO}")
    e = DomainNetEntries()
    paths: list[Path] = []
    for d in domains:
        for split in ("train", "test"):
            list_file = root / f"{d}_{split}.txt"
            if not list_file.is_file():
                raise DataError(f"{root.name}/{list_file.name} is missing. {_DOMAINNET_HOWTO}")
            with open(list_file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    m = _LINE.match(line.strip())
                    rel = Path(m.group(1)) if m else None
                    if m is None or len(rel.parts) < 2:
                        raise DataError(
                            f"{list_file.name} line {lineno}: {line.strip()[:120]!r} is not "
                            f"'<domain>/<class>/<file> <label>'. Fix the line or re-download the "
                            f"official list. {_DOMAINNET_HOWTO}")
                    e.add(d, split, rel.parts[-2], int(m.group(2)), f"{list_file.name} line {lineno}")
                    paths.append(root / rel)

    def read(rows: np.ndarray) -> Iterable[np.ndarray]:
        for i in rows:
            if not paths[i].is_file():
                raise DataError(f"{e.where[i]} names {paths[i].relative_to(root)}, which is not in "
                                f"{root.name}. Unpack every domain's archive into data_dir. {_DOMAINNET_HOWTO}")
            yield read_image_file(paths[i], f"{paths[i].relative_to(root)} ({e.where[i]})")

    e.read, e.key = read, ("folder", str(root.resolve()), tuple(domains), len(paths))
    e.source = f"DomainNet from a local folder in the official layout ({root.name})"
    return e


def domainnet_hub_entries(hf_dataset: str, domains: Sequence[str]) -> DomainNetEntries:
    datasets = import_datasets(_DOMAINNET_HOWTO)
    try:
        dd = datasets.load_dataset(hf_dataset)
    except Exception as exc:
        raise DataError(f"could not load the Hugging Face dataset {hf_dataset!r} "
                        f"({type(exc).__name__}: {exc}). {_DOMAINNET_HOWTO}") from exc
    e = DomainNetEntries()
    where_rows: list[tuple[str, int]] = []
    image_cols = {}
    for split in ("train", "test"):
        if split not in dd:
            raise DataError(f"{hf_dataset} has no {split!r} split (it has {', '.join(dd)}). {_DOMAINNET_HOWTO}")
        ds, where = dd[split], f"Hugging Face dataset {hf_dataset}, split {split!r}"
        image_cols[split] = hf_column(ds, ("image", "img"), where, _DOMAINNET_HOWTO)
        domain_col = hf_column(ds, ("domain",), where, _DOMAINNET_HOWTO)
        label_col = hf_column(ds, ("label", "labels"), where, _DOMAINNET_HOWTO)
        meta = ds.select_columns([domain_col, label_col])[:]
        doms = hf_value_names(ds, domain_col, list(meta[domain_col]))
        names = getattr(ds.features.get(label_col), "names", None)
        if not names:
            raise DataError(f"{where}: column {label_col!r} has no class names (a ClassLabel feature is "
                            f"needed to pick classes by name). {_DOMAINNET_HOWTO}")
        for row, (d, y) in enumerate(zip(doms, meta[label_col], strict=True)):
            if d.lower() in domains:
                e.add(d.lower(), split, str(names[int(y)]), int(y), f"{split} row {row}")
                where_rows.append((split, row))

    def read(rows: np.ndarray) -> Iterable[np.ndarray]:
        # The pool lists each domain's train entries, then its test entries: one select per run
        # of consecutive entries from the same split keeps the pool's order.
        start = 0
        while start < len(rows):
            split = where_rows[rows[start]][0]
            stop = start
            while stop < len(rows) and where_rows[rows[stop]][0] == split:
                stop += 1
            hub_rows = np.array([where_rows[i][1] for i in rows[start:stop]])
            yield from hf_images(dd[split], hub_rows, image_cols[split], f"{hf_dataset} {split}")
            start = stop

    e.read = read
    e.key = ("hub", hf_dataset, tuple(getattr(dd[s], "_fingerprint", "") for s in ("train", "test")))
    e.source = f"DomainNet from the Hugging Face dataset {hf_dataset}"
    return e


def _resolve_classes(e: DomainNetEntries, classes: str) -> list[str]:
    """Class folder names in label order; every requested class must occur somewhere."""
    label_of: dict[str, int] = {}
    for name, y, where in zip(e.class_name, e.label, e.where, strict=True):
        if label_of.setdefault(name, y) != y:
            raise DataError(f"{where}: class {name!r} has label {y}, elsewhere {label_of[name]}; the "
                            f"lists disagree. Re-download the official lists. {_DOMAINNET_HOWTO}")
    if classes == "all":
        return sorted(label_of, key=lambda n: (label_of[n], n))
    wanted = FEDBN_CLASSES if classes == "fedbn10" else classes.split(",")
    missing = [c for c in wanted if c not in label_of]
    if missing:
        import difflib

        hints = [f"{c!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(c, label_of, 1)) else repr(c)
                 for c in missing]
        raise DataError(f"class(es) {', '.join(hints)} occur in none of the chosen domains' lists. "
                        f"Give class folder names as in the lists (e.g. ice_cream). {_DOMAINNET_HOWTO}")
    return list(wanted)


@register_task("domainnet", description="DomainNet (FedBN 10-class subset by default), one client per domain",
               fidelity="protocol", source=FEDBN)
class DomainNet(Task):
    """DomainNet over one client per domain: official train/test lists, optional held-out domain."""

    Options = DomainNetOptions
    default_rounds = 300  # FedBN's released code: 300 communication rounds
    clients_configurable = False
    card = TaskCard(
        classes="fedbn10 (FedBN's subset: " + ", ".join(FEDBN_CLASSES) + "), all 345, or a comma list",
        domains=", ".join(DOMAINNET_DOMAINS),
        prompt_template=DOMAINNET_PROMPT + " (class folder names with '_' read as spaces)",
        source=("DomainNet (Peng et al., Moment Matching for Multi-Source Domain Adaptation, ICCV 2019, "
                "arXiv 1812.01754): 6 domains, 345 classes, ~0.6M images. Read from a local folder in "
                "the official layout (<domain>/<class>/*.jpg and <domain>_train.txt / <domain>_test.txt) "
                "or a Hugging Face dataset id given with --set hf_dataset=ID."),
        licence="DomainNet: terms of use on the dataset's website (research and educational use); "
                "images collected from the web. Not redistributed by fedbench.",
        protocol=(
            "One client per domain (FedBN). Adaptation: each client trains on its domain's official "
            "train list minus a seeded val_fraction (0.2) carved as validation, and is tested on its "
            "official test list; the global test set is the union of the client tests. FedBN's "
            "released code instead uses its own split files and trains every client on an equal "
            "share; --set max_per_domain=N caps each domain (train and test lists in proportion) for "
            "equal, smaller clients. --set heldout=DOMAIN holds a domain out (its train and test "
            "lists tested whole with the server model). Images squashed to image_size x image_size."
        ),
        published={"_source": "FedBN (arXiv 2102.07623) reports per-domain accuracy of AlexNet trained "
                              "from scratch on its own splits; not comparable with frozen-backbone rows "
                              "and not transcribed."},
    )

    def load(self, options: DomainNetOptions, seed: int) -> FederatedDataset:
        domains = options.domain_list()
        if options.hf_dataset:
            e = domainnet_hub_entries(options.hf_dataset, domains)
        elif options.data_dir:
            e = domainnet_folder_entries(Path(options.data_dir).expanduser(), domains)
        else:
            raise DataError(f"domainnet has no default source (no public copy is reachable from the "
                            f"hub by default). {_DOMAINNET_HOWTO}")
        class_folders = _resolve_classes(e, options.classes)
        new_label = {c: k for k, c in enumerate(class_folders)}
        dom, spl = np.array(e.domain), np.array(e.split)
        in_subset = np.array([c in new_label for c in e.class_name], dtype=bool)

        # Per domain: its train and test entries (capped in proportion when max_per_domain is set).
        per_domain: dict[str, dict[str, np.ndarray]] = {}
        for d_index, d in enumerate(domains):
            lists = {s: np.flatnonzero(in_subset & (dom == d) & (spl == s)) for s in ("train", "test")}
            if not len(lists["train"]) + len(lists["test"]):
                raise DataError(f"domain {d!r} has no image of the chosen classes in its lists. {_DOMAINNET_HOWTO}")
            if options.max_per_domain:
                total = len(lists["train"]) + len(lists["test"])
                n_train = min(len(lists["train"]), round(options.max_per_domain * len(lists["train"]) / total))
                n_test = min(len(lists["test"]), options.max_per_domain - n_train)
                rng = stream_rng(seed, STREAM_SUBSAMPLE, d_index)
                lists = {"train": lists["train"][subsample(len(lists["train"]), n_train, rng)],
                         "test": lists["test"][subsample(len(lists["test"]), n_test, rng)]}
            per_domain[d] = lists

        rows = np.concatenate([np.concatenate([per_domain[d]["train"], per_domain[d]["test"]]) for d in domains])
        pos = {int(r): p for p, r in enumerate(rows)}  # entry -> position in the pool
        images = cached_pool((*e.key, options.image_size, rows.tobytes()),
                              lambda: stack_resized(e.read(rows), len(rows), options.image_size, "decoding DomainNet"))
        labels = np.array([new_label[e.class_name[r]] for r in rows], dtype=np.int64)

        def to_pool(entries: np.ndarray) -> np.ndarray:
            return np.array([pos[int(r)] for r in entries], dtype=np.int64)

        clients, held, shares = [], {}, []
        for d_index, d in enumerate(domains):
            train_all, test = to_pool(per_domain[d]["train"]), to_pool(per_domain[d]["test"])
            if d == options.heldout:
                held[d] = index_tensor(np.concatenate([train_all, test]))
                continue
            train, val = partition.split_fractions(
                train_all, [1 - options.val_fraction, options.val_fraction], stream_rng(seed, STREAM_VAL, d_index))
            clients.append(ClientIndices(index_tensor(train), index_tensor(val), index_tensor(test), domain=d))
            shares.append(np.concatenate([train_all, test]))
        k = len(class_folders)
        stats = {
            "protocol": "leave-one-domain-out" if options.heldout else "one client per domain",
            "heldout": options.heldout or None,
            "classes": class_folders,
            "client_domains": [c.domain for c in clients],
            "split_sizes": [{"train": len(c.train), "val": len(c.val), "test": len(c.test)} for c in clients],
            "class_histograms": partition.class_histograms(labels, shares, k),
            "heldout_class_histogram": (partition.class_histograms(labels, [held[options.heldout].numpy()], k)[0]
                                        if options.heldout else None),
        }
        if options.max_per_domain:
            stats["max_per_domain"] = options.max_per_domain
        return FederatedDataset(
            images=images, labels=torch.from_numpy(labels), class_names=[c.replace("_", " ") for c in class_folders],
            clients=clients, global_test=index_tensor(np.concatenate([c.test.numpy() for c in clients])),
            prompt_template=DOMAINNET_PROMPT, heldout=held, domains=list(domains), source=e.source,
            partition_stats=stats,
        )
