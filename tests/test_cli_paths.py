"""Every command that reads or writes a user-given path turns what can go wrong with it into one
line naming the path and the fix, exit code 2, never a traceback: one test per class of failure,
each over its instances, through the real CLI (``fedbench.cli.main.main``; a subprocess where a
real signal is needed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedbench.cli.main import main
from fedbench.core.results import MAX_RECORD_BYTES

FAST = ["local_epochs=1", "samples=200"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good_record(blobs_task, tmp_path_factory) -> Path:
    """A real fedavg record on blobs, written by the engine where a sweep of the same spec looks."""
    from fedbench.harness.run import execute, resolve_spec

    root = tmp_path_factory.mktemp("cli-paths")
    record = execute(resolve_spec("fedavg", blobs_task, rounds=2, sets=FAST), root)
    return Path(record["path"])


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, path: Path | str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedbench: error: "), err
    assert str(path) in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- files that are not readable JSON

def _folder(path: Path, record: Path) -> None:
    path.mkdir()


def _not_utf8(path: Path, record: Path) -> None:
    path.write_bytes(b"\xff\xfe{" + record.read_bytes()[1:])


def _symlink_loop(path: Path, record: Path) -> None:
    path.symlink_to(path.name)  # a link to itself


def _fifo(path: Path, record: Path) -> None:
    os.mkfifo(path)  # reading it would block forever: it must be refused, not read


def _oversized(path: Path, record: Path) -> None:
    with path.open("wb") as f:  # sparse: costs no disk
        f.truncate(MAX_RECORD_BYTES + 1)


def _nan_literal(path: Path, record: Path) -> None:
    path.write_text(record.read_text().replace('"train_loss": ', '"train_loss": NaN, "was": ', 1))


def _deeply_nested(path: Path, record: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _huge_integer(path: Path, record: Path) -> None:
    path.write_text('{"schema_version": ' + "9" * 5000 + "}")


def _not_json(path: Path, record: Path) -> None:
    path.write_text("{not json")


def _empty(path: Path, record: Path) -> None:
    path.write_bytes(b"")


UNREADABLE: dict[str, Callable[[Path, Path], None]] = {
    "folder": _folder, "not-utf8": _not_utf8, "symlink-loop": _symlink_loop, "fifo": _fifo,
    "oversized": _oversized, "nan-literal": _nan_literal, "deeply-nested": _deeply_nested,
    "huge-integer": _huge_integer, "not-json": _not_json, "empty": _empty,
}
READERS: dict[str, Callable[[Path, Path], list[str]]] = {
    "show": lambda bad, good: ["show", str(bad)],
    "show --json": lambda bad, good: ["show", "--json", str(bad)],
    "compare": lambda bad, good: ["compare", str(good), str(bad)],
}


def _bad_file(kind: str, tmp_path: Path, record: Path) -> Path:
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / f"{kind}.json"
    UNREADABLE[kind](path, record)
    return path


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_an_unreadable_record_file_is_one_line_naming_it(good_record, tmp_path, capsys, kind, reader):
    bad = _bad_file(kind, tmp_path, good_record)
    code, out, err = _cli(READERS[reader](bad, good_record), capsys)
    _assert_one_line_error(code, err, bad)


@pytest.mark.parametrize("kind", [k for k in UNREADABLE if k != "folder"])  # a folder is searched for records
def test_validate_fails_an_unreadable_record_and_names_it(good_record, tmp_path, capsys, kind):
    bad = _bad_file(kind, tmp_path, good_record)
    code, out, err = _cli(["validate", str(bad)], capsys)
    assert code == 1 and "Traceback" not in err and err == ""
    assert f"FAIL {bad}\n     - " in out and "0 OK, 1 FAIL" in out


# (A symlink loop or a folder at a record's path is not a file: the sweep plans the run, no message.)
@pytest.mark.parametrize("kind", ["not-utf8", "nan-literal", "huge-integer", "deeply-nested", "oversized", "empty"])
def test_sweep_over_an_unreadable_record_names_it_and_plans_to_rerun_it(blobs_task, good_record, tmp_path, capsys,
                                                                         kind):
    results = tmp_path / "results"
    target = results / good_record.relative_to(good_record.parents[2])  # where the sweep's spec lies
    target.parent.mkdir(parents=True)
    UNREADABLE[kind](target, good_record)
    sets = [a for s in FAST for a in ("--set", s)]
    code, out, err = _cli(["sweep", "fedavg", "--tasks", blobs_task, "--seeds", "0", "--rounds", "2", *sets,
                           "--results-dir", str(results), "--dry-run"], capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{target} is unreadable; it will be re-run" in err and "would run fedavg" in err + out


def test_a_symlink_loop_in_a_results_folder_is_left_out_of_the_leaderboard(good_record, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(good_record.parents[2], results)
    loop = results / "blobs" / "fedavg" / "loop.json"
    loop.symlink_to(loop.name)
    (results / "blobs" / "up").symlink_to("..")  # a folder loop: never followed
    code, out, err = _cli(["leaderboard", "--results-dir", str(results), "--out", str(tmp_path / "board")], capsys)
    assert code == 0 and "Traceback" not in err
    assert "1 records" in out and "left out invalid record blobs/fedavg/loop.json" in out
    code, out, err = _cli(["leaderboard", "--results-dir", str(results), "--out", str(tmp_path / "b2"), "--strict"],
                          capsys)
    assert code == 1


# ---------------------------------------------------------------- records missing blocks

def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        block = record
        for key in keys[:-1]:
            block = block[key]
        del block[keys[-1]]
    return change


INCOMPLETE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no-metrics": (_drop("metrics"), "missing ['metrics']"),
    "no-comm": (_drop("comm"), "missing ['comm']"),
    "no-final": (_drop("metrics", "final"), "metrics.final is not an object"),
    "no-final-last": (_drop("metrics", "final", "last"), "metrics.final.last does not name a round"),
    "no-total-seconds": (_drop("timing", "total_seconds"), "timing.total_seconds"),
    "no-spec-seed": (_drop("spec", "seed"), "spec"),
    "metrics-a-list": (lambda r: r.update(metrics=[]), "metrics and comm must be objects"),
    "bytes-a-string": (lambda r: r["comm"].update(up_bytes="many"), "comm.up_bytes = 'many'"),
}


@pytest.mark.parametrize("kind", list(INCOMPLETE))
def test_show_on_a_record_missing_blocks_names_the_file_and_the_field(good_record, tmp_path, capsys, kind):
    change, field_named = INCOMPLETE[kind]
    record = json.loads(good_record.read_text())
    change(record)
    path = tmp_path / "incomplete.json"
    path.write_text(json.dumps(record))
    code, out, err = _cli(["show", str(path)], capsys)
    line = _assert_one_line_error(code, err, path)
    assert field_named in line and "fedbench validate" in line
    assert out == ""


def test_show_prints_a_whole_record(good_record, capsys):
    code, out, err = _cli(["show", str(good_record)], capsys)
    assert code == 0 and err == "" and json.loads(good_record.read_text())["spec_hash"] in out


# ---------------------------------------------------------------- outputs that cannot be written

def _a_file(tmp_path: Path) -> tuple[Path, Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    return blocker, blocker


def _under_a_file(tmp_path: Path) -> tuple[Path, Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    return blocker / "sub", blocker


def _read_only_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # the superuser writes anywhere
        folder.chmod(0o755)
        pytest.skip("permissions are not enforced for this user")
    return folder / "out", folder


def _images_name_taken(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "board"
    out.mkdir()
    (out / "generated").write_text("keep me")
    return out, out / "generated"


def _not_a_weights_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "my-files"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder, folder


def _leaderboard(out: Path, results: Path) -> list[str]:
    return ["leaderboard", "--results-dir", str(results), "--out", str(out)]


def _prepare(out: Path, results: Path) -> list[str]:
    return ["prepare", "digits-clip", "--quick", "--out", str(out)]


WRITERS: dict[str, tuple[Callable[[Path], tuple[Path, Path]], Callable[[Path, Path], list[str]]]] = {
    "leaderboard-out-is-a-file": (_a_file, _leaderboard),
    "leaderboard-out-under-a-file": (_under_a_file, _leaderboard),
    "leaderboard-out-read-only": (_read_only_folder, _leaderboard),
    "leaderboard-generated-is-a-file": (_images_name_taken, _leaderboard),
    "prepare-out-is-a-file": (_a_file, _prepare),
    "prepare-out-under-a-file": (_under_a_file, _prepare),
    "prepare-out-holds-other-files": (_not_a_weights_folder, _prepare),
}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_an_output_path_that_cannot_be_written_is_one_line_and_changes_nothing(good_record, tmp_path, capsys,
                                                                                 kind):
    make, argv = WRITERS[kind]
    work = tmp_path / "work"
    work.mkdir()
    out, named = make(work)
    before = _snapshot(work)
    try:
        code, _, err = _cli(argv(out, good_record.parents[2]), capsys)
    finally:
        for p in [work, *work.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    _assert_one_line_error(code, err, named)
    assert _snapshot(work) == before  # nothing half-written, nothing replaced


# ---------------------------------------------------------------- nothing to validate

@pytest.mark.parametrize("layout", ["empty-folder", "hidden-files-only", "two-empty-folders"])
def test_validate_with_no_record_says_so_and_exits_non_zero(tmp_path, capsys, layout):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if layout == "hidden-files-only":
        (a / ".ci").mkdir()
        (a / ".ci" / "r.json").write_text("{}")
        (a / ".r.json.tmp.json").write_text("{}")
    argv = ["validate", str(a)] + ([str(b)] if layout == "two-empty-folders" else [])
    code, out, err = _cli(argv, capsys)
    line = _assert_one_line_error(code, err, a)
    assert "no record found" in line and "fedbench validate results/" in line and out == ""


def test_validate_a_path_that_does_not_exist_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "results"
    code, out, err = _cli(["validate", str(missing)], capsys)
    assert code == 1 and err == "" and f"FAIL {missing}\n     - no record at {missing}" in out


# ---------------------------------------------------------------- weights given as a file

def _tiny_openclip_config(tmp_path: Path) -> str:
    import open_clip

    from fedbench.models.backbones.tiny import TINY_CLIP_CONFIG

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "fedbench-test-tiny.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(configs)
    return "fedbench-test-tiny"


def _other_state_dict() -> bytes:
    """A real torch checkpoint, of some other model: loadable, but not these weights."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"layer.weight": torch.zeros(2, 2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content", [b"just some text\n", b"\x00\x01 not a state dict", _other_state_dict],
                         ids=["text", "binary", "other-state-dict"])
