"""The `edgegpt serve` click command (edgegpt/cli.py adds `serve_command` to the group).

Module-level imports stay light (click, the standard library, edgegpt.cli_support): uvicorn, starlette and
the runtime load inside the command, so `edgegpt --help` works without the serve extra, and running the
command without it names the extra to install.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from edgegpt.cli_support import Command

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


@click.command("serve", cls=Command)
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    "models",
    multiple=True,
    callback=_model_pair,
    help="Serve this bundle as NAME (repeatable); a request's model field picks one. [default model: BUNDLE, else the first]",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; another than loopback needs --api-key or --no-auth.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key", envvar="EDGEGPT_API_KEY", help="Require 'Authorization: Bearer KEY' (also from $EDGEGPT_API_KEY)."
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve a non-loopback address without an API key (anyone who reaches it may use it).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow browser pages from this origin (repeatable). [default: none]",
)
@click.option(
    "--slots", type=click.IntRange(1, 256), default=4, show_default=True, help="Requests decoded together at most."
)
@click.option(
    "--ctx-size", type=click.IntRange(min=2), default=None, help="Positions per slot. [default: the model's context]"
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Prompt tokens per prefill call (long prompts are interleaved with decoding).",
)
@click.option(
    "--queue",
    "queue_limit",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests that may wait for a slot; beyond it: 429.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds a request may take.",
)
@click.option(
    "--max-body",
    "max_body_bytes",
    type=click.IntRange(min=1),
    default=1 << 20,
    show_default=True,
    help="Largest request body in bytes (413 beyond).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On SIGTERM or Ctrl-C: seconds to let running requests finish.",
)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: one per core]."
)
@click.option(
    "--spinning/--no-spinning",
    default=False,
    show_default=True,
    help="Idle onnxruntime threads busy-wait between calls (faster steps; the event loop then competes for the cores).",
)
def serve_command(
    bundle,
    models,
    host,
    port,
    api_key,
    no_auth,
    cors_origins,
    slots,
    ctx_size,
    chunk,
    queue_limit,
    timeout_s,
    max_body_bytes,
    grace,
    provider,
    threads,
    spinning,
):
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
    from edgegpt.runtime.serve.app import LOOPBACK, ServeSettings, create_app  # the serve extra, needed to serve

    if host not in LOOPBACK and not api_key and not no_auth:
        raise click.UsageError(
            f"--host {host} reaches beyond this machine: give --api-key KEY (or $EDGEGPT_API_KEY), "
            "or --no-auth to serve it open"
        )
    import uvicorn

    settings = ServeSettings(
        host=host,
        api_key=api_key or None,
        cors_origins=tuple(cors_origins),
        slots=slots,
        ctx_size=ctx_size,
        chunk=chunk,
        queue_limit=queue_limit,
        timeout_s=timeout_s,
        max_body_bytes=max_body_bytes,
        grace_s=grace,
        spinning=spinning,
        threads=threads,
        provider=provider,
    )
    default = next(iter(paths))
    app = create_app(paths, default, settings)
    where = f"[{host}]" if ":" in host else host
    click.echo(
        f"edgegpt serve: http://{where}:{port}/v1  models: {', '.join(paths)} (default {default}), {slots} slots",
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
        timeout_graceful_shutdown=grace,
        access_log=False,
    )
    click.echo("edgegpt serve: stopped", err=True)
    sys.exit(0)
