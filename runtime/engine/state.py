"""`DecodeState`: the step-level decoding engine. Feed token ids, get logits; rewind; fork.

Everything that generates text is a loop over this one layer: `Generator.generate/stream/generate_batch`,
the `chat` command (which keeps its state between turns), the bench, and whatever samples differently
(constraints, speculative decoding, a server's slots). Like onnxruntime-genai's `Generator`
(`append_tokens`, `get_logits`, `rewind_to`), it knows nothing of text or sampling.

A state holds B rows (batch), each a sequence of positions in one KV cache (`cache.py`) of at most
`capacity` positions, plus the attention mask (B, capacity) and each row's next position id. The rows
share one column count, `length`: a first feed of rows of unequal lengths left-pads the shorter ones
(mask 0, so each row computes what it would compute alone; position ids = cumsum(mask) - 1).

- `feed(tokens)` runs the model on any number of new tokens per row (the prompt, one sampled token, a
  draft) and returns the logits of each row's last position, (B, vocab) float32 (or float16 for a float16
  graph). After the first feed every row takes the same number of tokens. One token per row is the decode
  step, which allocates nothing and, on a CPU session with the "shared_buffer" layout, rebinds nothing.
  Several tokens after a prefix run as one model call, except for B > 1 on the "shared_buffer" layout
  (onnxruntime's CPU GroupQueryAttention kernel takes a multi-token chunk after a past only at batch 1),
  where they run one column per call, with the same result.
- `rewind(length)` forgets every position from `length` on; the cache keeps the rest, so feeding the same
  tokens again gives the same logits, and a prompt that shares a prefix with the state feeds only the rest.
- `fork()` copies the state: the copy and the original go on independently.

A state is not thread-safe; use one per thread. The session it runs on is (onnxruntime's `Run` is).
What it shares with `SlotBatch` (checks, cache allocation, the timed call) lives in `base.KVEngine`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgegpt.errors import ContextLengthError, PromptError
from edgegpt.manifest import LOGITS
from edgegpt.runtime.engine.base import KVEngine, check_ids, is_id
from edgegpt.runtime.engine.session import ModelSession

__all__ = ["DecodeState", "PromptError"]


class DecodeState(KVEngine):
    """The KV cache, attention mask and positions of `batch` rows on one session; see the module docstring.

    Made by `Generator.new_state`. Attributes (read them, do not assign):
        batch: rows.
        capacity: positions the cache holds at most (at most the model's block_size).
        length: positions fed so far (the same for every row; left padding counts).
        tokens: each row's token ids as fed (without padding).
        steps, session_s: model calls so far and the time spent inside onnxruntime.
        model: the `ModelSession` it runs on.

    >>> state = gen.new_state()  # doctest: +SKIP
    >>> logits = state.feed(gen.encode("def parse("))  # (1, vocab)  # doctest: +SKIP
    >>> logits = state.feed([int(logits[0].argmax())])  # one greedy step  # doctest: +SKIP
    """

    def __init__(self, model: ModelSession, batch: int = 1, capacity: int | None = None):
        super().__init__(model, batch, capacity, "batch")
        self.batch = batch
        # The mask lives in one (B, capacity) buffer: a decode step sets one column instead of allocating.
        self._mask = np.zeros((batch, self.capacity), dtype=np.int64)
        self._start = [0] * batch  # each row's first real column (left padding before it)
        self._next_ids = np.empty((batch, 1), dtype=np.int64)
        self._next_positions = np.zeros((batch, 1), dtype=np.int64)  # bound as is on decode steps: update in place
        self._logits: np.ndarray | None = None  # the bound host array of the last run's logits (B, T, V)
        self._logits_value = None
        self._chunk_logits: np.ndarray | None = None  # a multi-token feed run one column per call
        self._outputs_bound = False  # the logits and a "shared_buffer" cache stay bound from step to step
        self._inputs_bound = False  # the decode arrays stay bound on a CPU session with a static mask
        self.length = 0

    def feed(self, tokens: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Run the model on new tokens; -> the logits of each row's last position, (batch, vocab).

        Args:
            tokens: for batch 1 a sequence of ids; otherwise one sequence per row, or a (batch, T) int array.
                The first feed may give rows of different lengths (the shorter are left-padded); later
                feeds give every row the same number of tokens.

        Returns:
            A view into the state's output buffer, overwritten by the next feed: copy it to keep it.

        Raises:
            PromptError: ids outside the vocabulary, an empty row, rows of unequal lengths after the first feed.
            ContextLengthError: the tokens do not fit in the remaining capacity.
        """
        step = isinstance(tokens, np.ndarray) and tokens.shape == self._next_ids.shape and tokens.dtype.kind in "iu"
        if step and self.length:  # the decode step from a (B, 1) array: no lists of lists to build and check
            return self._step(tokens[:, 0].tolist())
        rows = self._rows(tokens)
        if self.length == 0:
            return self._prefill(rows)
        count = len(rows[0])
        self._check_room(count)
        if count == 1:
            return self._step([row[0] for row in rows])
        if not (self.batch > 1 and self._cache.static_mask):
            return self._chunk(rows)
        columns = []  # B > 1 on "shared_buffer": one column per call (the kernel's limit)
        for column in range(count):
            for b, row in enumerate(rows):
                self._next_ids[b, 0] = row[column]
                self.tokens[b].append(row[column])
            columns.append(self._decode().copy())
        self._chunk_logits = np.stack(columns, axis=1)  # (B, T, V)
        return self._chunk_logits[:, -1, :]

    @property
    def logits(self) -> np.ndarray:
        """The logits of every position of the last feed, (batch, T, vocab); overwritten by the next feed.

        Scoring a text (perplexity) and checking several draft tokens at once read these.
        """
        if self._logits is None:
            raise PromptError("no logits yet: feed tokens first")
        return self._chunk_logits if self._chunk_logits is not None else self._logits

    def _check_room(self, count: int) -> None:
        if self.length + count > self.capacity:
            block = self.model.bundle.config.block_size
            raise ContextLengthError(
                f"{count} new tokens after {self.length} exceed the state's capacity of {self.capacity} positions; "
                f"rewind it, or make a state with a larger capacity (at most the model's {block})"
            )

    def _step(self, ids: list[int]) -> np.ndarray:
        """One token per row (after a prefix), checked one by one: the cheapest path, taken every decode step."""
        self._check_room(1)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise PromptError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        for b, i in enumerate(ids):
            self._next_ids[b, 0] = i
            self.tokens[b].append(i)
        return self._decode()

    def rewind(self, length: int) -> None:
        """Forget the positions from `length` on (0 empties the state); the cache keeps positions [0, length).

        Raises:
            PromptError: `length` is not in 0..self.length, or would cut a row down to its padding only.
        """
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= self.length:
            raise PromptError(f"rewind takes a length in 0..{self.length} (the positions held), got {length!r}")
        length = int(length)
        if 0 < length <= max(self._start):
            raise PromptError(f"rewind to {length} would leave a row with only its left padding; rewind to 0 instead")
        self._mask[:, length:] = 0
        for b, start in enumerate(self._start):
            del self.tokens[b][max(length - start, 0) :]
        self._next_positions[:, 0] = self._mask.sum(axis=1)
        if length == 0:
            self._start = [0] * self.batch
        self._cache.truncate(self._binding, length)
        self._outputs_bound = self._outputs_bound and not self._cache.reads_outputs
        self.length = length

    def fork(self) -> "DecodeState":
        """An independent copy: same positions, tokens and cache contents, a cache of its own."""
        twin = DecodeState(self.model, self.batch, self.capacity)
        twin._cache.copy_from(self._cache, twin._binding)
        twin._mask[:] = self._mask
        twin._start = list(self._start)
        twin._next_positions[:] = self._next_positions
        twin.length, twin.tokens = self.length, [list(row) for row in self.tokens]
        return twin

    # ------------------------------------------------------------------ model calls

    def _rows(self, tokens) -> list[list[int]]:
        """Validate `tokens` into one list of ids per row."""
        if isinstance(tokens, np.ndarray):
            if tokens.ndim == 1 and self.batch == 1:
                tokens = tokens[None, :]
            if tokens.ndim != 2 or tokens.shape[0] != self.batch or tokens.dtype.kind not in "iu":
                raise PromptError(
                    f"expected a ({self.batch}, T) integer array of token ids, got {tokens.dtype} {tokens.shape}"
                )
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                raise PromptError(f"token ids must be in 0..{self.vocab_size - 1}, got {tokens.min()}..{tokens.max()}")
            rows = tokens.tolist()
        else:
            if isinstance(tokens, (str, bytes)):
                raise PromptError(f"feed takes token ids, got {type(tokens).__name__}; encode text first")
            rows = [tokens] if self.batch == 1 and not (len(tokens) and not is_id(tokens[0])) else list(tokens)
            if len(rows) != self.batch:
                raise PromptError(f"expected token ids for {self.batch} rows, got {len(rows)}")
            rows = [check_ids(row, self.vocab_size) for row in rows]
        if any(not row for row in rows):
            raise PromptError("every row needs at least one token")
        if self.length and len({len(row) for row in rows}) > 1:
            raise PromptError(
                f"after the first feed every row takes the same number of tokens, got {[len(r) for r in rows]}"
            )
        return rows

    def _prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Left-pad the rows and run them from an empty cache."""
        width = max(map(len, rows))
        if width > self.capacity:
            raise ContextLengthError(f"{width} tokens exceed the state's capacity of {self.capacity} positions")
        ids = np.full((self.batch, width), self.eot_id, dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = row
            self._mask[b, width - len(row) : width] = 1
            self._start[b] = width - len(row)
            self.tokens[b].extend(row)
        mask = np.ascontiguousarray(self._mask[:, :width])
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        self._next_positions[:, 0] = mask.sum(axis=1)
        self._inputs_bound = self._outputs_bound = False
        self.length = width
        return self._call(ids, mask, positions)

    def _chunk(self, rows: list[list[int]]) -> np.ndarray:
        """Several tokens per row after a prefix, in one call (the past is read, the mask is exactly as wide)."""
        count = len(rows[0])
        ids = np.asarray(rows, dtype=np.int64)
        self._mask[:, self.length : self.length + count] = 1
        mask = np.ascontiguousarray(self._mask[:, : self.length + count])
        positions = self._next_positions + np.arange(count, dtype=np.int64)  # (B, 1) + (T,) -> (B, T)
        for b, row in enumerate(rows):
            self.tokens[b].extend(row)
        self._next_positions += count
        self._inputs_bound = False
        self.length += count
        return self._call(ids, mask, positions)

    def _decode(self) -> np.ndarray:
        """One token per row, from `_next_ids` (the caller records them in `tokens`)."""
        self._mask[:, self.length] = 1
        self.length += 1
        if self._inputs_bound and self._outputs_bound:  # as bound by the last decode step, updated in place: run
            self._chunk_logits = None
            self._run(self._binding)
            self._cache.update((), 1)
        else:
            mask = self._mask  # static: the whole (B, capacity) buffer, the same arrays updated in place every step
            if not self._cache.static_mask:  # a view for one row; rows of a batch need a contiguous copy
                mask = mask[:, : self.length] if self.batch == 1 else np.ascontiguousarray(mask[:, : self.length])
            self._call(self._next_ids, mask, self._next_positions, in_place=self._cache.static_mask)
        self._next_positions += 1  # after the run: the bound array is read by it
        return self._logits[:, -1, :]

    def _call(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, in_place: bool = False) -> np.ndarray:
        """One model call through the IOBinding; the presents stay on the device as the next past.

        `in_place`: the three arrays are the ones bound last step, updated in place. A CPU session reads a
        bound host array when it runs, so they stay bound (three binds a step saved; with the logits and a
        "shared_buffer" cache bound too, `_decode` only runs); CUDA copies at bind time.
        """
        binding = self._binding
        self._chunk_logits = None
        if not (in_place and self._inputs_bound):
            self._bind_inputs(binding, ids, mask, positions)
            self._inputs_bound = in_place and binding.reads_bound_arrays
        shape = (*ids.shape, self.vocab_size)
        if self._logits is None or self._logits.shape != shape:  # once for a multi-token feed, once for decode
            self._logits = np.empty(shape, dtype=self.model.logits_dtype)
            self._logits_value = binding.wrap(self._logits)
            self._outputs_bound = False
        if not self._outputs_bound:  # every step for "concat": its past and presents are new tensors
            binding.clear_outputs()
            binding.bind_output_value(LOGITS, self._logits_value)  # first: outputs() lists in binding order
            binding.bind_outputs([], self._cache.bind(binding))
            self._outputs_bound = not self._cache.reads_outputs
        self._run(binding)
        self._cache.update(binding.outputs()[1:] if self._cache.reads_outputs else [], ids.shape[1])
        return self._logits[:, -1, :]  # (B, T, V) -> (B, V): the last position of each row


def reusable_prefix(held: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading `tokens` a cache holding `held` can keep: their common prefix, less one where it would
    cover all of `tokens` (at least one token is fed: its logits pick the next).

    >>> reusable_prefix([1, 2, 3], [1, 2, 4]), reusable_prefix([1, 2, 3], [1, 2]), reusable_prefix([], [5])
    (2, 1, 0)
    """
    common = next((i for i, (a, b) in enumerate(zip(held, tokens)) if a != b), min(len(held), len(tokens)))
    return min(common, len(tokens) - 1)
