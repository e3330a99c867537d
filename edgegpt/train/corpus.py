"""`edgegpt train` end to end: corpus -> tokenizer -> cached token ids -> model -> training run.

Kept apart from train.py so that the loop stays about optimisation and this file about set-up:
which corpus, which tokenizer, which config when starting afresh or resuming.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from edgegpt.train.checkpoint import load_checkpoint, load_train_state, resolve
from edgegpt.config import PRESETS, GPTConfig
from edgegpt.train.data import (
    check_enough,
    corpus_texts_for_tokenizer,
    find_corpus_files,
    load_token_ids,
    read_corpus,
    split_ids,
)
from edgegpt.errors import ConfigError
from edgegpt.files import LOCK_NAME, aside, run_lock
from edgegpt.train.model import SimpleGPT
from edgegpt.tokenizer import eot_id, train_tokenizer
from edgegpt.train.trainer import TrainResult, check_steps_left, train
from edgegpt.train.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_PRESET, DEFAULT_VOCAB_SIZE = "tiny", 4096  # for a new run; a resumed one keeps its checkpoint's


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
        if not isinstance(from_file, dict):
            raise ConfigError(
                f'{config_file}: a training config is a JSON object of TrainConfig fields (e.g. {{"steps": 500}}), '
                f"got a JSON {type(from_file).__name__}"
            )
    return TrainConfig.from_dict({**base, **from_file, **overrides})


def train_on_corpus(
    corpus: Sequence[str | Path] = (),
    *,
    out: str | Path,
    preset: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    vocab_size: int | None = None,
    pattern: str | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train a model on `corpus` (files and directories; empty = the Python standard library's sources).

    Starting afresh trains a BPE tokenizer on the corpus (`vocab_size`, default 4096) and builds the preset's
    model (default "tiny"). Resuming takes model, tokenizer, settings and corpus from `out/checkpoint`; flags
    given again override training settings, and model settings (`preset`, `model_overrides`, `vocab_size`)
    must agree with the checkpoint. The run directory is locked while this runs (`edgegpt.files.run_lock`).

    Raises:
        ConfigError: `out` already holds a checkpoint (without resume or force), bad settings, model settings
            that contradict the resumed checkpoint, or a resumed run already at or past `steps`.
        DataError: an empty or binary corpus, or too few tokens for one block.
        LockError: another process is training into `out`.

    >>> # train_on_corpus([], out="runs/tiny", train_overrides={"steps": 100})
    """
    out = Path(out)
    writer = os.environ.get("RANK", "0") == "0"  # DDP: rank 0 writes
    with contextlib.ExitStack() as locks:
        if writer and (out / LOCK_NAME).is_file():  # a run (maybe in progress) is checked before anything else
            locks.enter_context(run_lock(out))
        return _train_on_corpus(
            corpus,
            out,
            preset,
            model_overrides or {},
            dict(train_overrides or {}),
            config_file,
            vocab_size,
            pattern,
            cache_dir,
            resume,
            force,
            progress,
            lock=lambda: locks.enter_context(run_lock(out)) if writer else None,
        )


def _train_on_corpus(
    corpus,
    out: Path,
    preset,
    model_overrides,
    overrides,
    config_file,
    vocab_size,
    pattern,
    cache_dir,
    resume: bool,
    force: bool,
    progress: bool,
    *,
    lock,
) -> TrainResult:
    """The body of `train_on_corpus`; `lock()` takes the run directory's lock (re-entrant) before any write."""
    ckpt_dir = resolve(out / "checkpoint")
    if resume:
        ckpt = load_checkpoint(out)
        _, state = load_train_state(out)
        tokenizer, config = ckpt.tokenizer, ckpt.config
        _check_resumed_model(out, config, state, preset, model_overrides, vocab_size)
        cfg = _train_config(config_file, state["train_config"], overrides)
        check_steps_left(state["step"], cfg, out)
        tokenizer_meta = state.get("tokenizer")
        if not corpus:
            corpus, pattern = state["corpus"]["paths"], state["corpus"]["pattern"]
    else:
        if ckpt_dir.exists() and not force:
            raise ConfigError(
                f"{out} already holds a checkpoint; pass --resume to continue it or --force to start afresh"
            )
        cfg = _train_config(config_file, {}, overrides)
        vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        config = GPTConfig.preset(preset or DEFAULT_PRESET, vocab_size=vocab_size, **model_overrides)  # fail fast
        tokenizer_meta = {"vocab_size": vocab_size}  # what was asked for; the tokenizer may have come out smaller
    files = find_corpus_files(corpus, pattern)
    lock()  # before the first write: a second run into `out` is refused here, naming this process
    if not resume:
        documents = read_corpus(files)
        tokenizer = train_tokenizer(corpus_texts_for_tokenizer(documents), vocab_size=vocab_size)
        config = dataclasses.replace(config, vocab_size=tokenizer.get_vocab_size())
        if force:  # any copy an interrupted save left aside (which `resolve` would restore) first, then the checkpoint
            for directory in (aside(ckpt_dir), ckpt_dir):
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
    if tokenizer_meta is not None:
        meta["tokenizer"] = tokenizer_meta
    return train(model, train_ids, val_ids, cfg, out, tokenizer.to_str(), resume=resume, progress=progress, meta=meta)


def _check_resumed_model(
    out: Path,
    config: GPTConfig,
    state: dict[str, Any],
    preset: str | None,
    overrides: dict[str, Any],
    vocab_size: int | None,
) -> None:
    """Refuse model settings given with --resume that differ from the checkpoint's: they cannot apply to it."""
    have = config.to_dict()
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    conflicts = [f"{flag(k)} {v} (the checkpoint has {have[k]})" for k, v in overrides.items() if v != have.get(k, v)]
    unknown = sorted(k for k in overrides if k not in have)
    if unknown:
        raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        shape = {k: v for k, v in PRESETS[preset].items() if k not in overrides and v != have[k]}
        if shape:
            conflicts.append(
                f"--preset {preset} ({', '.join(f'{k} {v}' for k, v in shape.items())}; the checkpoint has "
                f"{', '.join(f'{k} {have[k]}' for k in shape)})"
            )
    asked = (state.get("tokenizer") or {}).get("vocab_size")  # what the run was started with, when recorded
    if vocab_size is not None and vocab_size not in (config.vocab_size, asked):
        conflicts.append(f"--vocab-size {vocab_size} (the checkpoint has {config.vocab_size})")
    if conflicts:
        raise ConfigError(
            f"{out}: --resume continues the checkpoint's model, and these flags contradict it: {'; '.join(conflicts)}. "
            "Drop them to resume, or start a new run (another --out, or --force without --resume)"
        )
