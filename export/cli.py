"""The `edgegpt export` command. Imports nothing heavy: torch loads inside the command when it runs."""

from __future__ import annotations

import click

from edgegpt.cli_support import Command


@click.command("export", cls=Command)
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--no-optimize", "no_optimize", is_flag=True, help="Skip onnxruntime's fusions (plain export).")
@click.option("--external-data", is_flag=True, help="Store weights in model.onnx.data (automatic above 2 GB).")
@click.option("--opset", type=click.IntRange(17, 19), default=None, help="ONNX opset (default 17).")
@click.option(
    "--attention",
    type=click.Choice(["mha", "gqa"]),
    default="gqa",
    show_default=True,
    help="Attention graph: gqa (GroupQueryAttention, KV cache updated in place, faster decode; needs "
    "head_size % 8 == 0 and onnxruntime >= 1.22) or mha (MultiHeadAttention, KV cache grown by concatenation).",
)
def export(checkpoint, out, force, no_optimize, external_data, opset, attention):
    """Export a checkpoint to a validated ONNX bundle with a KV cache.

    Writes model.onnx, tokenizer files, genai_config.json (onnxruntime-genai) and manifest.json, after
    checking the graph against PyTorch; the bundle appears only when complete.

    \b
    Examples:
      edgegpt export runs/tiny -o bundles/tiny
      edgegpt export runs/tiny/checkpoint -o bundles/tiny --force
      edgegpt export runs/tiny -o bundles/tiny-mha --attention mha
    """
    from edgegpt.export import export_bundle

    path = export_bundle(
        checkpoint, out, force=force, optimize=not no_optimize, external_data=external_data, opset=opset,
        attention=attention,
    )
    click.echo(path)
