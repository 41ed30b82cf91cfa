"""Image pools too large for memory are decoded into a memory-mapped file (fedbench.data.pool): the
same pixels, fingerprints and records as in memory; nothing left on disk; a full disk is a clear
error; the fingerprint hashes the pool without copying it."""

from __future__ import annotations

import errno
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbench.data import pool
from fedbench.data.pool import POOL_DIR_ENV, POOL_RAM_ENV, empty_pool, pixels_fingerprint, pool_ram_bytes
from fedbench.data.sources import clear_pool_cache, stack_resized
from fedbench.errors import DataError, SpecError
from fedbench.harness.run import execute, resolve_spec
from fedbench.tasks.domainnet import DOMAINNET_DOMAINS, DomainNet, DomainNetOptions

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map from /proc")


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file behind the mapping that holds ``tensor``'s first byte, or None (anonymous memory)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(a, 16) for a in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.fixture
def mapped(tmp_path, monkeypatch) -> Path:
    """Every pool mapped from disk (a threshold of 0 GiB), into a folder of the test's own."""
    folder = tmp_path / "pools"
    monkeypatch.setenv(POOL_RAM_ENV, "0")
    monkeypatch.setenv(POOL_DIR_ENV, str(folder))
    clear_pool_cache()
    yield folder
    clear_pool_cache()


def _old_fingerprint(images: torch.Tensor) -> str:
    # The formula the committed records' and cache keys' data fingerprints were made with.
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode() + str(images.dtype).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("images", [
    torch.randint(0, 256, (6, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
    torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).transpose(2, 3),
    torch.zeros(0, 3, 4, 4, dtype=torch.uint8),
    torch.randn(5, 3, generator=torch.Generator().manual_seed(2)),
], ids=["uint8", "non-contiguous", "empty", "float"])
def test_the_fingerprint_is_unchanged_and_hashed_in_slices(images, monkeypatch):
    monkeypatch.setattr(pool, "_HASH_CHUNK", 7)  # many slices, one that ends mid-image
    assert pixels_fingerprint(images) == _old_fingerprint(images)


def test_the_fingerprint_sees_every_byte(monkeypatch):
    monkeypatch.setattr(pool, "_HASH_CHUNK", 64)
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    before = pixels_fingerprint(images)
    images[-1, -1, -1, -1] = 1  # the very last byte, in the last slice
    assert pixels_fingerprint(images) != before


@linux_only
def test_a_large_pool_is_a_mapped_file_that_is_already_unlinked(mapped):
    images = empty_pool((10, 3, 16, 16), "test")
    images.fill_(7)
    backing = _mapped_file(images)
    assert backing is not None and backing.startswith(str(mapped)) and backing.endswith("(deleted)")
    assert list(mapped.iterdir()) == []  # nothing to leave behind, even on kill -9
    assert int(images.sum()) == 7 * images.numel()


@linux_only
def test_a_small_pool_stays_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv(POOL_DIR_ENV, str(tmp_path))
    assert _mapped_file(empty_pool((10, 3, 16, 16))) is None
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@linux_only
def test_the_threshold_is_inclusive(mapped, monkeypatch):
    monkeypatch.setenv(POOL_RAM_ENV, repr(1024 / 2**30))  # exactly 1 KiB
    assert _mapped_file(empty_pool((1024,))) is None
    assert _mapped_file(empty_pool((1025,))) is not None


def test_a_full_disk_is_refused_before_decoding_with_the_fix(mapped, monkeypatch):
    if not hasattr(pool.os, "posix_fallocate"):
        pytest.skip("no posix_fallocate: the file is sparse, there is no up-front reservation to fail")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pool.os, "posix_fallocate", full)
    arrays = iter([np.zeros((8, 8, 3), np.uint8)] * 4)
    with pytest.raises(DataError, match=f"No space left on device.*{POOL_DIR_ENV}.*max_per_domain"):
        stack_resized(arrays, 4, 8, "decoding test")
    assert next(arrays) is not None and list(mapped.iterdir()) == []  # nothing decoded, nothing left


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_bad_threshold_is_refused_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv(POOL_RAM_ENV, value)
    with pytest.raises(SpecError, match=f"{POOL_RAM_ENV}={value!r}.*GiB"):
        pool_ram_bytes()


def test_the_threshold_is_in_gib(monkeypatch):
    monkeypatch.setenv(POOL_RAM_ENV, "0.5")
    assert pool_ram_bytes() == 2**29
    monkeypatch.delenv(POOL_RAM_ENV)
    assert pool_ram_bytes() == 4 * 2**30


def _write_domainnet(root: Path) -> Path:
    """Four classes of flat-coloured images of varying sizes per domain, in the official layout."""
    g = np.random.default_rng(0)
    for d in DOMAINNET_DOMAINS:
        lines: dict[str, list[str]] = {"train": [], "test": []}
        for label, c in enumerate(["apple", "bird", "teapot", "zebra"]):
            (root / d / c).mkdir(parents=True)
            for split, count in (("train", 6), ("test", 2)):
                for k in range(count):
                    name = f"{label}_{split}{k}.png"
                    colour = tuple(int(v) for v in g.integers(0, 256, 3))
                    size = (int(g.integers(12, 40)), int(g.integers(12, 40)))
                    Image.new("RGB", size, colour).save(root / d / c / name)
                    lines[split].append(f"{d}/{c}/{name} {label}")
        for split, rows in lines.items():
            (root / f"{d}_{split}.txt").write_text("\n".join(rows) + "\n")
    return root


@linux_only
def test_a_mapped_domainnet_pool_gives_the_same_data_and_record(tmp_path, monkeypatch):
    root = _write_domainnet(tmp_path / "domainnet")
    options = DomainNetOptions(data_dir=str(root), classes="all", image_size=16)
    sets = {"data_dir": str(root), "classes": "all", "image_size": "16"}
    spec = resolve_spec("fedclip", "domainnet", backbone="digits-clip", rounds=2, sets=sets)
    clear_pool_cache()
    in_memory = DomainNet().load(options, 0)
    assert _mapped_file(in_memory.images) is None
    record = execute(spec, None, cache_dir=tmp_path / "cache-a")

    monkeypatch.setenv(POOL_RAM_ENV, "0")
    monkeypatch.setenv(POOL_DIR_ENV, str(tmp_path / "pools"))
    clear_pool_cache()
    mapped = DomainNet().load(options, 0)
    assert _mapped_file(mapped.images) is not None
    assert torch.equal(mapped.images, in_memory.images)
    assert mapped.fingerprint() == in_memory.fingerprint()
    again = execute(spec, None, cache_dir=tmp_path / "cache-b")  # a fresh cache: encoded from the map
    assert again["provenance"]["data_fingerprint"] == record["provenance"]["data_fingerprint"]
    for block in ("partition", "comm", "metrics"):
        assert again[block] == record[block], block
    assert record["metrics"]["final"]["last"]["global_acc"] is not None
    clear_pool_cache()


if sys.platform == "win32":  # TemporaryFile is not unlinked on Windows
    pytestmark = pytest.mark.skip(reason="pool files are unlinked at creation on POSIX only")
