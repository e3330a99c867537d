"""KV-cache strategies: how the past/present tensors of one request are bound to the graph each step.

One class per `graph.kv_cache.layout` of the manifest. Each keeps its tensors as OrtValues on the
session's device (CUDA: the cache never round-trips to the host) and binds them through the request's
`binding.Binding`, so the same code runs on CPU in tests.
- "concat" (`ConcatKVCache`): the graph returns present = concat(past, new), (B, H, P+T, D); onnxruntime
  allocates it, and the next step binds it as the past without a copy. A new buffer per step is inherent
  to this graph (its Concat op allocates); the host never sees the cache.
- "shared_buffer" (GroupQueryAttention, one preallocated (B, H, max_len, D) buffer bound as both past and
  present) fits the same interface: `reset` allocates once, `bind` binds the buffer as input and output
  (`bind_ortvalue_output`) and returns no names to allocate, `update` only counts.
"""

from __future__ import annotations

import numpy as np

from edgegpt.errors import BundleError

__all__ = ["ConcatKVCache", "KV_CACHES", "make_kv_cache"]


class ConcatKVCache:
    """layout "concat": past (B, H, P, D) in, present (B, H, P+T, D) out, fed back as the next past."""

    def __init__(self, past_names: list[str], present_names: list[str], n_head: int, head_size: int, dtype: str):
        self.past_names, self.present_names = past_names, present_names
        self.n_head, self.head_size, self.dtype = n_head, head_size, np.dtype(dtype)
        self.values: list = []
        self.length = 0

    def reset(self, binding, batch: int) -> None:
        """Start empty: P = 0 is a valid past on the first step."""
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


KV_CACHES = {"concat": ConcatKVCache}


def make_kv_cache(layout: str, past_names: list[str], present_names: list[str], n_head: int, head_size: int, dtype: str):
    """The strategy object for a manifest's layout; BundleError for a layout this runtime cannot run."""
    if layout not in KV_CACHES:
        raise BundleError(f"KV-cache layout {layout!r} is not supported (known: {', '.join(KV_CACHES)}); upgrade edgegpt")
    return KV_CACHES[layout](past_names, present_names, n_head, head_size, dtype)
