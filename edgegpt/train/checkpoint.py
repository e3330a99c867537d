"""Checkpoints: a directory of safetensors weights, config JSON, tokenizer.json and training state.

Layout of a checkpoint directory:
    model.safetensors   weights (the tied lm_head is stored once, as tok_emb.weight)
    config.json         GPTConfig.to_dict()
    tokenizer.json      the HF `tokenizers` file
    train_state.pt      optimizer state and torch RNG state (loaded with weights_only=True only)
    train_state.json    step, data RNG state, training config

Saving is atomic (`edgegpt.files.staged_dir`): everything is written to a temporary sibling directory, the
old checkpoint is moved aside, the new one renamed into place, and the old one deleted. A kill at any point
leaves either the new or the previous checkpoint readable; `resolve` puts a moved-aside previous
checkpoint back (`edgegpt.files.recover`).
Pickle is never loaded except through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgegpt.config import GPTConfig
from edgegpt.errors import CheckpointError, ConfigError, DataError
from edgegpt.files import recover, staged_dir
from edgegpt.tokenizer import CHAT_TEMPLATE_FILE, load_tokenizer
from edgegpt.train.model import SimpleGPT

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
TRAIN_STATE_PT, TRAIN_STATE_JSON = "train_state.pt", "train_state.json"
CHAT_TEMPLATE = CHAT_TEMPLATE_FILE  # optional: the model's own chat template (Hugging Face's file name)
TIED = "lm_head.weight"  # same tensor as tok_emb.weight; not stored twice


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, given it or a training run directory that holds `checkpoint/`."""
    path, inner = recover(path), recover(Path(path) / "checkpoint")  # a save interrupted between its renames
    if (inner / CONFIG).exists() or not (path / CONFIG).exists() and inner.exists():
        path = inner
    return path


def save_checkpoint(
    path: str | Path,
    model: SimpleGPT,
    tokenizer_json: str,
    *,
    optimizer_state: dict | None = None,
    train_state: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    Args:
        path: the checkpoint directory (created or replaced).
        model: the uncompiled, unwrapped model (no `_orig_mod.` / `module.` prefixes).
        tokenizer_json: the tokenizer as `tokenizers.Tokenizer.to_str()`.
        optimizer_state: optional {"optimizer": ..., "torch_rng": ...} tensors-and-numbers dict.
        train_state: optional JSON-serialisable training state (step, data RNG, config).
        chat_template: optional Jinja chat template of the model (written as chat_template.jinja).

    >>> import tempfile, tokenizers
    >>> m = SimpleGPT(GPTConfig.preset("tiny", vocab_size=64))
    >>> tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({str(i): i for i in range(64)}, unk_token="0"))
    >>> save_checkpoint(tempfile.mkdtemp() + "/ckpt", m, tok.to_str()).name
    'ckpt'
    """
    path = Path(path)
    with staged_dir(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt", "edgegpt": "1"})
        model.config.to_json(tmp / CONFIG)
        (tmp / TOKENIZER).write_text(tokenizer_json)
        if optimizer_state is not None:
            with open(tmp / TRAIN_STATE_PT, "wb") as f:  # a file object: a full disk's OSError stays in the chain
                torch.save(optimizer_state, f)
        if train_state is not None:
            (tmp / TRAIN_STATE_JSON).write_text(json.dumps(train_state, indent=2))
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE).write_text(chat_template, encoding="utf-8")
    return path


def _read_config(path: Path) -> GPTConfig:
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: no {CONFIG}; is this a checkpoint written by `edgegpt train`?")
    try:
        return GPTConfig.from_json(path / CONFIG)
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG}: {exc}") from exc


def _read_weights(path: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The stored tensors, checked name by name and shape by shape against the config's model."""
    file = path / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete, train or import it again")
    try:
        state = load_file(file)
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError on corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc}); the checkpoint is corrupt") from exc
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SimpleGPT(config).state_dict().items() if k != TIED}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: tensors do not match {CONFIG}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"{file}: {name} has shape {tuple(state[name].shape)} but {CONFIG} implies {tuple(shape)}; "
                "the config does not belong to these weights"
            )
    return state


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, CPU), its tokenizer and the directory it came from."""

    model: SimpleGPT
    tokenizer: Any
    path: Path

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja), kept by `import_hf`; None when it has none."""
        file = self.path / CHAT_TEMPLATE
        return file.read_text(encoding="utf-8") if file.is_file() else None

    @property
    def config(self) -> GPTConfig:
        return self.model.config


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint (or a run directory holding one) before any other work.

    Raises:
        CheckpointError: missing or corrupt files, weights that do not fit the config, a tokenizer with more
            tokens than the model's vocab_size (fewer is a padded vocabulary: the rest are never sampled).
    """
    path = resolve(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    config = _read_config(path)
    state = _read_weights(path, config)
    try:
        tokenizer = load_tokenizer(path / TOKENIZER)
    except DataError as exc:  # its message names the file
        raise CheckpointError(str(exc)) from exc
    if tokenizer.get_vocab_size() > config.vocab_size:  # fewer is a padded vocabulary (nanoGPT's 50304)
        raise CheckpointError(
            f"{path / TOKENIZER}: the tokenizer has {tokenizer.get_vocab_size()} tokens but {CONFIG} vocab_size is "
            f"only {config.vocab_size}; use the tokenizer the model was trained with"
        )
    model = SimpleGPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {TIED} or unexpected:  # internal invariant: _read_weights checked the names
        raise CheckpointError(f"{path}: inconsistent weights (missing {missing}, unexpected {unexpected})")
    return Checkpoint(model.to(map_location).eval(), tokenizer, path)


def load_train_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer/RNG tensors, JSON train state) of a checkpoint, for `--resume`."""
    path = resolve(path)
    pt, js = path / TRAIN_STATE_PT, path / TRAIN_STATE_JSON
    if not pt.is_file() or not js.is_file():
        raise CheckpointError(f"{path}: no training state to resume from ({TRAIN_STATE_PT}, {TRAIN_STATE_JSON})")
    try:
        tensors = load_tensors_only(pt)
        return tensors, json.loads(js.read_text())
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{js}: unreadable training state ({exc})") from exc


def load_tensors_only(file: Path) -> Any:
    """`torch.load(file, weights_only=True)`: tensors, numbers and containers, never arbitrary objects.

    Raises:
        CheckpointError: a corrupt file; or a file that needs more than that to load. Such a file asks to run
            code while loading (what pickle allows), which a file of weights never needs: it may be hostile.
    """
    import pickle
    import re

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError: refused by the weights-only unpickler; RuntimeError: corrupt zip
        if not isinstance(exc, pickle.UnpicklingError) and "weights_only" not in str(exc):
            raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {exc}); the file is corrupt") from exc
        # torch's message suggests loading it unrestricted: exactly what a hostile file wants. Only the name of
        # what the file asked for is kept, and the chain is cut so that --debug does not show the suggestion.
        found = re.search(r"unsupported global:?(?: GLOBAL)? ([\w.]+)", str(exc), re.IGNORECASE)
        reason = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(exc))
        asks = (
            f"it asks to import {found[1]} while loading"
            if found
            else f"it holds more than tensors ({reason[1].strip()})"
            if reason
            else "it holds more than tensors"
        )
    raise CheckpointError(
        f"{file}: refused: {asks}. Loading it would run code of the file's choosing, which a file of weights never "
        "needs: it may be hostile. Do not load it; use a file you can trust (train again, or download it again "
        "from its original source)"
    )
