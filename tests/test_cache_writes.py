"""Feature cache writes: a full or unwritable cache never stops a run, never leaves a half entry;
concurrent writers leave one whole entry; temp files of killed writers are reported and cleaned."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

import fedbench
import fedbench.models.cache_disk as disk
from fedbench.models.cache import CacheWarning, FeatureCache
from tests.test_cache import FakeBackbone, images

needs_posix_signals = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP / SIGKILL")
needs_flock = pytest.mark.skipif(disk.fcntl is None, reason="the commit lock needs fcntl.flock")


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


def all_files(cache: FeatureCache) -> list[str]:
    return sorted(p.name for p in cache.dir.iterdir()) if cache.dir.is_dir() else []


def expected(bb: FakeBackbone, x: torch.Tensor) -> torch.Tensor:
    return bb.encode_image(x).half().float()


def no_space(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_disk_too_full_for_the_entry_leaves_nothing_and_the_run_goes_on(cache, monkeypatch):
    bb, x = FakeBackbone(), images(10)
    monkeypatch.setattr(disk.os, "posix_fallocate", no_space, raising=False)
    with pytest.warns(CacheWarning, match=r"free some space .*--cache-dir or \$FEDBENCH_CACHE") as caught:
        got = cache.features(bb, x, batch_size=4, progress=False)
    assert cache.key(bb, x) in str(caught[0].message)
    assert torch.equal(got, expected(bb, x)) and cache.stats.uncached == 1
    assert all_files(cache) == [] and cache.ls() == [] and cache.temp_files() == []

    monkeypatch.undo()  # room again: the next run caches
    assert torch.equal(cache.features(bb, x, progress=False), got)
    assert [e.kind for e in cache.ls()] == ["image"] and cache.stats.uncached == 1


def test_a_disk_that_fills_mid_write_leaves_nothing_and_the_run_goes_on(cache, monkeypatch):
    # Where space cannot be reserved, the array goes out in plain writes: ENOSPC, never SIGBUS.
    bb, x = FakeBackbone(), images(10)
    monkeypatch.delattr(disk.os, "posix_fallocate", raising=False)
    real_write, writes = disk.write_all, []

    def fills_up(fd, data):
        writes.append(len(data))
        if len(writes) == 3:  # the header and the first batch went out
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data)

    monkeypatch.setattr(disk, "write_all", fills_up)
    with pytest.warns(CacheWarning, match="free some space"):
        got = cache.features(bb, x, batch_size=4, progress=False)
    assert torch.equal(got, expected(bb, x)) and cache.stats.images_encoded == 10
    assert len(writes) == 3  # no write tried after the disk filled
    assert all_files(cache) == [] and cache.temp_files() == []


def test_a_failed_commit_leaves_nothing_and_the_run_goes_on(cache, monkeypatch):
    bb = FakeBackbone()

    def refuses(src, dst):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(disk.os, "replace", refuses)
    with pytest.warns(CacheWarning, match="writable folder"):
        got = cache.text_features(bb, ["a cat"])
    assert got.shape == (1, 8) and all_files(cache) == []


def test_a_cache_that_cannot_be_a_folder_leaves_the_run_uncached(cache):
    bb, x = FakeBackbone(), images(10)
    cache.root.mkdir(parents=True)
    (cache.root / "features").write_text("a file where the cache folder goes")
    with pytest.warns(CacheWarning, match="could not write .* writable folder"):
        got = cache.features(bb, x, progress=False)
    assert torch.equal(got, expected(bb, x))
    with pytest.warns(CacheWarning):
        assert cache.text_features(bb, ["a cat"]).shape == (1, 8)
    assert cache.ls() == [] and cache.stats.uncached == 2


def test_a_read_only_cache_is_read_and_never_written(cache):
    bb, x, y = FakeBackbone(), images(10), images(6, seed=1)
    good = cache.features(bb, x, progress=False)
    cache.dir.chmod(0o555)
    try:
        if os.access(cache.dir, os.W_OK):
            pytest.skip("this user writes read-only folders (root)")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(FeatureCache(cache.root).features(bb, x, progress=False), good)  # a hit
        with pytest.warns(CacheWarning, match="writable folder"):
            assert torch.equal(cache.features(bb, y, progress=False), expected(bb, y))
    finally:
        cache.dir.chmod(0o755)
    assert len(cache.ls()) == 1 and cache.temp_files() == []


class Unpredictable(FakeBackbone):
    """A backbone whose features move in the last bits between runs (GPU kernels do), so two
    writers of one key write different bytes; ``wait_for`` holds its encode until an event."""

    def __init__(self, shift: float, wait_for: threading.Event | None = None, started: threading.Event | None = None):
        super().__init__()
        self.shift, self.wait_for, self.started = shift, wait_for, started

    def encode_image(self, batch: torch.Tensor) -> torch.Tensor:
        if self.started is not None:
            self.started.set()
        if self.wait_for is not None:
            assert self.wait_for.wait(20)
        return super().encode_image(batch) + self.shift


@needs_flock
def test_two_writers_and_a_reader_of_one_entry_see_and_leave_only_whole_entries(cache, monkeypatch):
    """A commits its array, then stalls before its sidecar. B (encoded meanwhile) must not
    interleave its pair with A's, and a reader must not take A's array without its sidecar."""
    x = images(12)
    a_half_done, release_a, b_started, b_committing = (threading.Event() for _ in range(4))
    real_replace, real_lock = disk.os.replace, disk.folder_lock

    def stalls_between_array_and_sidecar(src, dst):
        real_replace(src, dst)
        if threading.current_thread().name == "A" and str(dst).endswith(".npy"):
            a_half_done.set()
            assert release_a.wait(20)

    def watched_lock(folder, *, exclusive):
        if exclusive and threading.current_thread().name == "B":
            b_committing.set()
        return real_lock(folder, exclusive=exclusive)

    monkeypatch.setattr(disk.os, "replace", stalls_between_array_and_sidecar)
    monkeypatch.setattr(disk, "folder_lock", watched_lock)
    backbone_a, backbone_b = Unpredictable(0.0), Unpredictable(0.25, wait_for=a_half_done, started=b_started)
    out: dict[str, object] = {}

    def run(name, bb):
        try:
            out[name] = FeatureCache(cache.root).features(bb, x, batch_size=4, progress=False)
        except BaseException as exc:  # reported below, in the test's thread
            out[name] = exc

    threads = {n: threading.Thread(target=run, args=(n, bb), name=n)
               for n, bb in (("B", backbone_b), ("A", backbone_a), ("C", Unpredictable(0.5)))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            threads["B"].start()
            assert b_started.wait(20)  # B missed and is encoding
            threads["A"].start()
            assert a_half_done.wait(20)  # A's array is in place, its sidecar is not
            threads["C"].start()  # a reader now
            assert b_committing.wait(20)
            time.sleep(0.3)  # were B not held, it would have moved its pair in by now
        finally:
            a_half_done.set()
            release_a.set()
            for t in threads.values():
                if t.is_alive() or t.ident is not None:
                    t.join(30)
    assert not any(t.is_alive() for t in threads.values())
    a, b = expected(backbone_a, x), expected(backbone_b, x)
    assert torch.equal(out["A"], a) and torch.equal(out["B"], b)
    assert torch.equal(out["C"], a) or torch.equal(out["C"], b)  # a whole entry, not its own encode
    assert [str(w.message) for w in caught if w.category is CacheWarning] == []

    monkeypatch.undo()
    final = FeatureCache(cache.root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = final.features(Unpredictable(0.5), x, progress=False)
    assert final.stats.hits == 1 and (torch.equal(got, a) or torch.equal(got, b))
    assert len(all_files(cache)) == 2  # one entry, no temp file


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from fedbench.models.cache import FeatureCache

    class Encoder:
        name, embed_dim, fingerprint, preprocess_id = "fake", 8, "f" * 16, "p1"
        calls = 0

        def encode_image(self, batch):
            self.calls += 1
            if self.calls == 2:  # the first batch is on disk: stop or die here, inside the write
                os.kill(os.getpid(), getattr(signal, sys.argv[2]))
            return batch.float().flatten(1)[:, :8]

    pool = torch.randint(0, 256, (10, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    FeatureCache(sys.argv[1]).features(Encoder(), pool, batch_size=4, progress=False)
    """
)


