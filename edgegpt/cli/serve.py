"""The `edgegpt serve` click command.

Module-level imports stay light (click, the standard library, edgegpt.cli.support and `ServeSettings`, a
stdlib-only dataclass): uvicorn, starlette and the rest of the runtime load inside the command, so
`edgegpt --help` works without the serve extra, and running the command without it names the extra to
install. Each setting's flag maps 1:1 to a `ServeSettings` field (`--queue` -> `queue_limit`); an unset flag
keeps the dataclass default.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from edgegpt.cli.support import Command, field_options, given, session_options
from edgegpt.runtime.serve.settings import LOOPBACK, ServeSettings

__all__ = ["serve_command"]


def _model_pair(ctx, param, values):
    """--model NAME=PATH (repeatable) -> {name: Path}; the path must be a directory."""
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {value!r}")
        if name in pairs:
            raise click.BadParameter(f"model name {name!r} is given twice")
        if not Path(path).is_dir():
            raise click.BadParameter(f"{path!r} is not a bundle directory")
        pairs[name] = Path(path)
    return pairs


# ServeSettings field -> how its flag differs from a plain --field-name (the defaults stay in ServeSettings);
# its session fields (provider, threads, spinning) are `session_options`'.
_SERVE_FLAGS = {
    "host": {"help": "Address to listen on; another than loopback needs --api-key or --no-auth. [default: {default}]"},
    "api_key": {
        "envvar": "EDGEGPT_API_KEY",
        "help": "Require 'Authorization: Bearer KEY' (also from $EDGEGPT_API_KEY).",
    },
    "cors_origins": {
        "flags": ("--cors-origin",),
        "help": "Allow browser pages from this origin (repeatable). [default: none]",
    },
    "slots": {"type": click.IntRange(1, 256), "help": "Requests decoded together at most. [default: {default}]"},
    "ctx_size": {"type": click.IntRange(min=2), "help": "Positions per slot. [default: the model's context]"},
    "chunk": {
        "type": click.IntRange(min=1),
        "help": "Prompt tokens per prefill call (long prompts are interleaved with decoding). [default: {default}]",
    },
    "queue_limit": {
        "flags": ("--queue",),
        "type": click.IntRange(min=0),
        "help": "Requests that may wait for a slot; beyond it: 429. [default: {default}]",
    },
    "timeout_s": {
        "flags": ("--timeout",),
        "type": click.FloatRange(min=0, min_open=True),
        "help": "Seconds a request may take. [default: {default}]",
    },
    "max_body_bytes": {
        "flags": ("--max-body",),
        "type": click.IntRange(min=1),
        "help": "Largest request body in bytes (413 beyond). [default: {default}]",
    },
    "grace_s": {
        "flags": ("--grace",),
        "type": click.FloatRange(min=0),
        "envvar": "EDGEGPT_SERVE_GRACE",  # as --grace's
        "help": "On SIGTERM or Ctrl-C: seconds to let running requests finish. [default: {default}]",
    },
}


@click.command("serve", cls=Command)
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    "models",
    multiple=True,
    callback=_model_pair,
    help="Serve this bundle as NAME (repeatable); a request's model field picks one. [default model: BUNDLE, else the first]",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve a non-loopback address without an API key (anyone who reaches it may use it).",
)
@field_options(_SERVE_FLAGS, of=ServeSettings)
@session_options(
    "provider",
    "threads",
    "spinning",
    spinning={
        "default": ServeSettings.spinning,
        "help": "Idle onnxruntime threads busy-wait between calls (faster steps; the event loop then competes for "
        "the cores).",
    },
)  # provider: SessionConfig's auto (ServeSettings' own default, cpu, is create_app's)
def serve_command(bundle, models, port, no_auth, **flags):
    """Serve bundles over an OpenAI-compatible HTTP API (needs edgegpt[serve]).

    POST /v1/completions and /v1/chat/completions (streaming with stream: true), GET /v1/models, /health
    and /metrics (Prometheus). Requests share the model through continuous batching over --slots slots; a
    request whose prompt starts with what a slot holds (a chat's next turn) feeds only the rest.

    \b
    Examples:
      edgegpt serve runs/demo/int8
      edgegpt serve --model small=bundles/small --model tiny=bundles/tiny --slots 8
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "def main(", "max_tokens": 32}'
    """
    paths = dict(models)
    if bundle is not None:
        name = bundle.resolve().name
        if name in paths:
            raise click.BadParameter(f"model name {name!r} is also given with --model", param_hint="BUNDLE")
        paths = {name: bundle, **paths}
    if not paths:
        raise click.UsageError("give a BUNDLE or at least one --model NAME=PATH")
    from edgegpt.runtime.serve.app import create_app  # the serve extra, needed to serve

    settings = ServeSettings(**given({**flags, "api_key": flags["api_key"] or None}))  # "": $EDGEGPT_API_KEY set empty
    host = settings.host
    if host not in LOOPBACK and not settings.api_key and not no_auth:
        raise click.UsageError(
            f"--host {host} reaches beyond this machine: give --api-key KEY (or $EDGEGPT_API_KEY), "
            "or --no-auth to serve it open"
        )
    import uvicorn

    default = next(iter(paths))
    app = create_app(paths, default, settings)
    where = f"[{host}]" if ":" in host else host
    click.echo(
        f"edgegpt serve: http://{where}:{port}/v1  models: {', '.join(paths)} (default {default}), "
        f"{settings.slots} slots",
        err=True,
    )
    # uvicorn handles SIGTERM and Ctrl-C itself (stop accepting, let requests finish for --grace seconds, cancel
    # the rest, stop the schedulers), then raises the signal again for the handler it found. With these no-op
    # handlers in place that ends here, and the process exits 0 after its clean shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=os.environ.get("EDGEGPT_LOG_LEVEL", "warning"),
        timeout_graceful_shutdown=settings.grace_s,
        access_log=False,
    )
    click.echo("edgegpt serve: stopped", err=True)
    sys.exit(0)
