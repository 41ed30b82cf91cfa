"""How numbers are written for people: bytes in decimal units, fractions as percents, counts, seconds.

Every function takes ``missing``, the text written for ``None`` (tables use an em dash; plain
terminal output may prefer ``"-"``).
"""

from __future__ import annotations

MISSING = "—"


def format_bytes(n: float | None, digits: int = 2, missing: str = MISSING) -> str:
    """``1_234_567`` -> ``"1.23 MB"``: decimal units (1 KB = 1000 B) up to TB; whole bytes below 1 KB."""
    if n is None:
        return missing
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.{digits}f} {unit}"
    return f"{n / 1000:.{digits}f} TB"


def format_percent(x: float | None, digits: int = 2, missing: str = MISSING) -> str:
    """A fraction as a percent without the sign: ``0.9123`` -> ``"91.23"``."""
    return missing if x is None else f"{100 * x:.{digits}f}"


def format_count(x: float | None, missing: str = MISSING) -> str:
    """A count with thousands separators: ``44426`` -> ``"44,426"``."""
    return missing if x is None else f"{x:,.0f}"


def format_seconds(x: float | None, missing: str = MISSING) -> str:
    """Seconds to one decimal: ``56.52`` -> ``"56.5"``."""
    return missing if x is None else f"{x:.1f}"
