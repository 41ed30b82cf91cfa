"""Every message between server and clients crosses this channel.

A :class:`~fedbench.federation.method.Message` is serialised with safetensors, its envelope
(client id, round, and on uploads the sender's sample count) in the header's ``__metadata__``,
and rebuilt on the other side from those bytes alone. So what a method "sends" is exactly what
could travel over a wire, and its size is measured, not estimated: ``len`` of the bytes, header
included.
"""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors import serialize
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

try:  # newer safetensors export the serializer's tensor description
    from safetensors import TensorSpec
except ImportError:  # pragma: no cover - older safetensors: its torch front end
    TensorSpec = None
from torch import Tensor

from fedbench.errors import FedbenchError
from fedbench.federation.method import Message

_ENVELOPE_UP = ("client_id", "round", "num_samples")
_ENVELOPE_DOWN = ("client_id", "round")


def encode(message: Message, direction: str) -> bytes:
    payload = message.payload
    bad = [k for k, v in payload.items() if not isinstance(v, Tensor)]
    if bad:
        raise FedbenchError(
            f"channel payload entries {bad} are not tensors; a method must send every "
            f"value as a torch.Tensor (wrap numbers with torch.tensor(...))"
        )
    envelope = _ENVELOPE_UP if direction == "up" else _ENVELOPE_DOWN
    for key in envelope:
        value = getattr(message, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FedbenchError(f"message {key}={value!r}: must be a non-negative int (a method returns "
                                f"ClientResult(num_samples=len(data.train)) for the samples it trained on)")
    metadata = {k: str(getattr(message, k)) for k in envelope}
    tensors = {k: v.detach().cpu().contiguous() for k, v in payload.items()}  # what a wire would carry
    if TensorSpec is None or sys.byteorder != "little":
        # safetensors' torch front end (byte-swaps on big-endian hosts); it refuses entries that share
        # storage, so those are copied
        owners = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
        return st_save({k: t.clone() if owners[t.untyped_storage().data_ptr()] > 1 else t for k, t in tensors.items()},
                       metadata=metadata)
    # The same bytes through safetensors' serializer directly, pointing it at each tensor's memory:
    # the torch front end's per-call checks cost ~60 us a message, which 2,000 messages a round feel.
    specs = {k: TensorSpec(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), data_ptr=t.data_ptr(),
                           data_len=t.numel() * t.element_size()) for k, t in tensors.items()}
    return serialize(specs, metadata=metadata)  # ``tensors`` holds the memory alive until it returns


def decode(wire: bytes, device: torch.device | None = None) -> Message:
    """The message ``wire`` carries, its tensors on the receiver's ``device`` (default CPU)."""
    (header_len,) = struct.unpack("<Q", wire[:8])
    metadata = json.loads(wire[8 : 8 + header_len]).get("__metadata__", {})
    payload = st_load(wire)
    if device is not None and device.type != "cpu":
        payload = {k: v.to(device) for k, v in payload.items()}
    return Message(payload=payload, client_id=int(metadata["client_id"]), round=int(metadata["round"]),
                   num_samples=int(metadata.get("num_samples", 0)))


@dataclass
class Channel:
    up_bytes: int = 0
    down_bytes: int = 0
    up_messages: int = 0
    down_messages: int = 0
    _round_up: int = 0
    _round_down: int = 0
    per_round: list[dict[str, int]] = field(default_factory=list)

    def down(self, message: Message, device: torch.device | None = None) -> Message:
        wire = encode(message, "down")
        self.down_bytes += len(wire)
        self._round_down += len(wire)
        self.down_messages += 1
        return decode(wire, device)

    def up(self, message: Message, device: torch.device | None = None) -> Message:
        wire = encode(message, "up")
        self.up_bytes += len(wire)
        self._round_up += len(wire)
        self.up_messages += 1
        return decode(wire, device)

    def end_round(self) -> dict[str, int]:
        """Close the round's counters and return them."""
        stats = {"up_bytes": self._round_up, "down_bytes": self._round_down}
        self.per_round.append(stats)
        self._round_up = self._round_down = 0
        return stats
