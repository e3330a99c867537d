"""`SlotBatch`: independent sequences ("slots") in one KV buffer, for continuous batching.

`DecodeState` runs rows in lockstep: they share one column count and join together. A server needs rows
that come and go: a request takes a free slot, is prefilled alone, then decodes beside whatever the other
slots are doing, and leaves; the next request may find its prefix still cached in a slot. This class is
that engine, on the "shared_buffer" graph (GroupQueryAttention), built on three of its properties:

- GroupQueryAttention takes each row's length from its own attention-mask row (the index of its last 1),
  writes that row's new key/value there, and positions come from `position_ids`: rows of one batched
  call may sit at different lengths.
- Per layer one C-contiguous (slots, heads, width, head_size) buffer holds every slot; rows [a, b) of it
  are themselves one contiguous block, bound without a copy (`Binding.bind_rows`).
- The CPU kernel takes a multi-token chunk after a non-empty past only at batch 1, so a prompt (or a
  chunk of one) runs on its slot's row alone, and decode steps batch the slots.

`step` decodes one token for each given slot in one call over rows [0, k), k = the highest such slot + 1:
slots below it that are not stepping (free, or waiting to prefill) ride along with a dummy token whose
mask row holds a single 1 in the scratch column `capacity` (the buffer is one column wider than the
context), so their cached positions are neither read nor written. Keep busy slots low (the server takes
the lowest free slot) to keep k small.

The buffers are a `SharedBufferKVCache` one column wider than `capacity`, made, like the checks and the timed
call, by `base.KVEngine`, which `DecodeState` shares.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgegpt.errors import BundleError, ContextLengthError, PromptError
from edgegpt.manifest import LOGITS
from edgegpt.runtime.engine.base import KVEngine, check_ids
from edgegpt.runtime.engine.session import ModelSession

__all__ = ["SlotBatch"]


class SlotBatch(KVEngine):
    """`slots` sequences of at most `capacity` positions each, in one KV buffer; see the module docstring.

    Made by `Generator.new_slots`. Attributes (read them): slots, capacity, lengths (positions each slot
    holds), tokens (each slot's token ids as fed), steps and session_s (model calls, time inside them),
    model (the `ModelSession` it runs on).
    """

    def __init__(self, model: ModelSession, slots: int, capacity: int | None = None):
        bundle = model.bundle
        if bundle.kv.layout != "shared_buffer":
            raise BundleError(
                f"{bundle.path}: continuous batching needs the GroupQueryAttention graph (KV layout 'shared_buffer'), "
                f"this bundle has {bundle.kv.layout!r}; re-export it with the default attention"
            )
        # The cache is one column wider than the context: the last is scratch, where a riding-along row writes.
        super().__init__(model, slots, capacity, "slots", spare_columns=1)
        self.slots = slots
        self._prefill_binding = model.binding()  # `_binding` keeps the decode step's rows bound between steps
        self._mask = np.zeros((slots, self.capacity + 1), dtype=np.int64)  # at rest: ones over each slot's length
        self._ids = np.zeros((slots, 1), dtype=np.int64)
        self._positions = np.zeros((slots, 1), dtype=np.int64)
        self._logits = np.empty((slots, 1, self.vocab_size), dtype=model.logits_dtype)
        self._logits_value = None
        self._bound_rows = 0  # rows [0, k) bound for the decode step last time (0: nothing bound yet)

    def prefill(self, slot: int, tokens: Sequence[int]) -> np.ndarray:
        """Feed `tokens` to `slot` after what it holds, in one batch-1 call; -> the last position's logits (V,).

        Raises:
            PromptError: a bad slot or token id, or no tokens.
            ContextLengthError: the tokens do not fit in the slot's remaining capacity.
        """
        self._check_slot(slot)
        tokens = check_ids(tokens, self.vocab_size)
        start, count = len(self.tokens[slot]), len(tokens)
        if not count:
            raise PromptError("prefill needs at least one token")
        self._check_room(slot, count)
        binding = self._prefill_binding
        ids = np.asarray([tokens], dtype=np.int64)
        mask = np.ones((1, start + count), dtype=np.int64)  # (1, past + T)
        self._bind_inputs(binding, ids, mask, np.arange(start, start + count, dtype=np.int64)[None, :])
        binding.clear_outputs()
        binding.bind_outputs([LOGITS], [])  # first: outputs() lists in binding order
        self._cache.bind_rows(binding, slot, 1)
        self._run(binding)
        self._mask[slot, start : start + count] = 1
        self.tokens[slot].extend(tokens)
        return binding.outputs()[0].numpy()[0, -1]  # (1, T, V) -> (V,)

    def step(self, tokens: dict[int, int]) -> np.ndarray:
        """One token for each slot in `tokens` ({slot: token id}), in one call; -> logits (k, V), row = slot.

        The returned array is overwritten by the next step: copy a row to keep it.
        """
        if not tokens:
            raise PromptError("step needs at least one slot")
        for slot, token in tokens.items():
            self._check_slot(slot)
            self._check_room(slot, 1)
            if not self.tokens[slot]:
                raise PromptError(f"slot {slot} is empty: prefill it first")
            check_ids([token], self.vocab_size)
        rows = max(tokens) + 1
        riders = [b for b in range(rows) if b not in tokens]
        for b, token in tokens.items():
            self._ids[b, 0], self._positions[b, 0] = token, len(self.tokens[b])
            self._mask[b, len(self.tokens[b])] = 1
        for b in riders:  # a dummy in the scratch column: the row's cache is neither read nor written
            self._mask[b] = 0
            self._mask[b, -1] = 1
            self._ids[b, 0], self._positions[b, 0] = self.eot_id, 0
        binding = self._binding
        if rows != self._bound_rows or not binding.reads_bound_arrays:
            self._bind_decode(rows)
        try:
            self._run(binding)
        finally:
            for b in riders:  # back at rest
                self._mask[b] = 0
                self._mask[b, : len(self.tokens[b])] = 1
        for b, token in tokens.items():
            self.tokens[b].append(token)
        return self._logits[:rows, 0]

    def rewind(self, slot: int, length: int) -> None:
        """Forget `slot`'s positions from `length` on (0 empties it); the cache keeps [0, length)."""
        self._check_slot(slot)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= len(self.tokens[slot]):
            raise PromptError(
                f"rewind takes a length in 0..{len(self.tokens[slot])} (slot {slot}'s positions), got {length!r}"
            )
        self._mask[slot, length:] = 0
        del self.tokens[slot][length:]

    def _bind_decode(self, rows: int) -> None:
        """Bind rows [0, rows) of every buffer and array; a CPU session keeps them bound while `rows` holds."""
        binding = self._binding
        self._bind_inputs(binding, self._ids[:rows], self._mask[:rows], self._positions[:rows])  # mask: a static width
        binding.clear_outputs()
        self._logits_value = binding.wrap(self._logits[:rows])  # kept: the binding holds only a reference
        binding.bind_output_value(LOGITS, self._logits_value)
        self._cache.bind_rows(binding, 0, rows)
        self._bound_rows = rows

    @property
    def lengths(self) -> list[int]:
        """Positions each slot holds (its tokens as fed)."""
        return [len(row) for row in self.tokens]

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise PromptError(f"slot must be in 0..{self.slots - 1}, got {slot!r}")

    def _check_room(self, slot: int, count: int) -> None:
        if len(self.tokens[slot]) + count > self.capacity:
            raise ContextLengthError(
                f"{count} new tokens after {len(self.tokens[slot])} exceed slot {slot}'s capacity of {self.capacity} positions"
            )
