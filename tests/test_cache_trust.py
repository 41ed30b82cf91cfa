"""Feature cache reads: an entry is used only if its sidecar says it is the requested one and its array checks out."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbench.core.hashing import json_digest
from fedbench.data.dataset import pixels_fingerprint
from fedbench.errors import CacheError
from fedbench.models.cache import FORMAT_VERSION, SIDECAR_VERSION, CacheWarning, FeatureCache
from tests.test_cache import FakeBackbone as CountingBackbone
from tests.test_cache import images


class FakeBackbone(CountingBackbone):
    """As a real backbone: other weights or other preprocessing give other features."""

    def encode_image(self, batch: torch.Tensor) -> torch.Tensor:
        return super().encode_image(batch) + sum(map(ord, self.fingerprint + self.preprocess_id)) % 13 / 4


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


def files_of(cache: FeatureCache, key: str) -> tuple[Path, Path]:
    return cache.dir / f"{key}.npy", cache.dir / f"{key}.json"


def copy_entry(cache: FeatureCache, source: str, target: str) -> None:
    """What the hostile user did: an entry, array and sidecar, copied under another key's name."""
    for src, dst in zip(files_of(cache, source), files_of(cache, target), strict=True):
        shutil.copyfile(src, dst)


def reread_cleanly(cache: FeatureCache, read, expected: torch.Tensor) -> None:
    """The rebuilt entry verifies: a later read is a hit, with no warning and no encode."""
    later = FeatureCache(cache.root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(read(later), expected)
    assert later.stats.hits == 1 and later.stats.rebuilt == 0


def test_keys_are_unchanged(cache):
    # Keys address caches on users' disks and the fingerprints in committed records.
    bb, x = FakeBackbone(), images(5)
    image_key = {"format": 1, "kind": "image", "backbone": bb.fingerprint, "data": pixels_fingerprint(x),
                 "preprocess": bb.preprocess_id}
    assert FORMAT_VERSION == 1 and cache.key(bb, x) == json_digest(image_key)
    texts = ["a photo of a cat", "a photo of a dog"]
    text_key = {"format": 1, "kind": "text", "backbone": bb.fingerprint, "texts": texts}
    assert cache.text_key(bb, texts) == json_digest(text_key)


def test_sidecar_records_what_the_entry_is(cache):
    bb, x = FakeBackbone(), images(3)
    cache.features(bb, x, progress=False)
    meta = json.loads(files_of(cache, cache.key(bb, x))[1].read_text())
    assert meta["sidecar_version"] == SIDECAR_VERSION and meta["format"] == FORMAT_VERSION
    assert (meta["key"], meta["kind"], meta["backbone"]) == (cache.key(bb, x), "image", "fake")
    assert meta["backbone_fingerprint"] == bb.fingerprint and meta["preprocess_id"] == bb.preprocess_id
    assert meta["data_fingerprint"] == pixels_fingerprint(x)
    assert meta["bytes"] == files_of(cache, cache.key(bb, x))[0].stat().st_size

    texts = ["a cat", "a dog"]
    cache.text_features(bb, texts)
    meta = json.loads(files_of(cache, cache.text_key(bb, texts))[1].read_text())
    assert (meta["kind"], meta["key"], meta["preprocess_id"]) == ("text", cache.text_key(bb, texts), None)
    assert meta["data_fingerprint"] == json_digest(texts, length=16)
    assert meta["backbone_fingerprint"] == bb.fingerprint


@pytest.mark.parametrize(
    "other, field",
    [
        ((FakeBackbone(), images(10, seed=7)), "data_fingerprint"),  # another data set's entry
        ((FakeBackbone(fingerprint="e" * 16), images(10)), "backbone_fingerprint"),  # another backbone's
        ((FakeBackbone(preprocess_id="p2"), images(10)), "preprocess_id"),  # other preprocessing
    ],
    ids=["other-data", "other-backbone", "other-preprocess"],
)
def test_an_entry_copied_under_another_key_is_never_used(cache, other, field):
    bb, x = FakeBackbone(), images(10)
    right = cache.features(bb, x, progress=False)
    other_bb, other_x = other
    wrong = cache.features(other_bb, other_x, progress=False)
    assert not torch.equal(wrong, right)
    copy_entry(cache, cache.key(other_bb, other_x), cache.key(bb, x))

    fresh = FeatureCache(cache.root)
    with pytest.warns(CacheWarning, match=f"{cache.key(bb, x)}.npy.*{field}"):
        got = fresh.features(bb, x, progress=False)
    assert torch.equal(got, right) and fresh.stats.rebuilt == 1 and fresh.stats.images_encoded == 10
    reread_cleanly(cache, lambda c: c.features(bb, x, progress=False), right)


def test_a_text_entry_copied_under_another_key_is_never_used(cache):
    bb = FakeBackbone()
    cats, dogs = ["a cat"], ["a doggy"]
    right = cache.text_features(bb, dogs)
    assert not torch.equal(cache.text_features(bb, cats), right)
    copy_entry(cache, cache.text_key(bb, cats), cache.text_key(bb, dogs))

    fresh = FeatureCache(cache.root)
    with pytest.warns(CacheWarning, match=f"{cache.text_key(bb, dogs)}.npy.*data_fingerprint"):
        got = fresh.text_features(bb, dogs)
    assert torch.equal(got, right) and fresh.stats.texts_encoded == 1
    reread_cleanly(cache, lambda c: c.text_features(bb, dogs), right)


def test_a_sidecar_edited_to_name_the_requested_key_still_fails_on_its_fingerprints(cache):
    bb, x, y = FakeBackbone(), images(10), images(10, seed=3)
    right = cache.features(bb, x, progress=False)
    cache.features(bb, y, progress=False)
    copy_entry(cache, cache.key(bb, y), cache.key(bb, x))
    sidecar = files_of(cache, cache.key(bb, x))[1]
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "key": cache.key(bb, x)}))
    with pytest.warns(CacheWarning, match="data_fingerprint"):
        assert torch.equal(FeatureCache(cache.root).features(bb, x, progress=False), right)


