"""Checkpoints of a run between rounds, so that ``fedbench run ... --resume`` continues after a
kill and writes the record an uninterrupted run would have written, bit for bit.

A checkpoint holds everything the round loop has changed since it started (the server's state,
every client's private state, the random streams, the channel's counters, the rounds so far)
and the two method objects' attributes (models, optimiser states, generators a method keeps).
What a fresh start rebuilds identically is not stored but re-attached on load: the run context,
the frozen backbone, its text features and the hyper-parameters.

The file is a JSON header line and a pickle. A pickle runs code when it is loaded, so a
checkpoint is trusted like a script: resume only from checkpoints your own runs wrote. The header
names the spec, the data and the backbone it belongs to and a SHA-256 of itself and the body, so a truncated or
foreign file is refused before anything is unpickled. Files are written to a temporary name and
renamed, so a kill at any moment leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedbench.core.results import atomic_write_bytes
from fedbench.errors import CheckpointError

MAGIC = b"fedbench-checkpoint 1\n"
# Without a --checkpoint-every, a run checkpoints once this many seconds have passed since its
# last checkpoint: short runs never pay for one, long runs lose at most this much on a kill.
AUTO_CHECKPOINT_SECONDS = 120.0


class CheckpointWarning(UserWarning):
    """A checkpoint could not be written (disk full, a method attribute that cannot be pickled):
    the run goes on without checkpoints."""


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, shared: dict[str, Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._shared = {id(obj): key for key, obj in shared.items() if obj is not None}

    def persistent_id(self, obj: Any) -> str | None:
        return self._shared.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: dict[str, Any]) -> None:
        super().__init__(file)
        self._shared = shared

    def persistent_load(self, pid: str) -> Any:
        return self._shared[pid]


@dataclass
class Checkpoints:
    """Where one run's checkpoint lives, when it is due, and what it must match to be resumed.

    ``every``: a checkpoint after every ``every`` rounds; None: after a round once
    :data:`AUTO_CHECKPOINT_SECONDS` have passed since the last one; 0: never.
    """

    path: Path
    identity: dict[str, Any]  # spec hash, data and backbone fingerprints, torch version
    every: int | None = None
    resume: bool = False
    _last_save: float = 0.0

    def __post_init__(self) -> None:
        self._last_save = time.monotonic()

    def due(self, round_done: int, rounds: int) -> bool:
        if round_done >= rounds or self.every == 0:
            return False  # the record follows at once
        if self.every is None:
            return time.monotonic() - self._last_save >= AUTO_CHECKPOINT_SECONDS
        return round_done % self.every == 0

    def save(self, round_done: int, objects: Any, shared: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        _Pickler(buffer, shared).dump(objects)
        body = buffer.getvalue()
        header = {**self.identity, "round": round_done, "bytes": len(body)}
        header["sha256"] = _digest(header, body)
        atomic_write_bytes(self.path, MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body)
        self._last_save = time.monotonic()

    def load(self, shared: dict[str, Any]) -> tuple[int, Any] | None:
        """(round, objects) of the checkpoint to resume from; None: no resume asked or none there."""
        if not self.resume or not self.path.is_file():
            return None
        fix = f"delete {self.path} to start the run over, or run it without --resume"
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read the checkpoint {self.path} ({exc.strerror or exc}); {fix}") from None
        head, _, body = data[len(MAGIC):].partition(b"\n")
        try:
            header = json.loads(head) if data.startswith(MAGIC) else None
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is not a fedbench checkpoint; {fix}")
        differ = sorted(k for k, v in self.identity.items() if header.get(k) != v)
        if differ:
            raise CheckpointError(f"the checkpoint {self.path} was written for another {', '.join(differ)} "
                                  f"than this run has; {fix}")
        if header.get("bytes") != len(body) or header.get("sha256") != _digest(header, body):
            raise CheckpointError(f"the checkpoint {self.path} is damaged (its contents are not what its header "
                                  f"says); {fix}")
        return int(header["round"]), _Unpickler(io.BytesIO(body), shared).load()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _digest(header: dict[str, Any], body: bytes) -> str:
    """SHA-256 of the header (all but this digest) and the body: an edit of either is caught."""
    fields = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + b"\n" + body).hexdigest()


def checkpoint_identity(spec_hash: str, data_fingerprint: str, backbone_fingerprint: str | None) -> dict[str, Any]:
    return {"spec_hash": spec_hash, "data_fingerprint": data_fingerprint,
            "backbone_fingerprint": backbone_fingerprint, "torch": torch.__version__}
