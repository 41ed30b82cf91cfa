"""Feature cache: a frozen backbone encodes each image once, ever.

An entry is addressed by its content: ``sha256(backbone fingerprint, data fingerprint,
preprocess id)``. Same weights, same pixels, same preprocessing -> same key, in any process and
on any machine; change any of the three and the key changes, so a stale entry is never read.

On disk an entry is two files in ``<root>/features/``:

- ``<key>.npy``: the features, float16 [N, D] (half the bytes of float32; cosine scores on
  normalised features move by ~1e-3 at most, far below any accuracy step);
- ``<key>.json``: the sidecar: shape, dtype, sha256 of the array bytes, backbone name, created.

Writes are atomic: each file is written under a temporary name and moved into place with
``os.replace``, the array first and the sidecar last, so the sidecar is the commit mark. A crash
leaves at worst an array without a sidecar, which reads as incomplete and is rebuilt.

Reads are verified: the array is memory-mapped, its shape checked against the sidecar and the
request, and its bytes hashed against the sidecar. A truncated or corrupted entry is reported
with a warning naming the file and rebuilt; it is never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedbench.core.hashing import json_digest
from fedbench.data.dataset import pixels_fingerprint
from fedbench.errors import CacheError, DataError

FORMAT_VERSION = 1
_STORE_DTYPE = np.float16


class CacheWarning(UserWarning):
    """A cache entry failed verification and is being rebuilt."""


class EncodesImages(Protocol):
    """What the cache needs from a backbone (see ``fedbench.models.backbones.Backbone``)."""

    name: str
    embed_dim: int
    fingerprint: str
    preprocess_id: str

    def encode_image(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: list[str]) -> Tensor: ...


def default_cache_root() -> Path:
    """``$FEDBENCH_CACHE`` if set, else ``~/.cache/fedbench``."""
    env = os.environ.get("FEDBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedbench"


@dataclass
class CacheStats:
    """Counters for tests and logs: an image that is encoded twice shows up here."""

    hits: int = 0
    misses: int = 0
    rebuilt: int = 0  # entries that failed verification and were encoded again
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


class _Corrupt(Exception):
    """Internal: an entry that exists but must not be used."""


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
        _check_images(images)
        return json_digest(
            {
                "format": FORMAT_VERSION,
                "kind": "image",
                "backbone": backbone.fingerprint,
                "data": pixels_fingerprint(images),
                "preprocess": backbone.preprocess_id,
            }
        )

    def text_key(self, backbone: EncodesImages, texts: Sequence[str]) -> str:
        return json_digest(
            {"format": FORMAT_VERSION, "kind": "text", "backbone": backbone.fingerprint, "texts": list(texts)}
        )

    # ----------------------------------------------------------------------------- reads

    def features(self, backbone: EncodesImages, images: Tensor, batch_size: int = 256, progress: bool = True) -> Tensor:
        """Image features float32 [N, D] of uint8 ``images`` [N, C, H, W], from the cache or encoded."""
        key = self.key(backbone, images)
        n = int(images.shape[0])
        shape = (n, int(backbone.embed_dim))
        if n == 0:
            return torch.zeros(shape, dtype=torch.float32)
        cached = self._lookup(key, shape)
        if cached is not None:
            return cached

        bar = tqdm(
            total=n,
            unit="img",
            desc=f"encoding {backbone.name}",
            disable=not (progress and sys.stderr.isatty()),
        )

        def fill(out: np.ndarray, h: Any) -> None:
            for start in range(0, n, batch_size):
                chunk = backbone.encode_image(images[start : start + batch_size])
                rows = _storable(chunk, (min(batch_size, n - start), shape[1]), backbone.name, "images")
                out[start : start + len(rows)] = rows
                h.update(np.ascontiguousarray(rows).tobytes())  # rows are contiguous in the file
                self.stats.images_encoded += len(rows)
                bar.update(len(rows))

        try:
            meta = {"kind": "image", "backbone": backbone.name, "preprocess_id": backbone.preprocess_id}
            return self._store(key, shape, fill, meta)
        finally:
            bar.close()

    def text_features(self, backbone: EncodesImages, texts: Sequence[str]) -> Tensor:
        """Text features float32 [T, D] of ``texts`` (prompts are few, but methods ask often)."""
        texts = list(texts)
        key = self.text_key(backbone, texts)
        shape = (len(texts), int(backbone.embed_dim))
        if not texts:
            return torch.zeros(shape, dtype=torch.float32)
        cached = self._lookup(key, shape)
        if cached is not None:
            return cached

        def fill(out: np.ndarray, h: Any) -> None:
            out[:] = _storable(backbone.encode_text(texts), shape, backbone.name, "texts")
            h.update(np.ascontiguousarray(out).tobytes())
            self.stats.texts_encoded += len(texts)

        return self._store(key, shape, fill, {"kind": "text", "backbone": backbone.name})

    def _lookup(self, key: str, shape: tuple[int, int]) -> Tensor | None:
        """A verified entry (a hit), or None (a miss: the caller encodes and stores)."""
        cached = self._load(key, shape)
        if cached is not None:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        return cached

    # ------------------------------------------------------------------------ listing

    def ls(self) -> list[CacheEntry]:
        """Every entry under the root, oldest first; arrays without a sidecar show as incomplete."""
        if not self.dir.is_dir():
            return []
        entries = []
        for npy in sorted(self.dir.glob("*.npy")):
            if npy.name.startswith("."):  # a write in progress (or a crashed one)
                continue
            key = npy.stem
            try:
                meta = json.loads(self._sidecar(key).read_text())
                entries.append(
                    CacheEntry(
                        key=key,
                        kind=str(meta.get("kind", "?")),
                        backbone=str(meta.get("backbone", "?")),
                        shape=tuple(meta.get("shape", ())),
                        bytes=npy.stat().st_size,
                        created=str(meta.get("created", "")),
                    )
                )
            except (OSError, ValueError):
                entries.append(CacheEntry(key, "incomplete", "?", (), npy.stat().st_size, ""))
        return sorted(entries, key=lambda e: (e.created, e.key))

    def rm(self, key: str) -> list[str]:
        """Remove the entry whose key starts with ``key`` (or every entry for ``"all"``)."""
        if not self.dir.is_dir():
            if key == "all":
                return []
            raise CacheError(f"no cache entry matches {key!r}: the cache at {self.root} is empty.")
        if key == "all":  # also sweeps temp files that a killed process left behind
            removed = sorted({p.stem for p in self.dir.glob("[!.]*") if p.suffix in (".npy", ".json")})
            for path in self.dir.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)
            return removed
        matches = sorted({p.stem for p in self.dir.glob(f"{key}*") if p.suffix in (".npy", ".json")})
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

    def _delete(self, key: str) -> None:
        self._sidecar(key).unlink(missing_ok=True)  # sidecar first: the entry stops being whole
        self._array(key).unlink(missing_ok=True)

    def _load(self, key: str, shape: tuple[int, int]) -> Tensor | None:
        """The verified entry as float32, or None (missing, or corrupt: warned and deleted)."""
        array, sidecar = self._array(key), self._sidecar(key)
        if not array.exists() and not sidecar.exists():
            return None
        try:
            out = _verified(array, sidecar, shape)
        except _Corrupt as bad:
            warnings.warn(
                f"feature cache entry {array} failed verification ({bad}); deleting and rebuilding it.",
                CacheWarning,
                stacklevel=3,
            )
            self._delete(key)
            self.stats.rebuilt += 1
            return None
        return torch.from_numpy(out)

    def _store(
        self,
        key: str,
        shape: tuple[int, int],
        fill: Callable[[np.ndarray, Any], None],
        meta: dict[str, Any],
    ) -> Tensor:
        """Write an entry atomically: array under a temp name, then sidecar (the commit mark)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot create the feature cache at {self.dir} ({exc}); "
                f"point FEDBENCH_CACHE or --cache-dir at a writable folder."
            ) from exc
        token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp_array = self.dir / f".{key}.{token}.npy"
        tmp_sidecar = self.dir / f".{key}.{token}.json"
        h = hashlib.sha256()
        try:
            out = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=_STORE_DTYPE, shape=shape)
            fill(out, h)
            out.flush()
            result = np.array(out, dtype=np.float32)
            del out  # close the map before the move (required on Windows, tidy elsewhere)
            _fsync(tmp_array)
            sidecar = {
                "format": FORMAT_VERSION,
                "key": key,
                "shape": list(shape),
                "dtype": np.dtype(_STORE_DTYPE).name,
                "sha256": h.hexdigest(),
                "bytes": tmp_array.stat().st_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **meta,
            }
            tmp_sidecar.write_text(json.dumps(sidecar, indent=1, sort_keys=True))
            _fsync(tmp_sidecar)
            os.replace(tmp_array, self._array(key))
            os.replace(tmp_sidecar, self._sidecar(key))
        except OSError as exc:
            raise CacheError(
                f"could not write the feature cache entry {self._array(key)} ({exc}); "
                f"free some space or point FEDBENCH_CACHE or --cache-dir at another folder."
            ) from exc
        finally:
            tmp_array.unlink(missing_ok=True)
            tmp_sidecar.unlink(missing_ok=True)
        return torch.from_numpy(result)


