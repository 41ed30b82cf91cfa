"""The feature cache's files: entry writer, verification, folder lock, temp files (see ``fedbench.models.cache``).

Internal to the cache; ``FeatureCache`` is the interface. Kept apart so that each module reads
as one page: the cache's keys and policy there, what happens on disk here.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedbench.errors import CacheError

try:  # POSIX; without it (Windows) commits are unlocked and temp files are judged by age alone
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1  # part of every key: changing it re-addresses every entry on every disk
SIDECAR_VERSION = 2  # 2 added the identity fields; sidecars without them are unverifiable
STORE_DTYPE = np.float16
IDENTITY_FIELDS = ("format", "key", "kind", "backbone_fingerprint", "data_fingerprint", "preprocess_id")
_SIDECAR_MAX_BYTES = 1 << 20  # a real sidecar is a few hundred bytes
# A writer locks its temp file right after creating it; a lock-less temp of a live pid younger
# than this may be one in that instant. Where locks cannot be had, a live pid's temp is trusted
# for an hour (writes refresh its mtime batch by batch).
_UNLOCKED_GRACE_S = 60.0
_NO_LOCKS_GRACE_S = 3600.0
_TEMP_NAME = re.compile(r"\.(?P<key>[0-9a-f]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.(?:npy|json)")


@dataclass(frozen=True)
class TempFile:
    """A temp file of a write: in progress (``live``) or left behind by a writer that died."""

    path: Path
    key: str
    pid: int
    bytes: int
    age_s: float
    live: bool


@dataclass(frozen=True)
class EntryRequest:
    """What a read asks for; the sidecar of the entry it finds must say the same."""

    key: str
    kind: str
    shape: tuple[int, int]
    backbone: str
    backbone_fingerprint: str
    data_fingerprint: str
    preprocess_id: str | None  # None for text: image preprocessing does not touch text features

    def identity(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "key": self.key,
            "kind": self.kind,
            "backbone_fingerprint": self.backbone_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "preprocess_id": self.preprocess_id,
        }


class Corrupt(Exception):
    """Internal: an entry that exists but must not be used."""


class EntryWriter:
    """One entry's temp files: the array streamed with plain writes into reserved space, then the sidecar.

    Each temp file is locked (flock) by this process from its creation until it is moved into
    place or removed, so ``clean`` can tell a live writer from a dead one; the kernel drops the
    lock when the process dies, ``kill -9`` included.
    """

    def __init__(self, folder: Path, key: str, shape: tuple[int, int]) -> None:
        token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.folder = folder
        self.tmp_array = folder / f".{key}.{token}.npy"
        self.tmp_sidecar = folder / f".{key}.{token}.json"
        self._files: list[BinaryIO] = []
        self._done = False
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(  # the same header np.save writes
            header, {"descr": np.lib.format.dtype_to_descr(np.dtype(STORE_DTYPE)), "fortran_order": False,
                     "shape": tuple(shape)}
        )
        self.size = header.tell() + math.prod(shape) * np.dtype(STORE_DTYPE).itemsize
        try:
            self._array_file = self._create(self.tmp_array)
            reserve(self._array_file.fileno(), self.size)  # a full disk fails here, before any encoding
            write_all(self._array_file.fileno(), header.getbuffer())
        except BaseException:
            self.abort()
            raise

    def _create(self, path: Path) -> BinaryIO:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        file = os.fdopen(fd, "wb", buffering=0)
        self._files.append(file)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks: `clean` falls back to pid and age
                pass
        return file

    def write(self, rows: np.ndarray) -> None:
        write_all(self._array_file.fileno(), memoryview(np.ascontiguousarray(rows)).cast("B"))

    def commit(self, array: Path, sidecar: Path, meta: dict[str, Any]) -> None:
        written = os.fstat(self._array_file.fileno()).st_size
        if written != self.size or self._array_file.tell() != self.size:  # a bug, not the disk
            raise CacheError(f"internal: wrote {self._array_file.tell()} of {self.size} bytes of {self.tmp_array}")
        os.fsync(self._array_file.fileno())
        sidecar_file = self._create(self.tmp_sidecar)
        write_all(sidecar_file.fileno(), memoryview(json.dumps(meta, indent=1, sort_keys=True).encode()))
        os.fsync(sidecar_file.fileno())
        if fcntl is None:  # Windows cannot move an open file; there are no locks to keep anyway
            self._close()
        with folder_lock(self.folder, exclusive=True):  # the pair changes as one for every reader
            os.replace(self.tmp_array, array)
            os.replace(self.tmp_sidecar, sidecar)
        self._done = True
        self._close()

    def abort(self) -> None:
        self._close()
        if not self._done:
            unlink(self.tmp_array)
            unlink(self.tmp_sidecar)
            self._done = True

    def _close(self) -> None:
        while self._files:
            try:
                self._files.pop().close()
            except OSError:
                pass


def verified(array: Path, sidecar: Path, request: EntryRequest) -> np.ndarray:
    """The array at ``array`` as float32 if it and its sidecar are the entry ``request`` asks for; else Corrupt."""
    try:
        meta = read_sidecar(sidecar)
    except FileNotFoundError as exc:
        raise Corrupt("no sidecar: an interrupted write") from exc
    if meta.get("sidecar_version") != SIDECAR_VERSION:
        raise Corrupt(
            f"sidecar version {meta.get('sidecar_version', 1)!r}, not {SIDECAR_VERSION}: written by an older "
            f"fedbench, it does not record which backbone and data the entry is of, so it cannot be verified"
        )
    wanted = request.identity()
    differ = [f"{name} is {meta.get(name)!r}, requested {wanted[name]!r}" for name in IDENTITY_FIELDS
              if meta.get(name) != wanted[name]]
    if differ:
        raise Corrupt(f"it is not the requested entry (copied from another one?): {'; '.join(differ)}")
    try:
        data = np.lib.format.open_memmap(array, mode="r")  # .npy only: never a pickle, never an .npz
        size = array.stat().st_size
    except FileNotFoundError as exc:
        raise Corrupt("sidecar without its array") from exc
    except (OSError, ValueError, EOFError) as exc:  # a truncated file fails to map
        raise Corrupt(f"unreadable array: {exc}") from exc
    stated = meta.get("shape")
    if data.dtype != STORE_DTYPE or not is_shape(stated) or tuple(data.shape) != tuple(stated):
        raise Corrupt(f"array is {data.dtype} {tuple(data.shape)}, sidecar says {meta.get('dtype')} {stated}")
    if tuple(data.shape) != tuple(request.shape):
        raise Corrupt(f"array shape {tuple(data.shape)} != requested {tuple(request.shape)}")
    if not data.flags.c_contiguous:
        raise Corrupt("array is not C-ordered")
    if size != data.offset + data.nbytes or size != meta.get("bytes"):
        raise Corrupt(f"array file is {size} bytes; its header and data make {data.offset + data.nbytes}, "
                       f"the sidecar says {meta.get('bytes')}")
    digest = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
    if digest != meta.get("sha256"):
        raise Corrupt("sha256 of the array bytes differs from the sidecar")
    return np.array(data, dtype=np.float32)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar as a dict; Corrupt if it is not a small UTF-8 JSON object (FileNotFoundError if absent)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_SIDECAR_MAX_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Corrupt(f"unreadable sidecar: {exc}") from exc
    if len(raw) > _SIDECAR_MAX_BYTES:
        raise Corrupt("sidecar is too large to be one")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise Corrupt(f"unreadable sidecar: {exc}") from exc
    if not isinstance(meta, dict):
        raise Corrupt(f"sidecar is a JSON {type(meta).__name__}, not an object")
    return meta


def is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


@contextmanager
def folder_lock(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """flock on the features folder itself: commits and deletions exclusive, reads shared.

    The folder, not a lock file, so a read-only cache needs nothing written. Where locks cannot
    be had (no fcntl, no folder yet, a filesystem without them) this locks nothing.
    """
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock


def written_now(path: Path, pid: int, age_s: float) -> bool:
    """Whether a live writer may still be writing this temp file (then it must not be removed)."""
    if fcntl is None:
        return pid_alive(pid) and age_s < _NO_LOCKS_GRACE_S
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # its writer holds it: only a live process holds a lock
    except FileNotFoundError:  # moved into place or removed meanwhile: nothing to clean
        return True
    except OSError:  # no locks on this filesystem
        return pid_alive(pid) and age_s < _NO_LOCKS_GRACE_S
    return pid_alive(pid) and age_s < _UNLOCKED_GRACE_S


def pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's (EPERM), or unknown: assume alive
        return True
    return True


def reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes up front, so a full disk shows now as ENOSPC, not later as SIGBUS or a half file."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise  # ENOSPC, EDQUOT, EFBIG: the entry does not fit


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (it may write fewer); an error raises OSError."""
    while len(data):
        data = data[os.write(fd, data) :]


def file_id(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def unlink(path: Path) -> bool:
    """Remove a file if it can be; False if it was gone or cannot go (a read-only cache, a folder in its place)."""
    try:
        path.unlink()
    except OSError:
        return False
    return True


def temp_files(folder: Path) -> list[TempFile]:
    """The temp files of writes in ``folder``, in progress (live) or left by killed writers, oldest first."""
    if not folder.is_dir():
        return []
    now, found = time.time(), []
    for path in folder.iterdir():
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None:
            continue
        try:
            st = path.stat()
        except OSError:  # committed or removed since the listing
            continue
        pid, age = int(match["pid"]), max(0.0, now - st.st_mtime)
        found.append(TempFile(path, match["key"], pid, st.st_size, age, written_now(path, pid, age)))
    return sorted(found, key=lambda t: (-t.age_s, t.path.name))
