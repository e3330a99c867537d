"""Atomic bundle directories: build in a temporary sibling, then rename into place.

A failed or interrupted export leaves no half-written bundle: the files are written to a hidden
`.NAME.tmp-*` directory beside the target, and only a complete, validated bundle is renamed to `NAME`.
An existing target is refused unless `force`; with `force` it is moved aside, the new bundle renamed in,
and the old one deleted (so a crash between the renames keeps the old bundle as `.NAME.old-*`).
`force` replaces only what looks like a bundle (a directory with a manifest.json) or an empty directory,
so a mistyped `-o ~` cannot delete a home directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgegpt.errors import ExportError
from edgegpt.manifest import MANIFEST_NAME

__all__ = ["check_target", "staging"]


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing `out` unless `force` and it is a bundle (or an empty directory).

    Raises:
        ExportError: `out` exists and may not be replaced.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"{out}: already exists; choose another output or pass force=True (--force) to replace it")
    if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file()):
        raise ExportError(
            f"{out}: exists and is not an edgegpt bundle (no {MANIFEST_NAME}); refusing to replace it even with "
            "--force: remove it yourself or choose another output"
        )


@contextlib.contextmanager
def staging(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it becomes `out`, on failure it is removed.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "bundle"
    >>> with staging(out) as tmp:
    ...     _ = (tmp / "model.onnx").write_bytes(b"x")
    >>> sorted(p.name for p in out.iterdir())
    ['model.onnx']
    """
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared and deployed
    aside = None
    try:
        yield tmp
        check_target(out, force)  # again: something may have appeared at `out` during the export
        if out.exists():
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")) / out.name
            os.replace(out, aside)
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and aside.exists() and not out.exists():
            os.replace(aside, out)  # put the previous bundle back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