def _verified(array: Path, sidecar: Path, shape: tuple[int, int]) -> np.ndarray:
    """The array at ``array`` as float32 if it matches its sidecar and ``shape``; else _Corrupt."""
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError as exc:
        raise _Corrupt("no sidecar: an interrupted write") from exc
    except (OSError, ValueError) as exc:
        raise _Corrupt(f"unreadable sidecar: {exc}") from exc
    try:
        data = np.load(array, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as exc:
        raise _Corrupt("sidecar without its array") from exc
    except (OSError, ValueError) as exc:  # a truncated file fails to map
        raise _Corrupt(f"unreadable array: {exc}") from exc
    if data.dtype != _STORE_DTYPE or tuple(data.shape) != tuple(meta.get("shape", ())):
        raise _Corrupt(f"array is {data.dtype} {tuple(data.shape)}, sidecar says {meta.get('shape')}")
    if tuple(data.shape) != tuple(shape):
        raise _Corrupt(f"array shape {tuple(data.shape)} != requested {tuple(shape)}")
    if not data.flags.c_contiguous:
        raise _Corrupt("array is not C-ordered")
    digest = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
    if digest != meta.get("sha256"):
        raise _Corrupt("sha256 of the array bytes differs from the sidecar")
    return np.array(data, dtype=np.float32)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise DataError(
            f"the feature cache encodes uint8 images [N, C, H, W]; got {what}. "
            f"Pass the task's pixel pool (FederatedDataset.images), not features."
        )


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _storable(features: Tensor, expected: tuple[int, int], backbone: str, what: str) -> np.ndarray:
    """Encoder output as the float16 rows the cache stores, refused if misshapen or not finite."""
    with np.errstate(over="ignore"):  # overflow is checked (and explained) below
        rows = features.detach().to("cpu", torch.float32).numpy().astype(_STORE_DTYPE)
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
    return rows
