"""Where a decoded image pool lives: in memory when it is small, else in a memory-mapped file.

DomainNet's 586k images at 224 px are 88 GB of uint8, more than any laptop holds as one tensor.
A pool larger than ``FEDBENCH_POOL_RAM_GB`` (default 4) is decoded straight into a file under
``FEDBENCH_POOL_DIR`` (default: the cache root's ``pools/`` folder) and used through a memory map:
the kernel pages images in as the encoder reads them batch by batch, and evicts them under memory
pressure instead of the process running out of memory. Code that reads the pool sees an ordinary
uint8 tensor either way, and the pixels, hence every fingerprint and record, are the same.

- The file is unlinked as soon as it is created, so no run leaves it behind, not even one killed
  with kill -9; its space returns to the disk when the process ends.
- Its space is reserved up front (``posix_fallocate``), so a full disk is a clear error before
  decoding starts, not a SIGBUS halfway through. (Without ``posix_fallocate``, on macOS, the file is
  sparse and that guard is absent.)
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedbench.core.formatting import format_bytes
from fedbench.core.paths import default_cache_root
from fedbench.errors import DataError, SpecError

POOL_RAM_ENV = "FEDBENCH_POOL_RAM_GB"
POOL_DIR_ENV = "FEDBENCH_POOL_DIR"
DEFAULT_POOL_RAM_GB = 4.0
_HASH_CHUNK = 64 * 2**20  # bytes hashed at a time: a fingerprint never copies the whole pool


def pool_ram_bytes() -> int:
    """The largest pool kept in memory, from ``FEDBENCH_POOL_RAM_GB`` (GiB; 0: always mapped)."""
    raw = os.environ.get(POOL_RAM_ENV, "").strip()
    if not raw:
        return int(DEFAULT_POOL_RAM_GB * 2**30)
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not math.isfinite(gib) or gib < 0:
        raise SpecError(f"{POOL_RAM_ENV}={raw!r}: give the largest image pool to keep in memory in GiB, a number "
                        f">= 0 (e.g. {POOL_RAM_ENV}=4; 0 maps every pool from disk).")
    return int(gib * 2**30)


def pool_dir() -> Path:
    """``$FEDBENCH_POOL_DIR``, else ``pools/`` under the feature cache's root."""
    env = os.environ.get(POOL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return default_cache_root() / "pools"


def empty_pool(shape: tuple[int, ...], what: str = "image") -> Tensor:
    """An uninitialised uint8 tensor of ``shape``: in memory up to :func:`pool_ram_bytes`, else
    backed by an unlinked, fully reserved file that is memory-mapped."""
    nbytes = math.prod(shape)
    if nbytes <= pool_ram_bytes():
        return torch.empty(shape, dtype=torch.uint8)
    folder = pool_dir()
    need = f"the decoded {what} pool {tuple(shape)} needs {format_bytes(nbytes)} of disk under {folder}"
    fix = (f"free space there, point {POOL_DIR_ENV} at a disk with room, or shrink the pool (max_per_domain, "
           f"a smaller image_size)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # TemporaryFile is unlinked at creation on POSIX; the map keeps its own descriptor.
        with tempfile.TemporaryFile(dir=folder, prefix="pool-") as file:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(file.fileno(), 0, nbytes)
            else:
                file.truncate(nbytes)
            array = np.memmap(file, dtype=np.uint8, mode="r+", shape=shape)
    except OSError as exc:
        raise DataError(f"{need} ({exc.strerror or exc}): {fix}.") from exc
    return torch.from_numpy(array)


def pixels_fingerprint(images: Tensor) -> str:
    """Content hash of an image pool (shape, dtype and bytes), hashed in slices: the digest of the
    whole byte string, without a copy of it (a mapped pool is read once, page by page)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode() + str(images.dtype).encode())
    data = images.contiguous().reshape(-1).cpu().view(torch.uint8).numpy()  # the raw bytes, not a copy
    for start in range(0, len(data), _HASH_CHUNK):
        h.update(data[start : start + _HASH_CHUNK])
    return h.hexdigest()[:16]