@pytest.mark.parametrize("backbone", ["digits-clip", "openclip"])
def test_a_file_given_as_weights_is_not_a_valid_checkpoint_not_the_network(blobs_task, tmp_path, capsys, backbone,
                                                                            content):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(content() if callable(content) else content)
    if backbone == "digits-clip":
        spec = f"digits-clip:{weights}"
    else:
        spec = f"openclip:{_tiny_openclip_config(tmp_path)}@{weights}"
    code, out, err = _cli(["run", "zero-shot", blobs_task, "--backbone", spec, "--results-dir", str(tmp_path / "r")],
                          capsys)
    line = _assert_one_line_error(code, err, weights).replace(str(weights), "PATH")
    assert "not a valid" in line and "checkpoint" in line
    assert "need the network" not in line and "needs the network" not in line  # the file is at fault, not the hub
    assert ("fedbench prepare digits-clip" if backbone == "digits-clip" else "pretrained=TAG") in line  # how to get one
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("*.json"))


def test_a_file_given_as_generator_weights_says_how_to_build_a_folder(tmp_path, capsys):
    from fedbench.errors import BackboneUnavailableError
    from fedbench.models.digits_t2i import load_digits_t2i

    weights = tmp_path / "unet.safetensors"
    weights.write_text("just some text\n")
    with pytest.raises(BackboneUnavailableError, match="is a file, not a valid digits-t2i checkpoint") as info:
        load_digits_t2i(weights)
    assert str(weights) in str(info.value) and "fedbench prepare digits-t2i" in str(info.value)
    # through fedmmkt's option, refused before any data is read
    code, out, err = _cli(["run", "fedmmkt", "rotated-mnist", "--set", f"generator={weights}",
                           "--results-dir", str(tmp_path / "r")], capsys)
    line = _assert_one_line_error(code, err, weights)
    assert "fedbench prepare digits-t2i" in line and "network" not in line


