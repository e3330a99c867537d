"""Sampling in numpy: the `SamplingConfig` knobs, their validation, and the per-request `Sampler`.

One request owns one `Sampler`: a seeded `np.random.Generator` and the token counts that the penalties
need, so concurrent requests never share state. The order of the logits processors follows Hugging Face
`generate`: logit_bias, penalties, temperature, top-k, top-p (over the top-k renormalised), min-p, then a
draw. (A `Completion` runs a logits processor and a constraint's mask before this chain.)
Greedy (temperature 0, no penalties) is exactly `argmax` over the float32 logits, ties to the lowest id,
like `torch.argmax`, so it matches `edgegpt.train.generate.generate` token for token.
With a padded vocabulary (`sampled_vocab_size` below the row's width: nanoGPT's 50304 rows for GPT-2's 50257
tokens) the ids past it are never picked, by any step of the chain, greedy included: the chain runs on the
row's first `sampled_vocab_size` logits, which is the same as masking the rest to -inf and costs one view.

References: Holtzman et al. 2019 (top-p, "The Curious Case of Neural Text Degeneration");
Keskar et al. 2019 (CTRL, the repetition penalty); Nguyen et al. 2024 (min-p); OpenAI's presence and
frequency penalties.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from edgegpt.checks import check_bool, check_int, check_real
from edgegpt.errors import SamplingError, UnknownParameterError

__all__ = ["SamplingConfig", "Sampler", "UnknownParameterError", "draw"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token and when to stop. Every field is a keyword of `Generator.generate`.

    Attributes:
        max_new_tokens: tokens to generate at most; None means until the model's context is full.
        temperature: 0 is greedy (argmax); higher flattens the distribution.
        top_k: keep the k most likely tokens (0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 keeps all).
        min_p: drop tokens less likely than min_p times the most likely one (0 keeps all).
        repetition_penalty: CTRL's penalty (> 1 discourages) on tokens of the prompt and the output.
        presence_penalty: subtracted once from the logit of every token already generated.
        frequency_penalty: subtracted from a logit once per time its token was generated.
        stop: strings that end generation; the stop string itself is not part of the text.
        stop_token_ids: token ids that end generation (finish_reason "stop"), not part of the output.
        seed: same seed, same text; None draws fresh entropy.
        ignore_eos: keep going after the end-of-text token (benchmarks, parity tests).
        sliding_window: when the context fills up, keep the most recent tokens and recompute the cache
            instead of raising `ContextLengthError`.
        logit_bias: token id -> a bias added to its logit before every other step (OpenAI's logit_bias);
            -100 or less (or -inf) bans the token. A dict is kept as sorted (id, bias) pairs.
        logprobs: record each generated token's log-probability under the model (`GenerationResult.logprobs`).
        top_logprobs: also record the k most likely tokens of each step (implies logprobs).

    >>> SamplingConfig(temperature=0.7, top_p=0.9, stop=["\\n\\n"]).stop
    ('\\n\\n',)
    >>> SamplingConfig(top_p=0)
    Traceback (most recent call last):
    ...
    edgegpt.errors.SamplingError: top_p must be in (0, 1], got 0
    """

    max_new_tokens: int | None = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    sliding_window: bool = False
    logit_bias: Any = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens, optional=True, error=SamplingError)
        check_int("top_k", self.top_k, error=SamplingError)
        check_real("temperature", self.temperature, low=0.0, error=SamplingError)
        check_real("top_p", self.top_p, low=0.0, high=1.0, low_open=True, error=SamplingError)
        check_real("min_p", self.min_p, low=0.0, high=1.0, error=SamplingError)
        check_real("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True, error=SamplingError)
        check_real("presence_penalty", self.presence_penalty, error=SamplingError)
        check_real("frequency_penalty", self.frequency_penalty, error=SamplingError)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        stop = tuple(stop) if isinstance(stop, Iterable) else None
        if stop is None or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else self.stop_token_ids
        if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
            raise SamplingError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        ids = tuple(ids)
        for i in ids:
            check_int("stop_token_ids", i, error=SamplingError)
        object.__setattr__(self, "stop_token_ids", ids)
        check_int("seed", self.seed, optional=True, error=SamplingError)
        for name in ("ignore_eos", "sliding_window", "logprobs"):
            check_bool(name, getattr(self, name), error=SamplingError)
        check_int("top_logprobs", self.top_logprobs, error=SamplingError)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax (after logit_bias and the penalties), no draw. The one test of it."""
        return self.temperature == 0.0

    def replace(self, **overrides: Any) -> "SamplingConfig":
        """A copy with some fields changed; an unknown keyword raises `UnknownParameterError` naming it.

        >>> SamplingConfig().replace(top_k=40).top_k
        40
        >>> try:
        ...     SamplingConfig().replace(topk=40)
        ... except TypeError as exc:
        ...     print(exc)
        unknown sampling parameter 'topk'; did you mean 'top_k'?
        """
        known = [f.name for f in dataclasses.fields(self)]
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                raise UnknownParameterError(f"unknown sampling parameter {name!r}; {hint}")
        return dataclasses.replace(self, **overrides) if overrides else self


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs; SamplingError naming a bad id or bias."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise SamplingError(f"logit_bias must map token ids to biases, e.g. {{50256: -100}}, got {bias!r}")
    pairs = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise SamplingError(f"logit_bias must map token ids to biases, e.g. {{50256: -100}}, got {bias!r}")
        token, value = item
        if isinstance(token, str) and token.isdigit():  # JSON keys (OpenAI's request body) are strings
            token = int(token)
        check_int("logit_bias token id", token, error=SamplingError)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value == math.inf:
            raise SamplingError(f"logit_bias of token {token} must be a number (or -inf), got {value!r}")
        pairs[int(token)] = float(value)
    return tuple(sorted(pairs.items()))


def draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One id from `weights`, a distribution over ids in id order (not necessarily normalised): the draw of
    every temperature sample (the `Sampler`'s, speculative decoding's), one `rng.random()` per draw.

    >>> draw(np.array([0.0, 2.0, 0.0]), np.random.default_rng(0))
    1
    """
    cumulative = np.cumsum(weights)
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), cumulative.size - 1)


