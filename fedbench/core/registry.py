"""One registry type for methods, tasks, backbones and metrics (timm's ``register_model`` habit).

Built-ins register with a decorator; third-party packages register through entry points
(``fedbench.methods``, ``fedbench.tasks``, ``fedbench.backbones``, ``fedbench.metrics``);
a local file is loaded with ``--include PATH``.

Backbone names may be parametric, ``family:argument`` (``openclip:ViT-B-32/openai``):
the registry looks up ``family`` and hands ``argument`` to the factory.

A name has one owner. Registering a taken name raises :class:`DuplicateNameError` naming both
owners, unless it is the same code again (the same object, or the same module and qualified
name: a module imported twice) or the new registration asks to replace it: ``override=True``
on the decorator, or ``include(path, override=True)`` for everything a plugin file registers.
An entry that replaced another remembers it (:attr:`Entry.replaced`). Installed entry points
never replace anything: one that fails to import, or that collides with a name already taken,
is skipped with a :class:`PluginWarning`, so the built-ins always work.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedbench.core.hashing import json_digest
from fedbench.errors import DuplicateNameError, PluginError, UnknownNameError

T = TypeVar("T")


class PluginWarning(UserWarning):
    """An installed plugin was skipped: it failed to import, or it claims a name already taken."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    fidelity: str  # "reproduction" | "adaptation" | "reference" | "protocol" | ""
    source: str  # the work the code follows (paper, repository), as the method states it
    origin: str = ""  # where the code comes from: "module:qualname", a plugin file, an entry point
    replaced: str | None = None  # the origin of the entry this one overrode, if it overrode one


@dataclass(frozen=True)
class _Loading:
    """What is being loaded while a plugin file or an entry point runs its registrations."""

    what: str  # "the plugin file PATH" / "entry point ..." (for messages)
    override: bool  # registrations made meanwhile may replace taken names


_loading: ContextVar[_Loading | None] = ContextVar("fedbench_registry_loading", default=None)
_included_files: dict[str, Path] = {}  # module name given to an --include file -> the file
_all_registries: weakref.WeakSet[Registry[Any]] = weakref.WeakSet()


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points_loaded = False
        _all_registries.add(self)

    def register(
        self, name: str, *, description: str = "", fidelity: str = "", source: str = "", override: bool = False
    ) -> Callable[[T], T]:
        """Decorator registering ``obj`` as ``name``; a taken name needs ``override=True`` (see the module doc)."""

        def decorator(obj: T) -> T:
            if not description:
                doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
                desc = doc[0] if doc else ""
            else:
                desc = description
            loading = _loading.get()
            origin = _origin_of(obj, loading)
            existing = self._entries.get(name)
            replaced = None
            if existing is not None:
                if _same_code(existing.obj, obj):
                    replaced = existing.replaced  # a re-import replaces nothing new
                elif override or (loading is not None and loading.override):
                    replaced = existing.origin
                else:
                    raise DuplicateNameError(
                        self._duplicate_message(name, existing.origin, origin),
                        taken_name=name,
                        existing=existing.origin,
                        new=origin,
                    )
            self._entries[name] = Entry(name, obj, desc, fidelity, source, origin, replaced)
            return obj

        return decorator

    def _duplicate_message(self, name: str, existing: str, new: str) -> str:
        return (
            f"the {self.kind} name {name!r} is taken: {existing} registered it, and {new} registers it again. "
            f"Rename one of them; or, to replace the existing {self.kind} on purpose, pass override=True to "
            f"the register decorator, or load the plugin file with include(path, override=True) "
            f"(--override with --include on the command line)."
        )

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        _load_builtins()
        for ep in entry_points(group=self.entry_point_group):
            self._load_entry_point(ep)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        """Register one installed plugin; a broken or colliding one is skipped with a warning."""
        what = _describe_entry_point(ep, self.entry_point_group)
        before = self._entries.get(ep.name)
        token = _loading.set(_Loading(what, override=False))
        try:
            with _rolled_back_on_error():
                obj = ep.load()
                now = self._entries.get(ep.name)
                if now is not None and now is not before:
                    return  # the module registered this name itself while it was imported
                if before is not None and _same_code(before.obj, obj):
                    return  # the entry point names the very object that holds the name
                self.register(ep.name, source=ep.value)(obj)
        except DuplicateNameError as exc:
            warnings.warn(
                PluginWarning(
                    f"fedbench: ignoring the {self.kind} plugin {what}: the {self.kind} name "
                    f"{exc.taken_name!r} is already registered by {exc.existing}. An installed plugin never "
                    f"replaces a registered {self.kind}: its package should pick another name (or load the "
                    f"plugin's file with --include PATH --override to replace the {self.kind} on purpose)."
                ),
                stacklevel=4,
            )
        except Exception as exc:  # a broken plugin must not hide the built-ins
            warnings.warn(
                PluginWarning(
                    f"fedbench: skipping the {self.kind} plugin {what}: it failed to load "
                    f"({type(exc).__name__}: {exc}). Fix or uninstall the package that provides it; "
                    f"the built-in {self.kind}s are unaffected."
                ),
                stacklevel=4,
            )
        finally:
            _loading.reset(token)

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
BACKBONES: Registry[Any] = Registry("backbone", "fedbench.backbones")
METRICS: Registry[Any] = Registry("metric", "fedbench.metrics")

