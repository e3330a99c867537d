"""The `edgegpt web` command. Imports nothing heavy: the server module loads inside the command."""

from __future__ import annotations

import click

from edgegpt.cli_support import Command

__all__ = ["web_command"]


@click.command("web", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port on 127.0.0.1 (0: any free one).",
)
@click.option(
    "--node-modules",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A node_modules folder holding onnxruntime-web and @huggingface/tokenizers [default: web/node_modules "
    "of the edgegpt checkout, filled by `npm ci`].",
)
def web_command(bundle, port, node_modules):
    """Serve a bundle and a page that generates with it in the browser (onnxruntime-web) on 127.0.0.1.

    Open the printed address, type a prompt and watch the text stream, with tokens/s. The page checks every
    file of the bundle against its manifest (sha256) before using it, and runs on WebAssembly (WebGPU when
    the browser has it). Needs no torch and no onnxruntime; Ctrl-C stops it.

    \b
    Examples:
      edgegpt web bundles/tiny-int4
      edgegpt web bundles/tiny --port 8080
    """
    from edgegpt.runtime.serve.web import WebServer

    server = WebServer(bundle, port=port, node_modules=node_modules)
    click.echo(f"serving {bundle} at {server.url} (Ctrl-C stops)", err=True)
    click.echo(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
