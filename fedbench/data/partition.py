"""Partitioners: who holds which examples. Pure numpy on index arrays, no pixels.

Every function that draws takes an explicit ``np.random.Generator``; none touches numpy's or
torch's global RNG, so a partition depends only on the generator it is handed (and a task
derives that generator from the run seed). Every function returns index arrays (int64) into the
array it was given; a caller maps them into its own pool.

The label-skew and quantity-skew rules follow NIID-Bench (Li et al., "Federated Learning on
Non-IID Data Silos: An Experimental Study", ICDE 2022), partitions ``noniid-labeldir`` and
``iid-diff-quantity``, so that "Dirichlet alpha=0.5, 10 clients" means what it means there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedbench.errors import DataError, SpecError

# quantity_skew has no max_redraws argument (its signature is shared); this is its bound.
_QUANTITY_MAX_REDRAWS = 1000


def _check_clients(num_clients: int) -> None:
    if int(num_clients) != num_clients or num_clients < 1:
        raise SpecError(f"clients must be a whole number >= 1, got {num_clients!r}.")


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha <= 0:
        raise SpecError(
            f"alpha must be > 0 (the Dirichlet concentration; small = more skew, "
            f"e.g. 0.1 or 0.5), got {alpha!r}."
        )


def _check_capacity(num_samples: int, num_clients: int, min_samples: int) -> None:
    if min_samples < 0:
        raise SpecError(f"min_samples must be >= 0, got {min_samples}.")
    if num_clients * min_samples > num_samples:
        raise DataError(
            f"cannot give {num_clients} clients at least {min_samples} samples each from "
            f"{num_samples} samples. Use fewer clients (at most {num_samples // max(min_samples, 1)}), "
            f"a smaller min_samples, or more data (a larger max_train)."
        )


def _as_int64(parts: list[np.ndarray] | list[list[int]]) -> list[np.ndarray]:
    return [np.asarray(p, dtype=np.int64) for p in parts]


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_clients`` near-equal parts (NIID-Bench ``homo``)."""
    _check_clients(num_clients)
    if num_clients > num_samples:
        raise DataError(
            f"cannot split {num_samples} samples among {num_clients} clients without empty "
            f"clients. Use at most {num_samples} clients, or more data."
        )
    return _as_int64(np.array_split(rng.permutation(num_samples), num_clients))


def dirichlet_label_skew(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int = 10,
    max_redraws: int = 1000,
) -> list[np.ndarray]:
    """Label skew by Dirichlet(alpha) per class, with NIID-Bench's balancing and redraw rule.

    For each class in turn: shuffle that class's indices, draw client proportions from
    Dirichlet(alpha, ..., alpha), zero the proportion of every client that already holds
    >= N/num_clients samples (so no client grows far past an equal share), renormalise, and cut
    the class's indices at the cumulative proportions. If any client ends with fewer than
    ``min_samples`` samples, the whole partition is drawn again. Each client's indices are
    shuffled at the end (so class order does not leak into batches).
    """
    _check_clients(num_clients)
    _check_alpha(alpha)
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    _check_capacity(n, num_clients, min_samples)
    # Classes are the labels that occur (in sorted order); NIID-Bench loops over range(K), where
    # a class with no samples would only consume random draws.
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    cap = n / num_clients
    best = 0
    for _ in range(max(1, max_redraws)):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for members in by_class:
            idx_k = members.copy()
            rng.shuffle(idx_k)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            open_ = np.array([len(part) for part in parts]) < cap
            p = p * open_
            if p.sum() > 0:
                p = p / p.sum()
            else:
                # A tiny alpha can put all the mass on clients that are already full (the
                # others underflow to exactly 0); then spread this class over the open ones.
                p = open_ / max(int(open_.sum()), 1)
            # The cumulative share must reach exactly 1 at the last open client: a float sum of
            # 0.999... would leave a stray sample to a full last client (a quirk in NIID-Bench).
            cum = np.cumsum(p)
            cum[np.flatnonzero(p)[-1] :] = 1.0
            cuts = (cum * len(idx_k)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx_k, cuts), strict=True):
                part.extend(chunk.tolist())
        smallest = min(len(part) for part in parts)
        if smallest >= min_samples:
            out = _as_int64(parts)
            for part in out:
                rng.shuffle(part)
            return out
        best = max(best, smallest)
    raise DataError(
        f"Dirichlet label skew (alpha={alpha}, {num_clients} clients, {n} samples) left some "
        f"client with fewer than {min_samples} samples in each of {max_redraws} draws (best "
        f"smallest client: {best}). Use fewer clients, a larger alpha, more data (a larger "
        f"max_train), or a smaller min_samples."
    )


