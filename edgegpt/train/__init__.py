"""edgegpt.train: the PyTorch side. Define `SimpleGPT`, train it, keep checkpoints, sample from it.

Needs the training extra (`pip install "torch==2.13.0" "edgegpt[train]"`: torch, safetensors, tqdm).
Nothing on a device imports this package; `edgegpt.export` does, to trace the model.

Modules: model.py (the five classes of the GPT: `SelfAttentionHead`, `MultiHeadSelfAttention`,
`FeedForward`, `TransformerBlock`, `SimpleGPT`), config.py (`TrainConfig`), trainer.py (the training loop,
DDP through torch.distributed), corpus.py (`train_on_corpus`: files -> tokenizer -> token ids -> `train`),
data.py (corpus files, token-id cache, batches), checkpoint.py (save / load / resume), generate.py (the
PyTorch reference decoding loop that the runtime matches token for token), hf.py (Hugging Face GPT-2 in
and out), nanogpt.py (nanoGPT's ckpt.pt in). The public names load on first use (PEP 562):
`edgegpt.train.config` stays importable without torch, for the CLI's flags.

>>> from edgegpt.train import SimpleGPT, TrainConfig, train  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Checkpoint",
    "SimpleGPT",
    "TrainConfig",
    "TrainResult",
    "import_nanogpt",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "train_on_corpus",
]

_HOME = {
    "Checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "SimpleGPT": "model",
    "TrainConfig": "config",
    "TrainResult": "trainer",
    "train": "trainer",
    "train_on_corpus": "corpus",
    "import_nanogpt": "nanogpt",
}

if TYPE_CHECKING:
    from edgegpt.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from edgegpt.train.config import TrainConfig
    from edgegpt.train.corpus import train_on_corpus
    from edgegpt.train.model import SimpleGPT
    from edgegpt.train.nanogpt import import_nanogpt
    from edgegpt.train.trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'edgegpt.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edgegpt.train.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