class Sampler:
    """Picks the next token from one row of logits; per-request state (RNG, token counts).

    Args:
        config: the validated knobs.
        vocab_size: the model's vocabulary size (the logits' last dimension).
        prompt_ids: the prompt's token ids, which the repetition penalty also covers.
        sampled_vocab_size: ids at or above it are never picked (treated as logits of -inf): the padding
            past the tokenizer (`Generator.sampled_vocab_size`). None or vocab_size: every id may be.

    >>> s = Sampler(SamplingConfig(), vocab_size=4)
    >>> s(np.array([0.1, 2.0, 2.0, -1.0], dtype=np.float32))
    1
    >>> Sampler(SamplingConfig(), vocab_size=4, sampled_vocab_size=2)(np.array([0.1, -1.0, 2.0, 3.0], dtype=np.float32))
    0
    """

    def __init__(
        self,
        config: SamplingConfig,
        vocab_size: int,
        prompt_ids: Iterable[int] = (),
        *,
        sampled_vocab_size: int | None = None,
    ):
        check_int("sampled_vocab_size", sampled_vocab_size, low=1, high=vocab_size, optional=True, error=SamplingError)
        self.config, self.vocab_size = config, vocab_size
        self.sampled_vocab_size = sampled_vocab_size or vocab_size
        # Only a padded vocabulary pays for the cut (one view per step); None keeps the plain path.
        self._cut = sampled_vocab_size if sampled_vocab_size is not None and sampled_vocab_size < vocab_size else None
        self.rng = np.random.default_rng(config.seed)
        self._seen = np.zeros(vocab_size, dtype=bool)  # prompt + output, for the repetition penalty
        self._seen[np.asarray(list(prompt_ids), dtype=np.int64)] = True
        self._counts = np.zeros(vocab_size, dtype=np.int32)  # output only, for presence / frequency
        c = config
        self._bias = None
        if c.logit_bias:
            bad = [t for t, _ in c.logit_bias if t >= vocab_size]
            if bad:
                raise SamplingError(f"logit_bias token ids {bad} are outside the vocabulary (0..{vocab_size - 1})")
            self._bias = np.zeros(vocab_size, dtype=np.float32)
            for token, value in c.logit_bias:
                self._bias[token] = -np.inf if value <= -100 else value  # OpenAI's -100 bans
        # One flag for everything that changes the logits, so that the plain path pays one test per step.
        self._penalised = (
            c.repetition_penalty != 1.0
            or c.presence_penalty != 0.0
            or c.frequency_penalty != 0.0
            or self._bias is not None
        )
        self._scale = np.float32(0.0) if c.greedy else np.float32(1.0 / c.temperature)

    def __call__(self, logits: np.ndarray) -> int:
        """(V,) float32 logits of the last position -> the next token id (recorded for the penalties)."""
        if self._cut is not None:
            logits = logits[: self._cut]  # a view: the padded ids are out of reach of every step below
        if not self._penalised:
            return self._pick(logits)
        token = self._pick(self._penalise(logits))
        self._seen[token] = True
        self._counts[token] += 1
        return token

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(V,) logits -> softmax(logits / temperature) over the sampled ids: the distribution that a call draws
        from when no filter, penalty or logit_bias is set (speculative sampling's p and q). Not for greedy."""
        if self._cut is not None:
            logits = logits[: self._cut]
        weights = self._weights(logits)
        return weights / weights.sum()

    def _weights(self, logits: np.ndarray) -> np.ndarray:
        """exp((logits - max) / temperature): the softmax unnormalised, in id order."""
        return np.exp((logits - logits.max()) * self._scale)

    def _penalise(self, logits: np.ndarray) -> np.ndarray:
        c, logits = self.config, logits.astype(np.float32, copy=True)
        n = logits.shape[0]  # the cut row's width when padded
        if self._bias is not None:
            logits += self._bias[:n]
        seen_ids, counts = self._seen[:n], self._counts[:n]
        if c.repetition_penalty != 1.0:
            seen = logits[seen_ids]
            logits[seen_ids] = np.where(seen > 0, seen / c.repetition_penalty, seen * c.repetition_penalty)
        if c.presence_penalty or c.frequency_penalty:
            logits -= c.presence_penalty * (counts > 0) + c.frequency_penalty * counts
        return logits

    def _pick(self, logits: np.ndarray) -> int:
        # Few numpy calls on purpose: right after session.run the caches are cold and each call on a
        # (V,) row costs tens of microseconds, against a Python budget of a few hundred per step.
        c = self.config
        if c.greedy:
            return int(logits.argmax())  # first maximum: the lowest id wins a tie, as torch.argmax
        if not (c.top_k or c.top_p < 1.0 or c.min_p > 0.0):
            return draw(self._weights(logits), self.rng)
        # Filters: sort the logits once; top-k, top-p and min-p all become a cut-off n on the sorted row.
        ascending = np.sort(logits)
        desc, size = ascending[::-1], ascending.size
        n = size
        if 0 < c.top_k < size:
            n = size - int(np.searchsorted(ascending, desc[c.top_k - 1], side="left"))  # ties with the k-th kept
        if c.min_p > 0.0:  # p >= min_p * p_max  <=>  logit >= max + T * log(min_p)
            floor = desc[0] + c.temperature * math.log(c.min_p)
            n = min(n, max(size - int(np.searchsorted(ascending, floor, side="left")), 1))
        cumulative = np.cumsum(np.exp((desc[:n] - desc[0]) * self._scale))
        if c.top_p < 1.0:  # keep a token when the mass before it is below top_p (after top-k, as HF)
            n = min(n, int(np.searchsorted(cumulative, c.top_p * cumulative[-1], side="left")) + 1)
        rank = min(int(np.searchsorted(cumulative[:n], self.rng.random() * cumulative[n - 1], side="right")), n - 1)
        value = desc[rank]
        before = size - int(np.searchsorted(ascending, value, side="right"))  # sorted ranks above this value
        return int(np.flatnonzero(logits == value)[rank - before])  # ties: the (rank - before)-th such id
