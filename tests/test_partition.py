"""Partitioners: the NIID-Bench rules hold, nothing is lost or duplicated, seeds decide everything."""

from __future__ import annotations

import numpy as np
import pytest

from fedbench.data import partition as P
from fedbench.errors import DataError, SpecError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def balanced_labels(num_classes: int = 10, per_class: int = 300, seed: int = 0) -> np.ndarray:
    return rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index in 0..n-1 appears in exactly one part."""
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def assert_balancing_rule(labels: np.ndarray, parts: list[np.ndarray]) -> int:
    """Replay NIID-Bench's rule from the class histograms; return how often the cap bit.

    Classes are split in sorted order; a client that already held >= N/num_clients samples
    before class k was split must receive nothing of class k.
    """
    classes = np.unique(labels)
    hist = np.array(P.class_histograms(labels, parts, int(classes.max()) + 1))[:, classes]
    cap = len(labels) / len(parts)
    held = np.zeros(len(parts))
    capped = 0
    for k in range(len(classes)):
        full = held >= cap
        assert np.all(hist[full, k] == 0), f"a client at the cap received class {classes[k]}"
        capped += int(full.sum())
        held += hist[:, k]
    return capped


# --- iid ---------------------------------------------------------------------------------------


def test_iid_covers_and_is_near_equal():
    parts = P.iid(1003, 10, rng(1))
    assert_exact_cover(parts, 1003)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3


def test_iid_is_seeded_and_rejects_too_many_clients():
    a, b, c = P.iid(50, 5, rng(3)), P.iid(50, 5, rng(3)), P.iid(50, 5, rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    with pytest.raises(DataError, match="at most 5 clients"):
        P.iid(5, 6, rng())
    with pytest.raises(SpecError):
        P.iid(5, 0, rng())


# --- Dirichlet label skew (NIID-Bench noniid-labeldir) -----------------------------------------


@pytest.mark.parametrize(
    ("alpha", "clients", "seed"),
    [(0.1, 10, 0), (0.5, 10, 1), (0.5, 20, 2), (1.0, 5, 3), (100.0, 10, 4), (0.05, 4, 5)],
)
def test_dirichlet_rule_holds(alpha, clients, seed):
    labels = balanced_labels(seed=seed)
    parts = P.dirichlet_label_skew(labels, clients, alpha, rng(seed), min_samples=10)
    assert len(parts) == clients
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10
    assert_balancing_rule(labels, parts)
    hist = np.array(P.class_histograms(labels, parts, 10))
    assert hist.sum(axis=0).tolist() == np.bincount(labels).tolist()
    assert hist.sum(axis=1).tolist() == [len(p) for p in parts]


def test_dirichlet_cap_actually_binds_under_strong_skew():
    # With alpha=0.1, some client is filled past N/num_clients before the last classes are split
    # on most draws; check the rule is exercised, not just vacuously true.
    labels = balanced_labels()
    binds = sum(
        assert_balancing_rule(labels, P.dirichlet_label_skew(labels, 10, 0.1, rng(s))) > 0 for s in range(10)
    )
    assert binds >= 5


def test_dirichlet_small_alpha_skews_and_large_alpha_balances():
    labels = balanced_labels()

    def mean_max_share(alpha: float) -> float:
        parts = P.dirichlet_label_skew(labels, 10, alpha, rng(7))
        hist = np.array(P.class_histograms(labels, parts, 10), dtype=float)
        return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))

    assert mean_max_share(0.1) > 0.5  # most of a client's data is one class
    assert mean_max_share(1000.0) < 0.15  # close to uniform (0.1)


def test_dirichlet_is_seeded_and_leaves_global_rng_alone():
    labels = balanced_labels()
    before = np.random.get_state()[1].copy()
    a = P.dirichlet_label_skew(labels, 10, 0.5, rng(11))
    b = P.dirichlet_label_skew(labels, 10, 0.5, rng(11))
    c = P.dirichlet_label_skew(labels, 10, 0.5, rng(12))
    assert np.array_equal(np.random.get_state()[1], before)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_shuffles_within_each_client():
    labels = np.sort(balanced_labels())  # sorted by class: unshuffled output would be sorted too
    parts = P.dirichlet_label_skew(labels, 5, 1.0, rng(0))
    assert any(not np.all(np.diff(p) > 0) for p in parts)


def test_dirichlet_handles_missing_classes_and_one_client():
    labels = np.array([0] * 40 + [7] * 40)  # classes 1..6 absent
    parts = P.dirichlet_label_skew(labels, 3, 0.5, rng(0), min_samples=5)
    assert_exact_cover(parts, 80)
    (only,) = P.dirichlet_label_skew(labels, 1, 0.5, rng(0))
    assert np.array_equal(np.sort(only), np.arange(80))


def test_dirichlet_bad_alpha_and_clients_are_spec_errors():
    labels = balanced_labels()
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(SpecError, match="alpha must be > 0"):
            P.dirichlet_label_skew(labels, 10, alpha, rng())
    with pytest.raises(SpecError, match="clients"):
        P.dirichlet_label_skew(labels, 0, 0.5, rng())


def test_dirichlet_too_many_clients_is_a_data_error():
    labels = balanced_labels(per_class=10)  # 100 samples
    with pytest.raises(DataError, match="fewer clients") as err:
        P.dirichlet_label_skew(labels, 11, 0.5, rng(), min_samples=10)
    assert "100 samples" in str(err.value)


def test_dirichlet_unsatisfiable_within_redraws_says_what_to_change():
    # 100 samples, 10 clients, 10 each: only an exactly even split passes, which alpha=0.1 never draws.
    labels = balanced_labels(per_class=10)
    with pytest.raises(DataError, match="larger alpha") as err:
        P.dirichlet_label_skew(labels, 10, 0.1, rng(), min_samples=10, max_redraws=20)
    assert "fewer clients" in str(err.value) and "more data" in str(err.value)


# --- quantity skew (NIID-Bench iid-diff-quantity) ----------------------------------------------


def test_quantity_skew_sizes_vary_and_cover():
    parts = P.quantity_skew(2000, 10, 0.5, rng(0), min_samples=10)
    assert_exact_cover(parts, 2000)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 10
    assert max(sizes) > 2 * min(sizes)
    again = P.quantity_skew(2000, 10, 0.5, rng(0), min_samples=10)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_quantity_skew_errors():
    with pytest.raises(SpecError, match="alpha"):
        P.quantity_skew(100, 5, 0.0, rng())
    with pytest.raises(DataError, match="fewer clients"):
        P.quantity_skew(100, 11, 0.5, rng(), min_samples=10)
    with pytest.raises(DataError, match="larger alpha"):
        P.quantity_skew(100, 10, 0.05, rng(), min_samples=10)


# --- domains and fractions ---------------------------------------------------------------------


def test_by_domain_and_leave_one_out():
    domains = np.array(["sketch", "photo", "art", "photo", "sketch", "art", "art"])
    groups = P.by_domain(domains)
    assert list(groups) == ["art", "photo", "sketch"]
    assert groups["art"].tolist() == [2, 5, 6]
    train, held = P.leave_one_domain_out(domains, "photo")
    assert list(train) == ["art", "sketch"]
    assert held.tolist() == [1, 3]
    with pytest.raises(SpecError, match="art, photo, sketch"):
        P.leave_one_domain_out(domains, "cartoon")


@pytest.mark.parametrize(("n", "sizes"), [(10, [6, 2, 2]), (11, [7, 2, 2]), (14, [10, 2, 2]), (3, [3, 0, 0])])
def test_split_fractions_floor_with_remainder_first(n, sizes):
    idx = np.arange(100, 100 + n)
    parts = P.split_fractions(idx, [0.6, 0.2, 0.2], rng(0))
    assert [len(p) for p in parts] == sizes
    assert np.array_equal(np.sort(np.concatenate(parts)), idx)


def test_split_fractions_shuffles_by_seed_and_checks_fractions():
    idx = np.arange(50)
    a = P.split_fractions(idx, [0.5, 0.5], rng(1))
    b = P.split_fractions(idx, [0.5, 0.5], rng(1))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(np.sort(a[0]), np.arange(25))
    for bad in ([0.6, 0.2], [1.2, -0.2], []):
        with pytest.raises(SpecError, match="sum to 1"):
            P.split_fractions(idx, bad, rng())


# --- per-client test sets ----------------------------------------------------------------------


def test_match_label_distribution_disjoint_and_proportional():
    num_classes = 4
    train = [np.array([0] * 30 + [1] * 10), np.array([0] * 10 + [2] * 20), np.array([1] * 30 + [2] * 20)]
    test_labels = np.repeat(np.arange(num_classes), 100)  # class 3: no client trains on it
    parts = P.match_label_distribution(test_labels, train, num_classes, rng(0))
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))  # disjoint
    assert set(joined.tolist()) == set(np.flatnonzero(test_labels < 3).tolist())  # class 3 unassigned
    got = np.array(P.class_histograms(test_labels, parts, num_classes))
    train_counts = np.array([np.bincount(t, minlength=num_classes) for t in train])
    for c in range(3):
        expected = 100 * train_counts[:, c] / train_counts[:, c].sum()
        assert np.all(np.abs(got[:, c] - expected) <= 1), (c, got[:, c], expected)
    assert got[:, 3].tolist() == [0, 0, 0]


def test_match_label_distribution_rounds_to_exact_totals_and_is_seeded():
    train = [np.array([0]), np.array([0]), np.array([0])]  # thirds of 10 cannot be exact
    test_labels = np.zeros(10, dtype=int)
    parts = P.match_label_distribution(test_labels, train, 1, rng(5))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    again = P.match_label_distribution(test_labels, train, 1, rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_class_histograms_are_plain_ints():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = P.class_histograms(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert hist == [[1, 1, 0, 0], [0, 1, 3, 0]]
    assert all(type(v) is int for row in hist for v in row)
