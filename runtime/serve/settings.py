"""`ServeSettings`: how `edgegpt serve` runs, one field per flag of the command, and `LOOPBACK`.

Standard library and core only (no serve extra): the `serve` command declares its flags from these fields
when the CLI starts (`edgegpt.cli.serve`), and `app.py` (starlette, the serve extra) runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgegpt.runtime.model.session_config import SessionConfig

__all__ = ["LOOPBACK", "ServeSettings"]

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})  # hosts served without an API key


@dataclass(frozen=True)
class ServeSettings:
    """How `edgegpt serve` runs (each field is a flag of the command; see `edgegpt serve --help`)."""

    host: str = "127.0.0.1"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    slots: int = 4
    ctx_size: int | None = None
    chunk: int = 128
    queue_limit: int = 64
    timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    grace_s: float = 10.0
    spinning: bool = False  # idle onnxruntime threads busy-wait: off, the event loop shares the cores
    threads: int | None = None
    provider: str = "cpu"

    @property
    def session(self) -> SessionConfig:
        """The session every served model runs on."""
        return SessionConfig(provider=self.provider, threads=self.threads, spinning=self.spinning)
