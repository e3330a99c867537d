"""Atomic bundle directories: build in a temporary sibling, then rename into place.

A failed or interrupted export leaves no half-written bundle: the files are written to a hidden
`.NAME.tmp-*` directory beside the target, and only a complete, validated bundle is renamed to `NAME`
(`edgegpt.files.staged_dir`). An existing target is refused unless `force`; with `force` it is moved aside,
the new bundle renamed in, and the old one deleted (so a crash between the renames keeps the old bundle as
`.NAME.previous`, which every reader of the bundle renames back: `edgegpt.files.recover`).
`force` replaces only what looks like a bundle (a directory with a manifest.json) or an empty directory,
so a mistyped `-o ~` cannot delete a home directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from edgegpt.errors import ExportError
from edgegpt.files import recover, staged_dir
from edgegpt.manifest import MANIFEST_NAME

__all__ = ["check_target", "staging"]


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing `out` unless `force` and it is a bundle (or an empty directory).

    Raises:
        ExportError: `out` exists and may not be replaced.
    """
    if not recover(out).exists() and not out.is_symlink():
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
    with staged_dir(out) as tmp:
        yield tmp
        check_target(out, force)  # again: something may have appeared at `out` during the export