def quantity_skew(
    num_samples: int,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int = 10,
) -> list[np.ndarray]:
    """Quantity skew (NIID-Bench ``iid-diff-quantity``): IID labels, Dirichlet(alpha) sizes.

    Shuffle all indices once, draw client shares from Dirichlet(alpha), redraw the shares until
    every client gets at least ``min_samples``, and cut the shuffled list at the cumulative
    shares. (NIID-Bench tests share*N >= 10 before rounding; we test the sizes actually cut.)
    """
    _check_clients(num_clients)
    _check_alpha(alpha)
    _check_capacity(num_samples, num_clients, min_samples)
    order = rng.permutation(num_samples)
    for _ in range(_QUANTITY_MAX_REDRAWS):
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(p) * num_samples).astype(int)[:-1]
        parts = np.split(order, cuts)
        if min(len(part) for part in parts) >= min_samples:
            return _as_int64(parts)
    raise DataError(
        f"quantity skew (alpha={alpha}, {num_clients} clients, {num_samples} samples) left some "
        f"client with fewer than {min_samples} samples in each of {_QUANTITY_MAX_REDRAWS} draws. "
        f"Use fewer clients, a larger alpha, or more data."
    )


def by_domain(domains: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of each domain, keyed by domain name in sorted order (indices ascending)."""
    names = np.asarray(domains).astype(str)
    return {str(d): np.flatnonzero(names == d).astype(np.int64) for d in np.unique(names)}


def leave_one_domain_out(domains: np.ndarray, heldout: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(training domain -> indices, held-out domain's indices)."""
    groups = by_domain(domains)
    if heldout not in groups:
        raise SpecError(f"unknown held-out domain {heldout!r}. Domains in this task: {', '.join(groups)}.")
    held = groups.pop(heldout)
    return groups, held


def split_fractions(
    indices: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle ``indices`` and cut them by ``fractions`` (e.g. 0.6/0.2/0.2, FedCLIP's protocol).

    Each part gets floor(fraction * n); the few left over by flooring go to the first part (the
    training split), so a 0.2 split never gets more than 20%.
    """
    fr = np.asarray(list(fractions), dtype=float)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0, atol=1e-6):
        raise SpecError(
            f"split fractions must be >= 0 and sum to 1 (e.g. 0.6,0.2,0.2), got {list(fractions)}."
        )
    idx = np.asarray(indices, dtype=np.int64)
    n = idx.shape[0]
    shuffled = idx[rng.permutation(n)]
    sizes = np.floor(fr * n + 1e-9).astype(int)
    sizes[0] += n - int(sizes.sum())
    return np.split(shuffled, np.cumsum(sizes)[:-1])


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total`` (Hamilton's method)."""
    quota = total * weights / weights.sum()
    counts = np.floor(quota).astype(np.int64)
    left = total - int(counts.sum())
    if left > 0:
        # Largest fractional parts first; ties go to the lower client id (stable sort).
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[:left]] += 1
    return counts


def match_label_distribution(
    test_labels: np.ndarray,
    client_train_labels: list[np.ndarray],
    num_classes: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Split a test set among clients, disjointly, so each follows its train label distribution.

    For each class, that class's test indices are shuffled and cut in proportion to the
    clients' train counts of the class (largest-remainder rounding, so every test example of a
    class some client trains on is given out). Test examples of a class that no client trains
    on are given to no one: they stay in the global test set only. Indices come back sorted.
    """
    test_labels = np.asarray(test_labels)
    train_counts = np.zeros((len(client_train_labels), num_classes), dtype=np.int64)
    for i, y in enumerate(client_train_labels):
        train_counts[i] = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)[:num_classes]
    parts: list[list[np.ndarray]] = [[] for _ in client_train_labels]
    for c in range(num_classes):
        weights = train_counts[:, c].astype(float)
        if weights.sum() == 0:
            continue
        idx_c = np.flatnonzero(test_labels == c)
        rng.shuffle(idx_c)
        counts = _largest_remainder(len(idx_c), weights)
        for part, chunk in zip(parts, np.split(idx_c, np.cumsum(counts)[:-1]), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, dtype=np.int64) for p in parts]


def class_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per part, how many examples of each class it holds (plain ints, ready for JSON)."""
    labels = np.asarray(labels, dtype=np.int64)
    return [
        [int(v) for v in np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)]
        for p in parts
    ]
