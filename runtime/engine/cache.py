"""KV-cache strategies: how the past/present tensors of one request are bound to the graph each step.

One class per `graph.kv_cache.layout` of the manifest. Each keeps its tensors as OrtValues on the
session's device (CUDA: the cache never round-trips to the host) and binds them through the request's
`binding.Binding`, so the same code runs on CPU in tests. The interface: `reset(binding, batch, capacity)`
once, before the first run, `bind(binding)` before each run (binds the pasts, and the presents that are
written in place; returns the present names that onnxruntime must allocate), `update(presents,
new_tokens)` after it, `truncate(binding, length)` to forget positions from `length` on, `copy_from(other,
binding)` to take another cache's contents (`engine.DecodeState.fork`), `length` (positions cached) and
`reads_outputs` (whether `update` needs the outputs). The engines (`base.KVEngine`) make one through
`ModelSession.kv_cache()`.

- "concat" (`ConcatKVCache`, the MultiHeadAttention graph): the graph returns present = concat(past, new),
  (B, H, P+T, D); onnxruntime allocates it, and the next step binds it as the past without a copy. A new
  buffer per step is inherent to this graph (its kernel allocates the present); the host never sees it.
- "shared_buffer" (`SharedBufferKVCache`, the GroupQueryAttention graph): per layer one key and one value
  buffer of (B, H, L, D) is allocated once per request, L = `capacity` (the longest sequence the request
  can reach: prompt + max_new_tokens, at most block_size), and bound as both past_key_values.{i}.* and
  present.{i}.*. The attention kernel reads positions [0, S) of each row (S = the index of the row's
  last 1 in the attention mask + 1, padding included) and writes the T new keys/values at [S - T, S) in
  place: no cache copy, no allocation per step. Positions >= S hold stale or uninitialised values that are
  never read, so a sliding-window re-prefill reuses the buffers as they are. The prefill's mask is exactly as wide as the prompt; decode
  steps bind the whole (B, L) mask buffer (ones up to the cached length, zeros after: the graph takes each
  row's length from its last 1), so its shape, and on the CPU its binding, stay the same every step.
  `SlotBatch` resets it one column wider than its capacity (a scratch column) and binds a range of rows,
  one slot or the slots a step runs, with `bind_rows`.
"""

from __future__ import annotations

import numpy as np

from edgegpt.errors import BundleError
from edgegpt.runtime.model.contract import KV_LAYOUTS

__all__ = ["ConcatKVCache", "KV_CACHES", "SharedBufferKVCache", "make_kv_cache"]


class ConcatKVCache:
    """layout "concat": past (B, H, P, D) in, present (B, H, P+T, D) out, fed back as the next past."""

    reads_outputs = True
    static_mask = False  # the graph takes the past length from the mask's width: it grows one column per step

    def __init__(self, past_names: list[str], present_names: list[str], n_head: int, head_size: int, dtype: str):
        self.past_names, self.present_names = past_names, present_names
        self.n_head, self.head_size, self.dtype = n_head, head_size, np.dtype(dtype)
        self.values: list = []
        self.length = 0

    def reset(self, binding, batch: int, capacity: int) -> None:
        """Start empty: P = 0 is a valid past on the first step. (`capacity` is not needed: presents grow.)"""
        self.batch = batch
        empty = binding.empty(np.zeros((batch, self.n_head, 0, self.head_size), dtype=self.dtype))
        self.values = [empty] * len(self.past_names)  # read-only inputs: one empty tensor serves all
        self.length = 0

    def bind(self, binding) -> list[str]:
        """Bind the past as inputs; return the outputs that onnxruntime must allocate on the device."""
        for name, value in zip(self.past_names, self.values):
            binding.bind_value(name, value)
        return self.present_names

    def update(self, presents: list, new_tokens: int) -> None:
        """Take this step's presents (still on the device) as the next step's past."""
        self.values = presents
        self.length += new_tokens

    def truncate(self, binding, length: int) -> None:
        """Keep positions [0, length): a new, shorter past (through the host: a value cannot be sliced in place)."""
        if length == 0:
            self.reset(binding, self.batch, 0)
            return
        self.values = [binding.from_numpy(binding.to_numpy(v)[:, :, :length]) for v in self.values]
        self.length = length

    def copy_from(self, other: "ConcatKVCache", binding) -> None:
        """Share `other`'s past: a step never writes into a past, it returns new presents."""
        self.values, self.length, self.batch = list(other.values), other.length, other.batch


class SharedBufferKVCache:
    """layout "shared_buffer": one (B, H, capacity, D) buffer per key/value and layer, past and present at once."""

    reads_outputs = False
    static_mask = True  # decode steps bind the whole (B, capacity) mask: zeros after the cached positions

    def __init__(self, past_names: list[str], present_names: list[str], n_head: int, head_size: int, dtype: str):
        self.past_names, self.present_names = past_names, present_names
        self.n_head, self.head_size, self.dtype = n_head, head_size, np.dtype(dtype)
        self.buffers: list = []
        self.shape: tuple[int, ...] = ()
        self.length = 0

    def reset(self, binding, batch: int, capacity: int) -> None:
        """Allocate the buffers on the device, or keep its own when their shape already fits.

        `capacity` is the buffers' width in positions (a `SlotBatch` asks for one more than it holds)."""
        shape = (batch, self.n_head, capacity, self.head_size)
        if shape != self.shape:
            self.buffers = [binding.allocate(shape, self.dtype) for _ in self.past_names]
            self.shape = shape
        self.length = 0

    def bind(self, binding) -> list[str]:
        """Bind each buffer as its layer's past and present; onnxruntime allocates nothing for the cache."""
        for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
            binding.bind_value(past, buffer)
            binding.bind_output_value(present, buffer)
        return []

    def bind_rows(self, binding, start: int, rows: int) -> None:
        """Bind rows [start, start + rows) of each buffer as its layer's past and present, without a copy: such
        rows are one contiguous block of the C-contiguous buffer (`Binding.bind_rows`)."""
        for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
            binding.bind_rows(past, buffer, self.shape, self.dtype, start, rows)
            binding.bind_rows(present, buffer, self.shape, self.dtype, start, rows, output=True)

    def update(self, presents: list, new_tokens: int) -> None:
        """The kernel wrote the new positions in place: only count them."""
        self.length += new_tokens

    def truncate(self, binding, length: int) -> None:
        """Positions from `length` on are never read again (the mask ends before them) and get overwritten."""
        self.length = length

    def copy_from(self, other: "SharedBufferKVCache", binding) -> None:
        """Copy `other`'s buffers into new ones (written in place, they cannot be shared)."""
        self.buffers = [binding.from_numpy(binding.to_numpy(buffer)) for buffer in other.buffers]
        self.shape, self.length = other.shape, other.length


KV_CACHES = {"concat": ConcatKVCache, "shared_buffer": SharedBufferKVCache}
assert KV_CACHES.keys() == KV_LAYOUTS.keys(), "one strategy class per layout of the contract"


def make_kv_cache(
    layout: str, past_names: list[str], present_names: list[str], n_head: int, head_size: int, dtype: str
):
    """The strategy object for a manifest's layout; BundleError for a layout this runtime cannot run."""
    if layout not in KV_CACHES:
        raise BundleError(
            f"KV-cache layout {layout!r} is not supported (known: {', '.join(KV_CACHES)}); upgrade edgegpt"
        )
    return KV_CACHES[layout](past_names, present_names, n_head, head_size, dtype)
