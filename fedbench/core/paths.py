"""Where fedbench keeps what it builds on a user's disk."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """``$FEDBENCH_CACHE`` if set, else ``~/.cache/fedbench``: feature cache, weights, decoded pools."""
    env = os.environ.get("FEDBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedbench"