def start_writer(tmp_path: Path, cache: FeatureCache, how: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    tree = str(Path(fedbench.__file__).parent.parent)  # the fedbench under test, also in the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(cache.root), how], env=env)


def cache_cli(cache: FeatureCache, capsys, *words: str) -> str:
    from fedbench.cli.cache import add_cache_parser

    parser = argparse.ArgumentParser(prog="fedbench")
    add_cache_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cache", *words, "--cache-dir", str(cache.root)])
    assert args.func(args) == 0
    return capsys.readouterr().out


@needs_posix_signals
def test_a_killed_writer_leaves_a_temp_file_that_ls_reports_and_clean_removes(cache, tmp_path, capsys):
    writer = start_writer(tmp_path, cache, "SIGKILL")
    assert writer.wait(120) == -signal.SIGKILL
    (temp,) = cache.temp_files()
    assert not temp.live and temp.pid == writer.pid and temp.bytes > 0 and temp.age_s >= 0
    assert cache.ls() == []

    out = cache_cli(cache, capsys, "ls")
    assert "1 temp file (" in out and "left by interrupted writes" in out and "fedbench cache clean" in out
    out = cache_cli(cache, capsys, "clean")
    assert "removed 1 temp file" in out
    assert all_files(cache) == [] and cache.temp_files() == []


@needs_posix_signals
def test_a_live_writers_temp_file_is_kept_by_clean_and_rm_all(cache, tmp_path, capsys):
    writer = start_writer(tmp_path, cache, "SIGSTOP")
    try:
        _, status = os.waitpid(writer.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)  # stopped inside its write, alive
        (path,) = (t.path for t in cache.temp_files())
        hours_ago = time.time() - 7200  # one slow batch (a big model on a CPU) keeps the mtime still
        os.utime(path, (hours_ago, hours_ago))
        (temp,) = cache.temp_files()
        assert temp.live and temp.pid == writer.pid and temp.age_s > 3600  # its lock says so, not its age

        assert f"being written now (pid {writer.pid})" in cache_cli(cache, capsys, "ls")
        report = cache.clean()
        assert [t.path for t in report.kept] == [temp.path] and report.temp_files == [] and temp.path.exists()
        assert "kept 1 temp file" in cache_cli(cache, capsys, "clean")
        cache.rm("all")
        assert temp.path.exists()
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    assert writer.wait(120) == 0  # it finishes its write as if nothing happened
    assert [e.kind for e in cache.ls()] == ["image"] and cache.temp_files() == []
    assert len(all_files(cache)) == 2


def test_clean_removes_half_entries_of_a_crashed_commit(cache, monkeypatch, capsys):
    bb, x = FakeBackbone(), images(4)
    real_replace = disk.os.replace

    def dies_after_the_array(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".npy"):
            raise KeyboardInterrupt  # stands for a kill between the two moves

    monkeypatch.setattr(disk.os, "replace", dies_after_the_array)
    with pytest.raises(KeyboardInterrupt):
        cache.features(bb, x, progress=False)
    monkeypatch.undo()
    cache.features(bb, images(4, seed=1), progress=False)  # a whole entry, which clean keeps
    assert sorted(e.kind for e in cache.ls()) == ["image", "incomplete"]

    assert "removed no temp files and 1 incomplete entry" in cache_cli(cache, capsys, "clean")
    assert [e.kind for e in cache.ls()] == ["image"] and len(all_files(cache)) == 2


def test_a_reader_never_deletes_a_whole_entry_another_run_wrote_after_its_check(cache, monkeypatch, tmp_path):
    """R finds the entry corrupt; before R deletes it, another run commits a good one: R must keep it."""
    bb, x = FakeBackbone(), images(10)
    good = cache.features(bb, x, progress=False)
    array, sidecar = cache.dir / f"{cache.key(bb, x)}.npy", cache.dir / f"{cache.key(bb, x)}.json"
    saved = {final: tmp_path / final.name for final in (array, sidecar)}  # the good entry, as another run writes it
    for final, copy in saved.items():
        copy.write_bytes(final.read_bytes())
    raw = bytearray(array.read_bytes())
    raw[-3] ^= 0x10
    array.write_bytes(bytes(raw))

    real_verified, real_lock, found_corrupt = disk.verified, disk.folder_lock, []

    def watched_verified(*args):
        try:
            return real_verified(*args)
        except disk.Corrupt:
            found_corrupt.append(True)
            raise

    def other_run_commits_first(folder, *, exclusive):
        if exclusive and found_corrupt and len(found_corrupt) == 1:
            found_corrupt.append(True)
            for final, copy in saved.items():  # new files, as os.replace of another run's temps gives
                staged = final.with_name(f".staged-{final.name}")
                staged.write_bytes(copy.read_bytes())
                os.replace(staged, final)
        return real_lock(folder, exclusive=exclusive)

    monkeypatch.setattr(disk, "verified", watched_verified)
    monkeypatch.setattr(disk, "folder_lock", other_run_commits_first)
    monkeypatch.setattr(disk.os, "posix_fallocate", no_space, raising=False)  # R itself cannot write
    reader = FeatureCache(cache.root)
    with pytest.warns(CacheWarning):
        assert torch.equal(reader.features(bb, x, progress=False), good)
    assert len(found_corrupt) == 2 and reader.stats.uncached == 1
    monkeypatch.undo()

    later = FeatureCache(cache.root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(later.features(bb, x, progress=False), good)
    assert later.stats.hits == 1  # the other run's entry survived
