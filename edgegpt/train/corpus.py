"""`edgegpt train` end to end: corpus -> tokenizer -> cached token ids -> model -> training run.

Kept apart from train.py so that the loop stays about optimisation and this file about set-up:
which corpus, which tokenizer, which config when starting afresh or resuming.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from edgegpt.train.checkpoint import load_checkpoint, load_train_state, resolve
from edgegpt.config import GPTConfig
from edgegpt.train.data import check_enough, corpus_texts_for_tokenizer, find_corpus_files, load_token_ids, read_corpus, split_ids
from edgegpt.errors import ConfigError
from edgegpt.files import aside
from edgegpt.train.model import SimpleGPT
from edgegpt.tokenizer import eot_id, train_tokenizer
from edgegpt.train.trainer import TrainResult, train
from edgegpt.train.config import TrainConfig

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where token ids are cached: $XDG_CACHE_HOME/edgegpt/tokens (default ~/.cache/edgegpt/tokens)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgegpt" / "tokens"


def _train_config(config_file: Path | None, base: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """base (resumed run's settings or defaults) <- --config file <- flags."""
    from_file = {}
    if config_file is not None:
        try:
            from_file = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{config_file}: cannot read training config ({exc})") from exc
    return TrainConfig.from_dict({**base, **from_file, **overrides})


def train_on_corpus(
    corpus: Sequence[str | Path] = (),
    *,
    out: str | Path,
    preset: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    vocab_size: int = 4096,
    pattern: str | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a model on `corpus` (files and directories; empty = the Python standard library's sources).

    Starting afresh trains a BPE tokenizer on the corpus and builds the preset's model. Resuming takes
    model, tokenizer, settings and corpus from `out/checkpoint`; flags given again override settings.

    Raises:
        ConfigError: `out` already holds a checkpoint (without resume or force), or bad settings.
        DataError: an empty or binary corpus, or too few tokens for one block.

    >>> # train_on_corpus([], out="runs/tiny", train_overrides={"steps": 100})
    """
    out = Path(out)
    ckpt_dir = resolve(out / "checkpoint")
    overrides = dict(train_overrides or {})
    if resume:
        ckpt = load_checkpoint(out)
        _, state = load_train_state(out)
        tokenizer, config = ckpt.tokenizer, ckpt.config
        cfg = _train_config(config_file, state["train_config"], overrides)
        if not corpus:
            corpus, pattern = state["corpus"]["paths"], state["corpus"]["pattern"]
    else:
        if ckpt_dir.exists() and not force:
            raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or --force to start afresh")
        cfg = _train_config(config_file, {}, overrides)
        config = GPTConfig.preset(preset, vocab_size=vocab_size, **(model_overrides or {}))  # fail fast
    files = find_corpus_files(corpus, pattern)
    if not resume:
        documents = read_corpus(files)
        tokenizer = train_tokenizer(corpus_texts_for_tokenizer(documents), vocab_size=vocab_size)
        config = dataclasses.replace(config, vocab_size=tokenizer.get_vocab_size())
        if force:  # the checkpoint and any copy an interrupted save left aside, which `resolve` would restore
            for directory in (ckpt_dir, aside(ckpt_dir)):
                shutil.rmtree(directory, ignore_errors=True)
            for name in ("metrics.jsonl", "loss.png"):
                (out / name).unlink(missing_ok=True)
    ids = load_token_ids(files, tokenizer, cache_dir or default_cache_dir())
    check_enough(ids, config.block_size, name="corpus")
    train_ids, val_ids = split_ids(ids, eot=eot_id(tokenizer))
    check_enough(train_ids, config.block_size, name="training split")
    check_enough(val_ids, config.block_size, name="validation split")
    log.info("corpus: %d files, %d train + %d validation tokens", len(files), len(train_ids), len(val_ids))
    torch.manual_seed(cfg.seed)
    model = SimpleGPT(config)
    log.info("model: %s, %.2f M parameters", config, model.num_params() / 1e6)
    meta = {"corpus": {"paths": [str(p) for p in corpus], "pattern": pattern}}
    return train(model, train_ids, val_ids, cfg, out, tokenizer.to_str(), resume=resume, progress=progress, meta=meta)
