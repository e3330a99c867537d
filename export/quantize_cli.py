"""The `edgegpt quantize` and `edgegpt eval` commands. Imports nothing heavy: onnx and onnxruntime load
inside the commands when they run."""

from __future__ import annotations

import json

import click

from edgegpt.errors import ConfigError, EdgeGPTError

FORMATS = ("int8", "int4", "fp16")  # edgegpt.export.quantize.FORMATS, repeated to keep this import light


def _fail(exc: EdgeGPTError):
    """EdgeGPTError -> click's errors: bad settings exit 2, everything else 1; tracebacks with --debug."""
    if (click.get_current_context().obj or {}).get("debug"):
        raise exc
    if isinstance(exc, ConfigError):
        raise click.UsageError(str(exc)) from exc
    raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _quiet() -> bool:
    return bool((click.get_current_context().obj or {}).get("quiet"))


@click.command("quantize")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", required=True, type=click.Choice(FORMATS), help="Target format.")
@click.option("-o", "--out", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out, and write even past the accuracy gate.")
@click.option("--per-channel/--per-tensor", "per_channel", default=None, help="int8 weight scales [default: per-channel].")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
              help="int4 weights per scale [default: 32].")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="int4 MatMulNBits accuracy_level; 4 = int8 activations [default: 4].")
@click.option("--embedding/--no-embedding", "embedding", default=None,
              help="int8/int4: quantize the token embedding table too [default: yes].")
@click.option("--calibrate", type=click.Path(exists=True, dir_okay=False), default=None,
              help="int8: static QDQ quantization calibrated on this text file (default: dynamic).")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Measure the result against BUNDLE on this text, record it, apply the gate.")
@click.option("--max-ppl-increase", type=click.FloatRange(min=0), default=None,
              help="Gate, percent over BUNDLE's perplexity [default: int8 2, int4 10, fp16 1].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads for checks and eval.")
def quantize(bundle, to, out, force, per_channel, block_size, accuracy_level, embedding, calibrate, eval_text,
             max_ppl_increase, threads):
    """Quantize an fp32 bundle to int8, int4 or fp16 as a new bundle.

    The source is left untouched; the new bundle appears only when complete. With --eval-text, its
    perplexity, top-1 and greedy agreement with BUNDLE are measured and recorded in its manifest, and a
    perplexity increase past --max-ppl-increase refuses the bundle unless --force.

    \b
    Examples:
      edgegpt quantize bundles/small --to int8 -o bundles/small-int8
      edgegpt quantize bundles/small --to int4 --block-size 32 -o bundles/small-int4 --eval-text held_out.txt
      edgegpt quantize bundles/small --to int8 --calibrate corpus.txt -o bundles/small-int8-static
      edgegpt quantize bundles/small --to fp16 -o bundles/small-fp16
    """
    from edgegpt.export.quantize import quantize_bundle

    try:
        path = quantize_bundle(
            bundle, out, to=to, force=force, per_channel=per_channel,
            block_size=None if block_size is None else int(block_size), accuracy_level=accuracy_level,
            embedding=embedding, calibrate=calibrate, eval_text=eval_text, max_ppl_increase=max_ppl_increase,
            threads=threads,
        )
    except EdgeGPTError as exc:
        _fail(exc)
    if eval_text and not _quiet():
        from edgegpt.manifest import read_manifest

        manifest = read_manifest(path)
        click.echo(_summary(manifest["eval"]) + _gate_line(manifest["quantization"]["gate"]), err=True)
    click.echo(path)


@click.command("eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out text to measure on.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False), default=None,
              help="Bundle to compare with (the fp32 one): top-1 and greedy agreement.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--tail", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Only the last fraction of the file (0.1: `edgegpt train`'s validation split).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score at most this many tokens.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens between windows [default: context/2].")
@click.option("--prompts", type=click.IntRange(min=0), default=8, show_default=True, help="Greedy prompts (with --reference).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Greedy tokens per prompt.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: one per core].")
def evaluate(bundle, text_file, reference, as_json, tail, max_tokens, stride, prompts, new_tokens, provider, threads):
    """Measure a bundle: perplexity on a text, agreement with a reference bundle, size.

    Perplexity uses sliding windows of the model's context over the text; with --reference, the same
    windows give next-token top-1 agreement, and greedy continuations of prompts cut from the text give
    greedy-sequence agreement. Runs on onnxruntime only (no torch).

    \b
    Examples:
      edgegpt eval bundles/small --text held_out.txt
      edgegpt eval bundles/small-int8 --text held_out.txt --reference bundles/small --json
      edgegpt eval bundles/small-int4 --text corpus.txt --tail 0.1 --reference bundles/small
    """
    from edgegpt.export.evaluate import evaluate_bundle

    try:
        result = evaluate_bundle(bundle, text_file, reference=reference, tail=tail, max_tokens=max_tokens, stride=stride,
                                 prompts=prompts, new_tokens=new_tokens, provider=provider, threads=threads)
    except EdgeGPTError as exc:
        _fail(exc)
    click.echo(json.dumps(result, indent=2) if as_json else _summary(result))


def _summary(r: dict) -> str:
    """A few human lines of an evaluate_bundle result."""
    lines = [f"{r['bundle']} ({r['format']}): perplexity {r['perplexity']:.4f} over {r['scored_tokens']} tokens "
             f"({r['windows']['count']} windows of {r['windows']['size']}, stride {r['windows']['stride']}), "
             f"top-1 accuracy {r['top1_accuracy']:.4f}, model {r['model_bytes'] / 1e6:.2f} MB"]
    ref = r.get("reference")
    if ref:
        lines.append(f"reference {ref['bundle']} ({ref['format']}): perplexity {ref['perplexity']:.4f}, "
                     f"model {ref['model_bytes'] / 1e6:.2f} MB")
        lines.append(f"perplexity {r['ppl_increase_percent']:+.2f} %, top-1 agreement {r['top1_agreement']:.4f}")
        g = r.get("greedy")
        if g:
            lines.append(f"greedy ({g['prompts']} prompts x {g['new_tokens']} tokens): token agreement "
                         f"{g['token_agreement']:.3f}, common prefix {g['prefix_agreement']:.3f}, "
                         f"identical {g['identical_sequences']}/{g['prompts']}")
    return "\n".join(lines)


def _gate_line(gate: dict | None) -> str:
    if not gate:
        return ""
    verdict = "passed" if gate["passed"] else "FAILED (written with --force)"
    return f"\ngate: {gate['increase_percent']:+.2f} % vs limit {gate['max_increase_percent']:g} %: {verdict}"
