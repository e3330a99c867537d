"""edgegpt.runtime: run a bundle with onnxruntime, without torch.

Imports only the standard library, numpy, onnxruntime, tokenizers and torch-free edgegpt modules; an extra's
library (the serve extra's starlette, the constrain extra's llguidance) only in that extra's modules or lazily.
tests/test_layout.py checks every import and loads each module in a fresh interpreter. The public names below
load on first use (PEP 562), so importing the package costs nothing until one is used.

Four wings, in the order a request meets them:

    model/       a bundle checked and opened: bundle.py (verify before load), onnx_paths.py and ort_format.py
                 (read the graphs without onnx), contract.py (KV layouts and the onnxruntime each needs),
                 session_config.py (SessionConfig, stdlib-only: the CLI builds its flags from it), providers.py
                 (the execution provider and the session), huge_pages.py
    engine/      the step layer over one session: binding.py (IOBinding), cache.py (KV layouts), state.py
                 (DecodeState: rows in lockstep), slots.py (SlotBatch: sequences that come and go), base.py
                 (what the two share), session.py (ModelSession: the session, bundle, device, logits dtype)
    generation/  from a prompt to text: sampling.py, completion.py (one row's text, stops, finish),
                 constraints.py, logprobs.py, speculative.py, budget.py (token_budget), generator.py
                 (Generator), chat.py, templates.py (chat templates), evaluate.py (perplexity, agreement)
    serve/       many clients on one model: scheduler.py (continuous batching), app.py, protocol.py,
                 metrics.py (`edgegpt serve`, the serve extra), settings.py (ServeSettings), process.py,
                 web.py (`edgegpt web`'s static server)

The benches are `edgegpt.bench`, the commands `edgegpt.cli`.

Names, next to the field's (STYLE.md section 11). edgegpt keeps its own, which its API, CLI, server and browser
runtime have used from the start; the table is for readers who come from the other two:

    edgegpt                 onnxruntime-genai           llama.cpp
    Bundle                  Config (+ the model folder) the GGUF file
    Generator               Model (+ Tokenizer)         llama_model (+ llama_vocab)
    DecodeState             Generator (+ its state)     llama_context with one sequence
    DecodeState.feed        append_tokens / get_logits  llama_decode + llama_get_logits
    DecodeState.rewind      rewind_to                   llama_memory_seq_rm
    SlotBatch (a slot)      -                           llama-server's slot (a sequence id)
    Scheduler / Job         -                           llama-server's update_slots / task
    Sampler                 search options (in C++)     llama_sampler chain
    Completion              -                           llama-server's slot state of one request

A rename was weighed and not made: `Generator` -> `Model` alone would leave `DecodeState` short of genai's
`Generator`, and renaming both would give the name `Generator` two meanings during the deprecation.

>>> from edgegpt.runtime import Generator
>>> gen = Generator.load("bundles/tiny", provider="cpu")  # doctest: +SKIP
>>> print(gen.generate("def parse(", max_new_tokens=20).text)  # doctest: +SKIP
>>> state = gen.new_state()  # the step-level engine  # doctest: +SKIP
>>> logits = state.feed(gen.encode("def parse("))  # (1, vocab)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgegpt.errors import PromptError, UnknownParameterError  # the torch-free core's: nothing to load lazily

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
    "SpecialTokens",
    "Speculative",
    "TextStream",
    "Timings",
    "TokenLogprob",
    "UnknownParameterError",
]

_HOME = {
    "Bundle": "model.bundle",
    "KVCacheSpec": "model.bundle",
    "SpecialTokens": "model.bundle",
    "Completion": "generation.completion",
    "Constraint": "generation.constraints",
    "DecodeState": "engine.state",
    "GenerationResult": "generation.generator",
    "Generator": "generation.generator",
    "TextStream": "generation.generator",
    "Timings": "generation.generator",
    "SessionConfig": "model.session_config",
    "Sampler": "generation.sampling",
    "SamplingConfig": "generation.sampling",
    "Speculative": "generation.speculative",
    "TokenLogprob": "generation.logprobs",
}

if TYPE_CHECKING:
    from edgegpt.runtime.model.bundle import Bundle, KVCacheSpec
    from edgegpt.runtime.generation.completion import Completion
    from edgegpt.runtime.generation.constraints import Constraint
    from edgegpt.runtime.engine.state import DecodeState
    from edgegpt.runtime.generation.generator import GenerationResult, Generator, TextStream, Timings
    from edgegpt.runtime.generation.logprobs import TokenLogprob
    from edgegpt.runtime.model.session_config import SessionConfig
    from edgegpt.runtime.generation.sampling import Sampler, SamplingConfig
    from edgegpt.runtime.generation.speculative import Speculative


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'edgegpt.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edgegpt.runtime.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
