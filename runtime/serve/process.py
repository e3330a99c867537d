"""`running_server`: `edgegpt serve` in a child process, for the serving benchmark and the server tests.

It picks a free 127.0.0.1 port, waits until /health answers 200, hands back the base URL and the process,
and stops it with SIGTERM (a clean shutdown: running requests finish, exit status 0) when the block ends.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import httpx

__all__ = ["running_server"]


@contextmanager
def running_server(
    args: Sequence[str], edgegpt: str | Path | None = None, ready_s: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `edgegpt serve ARGS --port P`; yield (base URL, process) once healthy; SIGTERM and wait after.

    Args:
        args: the command's arguments (bundles, flags) without --port.
        edgegpt: the `edgegpt` command to run (default: the one installed beside this Python).
        ready_s: seconds to wait for /health before giving up.

    Raises:
        RuntimeError: the server exited or did not become healthy in time (its standard error is quoted).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = str(edgegpt or Path(sys.executable).parent / "edgegpt")
    proc = subprocess.Popen(
        [command, "serve", *args, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy in {ready_s:g} s")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
