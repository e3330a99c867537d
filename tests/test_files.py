"""edgegpt.files: what a kill, a full disk, a second writer or the user's umask leave behind."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgegpt import files
from edgegpt.errors import LockError, StorageError
from edgegpt.files import aside, atomic_write, atomic_write_text, recover, run_lock, staged_dir


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _python(code: str, *args: str) -> subprocess.Popen:
    """A child Python running `code` (torch-free: edgegpt.files only), stdout piped."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True)


# ------------------------------------------------------------------ a kill between or after the renames


def test_a_half_deleted_aside_does_not_break_the_next_replacements(tmp_path):
    out = tmp_path / "ckpt"
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("1")
    stray = aside(out)  # a SIGKILL during the final delete of an earlier replacement
    (stray / "sub").mkdir(parents=True)
    (stray / "sub" / "left.bin").write_bytes(b"x")
    for i in range(3):
        with staged_dir(out) as tmp:
            (tmp / "a").write_text(str(i))
    assert (out / "a").read_text() == "2" and _names(tmp_path) == ["ckpt"]


def test_a_kill_between_the_renames_is_undone_by_the_next_reader_and_writer(tmp_path):
    out = tmp_path / "ckpt"
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("old")
    out.rename(aside(out))
    assert (recover(out) / "a").read_text() == "old"
    out.rename(aside(out))
    with staged_dir(out) as tmp:
        assert (out / "a").read_text() == "old"  # restored before the new one is built
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new" and _names(tmp_path) == ["ckpt"]


# ------------------------------------------------------------------ staging left by a kill


_KILLED_MID_WRITE = """
    import os, signal, sys, time
    from edgegpt.files import atomic_write, staged_dir
    target, kind = sys.argv[1], sys.argv[2]
    writer = staged_dir(target) if kind == "dir" else atomic_write(target, "wb")
    with writer as handle:
        if kind == "dir":
            (handle / "model.safetensors").write_bytes(b"x" * 1000)
        else:
            handle.write(b"x" * 1000); handle.flush()
        print("writing", flush=True)
        if sys.argv[3] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_staging_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path, kind):
    target = tmp_path / ("checkpoint" if kind == "dir" else "tokens.bin")
    child = _python(_KILLED_MID_WRITE, str(target), kind, "kill")
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    left = [n for n in _names(tmp_path) if n.startswith(f".{target.name}.tmp-")]
    assert len(left) == 1, _names(tmp_path)  # what a SIGKILL leaves
    if kind == "dir":
        with staged_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
    else:
        atomic_write_text(target, "ok")
    assert _names(tmp_path) == [target.name]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_staging_of_a_live_writer_is_left_alone(tmp_path, kind):
    target = tmp_path / ("checkpoint" if kind == "dir" else "tokens.bin")
    child = _python(_KILLED_MID_WRITE, str(target), kind, "live")
    try:
        assert child.stdout.readline().strip() == "writing"
        live = [n for n in _names(tmp_path) if n.startswith(f".{target.name}.tmp-")]
        if kind == "dir":
            with staged_dir(target) as tmp:
                (tmp / "config.json").write_text("{}")
        else:
            atomic_write_text(target, "ok")
        assert set(live) <= set(_names(tmp_path)) and len(live) == 1
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------ a full disk, a failing write


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_staging_names_the_path_and_the_free_space_and_keeps_the_old(tmp_path):
    out = tmp_path / "ckpt"
    with staged_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(StorageError) as info:
        with staged_dir(out) as tmp:
            _enospc()
    message = str(info.value)
    assert str(out) in message and "no space left on device" in message and " free in " in message
    assert "previous" in message and (out / "a").read_text() == "old" and _names(tmp_path) == ["ckpt"]


def test_disk_full_wrapped_by_a_library_is_still_a_storage_error(tmp_path):
    class LibraryError(RuntimeError):
        pass

    with pytest.raises(StorageError, match="no space left on device"):
        with staged_dir(tmp_path / "out"):
            try:
                _enospc()
            except OSError as exc:
                raise LibraryError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from exc
    with pytest.raises(StorageError, match="no space left on device"):  # safetensors' own wording
        with staged_dir(tmp_path / "out"):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _names(tmp_path) == []


def test_a_short_write_on_a_full_disk_is_reported_as_disk_full(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    target = tmp_path / "tokens.bin"
    with pytest.raises(StorageError, match=r"tokens.bin: no space left on device \(0 B free in"):
        with atomic_write(target, "wb"):
            raise OSError("1000000 requested and 262144 written")  # numpy's tofile: no errno
    assert _names(tmp_path) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="bad value"):
        with staged_dir(tmp_path / "out"):
            raise ValueError("bad value")
    with pytest.raises(FileNotFoundError):  # reading some other file is not a storage failure
        with staged_dir(tmp_path / "out"):
            open(tmp_path / "missing.txt").read()
    assert _names(tmp_path) == []


def test_a_permission_error_while_staging_is_one_storage_error(tmp_path, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(files.os, "mkdir", denied)
    with pytest.raises(
        StorageError, match=r"ckpt: cannot write it: Permission denied \(.*/\.ckpt\.tmp-.*\); check that"
    ):
        with staged_dir(tmp_path / "ckpt"):
            pass


def test_an_unwritable_directory_is_one_storage_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: permissions do not apply")
        with pytest.raises(StorageError, match="cannot write"):
            atomic_write_text(parent / "a.txt", "x")
        with pytest.raises(StorageError, match="cannot write"):
            with staged_dir(parent / "ckpt"):
                pass
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------ modes follow the umask


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    files._umask.cache_clear()
    yield request.param
    os.umask(old)
    files._umask.cache_clear()


def test_written_files_and_directories_follow_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.json", "{}")
    with staged_dir(tmp_path / "dir") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"x")
        fd = os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors writes its file
        os.close(fd)
    for path in (tmp_path / "a.json", tmp_path / "dir" / "sub" / "b.bin", tmp_path / "dir" / "private"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in (tmp_path / "dir", tmp_path / "dir" / "sub"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path


# ------------------------------------------------------------------ one writer per run directory


_HOLD_LOCK = """
    import sys, time
    from edgegpt.files import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_first_process(tmp_path):
    run = tmp_path / "run"
    child = _python(_HOLD_LOCK, str(run))
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=rf"{run}: .*\(pid {child.pid}\)"):
            with run_lock(run):
                pass
    finally:
        child.kill()
        child.wait()
    with run_lock(run):  # free again once the first has gone (a kill releases it too)
        with run_lock(run):  # re-entrant in the same thread
            pass
