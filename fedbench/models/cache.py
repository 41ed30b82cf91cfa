"""Feature cache: a frozen backbone encodes each image once, ever.

An entry is addressed by its content: ``sha256(backbone fingerprint, data fingerprint,
preprocess id)``. Same weights, same pixels, same preprocessing -> same key, in any process and
on any machine; change any of the three and the key changes, so a stale entry is never read.

On disk an entry is two files in ``<root>/features/``:

- ``<key>.npy``: the features, float16 [N, D] (half the bytes of float32; cosine scores on
  normalised features move by ~1e-3 at most, far below any accuracy step);
- ``<key>.json``: the sidecar, which says what the entry is (key, kind, format version, backbone
  name and fingerprint, data fingerprint, preprocess id) and what its array is (shape, dtype,
  file size, sha256 of the array bytes), plus when it was created.

A read verifies, before any feature is used, that

1. the sidecar is a UTF-8 JSON object written by this sidecar version (older sidecars record no
   identity, so their entries are unverifiable and rebuilt);
2. the sidecar's identity equals the request's: key, kind, format version, backbone fingerprint,
   data fingerprint (pixels, or the list of texts) and preprocess id. An entry copied under
   another entry's name, whole with its sidecar, fails here. The backbone *name* is recorded but
   not compared: it is not part of the key, and two names for the same weights give the same
   features;
3. the array is a C-ordered float16 ``.npy`` whose shape equals the sidecar's and the request's,
   whose file size is exactly its header plus its data (and the sidecar's byte count), and whose
   data bytes hash to the sidecar's sha256.

An entry that fails any check is reported with a :class:`CacheWarning` naming its file, deleted,
and rebuilt; it is never used. The checks catch damage and mix-ups, not forgery: anyone who can
write the cache folder can write a matching sidecar.

Writes are atomic and never go through a memory map (a map into a sparse file on a full disk
kills the process with SIGBUS): the array is streamed with ordinary writes into a temp file
whose space is reserved first (``posix_fallocate`` where available), the sidecar likewise, and
both are moved into place with ``os.replace``, array first, sidecar last, under an exclusive
lock on the folder (reads take it shared). So no reader ever sees one writer's array with
another's sidecar, and two runs writing the same entry at once both succeed and leave one whole
entry. A cache that cannot be written (disk full, read-only folder) does not stop the run: the
features are already in memory, so the run continues uncached with a :class:`CacheWarning` that
names the fix.

Temp files are named ``.<key>.<pid>.<token>.npy|json`` and locked by their writer while it
lives. A killed writer leaves them behind; ``fedbench cache ls`` reports them and
``fedbench cache clean`` removes them, never one that a live writer holds.

This module holds the keys and the policy; ``fedbench.models.cache_disk`` the files, the
verification and the locks.
"""

from __future__ import annotations

import errno
import hashlib
import math
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedbench.core.formatting import format_bytes
from fedbench.core.hashing import json_digest
from fedbench.core.paths import default_cache_root
from fedbench.data.dataset import pixels_fingerprint
from fedbench.errors import CacheError, DataError
from fedbench.models import cache_disk as disk
from fedbench.models.cache_disk import FORMAT_VERSION, SIDECAR_VERSION, TempFile


class CacheWarning(UserWarning):
    """A cache entry failed verification and is rebuilt, or could not be written (the run goes on uncached)."""


class EncodesImages(Protocol):
    """What the cache needs from a backbone (see ``fedbench.models.backbones.Backbone``)."""

    name: str
    embed_dim: int
    fingerprint: str
    preprocess_id: str

    def encode_image(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: list[str]) -> Tensor: ...


@dataclass
class CacheStats:
    """Counters for tests and logs: an image that is encoded twice shows up here."""

    hits: int = 0
    misses: int = 0
    rebuilt: int = 0  # entries that failed verification and were encoded again
    uncached: int = 0  # entries that could not be written (the run went on without them)
    images_encoded: int = 0
    texts_encoded: int = 0


