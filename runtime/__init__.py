"""edgegpt.runtime: run a bundle with onnxruntime, without torch.

Imports only the standard library, numpy, onnxruntime, tokenizers and torch-free edgegpt modules
(config, errors, manifest, tokenizer); tests/test_layout.py checks every import, and loads each module in
a fresh interpreter.
The public names load on first use (PEP 562), so the `edgegpt` command group (edgegpt/cli/) can name
them without paying for onnxruntime and numpy at start-up.

Modules: bundle.py (verify a bundle), onnx_paths.py (read model.onnx without `onnx`), session.py
(`SessionConfig`, stdlib-only), providers.py (execution provider), binding.py (IOBinding), kv_cache.py (KV-cache layouts),
engine.py (`DecodeState`: feed tokens, get logits, rewind, fork), sampling.py (numpy sampling),
completion.py (one prompt's output), constraints.py (JSON schema, regex and grammar masks, with the
optional llguidance), logprobs.py (per-token log-probabilities),
speculative.py (draft and verify: prompt lookup or a draft model), generator.py (`Generator`: generate /
stream / batch), chat.py (a conversation that keeps its cache), evaluate.py (perplexity, agreement).
The benches are `edgegpt.bench`, the commands `edgegpt.cli`.

>>> from edgegpt.runtime import Generator
>>> gen = Generator.load("bundles/tiny", provider="cpu")  # doctest: +SKIP
>>> print(gen.generate("def parse(", max_new_tokens=20).text)  # doctest: +SKIP
>>> state = gen.new_state()  # the step-level engine  # doctest: +SKIP
>>> logits = state.feed(gen.encode("def parse("))  # (1, vocab)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Bundle",
    "Completion",
    "Constraint",
    "DecodeState",
    "GenerationResult",
    "Generator",
    "KVCacheSpec",
    "PromptError",
    "Sampler",
    "SamplingConfig",
    "SessionConfig",
    "Speculative",
    "TextStream",
    "Timings",
    "TokenLogprob",
    "UnknownParameterError",
]

_HOME = {
    "Bundle": "model.bundle",
    "KVCacheSpec": "model.bundle",
    "Completion": "generation.completion",
    "Constraint": "generation.constraints",
    "DecodeState": "engine.state",
    "PromptError": "engine.state",
    "GenerationResult": "generation.generator",
    "Generator": "generation.generator",
    "TextStream": "generation.generator",
    "Timings": "generation.generator",
    "SessionConfig": "model.session",
    "Sampler": "generation.sampling",
    "SamplingConfig": "generation.sampling",
    "UnknownParameterError": "generation.sampling",
    "Speculative": "generation.speculative",
    "TokenLogprob": "generation.logprobs",
}

if TYPE_CHECKING:
    from edgegpt.runtime.model.bundle import Bundle, KVCacheSpec
    from edgegpt.runtime.generation.completion import Completion
    from edgegpt.runtime.generation.constraints import Constraint
    from edgegpt.runtime.engine.state import DecodeState, PromptError
    from edgegpt.runtime.generation.generator import GenerationResult, Generator, TextStream, Timings
    from edgegpt.runtime.generation.logprobs import TokenLogprob
    from edgegpt.runtime.model.session import SessionConfig
    from edgegpt.runtime.generation.sampling import Sampler, SamplingConfig, UnknownParameterError
    from edgegpt.runtime.generation.speculative import Speculative


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'edgegpt.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edgegpt.runtime.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
