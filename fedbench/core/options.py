"""Bounds on the numeric fields of an options dataclass (a method's Hparams, a task's Options).

A field states its allowed range where it is declared::

    lr: float = bounded(0.01, gt=0)
    val_fraction: float = bounded(0.1, ge=0, lt=1)

and :func:`check_options` (run when a spec is resolved) refuses a value outside it with the
``--set`` that would fix it. A float must also be finite: NaN never passes, and +inf (-inf) only
where the upper (lower) bound is itself ``math.inf`` (``-math.inf``). The bounds live in the
field's ``metadata``, which ``dataclasses.asdict`` does not see: declaring them changes no spec
and no spec hash.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from fedbench.errors import SpecError

BOUNDS_KEY = "fedbench.bounds"
NUMERIC_TYPES = (int, float)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """An interval; ``None`` leaves that side open. ``ge``/``le`` are inclusive, ``gt``/``lt`` exclusive."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None:
            raise TypeError("give ge or gt, not both")
        if self.le is not None and self.lt is not None:
            raise TypeError("give le or lt, not both")

    def admits(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if math.isinf(value) and value not in (self.le, self.ge):  # infinity only where a bound is it
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in [0, 1)"``; ``""`` when unbounded."""
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None
               else None)
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None
                else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with ``default`` whose value must lie within the given bounds
    (``None`` is a default only for a field typed ``int | None`` or ``float | None``)."""
    bounds = Bounds(ge=ge, gt=gt, le=le, lt=lt)
    if default is not None and (isinstance(default, bool) or not isinstance(default, NUMERIC_TYPES)
                                or not bounds.admits(default)):
        # A programming error in the declaration, not bad user input.
        raise ValueError(f"default {default!r} is not a number {bounds.describe() or '(finite)'}")
    return dataclasses.field(default=default, metadata={BOUNDS_KEY: bounds})


def bounds_of(field: dataclasses.Field[Any]) -> Bounds | None:
    """The bounds a field declares, or None."""
    return field.metadata.get(BOUNDS_KEY)


def _numeric_kind(hint: Any) -> tuple[type | None, bool]:
    """(int or float, whether None is allowed) for ``int``, ``float``, ``int | None``...; (None, False) else."""
    if hint in NUMERIC_TYPES:
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in NUMERIC_TYPES:
            return rest[0], len(rest) < len(args)
    return None, False


def numeric_fields(cls: type) -> dict[str, type]:
    """The int and float fields of an options dataclass (``X | None`` included), by name, with that type."""
    hints = typing.get_type_hints(cls)
    kinds = {f.name: _numeric_kind(hints[f.name])[0] for f in dataclasses.fields(cls)}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def check_options(options: Any, where: str) -> None:
    """Raise SpecError for the first numeric field of ``options`` whose value its type or bounds refuse.

    ``where`` names the owner in the message (``"method 'fedavg'"``).
    """
    cls = type(options)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, optional = _numeric_kind(hints[field.name])
        if kind is None:
            continue
        value = getattr(options, field.name)
        if value is None and optional:
            continue
        bounds = bounds_of(field) or Bounds()  # undeclared: any finite number
        # bool is an int to Python, never to an option; an int is a fine float.
        right_type = not isinstance(value, bool) and isinstance(value, int if kind is int else NUMERIC_TYPES)
        if right_type and bounds.admits(value):
            continue
        if kind is int:
            wanted = "an integer"
        elif math.inf in (bounds.le, bounds.ge) or -math.inf in (bounds.le, bounds.ge):
            wanted = "a number"
        else:
            wanted = "a finite number"
        rule = f"{wanted} {bounds.describe()}".rstrip()
        example = "" if field.default is dataclasses.MISSING else f", e.g. --set {field.name}={field.default}"
        raise SpecError(f"--set {field.name}={value}: {where} option {field.name} must be {rule}{example}")
