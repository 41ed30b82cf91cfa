"""Result records: one JSON file per run, ``results/<task>/<method>/<spec_hash>.json``.

Written atomically (temp file in the same folder, fsync, rename), so a crashed run leaves
no record and a reader never sees half a file. Records are plain JSON: loading one never
executes code.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedbench.core.hashing import json_digest
from fedbench.core.spec import RunSpec
from fedbench.errors import ResultsError

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "spec", "spec_hash", "metrics", "comm", "provenance")
TRACKED_PACKAGES = ("fedbench", "torch", "torchvision", "numpy", "open_clip_torch", "peft", "safetensors",
                    "datasets", "diffusers", "timm", "transformers")


def record_path(results_dir: str | Path, spec: RunSpec) -> Path:
    return Path(results_dir) / spec.task / spec.method / f"{spec.spec_hash}.json"


def check_writable(results_dir: str | Path) -> None:
    """Fail before a run, not after it, when its record could not be written."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ResultsError(
            f"results directory {str(path)!r} is not writable ({exc.strerror or exc}); "
            f"pass --results-dir DIR with a folder you can write to"
        ) from None


def umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a record is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps_record(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n"


def write_record(record: dict[str, Any], results_dir: str | Path) -> Path:
    spec = RunSpec.from_dict(record["spec"])
    path = record_path(results_dir, spec)
    try:
        atomic_write_text(path, dumps_record(record))
    except OSError as exc:
        raise ResultsError(f"could not write {path}: {exc}; pass --results-dir DIR to write elsewhere") from exc
    return path


def write_image_grids(images: dict[str, Any], record_file: Path) -> dict[str, str]:
    """Each uint8 batch [N, C, H, W] as one PNG grid beside the record (``<hash>.<name>.png``,
    written atomically); returns name -> file name, for the record to list."""
    import io
    import math

    from PIL import Image

    out = {}
    for name, batch in sorted(images.items()):
        n, c, h, w = batch.shape
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        grid = batch.new_zeros((c, rows * (h + 2), cols * (w + 2)))
        for i in range(n):
            r, k = divmod(i, cols)
            grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = batch[i]
        pixels = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path = record_file.with_name(f"{record_file.stem}.{name}.png")
        atomic_write_bytes(path, buffer.getvalue())
        out[name] = path.name
    return out


# Far above any record fedbench writes (the largest committed ones are tens of kB): a bigger file is
# not a record, and reading it whole would only exhaust memory.
MAX_RECORD_BYTES = 64 * 1024 * 1024
_REWRITE = "delete it and re-run its spec"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json_strict(path: str | Path) -> Any:
    """Parse one file as strict JSON (no NaN/Infinity; never code, never pickle).

    Every way a user-given path can fail to be a JSON file (missing, a folder, a FIFO or device, a
    symlink loop, unreadable, too large, not UTF-8, not JSON, nested too deep) is a
    :class:`ResultsError` whose message names the file and the fix.
    """
    path = Path(path)
    try:
        # Non-blocking open, then fstat: a FIFO put where a record was must not hang the reader.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise ResultsError(f"{path} is a folder, not a record file; give one of its .json files "
                                   f"(`fedbench validate {path}` checks every record in it)")
            if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
                raise ResultsError(f"{path} is not a regular file, so not a record; give a record's .json file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_RECORD_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ResultsError(f"no record at {path}; list records with `ls results/<task>/<method>/`") from None
    except OSError as exc:  # permissions, a symlink loop, an I/O error
        raise ResultsError(f"{path} cannot be read ({exc.strerror or exc}); check the path and its "
                           f"permissions") from None
    if len(data) > MAX_RECORD_BYTES:
        raise ResultsError(f"{path} is larger than {MAX_RECORD_BYTES // 2**20} MiB, far more than any fedbench "
                           f"record; it is not one ({_REWRITE})")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ResultsError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}), so not a record; "
                           f"{_REWRITE}") from None
    except RecursionError:
        raise ResultsError(f"{path} is nested too deeply to be a record; {_REWRITE}") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer too long to convert
        raise ResultsError(f"{path} is not valid JSON ({exc}); {_REWRITE}") from None


def load_record(path: str | Path) -> dict[str, Any]:
    """A record file as a dict with the record's top-level keys; anything else is a ResultsError."""
    record = read_json_strict(path)
    missing = [k for k in REQUIRED_KEYS if k not in record] if isinstance(record, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ResultsError(f"{path} is not a fedbench record (missing {missing}); "
                           f"`fedbench validate {path}` says what is wrong")
    return record


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_commit(here: Path | None = None) -> str | None:
    """HEAD of the checkout holding ``here`` (default: this package), ``-dirty`` when its code differs."""
    here = here or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        # Dirty means the *code* differs from the commit: records and the leaderboard being rewritten
        # by a sweep (tracked files under results/ and leaderboard/) do not make the next record dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)results", ":(top,exclude)leaderboard"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        # The CPU kernels torch picked (AVX2, AVX512, ...) and the CPU's feature flags: records made on
        # machines that differ here may differ in the last bits of a metric, which is not a regression.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags_digest(),
    }


def _cpu_flags_digest() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return json_digest(sorted(flags), 12) if flags else None
