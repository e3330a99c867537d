"""Atomic bundle directories: build in a temporary sibling, then rename into place.

A failed or interrupted export leaves no half-written bundle: the files are written to a hidden
`.NAME.tmp-*` directory beside the target, and only a complete, validated bundle is renamed to `NAME`
(`edgegpt.files.staged_dir`). An existing target is refused unless `force`; with `force` it is moved aside,
the new bundle renamed in, and the old one deleted (so a crash between the renames keeps the old bundle as
`.NAME.previous`, which every reader of the bundle renames back: `edgegpt.files.recover`).

What `force` replaces: an empty directory, or an edgegpt bundle that verifies (its manifest reads, and
every file it lists has its recorded size and sha256) and holds nothing its manifest does not list. Anything
else is refused, naming what is in the way: a directory that merely holds a `manifest.json`, a bundle
altered since it was written, a bundle with the user's own files added. Refusing rather than replacing
only the listed files keeps the replacement one atomic rename of a whole directory (a kill can never leave
a mix of old and new files), and deletes nothing edgegpt did not write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edgegpt.errors import BundleError, ExportError
from edgegpt.files import recover, staged_dir
from edgegpt.manifest import MANIFEST_NAME, verify_bundle

__all__ = ["check_target", "staging"]


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing `out` unless `force` and it is an empty directory or a bundle that may be replaced.

    Raises:
        ExportError: `out` exists and may not be replaced; the message names what is in the way.
    """
    out = Path(out)
    if not recover(out).exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"{out}: already exists; choose another output or pass force=True (--force) to replace it")
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    refuse = "refusing to replace it even with --force: remove it yourself or choose another output"
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out}: exists and is a file or a symbolic link, not a bundle directory; {refuse}")
    try:
        manifest = verify_bundle(out)
    except BundleError as exc:
        raise ExportError(f"{out}: exists and is not an edgegpt bundle that verifies ({exc}); {refuse}") from None
    unlisted = _unlisted(out, manifest["files"])
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise ExportError(
            f"{out}: an edgegpt bundle, but it also holds files its manifest does not list ({shown}); "
            "refusing to replace it even with --force, which would delete them: move them out, or "
            "choose another output"
        )


def _unlisted(out: Path, listed: dict) -> list[str]:
    """Paths under `out` (relative, sorted) that are neither the manifest, a listed file nor a folder of one."""
    keep = set(listed) | {MANIFEST_NAME}
    folders = {parent.as_posix() for name in keep for parent in PurePosixPath(name).parents}
    found = []
    for root, dirs, names in os.walk(out):  # does not descend into symbolic links
        rel = lambda name: Path(root, name).relative_to(out).as_posix()  # noqa: E731
        found += [rel(name) for name in names if rel(name) not in keep]
        found += [rel(name) + "/" for name in dirs if rel(name) not in folders]  # named once, not file by file
        dirs[:] = [name for name in dirs if rel(name) in folders]
    return sorted(found)


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
