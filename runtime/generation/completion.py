"""`Completion`: one prompt's output as tokens arrive: its sampler, text, stop matching and finish reason.

Every decoding loop shares it: `Generator`'s requests (one per row of a batch), the server's slots and
speculative verification. The loop owns the model calls; a `Completion` owns what the tokens mean: it asks
its `Sampler` for the next token, turns tokens into text that never splits a character
(`IncrementalDecoder`), holds back text that may be the start of a stop string, and decides when the
output is finished ("eos", "stop" or "length").

Before its `Sampler` sees a row of logits, a `Completion` may run a user's logits processor (a callable
`(ids, logits) -> logits or None`, on a copy it may change in place) and then a constraint's `TokenMask`
(`constraints.py`), which every token it adds advances; so the mask comes after anything that could
un-ban a token, and the text may only end (end-of-text is masked) where the constraint accepts it. Once the
constraint allows nothing more, the output finishes with "eos" without another model call. With logprobs
asked for, each added token's log-probability under the raw logits is recorded (`logprobs.py`). Without any
of these the per-step path is the plain one: `sample` tests one flag.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from edgegpt.errors import SamplingError
from edgegpt.runtime.generation.constraints import TokenMask
from edgegpt.runtime.generation.logprobs import TokenLogprob, token_logprob
from edgegpt.runtime.generation.sampling import Sampler, SamplingConfig
from edgegpt.tokenizer import IncrementalDecoder

__all__ = ["Completion", "LogitsProcessor", "StopText"]

LogitsProcessor = Callable[[Sequence[int], np.ndarray], "np.ndarray | None"]


class StopText:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop string.

    >>> s = StopText(("\\n\\n",))
    >>> s.add("a\\n"), s.add("\\nb")
    (('a', False), ('', True))
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending = stops, ""

    def add(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = 0  # the longest tail of text that a stop string starts with
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self, piece: str) -> str:
        """The held-back text and `piece`, cut at a stop string if they complete one."""
        out, hit = self.add(piece)
        rest, self.pending = ("" if hit else self.pending), ""
        return out + rest


class Completion:
    """The output of one prompt: tokens, text pieces and finish reason, fed one picked token at a time.

    Args:
        prompt: the prompt's token ids as fed.
        sampler: picks tokens from logits.
        config: the request's knobs; its stop strings, stop_token_ids and ignore_eos apply here.
        decoder: a fresh incremental detokeniser (`Generator.new_decoder`).
        eot_id: the end-of-text token (finish_reason "eos" unless the config ignores it).
        max_new: tokens to produce at most (finish_reason "length" on the last).
        mask: a constraint's `TokenMask` (`ConstraintCompiler.mask`, `Generator.new_completion`), or None.
        logits_processors: callables `(ids, logits) -> logits or None` run in order before the mask; ids are
            the prompt and the tokens so far, logits a (V,) float32 copy they may change in place.

    Attributes (read them): tokens (without a final end-of-text or stop id), pieces (the text emitted so
    far, in order), finish_reason (None while running), finished_at (`time.perf_counter()` of the finish),
    logprobs (one `TokenLogprob` per token when the config asks for them, else None).
    """

    def __init__(
        self,
        prompt: list[int],
        sampler: Sampler,
        config: SamplingConfig,
        decoder: IncrementalDecoder,
        eot_id: int,
        max_new: int,
        *,
        mask: TokenMask | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ):
        self.prompt, self.sampler, self.config, self.decoder = prompt, sampler, config, decoder
        self.eot_id, self.max_new = eot_id, max_new
        if mask is not None and config.ignore_eos:
            raise SamplingError("ignore_eos=True cannot be used with a constraint: the text must end where it says")
        if any(not callable(p) for p in logits_processors):
            raise SamplingError(
                f"logits_processor must be a callable (ids, logits) -> logits or None, got {logits_processors!r}"
            )
        self.mask, self.logits_processors = mask, tuple(logits_processors)
        self.stop_text = StopText(self.config.stop)
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.finished_at = 0.0
        self.logprobs: list[TokenLogprob] | None = [] if config.wants_logprobs else None
        self._plain = mask is None and not self.logits_processors and self.logprobs is None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def sample(self, logits: np.ndarray) -> str:
        """Pick the next token from one row of logits (V,) and add it; -> the text piece it adds."""
        if self._plain:
            return self.add(self.sampler(logits))
        processed = logits
        if self.logits_processors:
            processed = np.array(logits, dtype=np.float32)  # a copy the processors may change
            ids = self.prompt + self.tokens
            for processor in self.logits_processors:
                out = processor(ids, processed)
                if out is not None:
                    processed = np.asarray(out, dtype=np.float32)
                    if processed.shape != logits.shape:
                        raise SamplingError(
                            f"a logits_processor returned shape {processed.shape}, expected {logits.shape}"
                        )
        if self.mask is not None:
            processed = self.mask.apply(processed)
        token = self.sampler(processed)
        if self.mask is not None:
            self.mask.check(token)
        entry = None
        if self.logprobs is not None:
            entry = token_logprob(logits[: self.sampler.sampled_vocab_size], token, self.config.top_logprobs)
        count = len(self.tokens)
        piece = self.add(token)
        if entry is not None and len(self.tokens) > count:  # only tokens that stay in the output
            self.logprobs.append(entry)
        return piece

    def add(self, token: int) -> str:
        """Append a picked token, or finish at end-of-text, a stop id or string, or max_new; -> the new text."""
        config = self.config
        if token == self.eot_id and not config.ignore_eos:
            return self.finish("eos")
        if token in config.stop_token_ids:
            return self.finish("stop")
        self.tokens.append(token)
        if self.mask is not None:
            self.mask.consume(token)
        piece, hit = self.stop_text.add(self.decoder.step(token))
        if hit:
            return self.finish("stop", piece)
        if self.mask is not None and self.mask.stopped:  # nothing but end-of-text may follow
            return self.finish("eos", piece)
        if len(self.tokens) >= self.max_new:
            return self.finish("length", piece)
        self.pieces.append(piece)
        return piece

    def finish(self, reason: str, piece: str | None = None) -> str:
        """End the output with `reason`; -> the last text piece (held-back text included unless a stop cut it)."""
        if reason == "stop" and piece is not None:  # a stop string already cut the text: drop what is held back
            out = piece
        else:
            out = (piece or "") + self.stop_text.flush(self.decoder.flush())
        self.pieces.append(out)
        self.finish_reason, self.finished_at = reason, time.perf_counter()
        return out
