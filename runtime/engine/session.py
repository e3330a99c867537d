"""`ModelSession`: one bundle's onnxruntime session and what every engine on it needs, worked out once.

onnxruntime-genai's `Model` holds the weights and the session, and each `Generator` one sequence's state
over it; here a `ModelSession` is that model, and the engines (`DecodeState`, `SlotBatch`) are the states.
A `Generator` holds one and makes its engines on it; a draft model's engine runs on the draft's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgegpt.manifest import LOGITS
from edgegpt.runtime.engine.binding import Binding
from edgegpt.runtime.engine.cache import make_kv_cache
from edgegpt.runtime.model.bundle import Bundle
from edgegpt.runtime.model.providers import CUDA

__all__ = ["ModelSession"]


@dataclass(frozen=True, eq=False)
class ModelSession:
    """A session with its bundle, the device its values live on and the dtype of its logits (read-only, shared).

    Attributes:
        session: the onnxruntime session (its `Run` is thread-safe: engines on several threads share it).
        bundle: the verified bundle the session runs.
        device: ("cpu", 0) or ("cuda", device id): where the KV cache and bound outputs are allocated.
        logits_dtype: the logits output's dtype, float32 (or float16 for a float16 graph).

    >>> model = ModelSession.of(session, bundle)  # doctest: +SKIP
    >>> model.device, model.logits_dtype  # doctest: +SKIP
    (('cpu', 0), dtype('float32'))
    """

    session: ort.InferenceSession
    bundle: Bundle
    device: tuple[str, int]
    logits_dtype: np.dtype

    @classmethod
    def of(cls, session: ort.InferenceSession, bundle: Bundle, device_id: int = 0) -> "ModelSession":
        """Read the device (the session's first provider) and the logits dtype from the session once."""
        logits_type = next(o.type for o in session.get_outputs() if o.name == LOGITS)
        logits_dtype = np.dtype(np.float16 if logits_type == "tensor(float16)" else np.float32)
        device = ("cuda", device_id) if session.get_providers()[0] == CUDA else ("cpu", 0)
        return cls(session, bundle, device, logits_dtype)

    def binding(self) -> Binding:
        """A new IOBinding on this session (one per engine, or per kind of call an engine makes)."""
        return Binding(self.session, self.device)

    def kv_cache(self):
        """A new, empty KV-cache strategy object for the bundle's layout (`engine.cache`); reset it before use."""
        kv, c = self.bundle.kv, self.bundle.config
        past, present = kv.past_names(c.n_layer), kv.present_names(c.n_layer)
        return make_kv_cache(kv.layout, past, present, c.kv_heads, c.head_size, kv.dtype)
