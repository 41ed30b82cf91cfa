"""The run specification: a frozen record of exactly what ran, with every default resolved.

``spec_hash`` is the first 16 hex digits of the SHA-256 of the spec's canonical JSON
(sorted keys, no spaces), so two runs with the same hash ran the same protocol with the same
method code: since spec version 2 the spec names the method's class and its ``version``, which a
method bumps whenever its math (or a random stream it draws) changes. Specs of version 1 (recorded
before the code identity existed) load with ``method_class=""`` and ``method_version=0`` and keep
their original hash.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedbench.core.hashing import canonical_json, json_digest
from fedbench.core.options import check_options
from fedbench.errors import SpecError

SPEC_VERSION = 2
UNVERSIONED = 0  # method_version of a version-1 spec: the code that ran it is not recorded


@dataclass(frozen=True)
class RunSpec:
    method: str
    task: str
    backbone: str  # "none" when the method trains from pixels without a backbone
    seed: int
    rounds: int
    # Clients per round: a float in (0, 1] is a fraction of all clients, an int >= 1 a count.
    sample: float | int
    method_options: Mapping[str, Any] = field(default_factory=dict)
    task_options: Mapping[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    # The code that ran: the method's import path and the version its class declares.
    method_class: str = ""
    method_version: int = UNVERSIONED
    spec_version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_options"] = dict(sorted(self.method_options.items()))
        d["task_options"] = dict(sorted(self.task_options.items()))
        if self.spec_version < 2:  # a version-1 spec had no code identity; its hash must not move
            del d["method_class"], d["method_version"]
        return d

    def canonical_json(self) -> str:
        return canonical_json(self.to_dict())

    @property
    def spec_hash(self) -> str:
        return json_digest(self.to_dict(), 16)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpecError(f"spec has unknown keys {sorted(unknown)}; known keys: {sorted(names)}")
        return cls(**d)


def parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    """``["lr=0.1", "task.alpha=0.3"]`` -> ``{"lr": "0.1", "task.alpha": "0.3"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set lr=0.01")
        out[key.strip()] = value.strip()
    return out


def coerce(value: str, annotation: Any, key: str) -> Any:
    """Parse a ``--set`` string into the option's declared type, or say what was expected."""
    if isinstance(annotation, str):  # postponed annotations
        annotation = eval(annotation, vars(typing), vars(types))  # noqa: S307 - annotation text of our own dataclasses
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in [str(c) for c in choices]:
            raise SpecError(f"--set {key}={value}: must be one of {', '.join(map(str, choices))}")
        return next(c for c in choices if str(c) == value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null") and len(args) < len(typing.get_args(annotation)):
            return None
        for arg in args:
            try:
                return coerce(value, arg, key)
            except SpecError:
                continue
        raise SpecError(f"--set {key}={value}: expected {annotation}")
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"--set {key}={value}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(value)
        except ValueError:
            raise SpecError(f"--set {key}={value}: expected an integer, e.g. {key}=10") from None
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise SpecError(f"--set {key}={value}: expected a number, e.g. {key}=0.5") from None
    if annotation is str:
        return value
    raise SpecError(f"--set {key}: options of type {annotation} cannot be set from the command line")


def options_from(cls: type, given: Mapping[str, Any], where: str) -> Any:
    """Build an options dataclass from defaults plus ``given`` (already-typed values), every
    numeric field checked against the bounds it declares (:mod:`fedbench.core.options`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(given) - names
    if unknown:
        raise SpecError(f"unknown {where} option(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        options = cls(**given)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where} options: {exc}") from exc
    # After __post_init__, whose own messages (cross-field ones) say more than a bound can.
    check_options(options, where)
    return options


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def split_sets(
    sets: Mapping[str, str], method_hparams: type, task_options: type
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route each ``--set`` key to the method or the task, type-checked.

    ``method.KEY`` / ``task.KEY`` disambiguate a key both declare.
    """
    mtypes, ttypes = field_types(method_hparams), field_types(task_options)
    method_opts: dict[str, Any] = {}
    task_opts: dict[str, Any] = {}
    for raw_key, value in sets.items():
        scope, _, key = raw_key.rpartition(".")
        if scope not in ("", "method", "task"):
            raise SpecError(f"--set {raw_key}: prefix must be 'method.' or 'task.'")
        in_m, in_t = key in mtypes, key in ttypes
        if scope == "method" or (in_m and not in_t and scope != "task"):
            if not in_m:
                raise SpecError(f"--set {raw_key}: the method has no option {key!r}; known: {sorted(mtypes)}")
            method_opts[key] = coerce(value, mtypes[key], raw_key)
        elif scope == "task" or (in_t and not in_m):
            if not in_t:
                raise SpecError(f"--set {raw_key}: the task has no option {key!r}; known: {sorted(ttypes)}")
            task_opts[key] = coerce(value, ttypes[key], raw_key)
        elif in_m and in_t:
            raise SpecError(f"--set {raw_key}: both the method and the task have {key!r}; "
                            f"write method.{key}=... or task.{key}=...")
        else:
            raise SpecError(
                f"--set {raw_key}: unknown option. Method options: {sorted(mtypes)}; "
                f"task options: {sorted(ttypes)}"
            )
    return method_opts, task_opts
