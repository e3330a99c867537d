"""The `edgegpt` command line: a click group whose commands parse flags and call the public API.

torch is imported lazily inside the commands that need it, so `edgegpt generate` runs on a device
with only the base install (onnxruntime, numpy, tokenizers, click).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from edgegpt import __version__
from edgegpt.cli_support import Group, field_options, given
from edgegpt.config import GPTConfig

log = logging.getLogger("edgegpt")


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


def _train_options(func):
    """One flag per TrainConfig field (--grad-accum -> grad_accum); edgegpt.train.config is torch-free."""
    from edgegpt.train.config import TrainConfig

    return field_options(of=TrainConfig)(func)


# GPTConfig fields that override the preset's (the rest of the model config comes from the preset).
_MODEL_FLAGS = {
    "n_layer": {"help": "Override the preset's n_layer."},
    "n_head": {"help": "Override the preset's n_head."},
    "n_embd": {"help": "Override the preset's n_embd."},
    "block_size": {"help": "Override the preset's block_size."},
    "dropout": {"help": "Override dropout. [default: {default}]"},
}


@main.command()
@click.argument("corpus", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (checkpoint/, metrics.jsonl, loss.png).",
)
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "gpt2"]),
    default=None,
    help="Model shape [default: tiny; with --resume, the checkpoint's: a preset that contradicts it is refused].",
)
@click.option(
    "--vocab-size", type=int, default=None, help="BPE vocabulary size [default: 4096; with --resume, the checkpoint's]."
)
@field_options(_MODEL_FLAGS, of=GPTConfig)
@click.option(
    "--glob", "pattern", help="Files to take from CORPUS directories [default: **/*; **/*.py for the default corpus]."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON with training-config fields; flags override it.",
)
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Token-id cache (default ~/.cache/edgegpt).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue exactly from OUT/checkpoint, with its model (model flags must agree with it).",
)
@click.option("--force", is_flag=True, help="Start afresh even if OUT already holds a checkpoint.")
@_train_options
@click.pass_context
def train(ctx, corpus, out, preset, vocab_size, config_file, cache_dir, resume, force, pattern, **flags):
    """Train a SimpleGPT on text files (default corpus: the Python standard library's sources).

    \b
    Examples:
      edgegpt train --preset tiny --steps 500 --out runs/tiny
      edgegpt train ~/texts --glob '**/*.txt' --preset small --steps 5000 --out runs/small
      edgegpt train --out runs/small --resume --steps 8000
      torchrun --nproc_per_node 2 -m edgegpt.cli train --preset tiny --steps 200 --out runs/ddp
    """
    from edgegpt.train.corpus import train_on_corpus

    model_overrides = given({k: flags.pop(k) for k in _MODEL_FLAGS})
    result = train_on_corpus(
        corpus,
        out=out,
        preset=preset,
        model_overrides=model_overrides,
        train_overrides=given(flags),
        config_file=config_file,
        vocab_size=vocab_size,
        pattern=pattern,
        cache_dir=cache_dir,
        resume=resume,
        force=force,
        progress=not ctx.obj["quiet"],
    )
    import signal

    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
    signum = result.signal or signal.SIGINT  # another rank's signal stopped this one
    how = (
        f"interrupted at step {result.step} by {signal.Signals(signum).name}, checkpoint saved"
        if result.interrupted
        else f"done at step {result.step}"
    )
    click.echo(
        f"{rank}{how}: train loss {result.train_loss:.4f}, val loss {val}, {result.tokens_per_s:,.0f} tokens/s, "
        f"weights {result.weights_sha256[:16]} -> {out / 'checkpoint'}",
        err=True,
    )
    if result.interrupted:
        ctx.exit(128 + signum)  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports a death by the signal


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("prompt", default="")
@click.option(
    "-n",
    "--max-new-tokens",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Tokens to generate at most (fewer when the context has no more room).",
)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 keeps all tokens.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
def sample(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed):
    """Generate text from a checkpoint with PyTorch (the reference for the ONNX runtime).

    Greedy by default, and prints the continuation only, as `edgegpt generate` does: for a checkpoint and
    its fp32 bundle the two commands print the same text.

    \b
    Examples:
      edgegpt sample runs/tiny "def main(" -n 48
      edgegpt sample runs/tiny "import " -t 0.8 --top-p 0.95 --seed 0
    """
    import torch

    from edgegpt.train.checkpoint import load_checkpoint
    from edgegpt.train.generate import generate
    from edgegpt.tokenizer import decode, encode, eot_id

    ckpt = load_checkpoint(checkpoint)
    ids = encode(ckpt.tokenizer, prompt) or [eot_id(ckpt.tokenizer)]
    room = ckpt.config.block_size - len(ids)
    out = generate(
        ckpt.model,
        torch.tensor([ids]),
        min(max_new_tokens, max(room, 0)),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eot_id(ckpt.tokenizer),
        sampled_vocab_size=ckpt.config.sampled_ids(ckpt.tokenizer.get_vocab_size()),  # never a padded id
    )
    new = out[0, len(ids) :].tolist()
    eot = eot_id(ckpt.tokenizer)
    click.echo(decode(ckpt.tokenizer, new[: new.index(eot)] if eot in new else new))  # as generate: not the end-of-text


@main.command("import-hf")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint directory.")
def import_hf_cmd(src, out, force):
    """Import a local Hugging Face GPT-2 directory as an edgegpt checkpoint.

    \b
    Examples:
      edgegpt import-hf ~/models/gpt2 -o runs/gpt2/checkpoint
    """
    from edgegpt.train.hf import import_hf

    click.echo(import_hf(src, out, force=force))


@main.command("import-nanogpt")
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option(
    "--tokenizer",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="tokenizer.json, vocab.json + merges.txt (repeat the flag), nanoGPT's meta.pkl, or a directory "
    "holding one [default: data/<dataset>/meta.pkl beside the checkpoint, as nanoGPT finds it].",
)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint directory.")
def import_nanogpt_cmd(ckpt, out, tokenizer, force):
    """Import a nanoGPT checkpoint (ckpt.pt) as an edgegpt checkpoint; then export, quantize, generate.

    The file is read with torch.load(weights_only=True) only: one that needs more is refused. The model keeps
    nanoGPT's exact GELU, its bias setting and its padded vocabulary (padded ids are never sampled).

    \b
    Examples:
      edgegpt import-nanogpt out-shakespeare-char/ckpt.pt -o runs/shakespeare
      edgegpt import-nanogpt out/ckpt.pt -o runs/owt --tokenizer gpt2/tokenizer.json
      edgegpt import-nanogpt out/ckpt.pt -o runs/owt --tokenizer vocab.json --tokenizer merges.txt
    """
    from edgegpt.train.nanogpt import import_nanogpt

    click.echo(import_nanogpt(ckpt, out, tokenizer=list(tokenizer) or None, force=force))


@main.command("export-hf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory for config.json, model.safetensors, tokenizer.json.",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def export_hf_cmd(checkpoint, out, force):
    """Write a checkpoint in the Hugging Face GPT-2 format (transformers loads it as GPT2LMHeadModel).

    \b
    Examples:
      edgegpt export-hf runs/tiny -o hf/tiny
    """
    from edgegpt.train.hf import export_hf

    click.echo(export_hf(checkpoint, out, force=force))


@main.command()
def info():
    """Package versions, onnxruntime execution providers and whether CUDA is usable.

    \b
    Examples:
      edgegpt info
    """
    import importlib.metadata as md
    import platform

    click.echo(f"edgegpt {__version__} on Python {platform.python_version()} ({platform.machine()})")
    for dist in (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-genai",
        "numpy",
        "tokenizers",
        "click",
        "torch",
        "onnx",
    ):
        try:
            click.echo(f"  {dist:<18} {md.version(dist)}")
        except md.PackageNotFoundError:
            click.echo(f"  {dist:<18} -")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    click.echo(f"onnxruntime providers: {', '.join(providers)}")
    cuda = "CUDAExecutionProvider" in providers
    click.echo(
        f"CUDA for onnxruntime: {'available' if cuda else 'not available (install edgegpt[gpu] on a CUDA machine)'}"
    )
    if "torch" in sys.modules or _installed("torch"):
        import torch

        click.echo(
            f"CUDA for torch: {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
        )


# Commands owned by the export and runtime packages; their modules import nothing heavy at load time.
from edgegpt.bench.cli import bench_command  # noqa: E402
from edgegpt.export.cli import convert_ort, export  # noqa: E402
from edgegpt.export.quantize_cli import quantize as quantize_command  # noqa: E402
from edgegpt.runtime.cli import chat_command, eval_command, generate_command  # noqa: E402
from edgegpt.runtime.serve.cli import serve_command  # noqa: E402
from edgegpt.runtime.web_cli import web_command  # noqa: E402

for command in (
    export,
    convert_ort,
    quantize_command,
    eval_command,
    generate_command,
    chat_command,
    serve_command,
    web_command,
    bench_command,
):
    main.add_command(command)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
