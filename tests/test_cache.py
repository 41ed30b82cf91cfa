"""Feature cache: hits never re-encode, entries are verified, writes are atomic."""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

from fedbench.errors import CacheError, DataError
from fedbench.models.cache import CacheWarning, FeatureCache, default_cache_root


class FakeBackbone:
    """A deterministic linear 'encoder' that counts what it encodes."""

    def __init__(self, preprocess_id: str = "p1", fingerprint: str = "f" * 16, dim: int = 8) -> None:
        self.name = "fake"
        self.embed_dim = dim
        self.fingerprint = fingerprint
        self.preprocess_id = preprocess_id
        self.calls = 0
        self.images_seen = 0

    def encode_image(self, images: Tensor) -> Tensor:
        self.calls += 1
        self.images_seen += int(images.shape[0])
        x = images.float().flatten(1) / 255.0
        w = torch.linspace(-1, 1, x.shape[1] * self.embed_dim).view(x.shape[1], self.embed_dim)
        return x @ w

    def encode_text(self, texts: list[str]) -> Tensor:
        return torch.tensor([[float(len(t))] * self.embed_dim for t in texts])


def images(n: int = 10, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g)


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


def entry_files(cache: FeatureCache) -> list[str]:
    return sorted(p.name for p in cache.dir.iterdir()) if cache.dir.exists() else []


def test_second_call_is_a_hit_with_zero_images_encoded(cache):
    bb, x = FakeBackbone(), images(10)
    first = cache.features(bb, x, batch_size=4, progress=False)
    assert first.shape == (10, 8) and first.dtype == torch.float32
    assert (cache.stats.misses, cache.stats.images_encoded, bb.calls) == (1, 10, 3)

    second = cache.features(bb, x, batch_size=4, progress=False)
    assert torch.equal(first, second)
    assert (cache.stats.hits, cache.stats.images_encoded, bb.images_seen) == (1, 10, 10)

    # A new cache object on the same root stands for a later process: still no encode.
    later = FeatureCache(cache.root)
    assert torch.equal(later.features(bb, x, progress=False), first)
    assert (later.stats.hits, later.stats.images_encoded, bb.images_seen) == (1, 0, 10)


def test_float16_round_trip(cache):
    bb, x = FakeBackbone(), images(7)
    exact = bb.encode_image(x)
    got = cache.features(bb, x, progress=False)
    assert torch.equal(got, exact.half().float())  # the miss returns what a hit will read
    stored = np.load(cache.dir / f"{cache.key(bb, x)}.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (7, 8)
    assert torch.equal(FeatureCache(cache.root).features(bb, x, progress=False), got)
    assert torch.allclose(got, exact, rtol=1e-3, atol=1e-3)


def _damage_and_reread(cache: FeatureCache, damage) -> None:
    bb, x = FakeBackbone(), images(10)
    good = cache.features(bb, x, progress=False)
    array = cache.dir / f"{cache.key(bb, x)}.npy"
    damage(array)
    with pytest.warns(CacheWarning, match=array.name):
        again = cache.features(bb, x, progress=False)
    assert torch.equal(again, good)
    assert cache.stats.rebuilt == 1 and cache.stats.images_encoded == 20  # encoded anew
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry verifies cleanly
        assert torch.equal(cache.features(bb, x, progress=False), good)
    assert cache.stats.images_encoded == 20


def test_truncated_file_is_detected_warned_and_rebuilt(cache):
    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 6)

    _damage_and_reread(cache, truncate)


def test_flipped_byte_is_detected_warned_and_rebuilt(cache):
    def flip(path):
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x10  # inside the array data, past the .npy header
        path.write_bytes(bytes(raw))

    _damage_and_reread(cache, flip)


