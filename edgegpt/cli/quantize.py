"""The `edgegpt quantize` command. Imports nothing heavy: onnx and onnxruntime load inside the command."""

from __future__ import annotations

import click

from edgegpt.cli.support import Command, root_flag, session_options
from edgegpt.manifest import QUANTIZED_FORMATS as FORMATS  # torch- and onnx-free: this import stays light

__all__ = ["quantize_command"]


@click.command("quantize", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", required=True, type=click.Choice(FORMATS), help="Target format.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing bundle at --out (only a bundle that verifies and holds "
    "no file its manifest does not list).",
)
@click.option(
    "--accept-gate-failure",
    is_flag=True,
    help="Write the bundle even if it misses the accuracy gate (--eval-text); the failure is recorded in its manifest.",
)
@click.option(
    "--per-channel/--per-tensor", "per_channel", default=None, help="int8 weight scales [default: per-channel]."
)
@click.option(
    "--block-size",
    type=click.Choice(["16", "32", "64", "128", "256"]),
    default=None,
    help="int4 weights per scale [default: 32].",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="int4 MatMulNBits accuracy_level; 4 = int8 activations [default: 4].",
)
@click.option(
    "--embedding/--no-embedding",
    "embedding",
    default=None,
    help="int8/int4: quantize the token embedding table too [default: yes].",
)
@click.option(
    "--int8-kernel",
    "int8_kernel",
    type=click.Choice(["rowwise", "dynamic"]),
    default=None,
    help="int8 activations: rowwise = per row, batch-invariant (greedy output does not depend on what shares the "
    "batch); dynamic = one scale per call, a little faster [default: rowwise].",
)
@click.option(
    "--calibrate",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="int8: static QDQ quantization calibrated on this text file (default: dynamic).",
)
@click.option(
    "--eval-text",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Measure the result against BUNDLE on this text, record it, apply the gate.",
)
@click.option(
    "--max-ppl-increase",
    type=click.FloatRange(min=0),
    default=None,
    help="Gate, percent over BUNDLE's perplexity [default: int8 2, int4 10, fp16 1].",
)
@click.option(
    "--max-kld",
    type=click.FloatRange(min=0),
    default=None,
    help="Gate, mean KL-divergence from BUNDLE in nats, as llama-perplexity --kl-divergence "
    "[default: int8 0.02, int4 0.1, fp16 0.005: a broken quantization fails].",
)
@session_options("threads", threads={"help": "onnxruntime threads for checks and eval."})
def quantize_command(
    bundle,
    to,
    out,
    force,
    accept_gate_failure,
    per_channel,
    block_size,
    accuracy_level,
    embedding,
    int8_kernel,
    calibrate,
    eval_text,
    max_ppl_increase,
    max_kld,
    threads,
):
    """Quantize an fp32 bundle to int8, int4 or fp16 as a new bundle.

    The source is left untouched; the new bundle appears only when complete. With --eval-text, its
    perplexity, top-1 and greedy agreement and KL-divergence from BUNDLE are measured and recorded in its
    manifest, and a perplexity increase past --max-ppl-increase or a mean KL-divergence past --max-kld
    refuses the bundle unless --accept-gate-failure. --force only replaces an existing bundle at --out.

    \b
    Examples:
      edgegpt quantize bundles/small --to int8 -o bundles/small-int8
      edgegpt quantize bundles/small --to int4 --block-size 32 -o bundles/small-int4 --eval-text held_out.txt
      edgegpt quantize bundles/small --to int8 -o bundles/small-int8 --eval-text held_out.txt --max-kld 0.01
      edgegpt quantize bundles/small --to int8 --int8-kernel dynamic -o bundles/small-int8-dynamic
      edgegpt quantize bundles/small --to int8 --calibrate corpus.txt -o bundles/small-int8-static
      edgegpt quantize bundles/small --to fp16 -o bundles/small-fp16
    """
    from edgegpt.export.quantize import quantize_bundle

    path = quantize_bundle(
        bundle,
        out,
        to=to,
        force=force,
        accept_gate_failure=accept_gate_failure,
        per_channel=per_channel,
        block_size=None if block_size is None else int(block_size),
        accuracy_level=accuracy_level,
        embedding=embedding,
        int8_kernel=int8_kernel,
        calibrate=calibrate,
        eval_text=eval_text,
        max_ppl_increase=max_ppl_increase,
        max_kld=max_kld,
        threads=threads,
    )
    if eval_text and not root_flag(click.get_current_context(), "quiet"):
        from edgegpt.manifest import read_manifest
        from edgegpt.runtime.generation.evaluate import summary_text

        manifest = read_manifest(path)
        click.echo(summary_text(manifest["eval"]) + _gate_line(manifest["quantization"]["gate"]), err=True)
    click.echo(path)


def _gate_line(gate: dict | None) -> str:
    if not gate:
        return ""
    verdict = "passed" if gate["passed"] else "FAILED (written with --accept-gate-failure)"
    kld = f", mean KLD {gate['kld']:.6f} vs limit {gate['max_kld']:g}" if "kld" in gate else ""
    return f"\ngate: {gate['increase_percent']:+.2f} % vs limit {gate['max_increase_percent']:g} %{kld}: {verdict}"