# ---------------------------------------------------------------- Ctrl-C during start-up

# Stands in for the script an installer writes for [project.scripts]: import the target, call it.
# A meta-path finder blocks the import of one module (the slow start-up the user interrupts) and
# says so, so the signal lands exactly there.
_CONSOLE_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, time

    blocked, module, func = sys.argv[1], *sys.argv[2].split(":")
    sys.argv[1:] = sys.argv[3:]  # what the command line of the script would be

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == blocked:
                sys.stderr.write("blocked\\n")
                sys.stderr.flush()
                time.sleep(120)
            return None

    sys.meta_path.insert(0, Block())
    sys.exit(getattr(__import__(module, fromlist=[func]), func)())
""")


def _entry_point() -> str:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["scripts"]["fedbench"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX signals")
@pytest.mark.parametrize("module, target", [
    # while the CLI module itself is imported (only a wrapper that imports it inside a try catches this)
    ("fedbench.core.registry", "pyproject"),
    ("fedbench.core.registry", "fedbench.cli.console:console_main"),
    # while the parser's subcommands import torch (seconds of start-up)
    ("torch", "pyproject"),
    ("torch", "fedbench.cli.console:console_main"),
])
def test_ctrl_c_during_start_up_is_one_line_not_a_traceback(module, target):
    target = _entry_point() if target == "pyproject" else target
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CONSOLE_SCRIPT, module, target, "list", "methods"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert child.stderr.readline() == "blocked\n"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert child.returncode == 130 and err.strip().startswith("fedbench: interrupted"), err
    assert len(err.strip().splitlines()) == 1 and out == ""
