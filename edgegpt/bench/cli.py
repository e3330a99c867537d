"""The `edgegpt bench` click command (edgegpt/cli.py adds `bench_command` to the group).

A bundle as SOURCE is timed by the runtime alone (`edgegpt.runtime.bench`, base install); anything else is
the comparison (`edgegpt.bench.compare`). Module-level imports stay light (click, the standard library,
edgegpt.cli_support); the benchmark loads inside the command. Each flag maps 1:1 to a field of
`BenchConfig` or `DeviceBenchConfig` (`--prompt-tokens` -> `prompt_tokens`); an unset flag keeps the
dataclass default, or `short()`'s with `--short`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from edgegpt.cli_support import Command, field_options, given

__all__ = ["bench_command"]


def _csv(kind=str):
    """A click callback: "a,b" -> ("a", "b") (ints for kind=int); None stays None (the config's default)."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            values = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}")
        return values

    return parse


# BenchConfig field -> how its flag differs from a plain --field-name (the defaults stay in BenchConfig).
_BENCH_FLAGS = {
    "formats": {
        "callback": _csv(),
        "help": "Bundle formats: fp32,fp16,int8,int4. [default: fp32,int8,int4; with --provider cuda also fp16]",
    },
    "backends": {"callback": _csv(), "help": "torch,edgegpt,genai. [default: all three]"},
    "runs": {
        "type": click.IntRange(min=1),
        "help": "Rounds (interleaved when comparing); figures are medians over them. [default: 5]",
    },
    "prompt_tokens": {
        "type": click.IntRange(min=1),
        "help": "Prompt length. [default: 128; a bundle alone: at most half its context]",
    },
    "new_tokens": {
        "type": click.IntRange(min=2),
        "help": "Tokens generated per run. [default: 128; a bundle alone: at most half its context]",
    },
    "batch": {"callback": _csv(int), "help": "Batch sizes to time. [default: 1,8; a bundle alone: 1]"},
    "threads": {
        "type": click.IntRange(min=1),
        "help": "Threads of every backend. [default: 2; a bundle alone: one per core]",
    },
    "provider": {"type": click.Choice(["cpu", "cuda"]), "help": "[default: cpu]"},
    "spinning": {
        "flags": ("--spinning/--no-spinning",),
        "help": "Busy-waiting onnxruntime threads (edgegpt and genai). [default: on]",
    },
    "huge_pages": {
        "flags": ("--huge-pages/--no-huge-pages",),
        "help": "edgegpt's weights in 2 MiB pages (CPU, Linux). [default: on]",
    },
    "seed": {"type": int, "help": "Seeds the prompts and a preset's weights. [default: 0]"},
    # A bundle alone: speculative decoding against plain decoding on real text (edgegpt.runtime.bench_speculative).
    "lookup": {"is_flag": True, "help": "Time prompt-lookup speculative decoding against plain decoding on --text."},
    "draft": {
        "type": click.Path(exists=True, file_okay=False),
        "help": "Time speculative decoding with this draft bundle (same tokenizer) on --text.",
    },
    "text": {
        "type": click.Path(exists=True),
        "multiple": True,
        "help": "With --lookup/--draft: a text file or a directory of them to continue (repeatable; one table row per source).",
    },
    "prompts": {
        "type": click.IntRange(min=1),
        "help": "With --lookup/--draft: prompts per --text source. [default: 4]",
    },
    "draft_tokens": {
        "type": click.IntRange(1, 64),
        "help": "With --lookup/--draft: drafts per call at most. [default: 4]",
    },
    "lookup_ngram": {"type": click.IntRange(1, 16), "help": "With --lookup: the longest suffix matched. [default: 3]"},
    "temperature": {
        "type": click.FloatRange(min=0),
        "help": "With --lookup/--draft: sample at this temperature (drafts mostly fail). [default: 0, greedy]",
    },
    # A bundle alone: `edgegpt serve` under concurrent clients (edgegpt.runtime.serve.bench, the serve extra).
    "serve_clients": {
        "callback": _csv(int),
        "help": "Start `edgegpt serve` on the bundle and time these numbers of concurrent streaming clients, e.g. 1,4,8,16.",
    },
}
_SPECULATIVE_FLAGS = ("lookup", "draft", "text", "prompts", "draft_tokens", "lookup_ngram", "temperature")
_ONE_BUNDLE_FLAGS = (*_SPECULATIVE_FLAGS, "serve_clients")


@click.command("bench", cls=Command)
@click.argument("source", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An existing bundle to measure (repeatable; its format is read from the manifest).",
)
@click.option(
    "--preset", type=click.Choice(["tiny", "small", "gpt2"]), help="A random-weight model of this shape (no training)."
)
@click.option(
    "--vocab-size",
    type=click.IntRange(min=257),
    help="Vocabulary of the --preset model [default: 512 tiny, 4096 small, 50257 gpt2].",
)
@field_options(_BENCH_FLAGS)
@click.option("--short", is_flag=True, help="A quick look: 3 rounds, 32-token prompt, 32 new tokens, batch 1.")
@click.option(
    "--attention",
    help="Export the graph with this attention (export_bundle's `attention`, e.g. mha, gqa) [default: the exporter's].",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Build the checkpoint and bundles here and keep them (reused next time) [default: a temporary directory].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every figure and the environment here.",
)
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a bar chart (PNG) here."
)
@click.pass_context
def bench_command(ctx, source, bundles, preset, vocab_size, short, attention, work_dir, json_path, plot_path, **flags):
    """Time a bundle on this device, or compare PyTorch, the edgegpt runtime and onnxruntime-genai.

    A bundle as SOURCE: prefill and decode tokens/s, first-token latency and memory with the runtime
    alone (the base install is enough, as llama-bench for llama.cpp).

    With --lookup and/or --draft DRAFT and --text FILE_OR_DIR: decode tokens/s of plain decoding against
    speculative decoding continuing that text, acceptance rate, tokens per model call, whether the greedy
    tokens are plain decoding's, and the cost of a multi-token call.

    A checkpoint (or run directory) as SOURCE, --bundle directories, or a --preset (random weights): the
    same weights through every backend, each in its own process, in interleaved rounds (needs the train
    extra; genai rows need edgegpt[genai]). The Markdown table goes to stdout, progress to stderr.

    \b
    Examples:
      edgegpt bench bundles/small-int8
      edgegpt bench bundles/small --short --batch 1,4 --json small.json
      edgegpt bench bundles/small --lookup --draft bundles/tiny --text held-out/ --text notes.txt
      edgegpt bench --preset small --json bench-small.json --plot bench-small.png
      edgegpt bench --preset gpt2 --work-dir runs/bench-gpt2 --json bench-gpt2.json
      edgegpt bench runs/demo/run --short --backends torch,edgegpt --formats fp32,int8
      edgegpt bench --bundle bundles/small --bundle bundles/small-int8 --runs 7
    """
    from edgegpt.manifest import MANIFEST_NAME

    if source is not None and (source / MANIFEST_NAME).is_file():
        comparing = {
            "--bundle": bundles,
            "--preset": preset,
            "--vocab-size": vocab_size,
            "--attention": attention,
            "--work-dir": work_dir,
            "--plot": plot_path,
            "--formats": flags["formats"],
            "--backends": flags["backends"],
        }
        wrong = [flag for flag, value in comparing.items() if value]
        if wrong:
            raise click.UsageError(
                f"{source} is a bundle, which is timed alone; {', '.join(wrong)} only go with the comparison: give "
                f"the bundle as --bundle {source} to compare backends on it"
            )
        _bench_one_bundle(source, short, json_path, given(flags))
        return
    from edgegpt.bench.compare import BenchConfig, run_bench

    settings = given(flags)
    alone = ["--" + name.replace("_", "-") for name in _ONE_BUNDLE_FLAGS if settings.pop(name, False)]
    if alone:
        raise click.UsageError(f"{', '.join(alone)} time one bundle: give the bundle's directory as SOURCE")
    if settings.get("provider") == "cuda" and "formats" not in settings:
        settings["formats"] = ("fp32", "fp16", "int8", "int4")
    config = dataclasses.replace(BenchConfig.short() if short else BenchConfig(), **settings)
    report = run_bench(
        config,
        checkpoint=source,
        bundles=bundles,
        preset=preset,
        vocab_size=vocab_size,
        work_dir=work_dir,
        attention=attention,
    )
    click.echo(report.markdown(), nl=False)
    if json_path:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        report.plot(plot_path)
        click.echo(f"wrote {plot_path}", err=True)


