"""Atomic files and staged directories: write beside the target, then rename it into place.

Everything edgegpt writes for others to read goes through one of the two writers here, so that a crash or
a kill never leaves a half-written file or directory under the real name:
- `atomic_write` / `atomic_write_text`: a file, written to a hidden `.NAME.tmp-PID-XXXXXXXX` beside it and
  renamed over it.
- `staged_dir`: a directory (checkpoint, bundle, Hugging Face export), built in a hidden
  `.NAME.tmp-PID-XXXXXXXX` beside it. An existing `NAME` is renamed to its aside `.NAME.previous`, the new
  one renamed to `NAME`, then the aside is deleted.

The recovery rule: a kill between the two renames leaves only `.NAME.previous`; `recover(NAME)` renames
it back. Every writer and every reader of such a directory calls `recover` before looking at it
(`staged_dir`, `edgegpt.manifest.read_manifest`, `edgegpt.train.checkpoint.resolve`). A `.NAME.previous`
beside a complete `NAME` is what a kill during the final delete leaves; the next `staged_dir` deletes it.

Staging left by a kill: the writer holds an advisory lock (`fcntl.flock`) on its staging file or directory
until it has been renamed, and the name carries the writer's process id. The next write of the same `NAME`
deletes a `.NAME.tmp-PID-*` whose lock it can take and whose process is gone (or is itself, from before a
restart). Besides the `NAME` its caller asked to replace, only these reserved hidden names are ever deleted.

Errors: a write that fails for want of space (ENOSPC, EDQUOT, anywhere in the error's chain, or a short
write on a disk with no space left) or with an OSError about the file being written raises `StorageError`,
one line naming the path, the free space and what was kept; other errors pass through unchanged.
Modes: what is written follows the process umask (0o666 / 0o777 masked), like any other tool's output.
`run_lock` keeps a second process from writing the same run directory. Torch-free (standard library only):
the runtime imports it through `edgegpt.manifest`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from edgegpt.errors import EdgeGPTError, LockError, StorageError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so staging is never judged stale and run_lock does not exclude
    fcntl = None

__all__ = ["aside", "atomic_write", "atomic_write_text", "recover", "run_lock", "staged_dir", "storage_errors"]

log = logging.getLogger(__name__)

ASIDE_SUFFIX = ".previous"
STAGING = ".tmp-"  # `.NAME.tmp-PID-XXXXXXXX`: a file or directory process PID is writing
LOCK_NAME = ".lock"  # run_lock's file inside the directory it guards; holds "PID what"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|os error (28|122)\b", re.IGNORECASE)
_NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this left failed for want of space

_lock = threading.Lock()  # creating + locking a staging name is one step for this process's other threads
_writing: set[str] = set()  # staging paths this process holds
_run_locks: dict[str, list] = {}  # lock file -> [fd, depth, thread id]


@functools.cache
def _umask() -> int:
    """The process umask, read once: from /proc where Linux shows it, else set and restored at once (to 0o077
    meanwhile, so that a file another thread creates in that instant is only more private)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under the process umask (0o644 under the usual 0o022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode of a new directory under the process umask (0o755 under the usual 0o022)."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; it replaces `path` when the block ends without error.

    Args:
        path: the file to create or replace; its directory must exist.
        mode: "w" (text) or "wb" (binary).

    Raises:
        StorageError: the disk is full, or the file cannot be written (see the module docstring).
        Whatever else the block raises. Either way the temporary file is removed and `path` is left as it was.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
    >>> with atomic_write(p, "wb") as f:
    ...     _ = f.write(b"xy")
    >>> p.read_bytes(), sorted(q.name for q in p.parent.iterdir())
    (b'xy', ['a.bin'])
    """
    path = Path(path)
    existed = path.exists()
    _remove_stale(path)
    with storage_errors(path, existed=existed):
        tmp, fd = _create(path, directory=False)
    with _staging(tmp, path, existed, remove=lambda: tmp.unlink(missing_ok=True)):
        with os.fdopen(fd, mode) as f:  # its lock lasts until the file is renamed and closed
            yield f
            f.flush()
            os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `atomic_write`."""
    with atomic_write(path) as f:
        f.write(text)


def aside(path: str | Path) -> Path:
    """Where `staged_dir` keeps the previous `path` between its two renames: the hidden sibling `.NAME.previous`.

    >>> aside("runs/tiny/checkpoint").as_posix()
    'runs/tiny/.checkpoint.previous'
    """
    path = Path(path)
    return path.with_name(f".{path.name}{ASIDE_SUFFIX}")


def recover(path: str | Path) -> Path:
    """Undo a replacement interrupted between its two renames: `path` missing, its aside present -> renamed back.

    Returns `path`. A reader on a read-only file system leaves the state as it is (and reports `path` missing).
    """
    path = Path(path)
    old = aside(path)
    if path.exists() or path.is_symlink() or old.is_symlink() or not old.is_dir():
        return path
    try:
        os.replace(old, path)
    except OSError as exc:  # read-only, or another process recovered it first
        log.debug("%s: not restored from %s: %s", path, old.name, exc)
    else:
        log.warning("%s: restored from %s, left there by an interrupted replacement", path, old.name)
    return path


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; it replaces `path` when the block ends without error.

    On error the temporary directory is removed and `path` is left as it was. An existing `path` is replaced
    whatever it holds: callers check first what they may replace. What the block writes gets the modes of
    the umask (0o644 files, 0o755 directories under 0o022), whatever mode its writer chose.

    Raises:
        StorageError: the disk is full, or the directory cannot be written (see the module docstring).
        Whatever else the block raises.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> with staged_dir(out) as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in out.iterdir()), sorted(p.name for p in out.parent.iterdir())
    (['config.json'], ['ckpt'])
    """
    path = Path(path)
    existed = recover(path).exists() or path.is_symlink()
    with storage_errors(path, existed=existed):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp, fd = _create(path, directory=True)
    try:
        with _staging(tmp, path, existed, remove=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            yield tmp
            _share(tmp)
            _swap(tmp, path)
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _staging(tmp: Path, path: Path, existed: bool, remove) -> Iterator[None]:
    """While the block writes `path` through the staging `tmp`: on failure `remove()` it and raise a failure to
    write as `StorageError`; either way this process no longer holds `tmp` afterwards."""
    try:
        yield
    except BaseException as exc:
        failure = _failure(exc, path)  # judged before the partial staging is removed
        remove()
        if failure is None:
            raise
        raise _storage_error(failure, exc, path, existed) from exc
    finally:
        with _lock:
            _writing.discard(str(tmp))


def _swap(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing `path` waits at its aside between the two renames, then is deleted."""
    if not path.exists() and not path.is_symlink():
        os.replace(new, path)
        return
    old = aside(path)
    if old.exists() or old.is_symlink():
        _remove(old)  # left by a kill during an earlier final delete; `path` is the complete one
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    try:
        _remove(old)
    except OSError as exc:  # the new `path` is in place; the next replacement deletes the aside
        log.warning("%s: could not delete %s: %s", path, old.name, exc)


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or symbolic link (never what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _share(tmp: Path) -> None:
    """Give everything under `tmp` the umask's modes: some writers create 0600 files (safetensors does)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(tmp, dmode)
    for root, dirs, names in os.walk(tmp):
        for name in dirs + names:
            member = os.path.join(root, name)
            if not os.path.islink(member):
                os.chmod(member, dmode if os.path.isdir(member) else fmode)


# --------------------------------------------------------------------------------- staging and its locks


def _create(path: Path, *, directory: bool) -> tuple[Path, int | None]:
    """A new staging directory or file beside `path`, locked, and its open descriptor (which holds the lock;
    None for a directory where there are no locks: Windows cannot open one)."""
    with _lock:
        while True:
            tmp = path.with_name(f".{path.name}{STAGING}{os.getpid()}-{secrets.token_hex(4)}")
            try:
                if directory:
                    os.mkdir(tmp, 0o777)  # the umask applies, as for any directory
                    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if fcntl else None
                else:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            break
        _try_lock(fd)
        _writing.add(str(tmp))
    return tmp, fd


def _try_lock(fd: int | None) -> bool | None:
    """Take an exclusive advisory lock without waiting: True, False (another holds it), None (no locks here)."""
    if fcntl is None or fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts)
        return None
    return True


def _remove_stale(path: Path) -> None:
    """Delete the `.NAME.tmp-PID-*` beside `path` that a killed writer left: unlocked, and its process gone."""
    if fcntl is None:  # without locks a live writer cannot be told from a dead one
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}{re.escape(STAGING)}(\d+)-[0-9a-f]{{8}}")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        stale, pid = path.parent / name, int(match[1])
        with _lock:  # this process's writers create and lock their staging under the same lock
            if str(stale) in _writing or (pid != os.getpid() and _alive(pid)):
                continue  # a live process may be between creating and locking it
            try:
                fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:  # gone, or a symbolic link: never one of ours
                continue
            try:
                if _try_lock(fd):
                    _remove(stale)
                    log.info("%s: deleted %s, left by an interrupted write (process %d)", path, name, pid)
            except OSError as exc:
                log.warning("%s: could not delete %s: %s", path, name, exc)
            finally:
                os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


# --------------------------------------------------------------------------------- one writer per run


@contextlib.contextmanager
def run_lock(directory: str | Path, what: str = "edgegpt train") -> Iterator[Path]:
    """Hold an advisory lock on `directory/.lock` (created with the directory) for the block.

    The lock file holds this process's id and `what`, for the message another process gets. The kernel
    releases the lock when the process ends, however it ends. Re-entrant within one thread.

    Raises:
        LockError: another process, or another thread of this one, holds it; the message names its process id.
        StorageError: `directory` cannot be created.

    >>> import tempfile
    >>> with run_lock(tempfile.mkdtemp()) as run:
    ...     pass
    """
    directory = Path(directory)
    with storage_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    file = directory / LOCK_NAME
    key, me = os.path.realpath(file), threading.get_ident()
    with _lock:
        held = _run_locks.get(key)
        if held is not None and held[2] != me:
            raise LockError(
                f"{directory}: another thread of this process (pid {os.getpid()}) is writing to it; "
                "wait for it to finish or choose another output directory"
            )
        if held is None:
            held = _run_locks[key] = [_take_run_lock(file, directory, what), 0, me]
        held[1] += 1
    try:
        yield directory
    finally:
        with _lock:
            held[1] -= 1
            if held[1] == 0:
                del _run_locks[key]
                os.close(held[0])


def _take_run_lock(file: Path, directory: Path, what: str) -> int:
    with storage_errors(file):
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
    locked = _try_lock(fd)
    if locked is False:
        holder = os.pread(fd, 256, 0).decode(errors="replace").split(maxsplit=1)
        os.close(fd)
        pid, by = (
            (holder[0], holder[1].strip()) if len(holder) == 2 else (holder[0] if holder else "unknown", "process")
        )
        raise LockError(
            f"{directory}: another {by} (pid {pid}) is writing to it; wait for it to finish or stop it, "
            "or choose another output directory"
        )
    if locked is None:
        log.debug("%s: no advisory locks on this file system; a second writer would not be refused", file)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
    except OSError as exc:  # the lock is what excludes; the id is for the message
        log.debug("%s: could not record the process id: %s", file, exc)
    return fd


# --------------------------------------------------------------------------------- failures as StorageError


@contextlib.contextmanager
def storage_errors(path: str | Path, *, existed: bool | None = None) -> Iterator[None]:
    """Raise the block's failures to write `path` as `StorageError` (see the module docstring); others pass.

    Args:
        path: what the block writes (a file or directory, or something inside it).
        existed: whether `path` existed before, for the message ("the previous NAME is unchanged" or
            "nothing was written"); None says neither.

    >>> import errno
    >>> with storage_errors("runs/x/metrics.jsonl"):
    ...     raise OSError(errno.ENOSPC, "No space left on device")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    edgegpt.errors.StorageError: runs/x/metrics.jsonl: no space left on device (... free in ...); free some space or write elsewhere
    """
    path = Path(path)
    try:
        yield
    except Exception as exc:
        failure = _failure(exc, path)
        if failure is None:
            raise
        raise _storage_error(failure, exc, path, existed) from exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _failure(exc: BaseException, path: Path) -> str | None:
    """ "full", "quota" or "write" when `exc` is a failure to write `path`; None for anything else."""
    if not isinstance(exc, Exception) or isinstance(exc, StorageError):
        return None
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno == errno.EDQUOT or "quota exceeded" in str(error).lower():
            return "quota"
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS or _DISK_FULL_TEXT.search(str(error)):
            return "full"
    if isinstance(exc, EdgeGPTError):
        return None
    free = _free(path)
    if (
        isinstance(exc, (OSError, RuntimeError))
        and getattr(exc, "errno", None) is None
        and free is not None
        and free < _NEARLY_FULL
    ):
        return "full"  # a short write (numpy's tofile) or torch's writer: no errno, but no space left either
    if isinstance(exc, OSError) and _about(exc, path):
        return "write"
    return None


def _about(exc: OSError, path: Path) -> bool:
    """Whether the OSError names no file, or `path`, something inside it, a directory above it or its staging."""
    target = os.path.abspath(path)
    names = [os.path.abspath(os.fsdecode(n)) for n in (exc.filename, exc.filename2) if n is not None]
    sibling = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.")
    return not names or any(
        n == target or n.startswith(target + os.sep) or target.startswith(n + os.sep) or n.startswith(sibling)
        for n in names
    )


def _storage_error(failure: str, exc: BaseException, path: Path, existed: bool | None) -> StorageError:
    kept = {True: f"; the previous {path.name} is unchanged", False: "; nothing was written", None: ""}[existed]
    where = _existing(path.parent)
    if failure in ("full", "quota"):
        free = _free(where)
        what = "no space left on device" if failure == "full" else "disk quota exceeded"
        size = "unknown space" if free is None else _size(free)
        return StorageError(f"{path}: {what} ({size} free in {where}); free some space or write elsewhere{kept}")
    detail = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
    name = f" ({os.fsdecode(exc.filename)})" if getattr(exc, "filename", None) else ""
    return StorageError(f"{path}: cannot write it: {detail}{name}; check that {where} is writable{kept}")


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _free(path: Path) -> int | None:
    """Bytes free to this user on `path`'s file system (or its nearest existing ancestor's); None if unknown."""
    try:
        return shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return None


def _size(n: int) -> str:
    """Bytes in decimal units: 0 B, 980 B, 1.2 MB, 3.4 GB."""
    units = ["B", "kB", "MB", "GB", "TB"]
    while n >= 1000 and len(units) > 1:
        n, units = n / 1000, units[1:]
    return f"{n} {units[0]}" if units[0] == "B" else f"{n:.1f} {units[0]}"
