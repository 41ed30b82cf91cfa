"""The one way fedbench hashes structured data: SHA-256 of canonical JSON (sorted keys, no spaces)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def json_digest(obj: Any, length: int | None = None) -> str:
    """Hex SHA-256 of ``canonical_json(obj)``, cut to ``length`` digits when given."""
    digest = hashlib.sha256(canonical_json(obj).encode()).hexdigest()
    return digest if length is None else digest[:length]