def test_an_old_sidecar_without_identity_is_rebuilt_not_trusted(cache):
    bb, x = FakeBackbone(), images(6)
    right = cache.features(bb, x, progress=False)
    sidecar = files_of(cache, cache.key(bb, x))[1]
    meta = json.loads(sidecar.read_text())
    old = {k: meta[k] for k in ("format", "key", "shape", "dtype", "sha256", "bytes", "created", "kind",
                                "backbone", "preprocess_id")}  # what format 1 sidecars hold
    sidecar.write_text(json.dumps(old))
    assert [e.kind for e in cache.ls()] == ["image"]  # still listed for what it is

    fresh = FeatureCache(cache.root)
    with pytest.warns(CacheWarning, match="older fedbench"):
        assert torch.equal(fresh.features(bb, x, progress=False), right)
    assert fresh.stats.rebuilt == 1
    assert json.loads(sidecar.read_text())["sidecar_version"] == SIDECAR_VERSION
    reread_cleanly(cache, lambda c: c.features(bb, x, progress=False), right)


def test_another_name_for_the_same_weights_is_a_hit(cache):
    # The name is not in the key: two names of one backbone must not rebuild each other's entries.
    x = images(4)
    first = cache.features(FakeBackbone(), x, progress=False)
    alias = FakeBackbone()
    alias.name = "fake-alias"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.features(alias, x, progress=False), first)
    assert cache.stats.hits == 1


def _truncate_into_header(a: Path, s: Path) -> None:
    with open(a, "r+b") as f:
        f.truncate(50)


def _npz(a: Path, s: Path) -> None:
    with open(a, "wb") as f:
        np.savez(f, x=np.load(a.with_name("good.npy")))


def _append(a: Path, s: Path) -> None:
    with open(a, "ab") as f:
        f.write(b"\0" * 64)


def _edit_sidecar(**changes):
    def edit(a: Path, s: Path) -> None:
        s.write_text(json.dumps({**json.loads(s.read_text()), **changes}))

    return edit


def _reshape_both(a: Path, s: Path) -> None:  # the same bytes as [20, 4]: the sha still matches
    np.save(a, np.load(a).reshape(20, 4))
    _edit_sidecar(shape=[20, 4])(a, s)


DAMAGE = {
    "empty-array": lambda a, s: a.write_bytes(b""),
    "array-truncated-into-header": _truncate_into_header,
    "array-is-npz": _npz,
    "array-is-a-pickle": lambda a, s: a.write_bytes(b"\x80\x04K\x01."),
    "bytes-appended": _append,
    "fortran-order": lambda a, s: np.save(a, np.asfortranarray(np.load(a))),
    "same-sha-other-shape": _reshape_both,
    "sidecar-shape-differs": _edit_sidecar(shape=[8, 10]),
    "sidecar-shape-not-a-list": _edit_sidecar(shape=5),
    "sidecar-bytes-differ": _edit_sidecar(bytes=1),
    "sidecar-not-json": lambda a, s: s.write_text("{not json"),
    "sidecar-not-utf8": lambda a, s: s.write_bytes(b'{"key": "\xff\xfe"}'),
    "sidecar-a-json-list": lambda a, s: s.write_text("[1, 2, 3]"),
    "sidecar-missing": lambda a, s: s.unlink(),
    "array-missing": lambda a, s: a.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_a_damaged_entry_is_warned_about_and_rebuilt_never_used(cache, damage):
    bb, x = FakeBackbone(), images(10)
    good = cache.features(bb, x, progress=False)
    array, sidecar = files_of(cache, cache.key(bb, x))
    shutil.copyfile(array, array.with_name("good.npy"))
    damage(array, sidecar)
    array.with_name("good.npy").unlink()
    assert [e.key for e in cache.ls()] == [cache.key(bb, x)]  # ls copes with whatever is there

    fresh = FeatureCache(cache.root)
    with pytest.warns(CacheWarning, match=f"{array.name} failed verification"):
        got = fresh.features(bb, x, progress=False)
    assert torch.equal(got, good)
    assert fresh.stats.rebuilt == 1 and fresh.stats.images_encoded == 10
    reread_cleanly(cache, lambda c: c.features(bb, x, progress=False), good)


def test_a_folder_in_place_of_the_sidecar_is_refused_and_the_run_goes_on(cache):
    bb, x = FakeBackbone(), images(10)
    good = cache.features(bb, x, progress=False)
    array, sidecar = files_of(cache, cache.key(bb, x))
    sidecar.unlink()
    sidecar.mkdir()
    assert [e.kind for e in cache.ls()] == ["incomplete"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = FeatureCache(cache.root).features(bb, x, progress=False)
    assert torch.equal(got, good)
    messages = " | ".join(str(w.message) for w in caught if w.category is CacheWarning)
    assert "failed verification" in messages and "could not write" in messages  # it cannot be replaced
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".")]  # no temp file left


def test_rm_refuses_what_is_not_a_key(cache):
    cache.features(FakeBackbone(), images(2), progress=False)
    for bad in ("../x", "*", "zz"):
        with pytest.raises(CacheError, match="hex digits"):
            cache.rm(bad)
    assert len(cache.ls()) == 1
