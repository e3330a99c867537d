"""The `edgegpt bench` click command (edgegpt/cli.py adds `bench_command` to the group).

Module-level imports stay light (click and the standard library); the benchmark loads inside the command.
Each flag maps 1:1 to a `BenchConfig` field (`--prompt-tokens` -> `prompt_tokens`); an unset flag keeps the
dataclass default, or `BenchConfig.short()`'s with `--short`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

__all__ = ["bench_command"]


def _csv(kind=str):
    """A click callback: "a,b" -> ("a", "b") (ints for kind=int); None stays None (the config's default)."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from None

    return parse


@click.command("bench")
@click.argument("checkpoint", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An existing bundle to measure (repeatable; its format is read from the manifest).")
@click.option("--preset", type=click.Choice(["tiny", "small", "gpt2"]), help="A random-weight model of this shape (no training).")
@click.option("--vocab-size", type=click.IntRange(min=257), help="Vocabulary of the --preset model [default: 512 tiny, 4096 small, 50257 gpt2].")
@click.option("--formats", callback=_csv(), help="Bundle formats: fp32,fp16,int8,int4. [default: fp32,int8,int4; with --provider cuda also fp16]")
@click.option("--backends", callback=_csv(), help="torch,edgegpt,genai. [default: all three]")
@click.option("--runs", type=click.IntRange(min=1), help="Interleaved rounds; figures are medians over them. [default: 5]")
@click.option("--prompt-tokens", type=click.IntRange(min=1), help="Prompt length. [default: 128]")
@click.option("--new-tokens", type=click.IntRange(min=2), help="Tokens generated per run. [default: 128]")
@click.option("--batch", callback=_csv(int), help="Batch sizes to time. [default: 1,8]")
@click.option("--threads", type=click.IntRange(min=1), help="Threads of every backend. [default: 2]")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), help="[default: cpu]")
@click.option("--spinning/--no-spinning", default=None, help="Busy-waiting onnxruntime threads (edgegpt and genai). [default: on]")
@click.option("--huge-pages/--no-huge-pages", default=None, help="edgegpt's weights in 2 MiB pages (CPU, Linux). [default: on]")
@click.option("--seed", type=int, help="Seeds the prompts and a preset's weights. [default: 0]")
@click.option("--short", is_flag=True, help="A quick look: 3 rounds, 32-token prompt, 32 new tokens, batch 1.")
@click.option("--attention", help="Export the graph with this attention (export_bundle's `attention`, e.g. mha, gqa) [default: the exporter's].")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Build the checkpoint and bundles here and keep them (reused next time) [default: a temporary directory].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure and the environment here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a bar chart (PNG) here.")
@click.pass_context
def bench_command(ctx, checkpoint, bundles, preset, vocab_size, short, attention, work_dir, json_path, plot_path, **flags):
    """Speed and memory of PyTorch, the edgegpt runtime and onnxruntime-genai on the same weights.

    Give a CHECKPOINT (exported and quantized to a temporary directory), --bundle directories, or a
    --preset (random weights). Each backend runs in its own process, in interleaved rounds; the Markdown
    table goes to stdout, progress to stderr.

    \b
    Examples:
      edgegpt bench --preset small --json bench-small.json --plot bench-small.png
      edgegpt bench --preset gpt2 --work-dir runs/bench-gpt2 --json bench-gpt2.json
      edgegpt bench runs/demo/run --short --backends torch,edgegpt --formats fp32,int8
      edgegpt bench --bundle bundles/small --bundle bundles/small-int8 --runs 7
    """
    from edgegpt.bench.compare import BenchConfig, run_bench
    from edgegpt.errors import ConfigError, EdgeGPTError

    root = ctx.find_root().obj
    debug = bool(isinstance(root, dict) and root.get("debug"))
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("provider") == "cuda" and "formats" not in given:
        given["formats"] = ("fp32", "fp16", "int8", "int4")
    try:
        config = dataclasses.replace(BenchConfig.short() if short else BenchConfig(), **given)
        report = run_bench(
            config, checkpoint=checkpoint, bundles=bundles, preset=preset, vocab_size=vocab_size, work_dir=work_dir,
            attention=attention,
        )
    except ConfigError as exc:
        if debug:
            raise
        raise click.UsageError(str(exc), ctx) from None
    except EdgeGPTError as exc:
        if debug:
            raise
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    click.echo(report.markdown(), nl=False)
    if json_path:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        report.plot(plot_path)
        click.echo(f"wrote {plot_path}", err=True)