register_method = METHODS.register
register_task = TASKS.register
register_backbone = BACKBONES.register
register_metric = METRICS.register

_BUILTIN_MODULES = (
    "fedbench.baselines",
    "fedbench.tasks",
    "fedbench.models.backbones",
    "fedbench.core.metrics",
    "fedbench.models.digits_t2i",
)
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def code_identity(obj: Any) -> str:
    """Where a registered class comes from, the same on every machine and in every process:
    ``module.Qualname`` for importable code, ``file NAME.py:Qualname`` for an ``--include`` file
    (whose module name embeds its local path)."""
    module = getattr(obj, "__module__", "")
    if module in _included_files:
        return f"file {_included_files[module].name}:{obj.__qualname__}"
    return f"{module}.{obj.__qualname__}"


def method_identity(method_cls: Any) -> dict[str, Any]:
    """The spec fields that name a method's code: its :func:`code_identity` and its ``version``."""
    return {"method_class": code_identity(method_cls), "method_version": method_cls.version}


def include(path: str | Path, *, override: bool = False) -> None:
    """Import a local plugin file; its decorators register its methods, tasks or backbones.

    With ``override=True`` whatever the file registers while it runs may replace names already
    taken (built-ins included); each replaced entry is recorded in :attr:`Entry.replaced`. A file
    is imported once per process: including it again does nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"--include {path}: no such file. Give the path of a Python file.")
    # A stable name (Python's str hash changes per process): the file's stem and a digest of its path.
    module_name = f"fedbench_include_{path.stem}_{json_digest(str(path.resolve()), 8)}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"--include {path}: not a Python file that can be imported.")
    _load_builtins()  # first, so that an override replaces the built-in and not the other way round
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    _included_files[module_name] = path
    token = _loading.set(_Loading(f"the plugin file {path}", override=override))
    try:
        with _rolled_back_on_error():
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        del _included_files[module_name]
        if isinstance(exc, DuplicateNameError):
            raise  # its message already names the file and the fix
        raise PluginError(f"--include {path} failed to import: {type(exc).__name__}: {exc}") from exc
    finally:
        _loading.reset(token)


@contextmanager
def _rolled_back_on_error() -> Iterator[None]:
    """Undo every registration made in the block if it raises: a plugin loads whole or not at all."""
    saved = {registry: dict(registry._entries) for registry in _all_registries}
    try:
        yield
    except BaseException:
        for registry, entries in saved.items():
            registry._entries = entries
        raise


def _code_identity(obj: Any) -> tuple[str, str]:
    """(module, qualified name) of a class or function; of a plain value, its class's, marked as a value."""
    if inspect.ismodule(obj):
        return (obj.__name__, "")
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return (module, qualname)
    cls = type(obj)
    return (cls.__module__, f"{cls.__qualname__} instance")


def _same_code(old: Any, new: Any) -> bool:
    """The same object, or what re-importing its module would make of it."""
    if old is new:
        return True
    identity = _code_identity(old)
    if identity != _code_identity(new):
        return False
    if identity[1].endswith(" instance"):  # a value: the same class alone says nothing; compare it
        try:
            return repr(old) == repr(new)
        except Exception:
            return False
    return True


def _origin_of(obj: Any, loading: _Loading | None) -> str:
    """Where ``obj`` comes from, for messages: ``module:qualname``, plus the plugin that brought it."""
    module, qualname = _code_identity(obj)
    if module in _included_files:  # the module name of an included file means nothing to a reader
        return f"{qualname or 'a registration'} in the plugin file {_included_files[module]}"
    where = f"{module}:{qualname}" if qualname else f"the module {module}"
    return f"{where} (loaded by {loading.what})" if loading is not None else where


def _describe_entry_point(ep: EntryPoint, group: str) -> str:
    dist = getattr(ep, "dist", None)  # the installed package that declares it, when known
    package = f" of the package {dist.name!r}" if dist is not None and getattr(dist, "name", None) else ""
    return f"entry point {ep.name!r} = {ep.value!r} (group {group!r}{package})"
