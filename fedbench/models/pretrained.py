"""Models fedbench pretrains itself (the offline stand-ins for CLIP and Stable Diffusion): how a
folder of weights is written, verified and found.

A pretrained model is a folder with ``manifest.json`` beside its files: the model's name, the
recipe it was trained with (seed, steps, data), the SHA-256 of every file, the training time and
the package versions. ``fedbench prepare NAME`` builds one:

- written atomically: the builder writes into ``.NAME.partial-PID`` next to the destination,
  the manifest is written last, and the folder is renamed into place, so a killed ``prepare``
  leaves no folder that looks whole (the next ``prepare`` removes partial folders whose process
  is gone);
- verified on every load: a file whose hash differs from the manifest (truncated, replaced,
  foreign) is refused with a message naming the command that rebuilds it.

Where a model is looked for: an explicit folder (``--backbone digits-clip:PATH``), else the copy
that ships inside the package (``fedbench/models/weights/NAME``, committed so that a fresh clone
and CI never retrain), else ``$FEDBENCH_CACHE/pretrained/NAME`` (where ``prepare`` writes by
default).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbench.core.registry import Registry
from fedbench.core.results import package_versions, umask
from fedbench.errors import BackboneUnavailableError

MANIFEST = "manifest.json"
PACKAGED = Path(__file__).parent / "weights"

# A builder trains the model into ``folder`` (an empty directory) and returns its recipe: the
# settings and facts a reader needs (seed, steps, data, measured accuracy).
Builder = Callable[["BuildRequest"], dict[str, Any]]


@dataclass(frozen=True)
class BuildRequest:
    folder: Path
    seed: int
    quick: bool  # a few steps only: for tests and smoke runs, never for committed weights
    progress: bool


@dataclass(frozen=True)
class Pretrained:
    name: str
    build: Builder
    description: str


PRETRAINED: Registry[Pretrained] = Registry("pretrained model", "fedbench.pretrained")


def register_pretrained(name: str, description: str) -> Callable[[Builder], Builder]:
    def decorator(build: Builder) -> Builder:
        PRETRAINED.register(name, description=description)(Pretrained(name, build, description))
        return build

    return decorator


def default_cache_folder(name: str) -> Path:
    root = os.environ.get("FEDBENCH_CACHE") or Path.home() / ".cache" / "fedbench"
    return Path(root) / "pretrained" / name


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(destination: Path) -> list[Path]:
    removed = []
    for partial in destination.parent.glob(f".{destination.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def check_destination(name: str, destination: Path) -> None:
    """``prepare`` replaces its destination: refuse one that is not a weights folder it wrote (a file,
    a folder of other things), which the replacement would delete."""
    fix = f"give a new or empty folder (`fedbench prepare {name} --out NEW_FOLDER`); nothing was changed"
    if destination.exists() and not destination.is_dir():
        raise BackboneUnavailableError(f"--out {destination} is a file; {name} weights are a folder: {fix}")
    if destination.is_dir() and any(destination.iterdir()) and not (destination / MANIFEST).is_file():
        raise BackboneUnavailableError(f"--out {destination} holds other files, not a {name} weights folder "
                                       f"(no {MANIFEST}), and prepare would replace it: {fix}")


def prepare(name: str, destination: Path | None = None, *, seed: int = 0, quick: bool = False,
            progress: bool = True) -> Path:
    """Train ``name`` and write it to ``destination`` (default: the cache), atomically."""
    entry = PRETRAINED.get(name).obj
    destination = Path(destination) if destination is not None else default_cache_folder(name)
    check_destination(name, destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackboneUnavailableError(f"cannot write {name} weights to {destination} ({exc.strerror or exc}: "
                                       f"{exc.filename}); pass --out NEW_FOLDER where you can write") from None
    remove_stale_partials(destination)
    partial = destination.parent / f".{destination.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        started = time.perf_counter()
        recipe = entry.build(BuildRequest(partial, seed, quick, progress))
        written = [p for p in sorted(partial.rglob("*")) if p.is_file()]
        for path in written:  # some writers (safetensors) make 0600 files; weights are as readable as any file
            os.chmod(path, 0o666 & ~umask())
        files = {str(p.relative_to(partial)): file_digest(p) for p in written}
        manifest = {"name": name, "seed": seed, "quick": quick, "recipe": recipe, "files": files,
                    "train_seconds": round(time.perf_counter() - started, 1), "packages": package_versions()}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if destination.exists():
            old = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
            os.replace(destination, old)
            os.replace(partial, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return destination


def verify(folder: Path, name: str) -> dict[str, Any]:
    """The folder's manifest, after checking every file against it; else a clear error."""
    fix = f"rebuild it with `fedbench prepare {name} --out {folder}` (or delete the folder)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise BackboneUnavailableError(f"{folder} holds no readable {MANIFEST}: it is not a complete "
                                       f"{name} folder; {fix}") from None
    if manifest.get("name") != name:
        raise BackboneUnavailableError(f"{folder} holds {manifest.get('name')!r}, not {name!r}; {fix}")
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            raise BackboneUnavailableError(f"{path} is missing; {fix}")
        if file_digest(path) != digest:
            raise BackboneUnavailableError(f"{path} does not match its manifest (truncated or replaced); {fix}")
    return manifest


def locate(name: str, explicit: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The verified folder of ``name``: ``explicit``, else the packaged copy, else the cache."""
    if explicit:
        folder = Path(explicit).expanduser()
        if folder.exists() and not folder.is_dir():
            # A file (a downloaded checkpoint, a text file) is not a prepared weights folder.
            raise BackboneUnavailableError(
                f"{name}: {folder} is a file, not a valid {name} checkpoint: {name} weights are a folder holding "
                f"{MANIFEST} and the weight files it lists. Build one with `fedbench prepare {name} --out "
                f"NEW_FOLDER` and give that folder, or leave the path out to use the packaged weights")
        if not folder.is_dir():
            raise BackboneUnavailableError(f"{name}: no folder at {folder}; build one with "
                                           f"`fedbench prepare {name} --out {folder}`")
        return folder, verify(folder, name)
    for folder in (PACKAGED / name, default_cache_folder(name)):
        if folder.is_dir():
            return folder, verify(folder, name)
    raise BackboneUnavailableError(f"{name}: no pretrained weights here (looked in {PACKAGED / name} and "
                                   f"{default_cache_folder(name)}); build them with `fedbench prepare {name}`")
