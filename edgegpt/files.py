"""Atomic files and staged directories: write beside the target, then rename it into place.

Everything edgegpt writes for others to read goes through one of the two writers here, so that a crash or
a kill never leaves a half-written file or directory under the real name:
- `atomic_write` / `atomic_write_text`: a file, written to a hidden `.NAME.*.tmp` beside it and renamed over it.
- `staged_dir`: a directory (checkpoint, bundle, Hugging Face export), built in a hidden `.NAME.tmp-*`
  beside it. An existing `NAME` is renamed to its aside `.NAME.previous`, the new one renamed to `NAME`,
  then the aside is deleted.

The recovery rule: a kill between the two renames leaves only `.NAME.previous`; `recover(NAME)` renames
it back. Every writer and every reader of such a directory calls `recover` before looking at it
(`staged_dir`, `edgegpt.manifest.read_manifest`, `edgegpt.train.checkpoint.resolve`). A `.NAME.previous`
beside a complete `NAME` is what a kill during the final delete leaves; the next `staged_dir` deletes it.
Besides the `NAME` its caller asked to replace, only these reserved hidden names are ever deleted.
Torch-free (standard library only): the runtime imports it through `edgegpt.manifest`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["aside", "atomic_write", "atomic_write_text", "recover", "staged_dir"]

log = logging.getLogger(__name__)

ASIDE_SUFFIX = ".previous"
FILE_MODE, DIR_MODE = 0o644, 0o755  # mkstemp / mkdtemp make 0600 / 0700: what edgegpt writes is meant to be shared


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; it replaces `path` when the block ends without error.

    Args:
        path: the file to create or replace; its directory must exist.
        mode: "w" (text) or "wb" (binary).

    Raises:
        Whatever the block raises; the temporary file is removed and `path` is left as it was.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
    >>> with atomic_write(p, "wb") as f:
    ...     _ = f.write(b"xy")
    >>> p.read_bytes(), sorted(q.name for q in p.parent.iterdir())
    (b'xy', ['a.bin'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    whatever it holds: callers check first what they may replace.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> with staged_dir(out) as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in out.iterdir()), sorted(p.name for p in out.parent.iterdir())
    (['config.json'], ['ckpt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(DIR_MODE)
        yield tmp
        _swap(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
