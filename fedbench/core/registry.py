"""One registry type for methods, tasks, backbones and metrics (timm's ``register_model`` habit).

Built-ins register with a decorator; third-party packages register through entry points
(``fedbench.methods``, ``fedbench.tasks``, ``fedbench.models.backbones``, ``fedbench.core.metrics``);
a local file is loaded with ``--include PATH``.

Backbone names may be parametric, ``family:argument`` (``openclip:ViT-B-32/openai``):
the registry looks up ``family`` and hands ``argument`` to the factory.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedbench.errors import PluginError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    fidelity: str  # "reproduction" | "adaptation" | "reference" | "protocol" | ""
    source: str


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points_loaded = False

    def register(
        self, name: str, *, description: str = "", fidelity: str = "", source: str = ""
    ) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if not description:
                doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
                desc = doc[0] if doc else ""
            else:
                desc = description
            self._entries[name] = Entry(name, obj, desc, fidelity, source)
            return obj

        return decorator

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        _load_builtins()
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._entries:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not hide the built-ins
                raise PluginError(
                    f"the {self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {exc}. "
                    f"Fix or uninstall the package that provides it."
                ) from exc
            if ep.name not in self._entries:  # the module may have registered itself
                self.register(ep.name, source=ep.value)(obj)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        self._load_entry_points()
        return [self._entries[n] for n in sorted(self._entries)]

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name`` (``family:argument`` names look up ``family``)."""
        self._load_entry_points()
        key = name.split(":", 1)[0] if ":" in name and name not in self._entries else name
        if key in self._entries:
            return self._entries[key]
        known = sorted(self._entries)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}. "
            f"A plugin's {self.kind} is loaded with --include PATH or an installed package's "
            f"{self.entry_point_group!r} entry point."
        )

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True


METHODS: Registry[Any] = Registry("method", "fedbench.methods")
TASKS: Registry[Any] = Registry("task", "fedbench.tasks")
BACKBONES: Registry[Any] = Registry("backbone", "fedbench.models.backbones")
METRICS: Registry[Any] = Registry("metric", "fedbench.core.metrics")

register_method = METHODS.register
register_task = TASKS.register
register_backbone = BACKBONES.register
register_metric = METRICS.register

_BUILTIN_MODULES = (
    "fedbench.baselines",
    "fedbench.tasks",
    "fedbench.models.backbones",
    "fedbench.core.metrics",
)
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def include(path: str | Path) -> None:
    """Import a local plugin file; its decorators register its methods, tasks or backbones."""
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"--include {path}: no such file. Give the path of a Python file.")
    module_name = f"fedbench_include_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"--include {path}: not a Python file that can be imported.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        _load_builtins()
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"--include {path} failed to import: {type(exc).__name__}: {exc}") from exc
