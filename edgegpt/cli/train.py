"""The training side's commands: `train`, `sample`, `import-hf`, `import-nanogpt`, `export-hf` (the train extra).

torch loads inside the commands; the flags come from the torch-free configs (`GPTConfig`, `TrainConfig`).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from edgegpt.cli.support import Command, field_options, given
from edgegpt.config import PRESETS, GPTConfig

__all__ = ["export_hf_command", "import_hf_command", "import_nanogpt_command", "sample_command", "train_command"]


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


@click.command("train", cls=Command)
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
    type=click.Choice(list(PRESETS)),
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
def train_command(ctx, corpus, out, preset, vocab_size, config_file, cache_dir, resume, force, pattern, **flags):
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


@click.command("sample", cls=Command)
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
def sample_command(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed):
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


@click.command("import-hf", cls=Command)
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint directory.")
def import_hf_command(src, out, force):
    """Import a local Hugging Face model directory (GPT-2 or the Llama family) as an edgegpt checkpoint.

    The classes read (config.json's architectures, else its model_type): GPT2LMHeadModel, LlamaForCausalLM
    (Llama 2/3, SmolLM2), Qwen2ForCausalLM and Qwen3ForCausalLM; its weights, tokenizer and chat template.

    \b
    Examples:
      edgegpt import-hf ~/models/gpt2 -o runs/gpt2/checkpoint
      edgegpt import-hf ~/models/SmolLM2-135M -o runs/smollm2/checkpoint
    """
    from edgegpt.train.hf import import_hf

    click.echo(import_hf(src, out, force=force))


@click.command("import-nanogpt", cls=Command)
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
def import_nanogpt_command(ckpt, out, tokenizer, force):
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


@click.command("export-hf", cls=Command)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory for config.json, model.safetensors, tokenizer.json.",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def export_hf_command(checkpoint, out, force):
    """Write a checkpoint as a Hugging Face model directory that transformers loads.

    A GPT-2 checkpoint becomes a GPT2LMHeadModel; a Llama-family one a LlamaForCausalLM, or a Qwen2ForCausalLM
    (biases on q, k and v only) or Qwen3ForCausalLM (q/k norm), whichever class computes it.

    \b
    Examples:
      edgegpt export-hf runs/tiny -o hf/tiny
      edgegpt export-hf runs/small-llama -o hf/small-llama
    """
    from edgegpt.train.hf import export_hf

    click.echo(export_hf(checkpoint, out, force=force))
