"""A real `edgegpt serve` process on a free 127.0.0.1 port, serving the lively tiny bundle as "tiny"."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from edgegpt.runtime.serve import process as serve_process


@contextlib.contextmanager
def running_server(bundle, *flags: str, process: list | None = None, python: str = sys.executable):
    """Serve `bundle` as "tiny", wait for /health (60 s at most), yield its base URL; SIGTERM must end it with 0.

    `process`: a list that receives the Popen, for tests that signal the server themselves.
    `python`: the interpreter whose venv's `edgegpt` runs it (another venv's, not this source tree).
    """
    args = ["--model", f"tiny={bundle}", "--provider", "cpu", "--threads", "2", *flags]
    with serve_process.running_server(args, edgegpt=Path(python).parent / "edgegpt", ready_s=60) as (base, proc):
        if process is not None:
            process.append(proc)
        yield base
    assert proc.returncode == 0, proc.stderr.read()


@pytest.fixture(scope="session")
def start_server():
    """`running_server` itself, for tests that need a server with flags of their own."""
    return running_server


@pytest.fixture(scope="module")
def server(lively_gqa_bundle):
    with running_server(lively_gqa_bundle, "--slots", "4", "--max-body", "20000", "--chunk", "16") as base:
        yield base
