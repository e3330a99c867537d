"""A real `edgegpt serve` process on a free 127.0.0.1 port, serving the lively tiny bundle as "tiny"."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(bundle, *flags: str, process: list | None = None, python: str = sys.executable):
    """Start the server, wait for /health 200 (60 s at most), yield its base URL; SIGTERM must end it with 0.

    `process`: a list that receives the Popen, for tests that signal the server themselves.
    `python`: the interpreter whose venv's `edgegpt` runs it (another venv's, not this source tree).
    """
    port = free_port()
    cmd = [str(Path(python).parent / "edgegpt"), "serve", "--model", f"tiny={bundle}", "--port", str(port),
           "--provider", "cpu", "--threads", "2", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if process is not None:
        process.append(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become healthy in 60 s"
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stdout.read()


@pytest.fixture(scope="session")
def start_server():
    """`running_server` itself, for tests that need a server with flags of their own."""
    return running_server


@pytest.fixture(scope="module")
def server(lively_gqa_bundle):
    with running_server(lively_gqa_bundle, "--slots", "4", "--max-body", "20000", "--chunk", "16") as base:
        yield base