@dataclass(frozen=True)
class CacheEntry:
    key: str
    kind: str  # "image" | "text" | "incomplete"
    backbone: str
    shape: tuple[int, ...]
    bytes: int
    created: str


@dataclass
class CleanReport:
    """What ``FeatureCache.clean`` removed, and the temp files it kept because a live writer holds them."""

    temp_files: list[TempFile] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    kept: list[TempFile] = field(default_factory=list)


class FeatureCache:
    """Content-addressed, verified, float16 store of backbone features.

    >>> cache = FeatureCache()                       # $FEDBENCH_CACHE or ~/.cache/fedbench
    >>> feats = cache.features(backbone, pool.images)  # float32 [N, D], encoded at most once
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.dir = self.root / "features"
        self.stats = CacheStats()

    # ----------------------------------------------------------------------------- keys

    def key(self, backbone: EncodesImages, images: Tensor) -> str:
        """The content address of ``backbone``'s features of ``images``."""
        return self._image_request(backbone, images).key

    def text_key(self, backbone: EncodesImages, texts: Sequence[str]) -> str:
        return self._text_request(backbone, list(texts)).key

    def _image_request(self, backbone: EncodesImages, images: Tensor) -> disk.EntryRequest:
        _check_images(images)
        data = pixels_fingerprint(images)
        key = json_digest(  # unchanged since format 1: these keys address caches on users' disks
            {
                "format": FORMAT_VERSION,
                "kind": "image",
                "backbone": backbone.fingerprint,
                "data": data,
                "preprocess": backbone.preprocess_id,
            }
        )
        shape = (int(images.shape[0]), int(backbone.embed_dim))
        return disk.EntryRequest(key, "image", shape, backbone.name, backbone.fingerprint, data, backbone.preprocess_id)

    def _text_request(self, backbone: EncodesImages, texts: list[str]) -> disk.EntryRequest:
        key = json_digest({"format": FORMAT_VERSION, "kind": "text", "backbone": backbone.fingerprint, "texts": texts})
        shape = (len(texts), int(backbone.embed_dim))
        data = json_digest(texts, length=16)
        return disk.EntryRequest(key, "text", shape, backbone.name, backbone.fingerprint, data, None)

    # ----------------------------------------------------------------------------- reads

    def features(self, backbone: EncodesImages, images: Tensor, batch_size: int = 256, progress: bool = True) -> Tensor:
        """Image features float32 [N, D] of uint8 ``images`` [N, C, H, W], from the cache or encoded."""
        request = self._image_request(backbone, images)
        n, dim = request.shape
        if n == 0:
            return torch.zeros(request.shape, dtype=torch.float32)
        cached = self._lookup(request)
        if cached is not None:
            return cached

        bar = tqdm(
            total=n,
            unit="img",
            desc=f"encoding {backbone.name}",
            disable=not (progress and sys.stderr.isatty()),
        )

        def batches() -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, n, batch_size):
                chunk = backbone.encode_image(images[start : start + batch_size])
                rows = _storable(chunk, (min(batch_size, n - start), dim), backbone.name, "images")
                self.stats.images_encoded += len(rows)
                bar.update(len(rows))
                yield start, rows

        try:
            return self._store(request, batches())
        finally:
            bar.close()

    def text_features(self, backbone: EncodesImages, texts: Sequence[str]) -> Tensor:
        """Text features float32 [T, D] of ``texts`` (prompts are few, but methods ask often)."""
        texts = list(texts)
        request = self._text_request(backbone, texts)
        if not texts:
            return torch.zeros(request.shape, dtype=torch.float32)
        cached = self._lookup(request)
        if cached is not None:
            return cached

        def one_batch() -> Iterator[tuple[int, np.ndarray]]:
            rows = _storable(backbone.encode_text(texts), request.shape, backbone.name, "texts")
            self.stats.texts_encoded += len(texts)
            yield 0, rows

        return self._store(request, one_batch())

    def _lookup(self, request: disk.EntryRequest) -> Tensor | None:
        """A verified entry (a hit), or None (a miss: the caller encodes and stores)."""
        cached = self._load(request)
        if cached is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        return cached

    # ------------------------------------------------------------------------ listing

    def ls(self) -> list[CacheEntry]:
        """Every entry under the root, oldest first; a half of an entry shows as incomplete."""
        entries = []
        for key in self._entry_keys():
            array = self._array(key)
            size = disk.size_or_zero(array)
            try:
                meta = disk.read_sidecar(self._sidecar(key))
                if not array.is_file():
                    raise disk.Corrupt("no array")
                shape = meta.get("shape")
                entries.append(
                    CacheEntry(
                        key=key,
                        kind=str(meta.get("kind", "?")),
                        backbone=str(meta.get("backbone", "?")),
                        shape=tuple(shape) if disk.is_shape(shape) else (),
                        bytes=size,
                        created=str(meta.get("created", "")),
                    )
                )
            except (disk.Corrupt, FileNotFoundError):
                entries.append(CacheEntry(key, "incomplete", "?", (), size, ""))
        return sorted(entries, key=lambda e: (e.created, e.key))

    def temp_files(self) -> list[TempFile]:
        """Temp files of writes, in progress (live) or left by killed writers, oldest first."""
        return disk.temp_files(self.dir)

    def clean(self) -> CleanReport:
        """Remove temp files that no live writer holds, and incomplete entries (half an entry)."""
        report = CleanReport()
        with disk.folder_lock(self.dir, exclusive=True):  # no commit runs while halves are judged
            for temp in self.temp_files():
                if temp.live:
                    report.kept.append(temp)
                elif disk.unlink(temp.path):
                    report.temp_files.append(temp)
            for entry in self.ls():
                if entry.kind == "incomplete":
                    self._delete(entry.key)
                    report.incomplete.append(entry.key)
        return report

    def rm(self, key: str) -> list[str]:
        """Remove the entry whose key starts with ``key`` (or every entry for ``"all"``)."""
        if key == "all":  # also sweeps temp files that killed writers left behind, never a live one
            with disk.folder_lock(self.dir, exclusive=True):
                removed = self._entry_keys()
                for stem in removed:
                    self._delete(stem)
                for temp in self.temp_files():
                    if not temp.live:
                        disk.unlink(temp.path)
            return removed
        prefix = key.lower()
        if not re.fullmatch(r"[0-9a-f]+", prefix):
            raise CacheError(f"{key!r} is not a cache key: keys are hex digits; `fedbench cache ls` lists them.")
        if not self.dir.is_dir():
            raise CacheError(f"no cache entry matches {key!r}: the cache at {self.root} is empty.")
        with disk.folder_lock(self.dir, exclusive=True):
            matches = [k for k in self._entry_keys() if k.startswith(prefix)]
            if not matches:
                raise CacheError(f"no cache entry matches {key!r}; `fedbench cache ls` lists the keys.")
            if len(matches) > 1:
                raise CacheError(
                    f"{key!r} matches {len(matches)} cache entries ({', '.join(m[:12] for m in matches)}); "
                    f"give more characters of the key."
                )
            self._delete(matches[0])
        return matches

    # ------------------------------------------------------------------------ storage

    def _array(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def _sidecar(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _entry_keys(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        stems = {p.stem for p in self.dir.iterdir() if not p.name.startswith(".") and p.suffix in (".npy", ".json")}
        return sorted(stems)

    def _delete(self, key: str) -> None:
        disk.unlink(self._sidecar(key))  # sidecar first: the entry stops being whole
        disk.unlink(self._array(key))

    def _load(self, request: disk.EntryRequest) -> Tensor | None:
        """The verified entry as float32, or None (missing, or corrupt: warned and deleted)."""
        array, sidecar = self._array(request.key), self._sidecar(request.key)
        with disk.folder_lock(self.dir, exclusive=False):  # no commit swaps the files while they are read
            seen = (disk.file_id(array), disk.file_id(sidecar))
            if seen == (None, None):
                return None
            try:
                return torch.from_numpy(disk.verified(array, sidecar, request))
            except disk.Corrupt as bad:
                problem = str(bad)
        warnings.warn(
            f"feature cache entry {array} failed verification ({problem}); deleting and rebuilding it.",
            CacheWarning,
            stacklevel=4,  # the caller of features() / text_features()
        )
        self.stats.rebuilt += 1
        with disk.folder_lock(self.dir, exclusive=True):
            if (disk.file_id(array), disk.file_id(sidecar)) == seen:  # not a whole entry another run just wrote
                self._delete(request.key)
        return None

    def _store(self, request: disk.EntryRequest, batches: Iterable[tuple[int, np.ndarray]]) -> Tensor:
        """Encode into memory while streaming the entry to disk; commit it, or warn and go on uncached."""
        result = np.empty(request.shape, dtype=np.float32)
        digest = hashlib.sha256()
        writer: disk.EntryWriter | None = None
        failure: OSError | None = None
        try:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                writer = disk.EntryWriter(self.dir, request.key, request.shape)
            except OSError as exc:
                failure = exc
            for start, rows in batches:
                result[start : start + len(rows)] = rows
                digest.update(memoryview(rows).cast("B"))  # rows are contiguous and in file order
                if writer is not None:
                    try:
                        writer.write(rows)
                    except OSError as exc:
                        writer.abort()
                        writer, failure = None, exc
            if writer is not None:
                try:
                    writer.commit(self._array(request.key), self._sidecar(request.key), {
                        "sidecar_version": SIDECAR_VERSION,
                        **request.identity(),
                        "backbone": request.backbone,
                        "shape": list(request.shape),
                        "dtype": np.dtype(disk.STORE_DTYPE).name,
                        "sha256": digest.hexdigest(),
                        "bytes": writer.size,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    })
                except OSError as exc:
                    failure = exc
        finally:
            if writer is not None:
                writer.abort()  # a no-op after a commit; else the temp files go
        if failure is not None:
            self.stats.uncached += 1
            warnings.warn(
                _uncached_message(self._array(request.key), request.shape, failure), CacheWarning, stacklevel=3
            )
        return torch.from_numpy(result)


def _uncached_message(array: Path, shape: tuple[int, int], exc: OSError) -> str:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    needs = format_bytes(math.prod(shape) * np.dtype(disk.STORE_DTYPE).itemsize)
    fix = (
        f"free some space (the entry needs {needs}) or point --cache-dir or $FEDBENCH_CACHE at a folder with room"
        if full
        else "point --cache-dir or $FEDBENCH_CACHE at a writable folder"
    )
    return (
        f"could not write the feature cache entry {array} ({exc.strerror or exc}); this run goes on uncached "
        f"(its features are in memory, the next run encodes them again). To cache them, {fix}."
    )


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise DataError(
            f"the feature cache encodes uint8 images [N, C, H, W]; got {what}. "
            f"Pass the task's pixel pool (FederatedDataset.images), not features."
        )


def _storable(features: Tensor, expected: tuple[int, int], backbone: str, what: str) -> np.ndarray:
    """Encoder output as the float16 rows the cache stores, refused if misshapen or not finite."""
    with np.errstate(over="ignore"):  # overflow is checked (and explained) below
        rows = features.detach().to("cpu", torch.float32).numpy().astype(disk.STORE_DTYPE)
    if rows.shape != expected:
        raise CacheError(
            f"backbone {backbone!r} returned features of shape {rows.shape} for {expected[0]} {what}; "
            f"expected D={expected[1]} (its embed_dim)."
        )
    if not np.isfinite(rows).all():  # float16 tops out at 65504
        raise CacheError(
            f"backbone {backbone!r} returned features that are not finite in float16 "
            f"(NaN, or beyond +-65504); the cache stores float16."
        )
    return np.ascontiguousarray(rows)
