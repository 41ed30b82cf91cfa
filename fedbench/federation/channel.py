"""Every message between server and clients crosses this channel.

The payload is serialised with safetensors and deserialised on the other side, so what a
method "sends" is exactly what could travel over a wire, and its size is measured, not
estimated: ``len`` of the bytes, header included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from fedbench.errors import FedbenchError


@dataclass
class Channel:
    up_bytes: int = 0
    down_bytes: int = 0
    up_messages: int = 0
    down_messages: int = 0
    _round_up: int = 0
    _round_down: int = 0
    per_round: list[dict[str, int]] = field(default_factory=list)

    def _transmit(self, payload: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        bad = [k for k, v in payload.items() if not isinstance(v, Tensor)]
        if bad:
            raise FedbenchError(
                f"channel payload entries {bad} are not tensors; a method must send every "
                f"value as a torch.Tensor (wrap numbers with torch.tensor(...))"
            )
        # safetensors refuses views that share storage; a contiguous copy is what a wire would carry.
        wire = st_save({k: v.detach().contiguous().clone() for k, v in payload.items()})
        return st_load(wire), len(wire)

    def down(self, client_id: int, payload: dict[str, Tensor]) -> dict[str, Tensor]:
        received, n = self._transmit(payload)
        self.down_bytes += n
        self._round_down += n
        self.down_messages += 1
        return received

    def up(self, client_id: int, payload: dict[str, Tensor]) -> dict[str, Tensor]:
        received, n = self._transmit(payload)
        self.up_bytes += n
        self._round_up += n
        self.up_messages += 1
        return received

    def end_round(self) -> dict[str, int]:
        """Close the round's counters and return them."""
        stats = {"up_bytes": self._round_up, "down_bytes": self._round_down}
        self.per_round.append(stats)
        self._round_up = self._round_down = 0
        return stats
