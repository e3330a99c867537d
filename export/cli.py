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
@click.option(
    "--ort",
    "ort",
    is_flag=True,
    help="Also write model.ort and required_operators.config (the mobile format; see `edgegpt convert-ort`).",
)
def export(checkpoint, out, force, no_optimize, external_data, opset, attention, ort):
    """Export a checkpoint to a validated ONNX bundle with a KV cache.

    Writes model.onnx, tokenizer files, genai_config.json (onnxruntime-genai) and manifest.json, after
    checking the graph against PyTorch; the bundle appears only when complete.

    \b
    Examples:
      edgegpt export runs/tiny -o bundles/tiny
      edgegpt export runs/tiny/checkpoint -o bundles/tiny --force
      edgegpt export runs/tiny -o bundles/tiny-mha --attention mha
      edgegpt export runs/tiny -o bundles/tiny --ort
    """
    from edgegpt.export import export_bundle

    path = export_bundle(
        checkpoint,
        out,
        force=force,
        optimize=not no_optimize,
        external_data=external_data,
        opset=opset,
        attention=attention,
        ort=ort,
    )
    click.echo(path)


@click.command("convert-ort", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o",
    "--out",
    type=click.Path(),
    default=None,
    help="Bundle directory to write [default: BUNDLE itself, replaced atomically].",
)
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option(
    "--ort-only",
    is_flag=True,
    help="Leave model.onnx out: a device bundle that only the ORT format serves "
    "(not `edgegpt web` or onnxruntime-genai).",
)
@click.option(
    "--target-platform",
    type=click.Choice(["arm", "amd64"]),
    default="arm",
    show_default=True,
    help="The converter's target: arm keeps the graph portable; amd64 adds x86-only layout fusions.",
)
def convert_ort(bundle, out, force, ort_only, target_platform):
    """Add the mobile ORT format to a bundle: model.ort and required_operators.config.

    onnxruntime's converter (onnxruntime.tools.convert_onnx_models_to_ort) optimizes the graph and writes it
    in the ORT format that reduced onnxruntime builds load, and lists the operators such a build needs
    (build onnxruntime with --include_ops_by_config required_operators.config). The manifest hashes both;
    the .ort graph's greedy tokens are checked against the .onnx graph's. Any format: fp32, int8, int4, fp16.

    \b
    Examples:
      edgegpt convert-ort bundles/tiny-int4
      edgegpt convert-ort bundles/tiny-int4 -o bundles/tiny-int4-mobile --ort-only
      edgegpt generate bundles/tiny-int4-mobile "def main("
    """
    from edgegpt.export.ort_convert import convert_to_ort

    click.echo(convert_to_ort(bundle, out, force=force, keep_onnx=not ort_only, target_platform=target_platform))