def test_crash_while_encoding_leaves_nothing(cache, monkeypatch):
    bb, x = FakeBackbone(), images(10)
    real = bb.encode_image

    def dies_on_second_batch(batch):
        if bb.calls == 1:
            raise KeyboardInterrupt  # stands for a kill mid-write
        return real(batch)

    monkeypatch.setattr(bb, "encode_image", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cache.features(bb, x, batch_size=4, progress=False)
    assert cache.ls() == [] and entry_files(cache) == []  # temp files are removed too


def test_crash_between_array_and_sidecar_never_reads_as_whole(cache, monkeypatch):
    bb, x = FakeBackbone(), images(10)
    real_replace = os.replace
    moves = []

    def replace_then_crash(src, dst):
        moves.append(dst)
        if len(moves) == 2:  # the array is in place, the sidecar (the commit mark) is not
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        cache.features(bb, x, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)

    assert [e.kind for e in cache.ls()] == ["incomplete"]
    with pytest.warns(CacheWarning, match="interrupted write"):
        cache.features(bb, x, progress=False)
    assert cache.stats.misses == 2 and [e.kind for e in cache.ls()] == ["image"]


def test_key_depends_on_weights_data_and_preprocessing(cache):
    x = images(5)
    base = cache.key(FakeBackbone(), x)
    assert cache.key(FakeBackbone(), x.clone()) == base
    assert cache.key(FakeBackbone(preprocess_id="p2"), x) != base
    assert cache.key(FakeBackbone(fingerprint="e" * 16), x) != base
    y = x.clone()
    y[0, 0, 0, 0] ^= 1
    assert cache.key(FakeBackbone(), y) != base

    bb = FakeBackbone()
    cache.features(bb, x, progress=False)
    cache.features(FakeBackbone(preprocess_id="p2"), x, progress=False)
    assert cache.stats.misses == 2 and len(cache.ls()) == 2


def test_ls_and_rm(cache):
    bb = FakeBackbone()
    cache.features(bb, images(4, seed=1), progress=False)
    cache.features(bb, images(6, seed=2), progress=False)
    entries = cache.ls()
    assert sorted(e.shape for e in entries) == [(4, 8), (6, 8)]
    assert all(e.backbone == "fake" and e.kind == "image" and e.bytes > 0 and e.created for e in entries)

    victim = entries[0].key
    assert cache.rm(victim[:12]) == [victim]
    assert [e.key for e in cache.ls()] == [entries[1].key]
    with pytest.raises(CacheError, match="no cache entry"):
        cache.rm("0" * 64)
    cache.rm("all")
    assert cache.ls() == [] and entry_files(cache) == []


def test_rm_refuses_an_ambiguous_prefix(cache):
    bb = FakeBackbone()
    keys = set()
    for seed in range(40):  # enough entries that two keys share a first hex digit
        x = images(2, seed=seed)
        cache.features(bb, x, progress=False)
        keys.add(cache.key(bb, x))
    prefix = next(k[0] for k in keys if sum(o[0] == k[0] for o in keys) > 1)
    with pytest.raises(CacheError, match="matches"):
        cache.rm(prefix)


def test_text_features_are_cached(cache):
    bb = FakeBackbone()
    first = cache.text_features(bb, ["a cat", "a dog!"])
    assert first.shape == (2, 8) and cache.stats.texts_encoded == 2
    assert torch.equal(cache.text_features(bb, ["a cat", "a dog!"]), first)
    assert cache.stats.texts_encoded == 2 and cache.stats.hits == 1


def test_features_reject_non_pixels_and_handle_empty(cache):
    with pytest.raises(DataError, match="uint8"):
        cache.features(FakeBackbone(), torch.zeros(3, 8), progress=False)
    empty = cache.features(FakeBackbone(), images(0), progress=False)
    assert empty.shape == (0, 8)


def test_sidecar_describes_the_entry(cache):
    bb, x = FakeBackbone(), images(3)
    cache.features(bb, x, progress=False)
    meta = json.loads((cache.dir / f"{cache.key(bb, x)}.json").read_text())
    assert meta["shape"] == [3, 8] and meta["dtype"] == "float16" and meta["backbone"] == "fake"
    assert len(meta["sha256"]) == 64 and meta["created"]


def test_default_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDBENCH_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_root() == tmp_path / "elsewhere"
    assert FeatureCache().root == tmp_path / "elsewhere"
    monkeypatch.delenv("FEDBENCH_CACHE")
    assert default_cache_root().name == "fedbench"


def test_with_a_real_backbone(cache):
    from fedbench.models.backbones import tiny_clip_backbone

    bb = tiny_clip_backbone(None)
    x = images(9)
    feats = cache.features(bb, x, batch_size=4, progress=False)
    assert torch.allclose(feats, bb.encode_image(x), atol=2e-3, rtol=2e-3)
    assert cache.features(bb, x, progress=False).shape == (9, bb.embed_dim)
    assert cache.stats.images_encoded == 9


def test_cache_cli(cache, capsys):
    from fedbench.cli.cache import add_cache_parser

    bb = FakeBackbone()
    cache.features(bb, images(4), progress=False)
    key = cache.ls()[0].key

    parser = argparse.ArgumentParser(prog="fedbench")
    add_cache_parser(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["cache", "ls", "--cache-dir", str(cache.root)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert key[:12] in out and "fake" in out and "4x8" in out

    args = parser.parse_args(["cache", "rm", key[:10], "--cache-dir", str(cache.root)])
    assert args.func(args) == 0
    assert "removed 1" in capsys.readouterr().out and cache.ls() == []

    cache.features(bb, images(4), progress=False)
    args = parser.parse_args(["cache", "rm", "--all", "--cache-dir", str(cache.root)])
    assert args.func(args) == 0 and cache.ls() == []

    with pytest.raises(SystemExit):
        parser.parse_args(["cache", "rm", key, "--all"])


def test_features_that_overflow_float16_are_refused(cache, monkeypatch):
    bb = FakeBackbone()
    monkeypatch.setattr(bb, "encode_image", lambda batch: torch.full((len(batch), 8), 1e6))
    with pytest.raises(CacheError, match="float16"):
        cache.features(bb, images(3), progress=False)
    assert cache.ls() == [] and entry_files(cache) == []


def test_text_features_that_overflow_float16_are_refused(cache, monkeypatch):
    bb = FakeBackbone()
    monkeypatch.setattr(bb, "encode_text", lambda texts: torch.full((len(texts), 8), 1e6))
    with pytest.raises(CacheError, match="float16"):
        cache.text_features(bb, ["a photo of a cat", "a photo of a dog"])
    assert cache.ls() == [] and entry_files(cache) == []
