"""`KVEngine`: what the KV engines (`DecodeState`: lockstep rows, `SlotBatch`: independent slots) share.

Both hold rows of token ids over one KV cache (`cache.py`) on one `ModelSession`, and differ in how rows
advance. The shared part: the checks of their arguments and of token ids, the cache and the binding it is
allocated through (a `SlotBatch` asks for one spare column: its scratch column), binding the three inputs,
and the timed model call behind `steps` and `session_s`.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from edgegpt.errors import ContextLengthError, PromptError
from edgegpt.manifest import ATTENTION_MASK, INPUT_IDS, POSITION_IDS
from edgegpt.runtime.engine.binding import Binding
from edgegpt.runtime.engine.session import ModelSession

__all__ = ["KVEngine", "check_ids", "is_id"]


class KVEngine:
    """`rows` sequences of at most `capacity` positions in one KV cache on `model`; subclasses say how they advance.

    Attributes (read them, do not assign):
        model: the `ModelSession` it runs on.
        capacity: positions a row holds at most (at most the model's block_size).
        vocab_size, eot_id: the model's.
        tokens: each row's token ids as fed (without padding).
        steps, session_s: model calls so far and the time spent inside onnxruntime.
    """

    def __init__(self, model: ModelSession, rows: int, capacity: int | None, rows_name: str, spare_columns: int = 0):
        block = model.bundle.config.block_size
        capacity = block if capacity is None else capacity
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise PromptError(f"{rows_name} must be a positive integer, got {rows!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= block:
            raise ContextLengthError(f"capacity must be in 1..{block} (the model's context), got {capacity!r}")
        self.model, self.capacity = model, capacity
        self.vocab_size, self.eot_id = model.bundle.config.vocab_size, model.bundle.eot_id
        self._binding = model.binding()
        self._cache = model.kv_cache()
        self._cache.reset(self._binding, rows, capacity + spare_columns)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.steps, self.session_s = 0, 0.0

    @staticmethod
    def _bind_inputs(binding: Binding, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        """Bind the token ids, attention mask and position ids (a CPU session reads them when it runs)."""
        binding.bind_numpy(INPUT_IDS, ids)
        binding.bind_numpy(ATTENTION_MASK, mask)
        binding.bind_numpy(POSITION_IDS, positions)

    def _run(self, binding: Binding) -> None:
        """One model call on what `binding` holds, counted in `steps` and timed in `session_s`."""
        start = time.perf_counter()
        binding.run()
        self.session_s += time.perf_counter() - start
        self.steps += 1


def is_id(value) -> bool:
    """Whether `value` is one integer token id (a Python or numpy int, not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """`ids` as a list of ints, each in 0..vocab_size-1; PromptError naming the first bad one."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise PromptError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
    out = []
    for pos, i in enumerate(ids):
        if not is_id(i):
            raise PromptError(f"token id at position {pos} must be an integer, got {i!r}")
        if not 0 <= i < vocab_size:
            raise PromptError(f"token id {int(i)} at position {pos} is outside the vocabulary (0..{vocab_size - 1})")
        out.append(int(i))
    return out
