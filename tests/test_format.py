"""The source's format: `ruff format` leaves every Python file as it is, and `ruff check` passes.

The settings are pyproject.toml's `[tool.ruff]` (120 columns; the only lint rule is E501, the line
length, which catches what the formatter cannot break: long strings, comments, docstrings). The files are
the repository's tracked ones (`git ls-files`), or without git the Python files of the four source trees.
To fix a failure: `ruff format $(git ls-files '*.py')`, then break the lines `ruff check` still lists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_TREES = ("edgegpt", "export", "runtime", "tests")


def _python_files() -> list[str]:
    if shutil.which("git"):
        result = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.splitlines()
    return sorted(str(p.relative_to(ROOT)) for tree in SOURCE_TREES for p in (ROOT / tree).rglob("*.py"))


def test_ruff_format_and_check_pass():
    pytest.importorskip("ruff", reason="ruff is not installed (the dev extra has it): the format is not checked")
    files = _python_files()
    assert files, f"no Python files found under {ROOT}"
    for command in (["format", "--check"], ["check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--no-cache", *files], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, f"ruff {' '.join(command)} failed:\n{result.stdout}{result.stderr}"
