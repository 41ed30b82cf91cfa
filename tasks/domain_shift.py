"""What the domain-shift tasks share: their random streams, option parsing, and the
leave-one-domain-out protocol (one client per domain, one domain held out and tested whole).

The tasks (``pacs``, ``pacs-mini``, ``domainnet``, ``rotated-mnist``) return one pool of uint8
images (all domains, the held-out one included) and index lists into it. Each use of randomness
has its own generator, ``np.random.default_rng([seed, STREAM, domain])``: a domain's split depends
on the seed and on that domain alone, so choosing another held-out domain never reshuffles the
others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedbench.data import partition
from fedbench.data.dataset import ClientIndices
from fedbench.data.sources import stream_rng
from fedbench.errors import DataError, SpecError

# Random streams (the second entry of every generator's seed list), one table for all the
# domain-shift tasks so that no two uses share a stream.
STREAM_SUBSAMPLE = 11  # PACS, DomainNet: max_per_domain
STREAM_SPLIT = 12  # the leave-one-domain-out split of each client's domain
STREAM_DEAL = 13  # Rotated MNIST: the shuffle that deals MNIST into domains
STREAM_VAL = 14  # DomainNet: validation carved from each official train list


def index_tensor(idx: np.ndarray) -> Tensor:
    """Pool positions as a sorted int64 tensor."""
    return torch.from_numpy(np.sort(np.asarray(idx, dtype=np.int64)))


# --------------------------------------------------------------------------------------------
# Option parsing shared by the tasks (run in the options' __post_init__, so the spec records
# one canonical spelling and two spellings of one protocol hash alike).
# --------------------------------------------------------------------------------------------


def parse_split(text: str) -> list[float]:
    """``"0.6,0.2,0.2"`` -> train/val/test fractions; each >= 0, summing to 1."""
    try:
        fr = [float(part) for part in text.split(",")]
    except ValueError:
        fr = []
    if len(fr) != 3 or any(not np.isfinite(f) or f < 0 for f in fr) or not np.isclose(sum(fr), 1.0):
        raise SpecError(
            f"split={text!r}: expected three train,val,test fractions >= 0 that sum to 1, "
            f"e.g. --set split=0.6,0.2,0.2 (FedCLIP's protocol)."
        )
    if fr[0] == 0:
        raise SpecError(f"split={text!r}: the train fraction must be > 0.")
    return fr


def canonical_split(text: str) -> str:
    """The one spelling of a split that the spec records (``"0.6, 0.2,0.2"`` -> ``"0.6,0.2,0.2"``)."""
    return ",".join(repr(f) for f in parse_split(text))


def check_image_size(size: int) -> None:
    """Reject an image_size outside 8..1024."""
    if not 8 <= size <= 1024:
        raise SpecError(f"image_size={size}: must be in 8..1024 (pixels of the square images).")


def check_nonnegative(name: str, value: int) -> None:
    """Reject a negative count option (0 means all)."""
    if value < 0:
        raise SpecError(f"{name}={value}: must be >= 0 (0 means all).")


def pick_domain(
    value: str, domains: Sequence[str], aliases: dict[str, str], allow_none: bool, option: str = "heldout"
) -> str:
    """A domain by name or alias (case-insensitive); '' when ``allow_none`` and none is given."""
    key = value.strip().lower()
    if key in ("", "none") and allow_none:
        return ""
    lookup = {d.lower(): d for d in domains} | {a.lower(): d for a, d in aliases.items()}
    if key in lookup:
        return lookup[key]
    valid = ", ".join(f"{d} ({a})" if a else d for d, a in _alias_pairs(domains, aliases))
    hint = ""
    if key == "all" and option == "heldout":
        hint = (" One run holds out one domain; `fedbench run METHOD TASK --set heldout=all` runs every "
                "domain in turn and prints the leave-one-domain-out table.")
    none = " or '' for no held-out domain" if allow_none else ""
    raise SpecError(f"{option}={value!r} is not a domain of this task. Valid: {valid}{none}.{hint}")


def _alias_pairs(domains: Sequence[str], aliases: dict[str, str]) -> list[tuple[str, str]]:
    by_domain = {d: a for a, d in aliases.items()}
    return [(d, by_domain.get(d, "")) for d in domains]


# --------------------------------------------------------------------------------------------
# The leave-one-domain-out protocol (PACS, Rotated MNIST).
# --------------------------------------------------------------------------------------------


def leave_one_domain_out_split(
    domain_of: np.ndarray,
    labels: np.ndarray,
    domains: Sequence[str],
    heldout: str,
    fractions: Sequence[float],
    seed: int,
    num_classes: int,
) -> tuple[list[ClientIndices], dict[str, Tensor], Tensor, dict[str, Any]]:
    """FedCLIP's protocol on a pool whose example i belongs to domain ``domain_of[i]``.

    One client per domain except ``heldout`` (tested whole); each client's domain is shuffled
    by its own generator and cut by ``fractions`` (floor per split, remainder to train).
    Returns clients, held-out indices, the global test set (union of client tests) and stats.
    """
    groups = partition.by_domain(domain_of)
    clients: list[ClientIndices] = []
    held: dict[str, Tensor] = {}
    shares: list[np.ndarray] = []
    for d_index, d in enumerate(domains):
        idx = groups.get(d, np.zeros(0, dtype=np.int64))
        if len(idx) == 0:
            raise DataError(f"domain {d!r} has no images; every domain of the protocol needs some.")
        if d == heldout:
            held[d] = index_tensor(idx)
            continue
        train, val, test = partition.split_fractions(idx, fractions, stream_rng(seed, STREAM_SPLIT, d_index))
        clients.append(ClientIndices(index_tensor(train), index_tensor(val), index_tensor(test), domain=d))
        shares.append(idx)
    global_test = index_tensor(np.concatenate([c.test.numpy() for c in clients]))
    stats = {
        "protocol": "leave-one-domain-out" if heldout else "one client per domain",
        "heldout": heldout or None,
        "split": list(fractions),
        "client_domains": [c.domain for c in clients],
        "domain_sizes": {d: int(len(groups.get(d, []))) for d in domains},
        "split_sizes": [{"train": len(c.train), "val": len(c.val), "test": len(c.test)} for c in clients],
        "class_histograms": partition.class_histograms(labels, shares, num_classes),
        "heldout_class_histogram": (
            partition.class_histograms(labels, [held[heldout].numpy()], num_classes)[0] if heldout else None
        ),
    }
    return clients, held, global_test, stats
