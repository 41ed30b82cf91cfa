"""``fedbench cache ls | rm [KEY | --all] | clean [--cache-dir DIR]``: look into and prune the feature cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fedbench.models.cache import FeatureCache, TempFile


def add_cache_parser(subparsers: Any, common: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``cache`` command (with ``ls``, ``rm`` and ``clean``) to an argparse subparsers object.

    ``common`` is a parent parser of options every command takes (the CLI's ``--include``).
    Each leaf sets ``func`` (call ``args.func(args)``; it returns an exit code).
    """
    parents = [common] if common is not None else []
    cache = subparsers.add_parser(
        "cache",
        help="list or remove feature-cache entries",
        description="The feature cache holds each backbone's features of each image pool, "
        "keyed by backbone weights, pixels and preprocessing ($FEDBENCH_CACHE or ~/.cache/fedbench).",
    )
    commands = cache.add_subparsers(dest="cache_command", metavar="{ls,rm,clean}", required=True)

    ls = commands.add_parser("ls", parents=parents, help="list entries: key, backbone, shape, size, created")
    _add_cache_dir(ls)
    ls.set_defaults(func=cmd_cache_ls)

    rm = commands.add_parser("rm", parents=parents, help="remove one entry (by key prefix) or all of them")
    which = rm.add_mutually_exclusive_group(required=True)
    which.add_argument("key", nargs="?", metavar="KEY", help="the entry's key, or its first characters")
    which.add_argument(
        "--all", action="store_true", help="remove every entry (and temp files that no running process is writing)"
    )
    _add_cache_dir(rm)
    rm.set_defaults(func=cmd_cache_rm)

    clean = commands.add_parser(
        "clean",
        parents=parents,
        help="remove what interrupted writes left: temp files no running process is writing, incomplete entries",
    )
    _add_cache_dir(clean)
    clean.set_defaults(func=cmd_cache_clean)
    return cache


def add_parsers(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """The hook ``fedbench.cli.main`` calls for optional command modules."""
    add_cache_parser(subparsers, common)


def cmd_cache_ls(args: argparse.Namespace) -> int:
    cache = FeatureCache(getattr(args, "cache_dir", None))
    entries, temps = cache.ls(), cache.temp_files()
    if not entries:
        print(f"feature cache {cache.dir}: empty")
    else:
        rows = [
            [e.key[:12], e.kind, e.backbone, "x".join(map(str, e.shape)) or "?", _size(e.bytes), e.created]
            for e in entries
        ]
        print(tabulate(rows, headers=["key", "kind", "backbone", "shape", "size", "created"]))
        total = sum(e.bytes for e in entries)
        print(f"\n{len(entries)} entries, {_size(total)} in {cache.dir}")
    left = [t for t in temps if not t.live]
    if left:
        print(f"{_temp_summary(left)} left by interrupted writes; `fedbench cache clean` removes them")
    live = [t for t in temps if t.live]
    if live:
        pids = ", ".join(sorted({str(t.pid) for t in live}))
        print(f"{_temp_summary(live)} being written now (pid {pids})")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    cache = FeatureCache(getattr(args, "cache_dir", None))
    removed = cache.rm("all" if args.all else args.key)  # CacheError (exit 2) names a bad key
    print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {cache.dir}")
    return 0


def cmd_cache_clean(args: argparse.Namespace) -> int:
    cache = FeatureCache(getattr(args, "cache_dir", None))
    report = cache.clean()
    n = len(report.incomplete)
    removed = [_temp_summary(report.temp_files) if report.temp_files else "no temp files"]
    removed.append(f"{n} incomplete entr{'y' if n == 1 else 'ies'}")
    print(f"removed {' and '.join(removed)} from {cache.dir}")
    if report.kept:
        pids = ", ".join(sorted({str(t.pid) for t in report.kept}))
        print(f"kept {_temp_summary(report.kept)} that a running process is writing (pid {pids})")
    return 0


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache root (default: $FEDBENCH_CACHE or ~/.cache/fedbench)",
    )


def _temp_summary(temps: list[TempFile]) -> str:
    """``2 temp files (1.5 MiB, oldest 3.0 h)``."""
    count = f"{len(temps)} temp file{'' if len(temps) == 1 else 's'}"
    return f"{count} ({_size(sum(t.bytes for t in temps))}, oldest {_age(max(t.age_s for t in temps))})"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
