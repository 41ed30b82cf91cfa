"""``fedbench cache ls | rm [KEY | --all] [--cache-dir DIR]``: look into and prune the feature cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fedbench.models.cache import FeatureCache


def add_cache_parser(subparsers: Any, common: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``cache`` command (with ``ls`` and ``rm``) to an argparse subparsers object.

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
    commands = cache.add_subparsers(dest="cache_command", metavar="{ls,rm}", required=True)

    ls = commands.add_parser("ls", parents=parents, help="list entries: key, backbone, shape, size, created")
    _add_cache_dir(ls)
    ls.set_defaults(func=cmd_cache_ls)

    rm = commands.add_parser("rm", parents=parents, help="remove one entry (by key prefix) or all of them")
    which = rm.add_mutually_exclusive_group(required=True)
    which.add_argument("key", nargs="?", metavar="KEY", help="the entry's key, or its first characters")
    which.add_argument("--all", action="store_true", help="remove every entry")
    _add_cache_dir(rm)
    rm.set_defaults(func=cmd_cache_rm)
    return cache


def add_parsers(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """The hook ``fedbench.cli.main`` calls for optional command modules."""
    add_cache_parser(subparsers, common)


def cmd_cache_ls(args: argparse.Namespace) -> int:
    cache = FeatureCache(getattr(args, "cache_dir", None))
    entries = cache.ls()
    if not entries:
        print(f"feature cache {cache.dir}: empty")
        return 0
    rows = [
        [e.key[:12], e.kind, e.backbone, "x".join(map(str, e.shape)) or "?", _size(e.bytes), e.created] for e in entries
    ]
    print(tabulate(rows, headers=["key", "kind", "backbone", "shape", "size", "created"]))
    total = sum(e.bytes for e in entries)
    print(f"\n{len(entries)} entries, {_size(total)} in {cache.dir}")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    cache = FeatureCache(getattr(args, "cache_dir", None))
    removed = cache.rm("all" if args.all else args.key)  # CacheError (exit 2) names a bad key
    print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from {cache.dir}")
    return 0


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache root (default: $FEDBENCH_CACHE or ~/.cache/fedbench)",
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