def _bench_one_bundle(bundle: Path, short: bool, json_path: Path | None, settings: dict) -> None:
    """`edgegpt bench BUNDLE`: the runtime alone (`edgegpt.runtime.bench`), or the server (`--serve-clients`)."""
    import json

    clients = settings.pop("serve_clients", None)
    if clients:
        _bench_server(bundle, clients, short, json_path, settings)
        return
    from edgegpt.runtime.bench import DeviceBenchConfig, bench_bundle, markdown

    known = {f.name for f in dataclasses.fields(DeviceBenchConfig)}
    settings = {k: v for k, v in settings.items() if k in known}
    config = DeviceBenchConfig.short(**settings) if short else DeviceBenchConfig(**settings)
    result = bench_bundle(bundle, config)
    click.echo(markdown(result), nl=False)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)


def _bench_server(bundle: Path, clients: tuple[int, ...], short: bool, json_path: Path | None, settings: dict) -> None:
    """`edgegpt bench BUNDLE --serve-clients ...`: `edgegpt serve` measured from the outside."""
    import json

    from edgegpt.runtime.serve.bench import ServeBenchConfig, bench_server, markdown

    other = [
        f"--{k.replace('_', '-')}"
        for k in settings
        if k not in ("prompt_tokens", "new_tokens", "runs", "threads", "spinning", "seed")
    ]
    if other:
        raise click.UsageError(
            f"{', '.join(other)} cannot be used with --serve-clients (it takes --prompt-tokens, "
            "--new-tokens, --runs, --threads, --spinning and --seed)"
        )
    quick = {"requests": 1, "prompt_tokens": 32, "new_tokens": 32, "history_tokens": 100, "runs": 1} if short else {}
    result = bench_server(bundle, ServeBenchConfig(clients=clients, **{**quick, **settings}))
    click.echo(markdown(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
