"""The `edgegpt` command line: the click group `main`, whose commands parse flags and call the public API.

Every command module lives here, one per family: train.py (train, sample, import-hf, import-nanogpt,
export-hf), export.py (export, convert-ort), quantize.py, generate.py (generate, chat, eval), serve.py, web.py,
bench.py and info.py; support.py holds what they share (errors as click's, dataclass fields as flags). At
module level they import only the standard library, click, core and one another (tests/test_layout.py):
torch, onnxruntime and numpy load inside the commands that need them, so `edgegpt --help` starts fast and
`edgegpt generate` runs on a device with only the base install (onnxruntime, numpy, tokenizers, click).
`python -m edgegpt.cli` runs the group too (__main__.py; torchrun starts training that way).
"""

from __future__ import annotations

import logging
import sys

import click

from edgegpt import __version__
from edgegpt.cli.bench import bench_command
from edgegpt.cli.export import convert_ort_command, export_command
from edgegpt.cli.generate import chat_command, eval_command, generate_command
from edgegpt.cli.info import info_command
from edgegpt.cli.quantize import quantize_command
from edgegpt.cli.serve import serve_command
from edgegpt.cli.support import Group
from edgegpt.cli.train import (
    export_hf_command,
    import_hf_command,
    import_nanogpt_command,
    sample_command,
    train_command,
)
from edgegpt.cli.web import web_command

__all__ = ["main"]


@click.group(cls=Group, context_settings={"auto_envvar_prefix": "EDGEGPT", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgegpt")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr; no progress bars.")
@click.pass_context
def main(ctx, debug, quiet):
    """Train a GPT in PyTorch, export it to ONNX, quantize it, generate with onnxruntime.

    \b
    Examples:
      edgegpt train --preset tiny --steps 500 --out runs/tiny
      edgegpt export runs/tiny -o bundles/tiny
      edgegpt generate bundles/tiny "def main(" -n 50
    """
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"debug": debug, "quiet": quiet}


for command in (
    train_command,
    sample_command,
    import_hf_command,
    import_nanogpt_command,
    export_hf_command,
    info_command,
    export_command,
    convert_ort_command,
    quantize_command,
    generate_command,
    chat_command,
    eval_command,
    serve_command,
    web_command,
    bench_command,
):
    main.add_command(command)
