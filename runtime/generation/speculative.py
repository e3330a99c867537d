"""Speculative decoding: draft k tokens cheaply, verify them in one target call, keep the accepted prefix.

`Speculative` is the knob (`Generator.generate(..., speculative=Speculative(lookup=True))`); `speculate` is the
loop, on the public engine: it feeds [last token, d1..dk] as one chunk, reads `DecodeState.logits` (k + 1
positions), keeps the longest accepted prefix plus one token of the target's own, and `rewind`s the rejected
tail (the shared KV buffer needs no copy). A `Generator` request with `speculative=` hands its `DecodeState`,
its `Completion` and a drafter (`new_drafter`) to it. This module owns the loop, the two draft sources and the
acceptance rule:

- prompt lookup: match the last n tokens (n = lookup_ngram down to 1) against the prompt and the text so far
  and propose the k tokens that followed the most recent match; no second model (Saxena 2023, "Prompt
  Lookup Decoding"; llama.cpp's lookup decoding).
- a draft model: a smaller `Generator` with the same tokenizer (the manifests' tokenizer.json sha256 must
  match), on a `DecodeState` of its own that is rewound to the common prefix each round.

Greedy keeps the draft while it equals the target's argmax, so the output is plain greedy decoding's, token
for token. Sampling uses the speculative-sampling rule (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023): accept a draft x with probability min(1, p(x)/q(x)),
otherwise draw from normalise(max(0, p - q)); a lookup draft is a point mass (q one-hot); after k accepted
drafts the bonus token is drawn from p. p and q are the distributions after temperature, both the request's
`Sampler.probabilities`, and every draw is `sampling.draw` on the request's RNG; top-k/top-p/min-p and the
penalties change p in ways the rule would have to replay, so sampling with them is refused (greedy takes them
all: it runs the request's own `Sampler` on each verified position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from edgegpt.checks import check_bool, check_int
from edgegpt.errors import ContextLengthError, SamplingError
from edgegpt.runtime.engine.state import reusable_prefix
from edgegpt.runtime.generation.sampling import draw

__all__ = ["Speculative", "accept", "lookup_draft", "speculate"]

_UNSUPPORTED = ("top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias")
_DRAFT_NEEDS = ("bundle", "config", "sampled_vocab_size", "new_state")  # what `ModelDrafter` uses of a Generator


@dataclass(frozen=True)
class Speculative:
    """How to draft tokens for speculative decoding: prompt lookup or a draft model, and how many at most.

    Attributes:
        lookup: draft by prompt lookup (the continuation of the most recent earlier match of the last tokens).
        draft: or a draft `Generator` (a smaller model with the same tokenizer).
        draft_tokens: the most tokens drafted per round; the round's k adapts (halved after a round with
            nothing accepted, one more after a round with everything accepted; a failure at k = 1 backs off).
            A draft model starts at draft_tokens; prompt lookup starts at 1, once its guesses come right
            (see `LookupDrafter` and `ModelDrafter`).
        lookup_ngram: the longest suffix matched by lookup (then shorter ones, down to 1).

    >>> Speculative(lookup=True).draft_tokens
    4
    >>> Speculative()
    Traceback (most recent call last):
    ...
    edgegpt.errors.SamplingError: Speculative takes one draft source, lookup=True or draft=<a Generator>; got neither
    """

    lookup: bool = False
    draft: Any = None
    draft_tokens: int = 4
    lookup_ngram: int = 3

    def __post_init__(self):
        check_bool("lookup", self.lookup, error=SamplingError)
        check_int("draft_tokens", self.draft_tokens, low=1, high=64, error=SamplingError)
        check_int("lookup_ngram", self.lookup_ngram, low=1, high=16, error=SamplingError)
        if self.lookup == (self.draft is not None):
            given = "both" if self.lookup else "neither"
            raise SamplingError(f"Speculative takes one draft source, lookup=True or draft=<a Generator>; got {given}")
        if self.draft is not None and not all(hasattr(self.draft, name) for name in _DRAFT_NEEDS):
            raise SamplingError(
                f"Speculative(draft=...) takes a Generator (Generator.load(bundle)), got {type(self.draft).__name__}"
            )


def check_request(speculative, config, batch: int, *, constrained: bool = False, processed: bool = False) -> None:
    """SamplingError for what speculation cannot run: not a `Speculative`, several prompts, sliding_window,
    filters in sampling, constraints, logits processors and logprobs (verification adds tokens without the
    per-step chain that applies them)."""
    if not isinstance(speculative, Speculative):
        raise SamplingError(f"speculative must be a Speculative, got {type(speculative).__name__}")
    if batch != 1:
        raise SamplingError(f"speculative decoding runs one prompt at a time, got {batch}; call generate per prompt")
    if config.sliding_window:
        raise SamplingError("speculative decoding does not support sliding_window=True; drop one of the two")
    for name, given in (
        ("a constraint (json_schema, regex, grammar)", constrained),
        ("a logits_processor", processed),
        ("logprobs", config.wants_logprobs),
    ):
        if given:
            raise SamplingError(f"speculative decoding does not support {name}; leave out speculative for this request")
    if not config.greedy:
        default = type(config)()
        knobs = [
            f"{name}={getattr(config, name)}"
            for name in _UNSUPPORTED
            if getattr(config, name) != getattr(default, name)
        ]
        if knobs:
            raise SamplingError(
                f"speculative sampling supports temperature only, not {', '.join(knobs)}; drop it, use temperature=0 "
                f"(greedy takes every knob), or leave out speculative"
            )


def tokenizer_sha256(gen) -> str:
    """The manifest's sha256 of the bundle's tokenizer file."""
    meta = gen.bundle.manifest.get("tokenizer")
    name = meta.get("file", "tokenizer.json") if isinstance(meta, dict) else "tokenizer.json"
    return gen.bundle.manifest["files"][name]["sha256"]


class NgramIndex:
    """Where each n-gram (n = 1..ngram) of a growing token list last ended, for prompt lookup.

    `draft` indexes only the tokens added since its last call, so a step costs O(ngram) whatever the length,
    where a scan of the whole text would grow with it (docs/design.md). The list must only grow between
    calls (a request's prompt and tokens).
    """

    def __init__(self, ngram: int = 3):
        self.ngram = ngram
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, for ends < self.indexed
        self.indexed = 0

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        """The k tokens that followed the most recent earlier occurrence of history's last n tokens (n = ngram..1).

        A match close to the end overlaps the suffix: its continuation runs on through the drafts themselves,
        so a text that repeats with a short period drafts k tokens of that period, not the few before the end.
        """
        size = len(history)
        for end in range(self.indexed, size - 1):  # every n-gram that ends before the last token
            for n in range(1, min(self.ngram, end + 1) + 1):
                self.ends[tuple(history[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, size - 1)
        if k < 1:
            return []
        for n in range(min(self.ngram, size - 1), 0, -1):
            end = self.ends.get(tuple(history[size - n :]))
            if end is not None:
                extended = list(history[end + 1 : end + 1 + k])
                while len(extended) < k:  # past the end: the text so far followed by these drafts
                    extended.append(extended[end + 1 + len(extended) - size])
                return extended
        return []


def lookup_draft(history: Sequence[int], k: int, ngram: int = 3) -> list[int]:
    """`NgramIndex.draft` on a fresh index: the k tokens that followed the last match of history's end.

    >>> lookup_draft([5, 6, 7, 1, 2, 5, 6], 3)
    [7, 1, 2]
    >>> lookup_draft([1, 2, 1, 2, 1, 2], 3)
    [1, 2, 1]
    >>> lookup_draft([1, 2, 3], 2)
    []
    """
    return NgramIndex(ngram).draft(history, k)


def accept(p: np.ndarray, draft: int, q: np.ndarray | None, rng: np.random.Generator) -> int:
    """The speculative-sampling rule for one draft: `draft` if accepted, else a token from max(0, p - q).

    Args:
        p: the target's distribution at this position.
        draft: the drafted id.
        q: the draft's distribution it was drawn from; None for a point mass (prompt lookup).
        rng: the request's generator.

    >>> accept(np.array([0.0, 1.0]), 1, None, np.random.default_rng(0))
    1
    >>> accept(np.array([1.0, 0.0]), 1, None, np.random.default_rng(0))
    0
    """
    q_x = 1.0 if q is None else float(q[draft])
    if rng.random() * q_x < p[draft]:  # u < p(x) / q(x)
        return draft
    if q is None:
        residual = p.copy()
        residual[draft] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0.0:  # p == q up to rounding: rejection had probability ~0
        residual = p
    return draw(residual, rng)


class Drafter:
    """Proposes draft tokens and adapts k; `propose(history, limit, sampler)` -> (drafts, their q rows or None).

    k halves after a round with nothing accepted and grows by one after a fully accepted round. A failed
    round at k = 1 means the text is not predictable here: on such text a round still costs a 2-token call,
    more than a plain step, for about one token, so each source backs off in its own way (`rest`) until
    drafts look worth a call again.
    """

    def __init__(self, spec: Speculative, config, cut: int):
        self.most, self.k = spec.draft_tokens, spec.draft_tokens
        self.config, self.cut = config, cut
        self.drafted = self.accepted = 0

    @property
    def steps(self) -> int:
        """Draft-model calls so far (none for prompt lookup)."""
        return 0

    def record(self, drafted: int, accepted: int) -> None:
        """Count a verified round and adapt k as the class says."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted == 0:
            if self.k == 1:
                self.rest()
            self.k = max(1, self.k // 2)
        else:
            self.kept()
            if accepted == drafted:
                self.k = min(self.most, self.k + 1)

    def rest(self) -> None:
        """Back off after a failed round at k = 1."""

    def kept(self) -> None:
        """A round kept at least one draft."""

    def propose(self, history: list[int], limit: int, sampler) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to min(k, limit) drafts after `history` (none while backing off: the caller takes a plain step);
        a draft model samples them with the request's `sampler` (its probabilities and RNG; unused when greedy)."""
        raise NotImplementedError


WATCH_HITS = 2  # right lookups in a row, while watching, that bring drafting back


class LookupDrafter(Drafter):
    """Drafts by prompt lookup once its guesses come right: it starts by watching, and watches again after a
    failed round at k = 1.

    While watching, every plain step still looks up one draft (no model call, O(ngram) with `NgramIndex`)
    and checks it against the token the step produced; drafting resumes, at k = 1, once `WATCH_HITS` of
    them in a row were right. Which steps draft depends only on tokens already emitted, so the output's
    distribution is unchanged (why watching measures acceptance for free: docs/design.md).

    >>> d = LookupDrafter(Speculative(lookup=True, draft_tokens=2), None, 0)
    >>> text = [1, 2, 1, 3, 1, 3, 1]  # watched guesses: 2 (wrong), none, 3 (right), 1 (right): draft again
    >>> [d.propose(text[:n], 4, None)[0] for n in range(3, 8)]
    [[], [], [], [], [3]]
    """

    def __init__(self, spec: Speculative, config, cut: int):
        super().__init__(spec, config, cut)
        self.index = NgramIndex(spec.lookup_ngram)
        self.k = 1
        self.rest()

    def rest(self) -> None:
        self.watching, self.hits, self.guess = True, 0, None

    def propose(self, history: list[int], limit: int, sampler) -> tuple[list[int], list[np.ndarray] | None]:
        if self.watching:
            if self.guess is not None:  # guessed at the last call, for the token the plain step then added
                self.hits = self.hits + 1 if history[-1] == self.guess else 0
            if self.hits < WATCH_HITS:
                guess = self.index.draft(history, 1)
                self.guess = guess[0] if guess else None
                return [], None
            self.watching = False
        return self.index.draft(history, min(self.k, limit)), None


MAX_PAUSE = 32  # plain steps at most between two draft-model rounds while its drafts keep failing


class ModelDrafter(Drafter):
    """Drafts with a smaller model on its own `DecodeState`, rewound to the common prefix with the text each round.

    Watching would cost a draft call per step, so a failed round at k = 1 pauses drafting instead, for 1, 2,
    4, ... `MAX_PAUSE` plain steps: the pause doubles with each such failure and halves with each round that
    keeps a draft, so a rare lucky draft does not bring back frequent rounds.
    """

    def __init__(self, spec: Speculative, config, cut: int, target, capacity: int):
        super().__init__(spec, config, cut)
        draft = spec.draft
        if tokenizer_sha256(draft) != tokenizer_sha256(target):
            raise SamplingError(
                f"the draft bundle {draft.bundle.path} has another tokenizer than {target.bundle.path} (tokenizer.json "
                f"sha256 {tokenizer_sha256(draft)[:12]}... vs {tokenizer_sha256(target)[:12]}...); a draft model must "
                f"share the target's tokenizer"
            )
        if draft.sampled_vocab_size != cut:
            raise SamplingError(
                f"the draft bundle {draft.bundle.path} samples ids 0..{draft.sampled_vocab_size - 1} but the target "
                f"0..{cut - 1}; export both from checkpoints with the same vocabulary"
            )
        if capacity > draft.config.block_size:
            raise ContextLengthError(
                f"this call needs {capacity} positions but the draft model's context is {draft.config.block_size}; "
                f"lower max_new_tokens or use a draft with a longer context"
            )
        self.state = draft.new_state(capacity=capacity)
        self.pause = self.resting = 0  # the current pause's length, and the plain steps left of it

    @property
    def steps(self) -> int:
        """Draft-model calls so far."""
        return self.state.steps

    def rest(self) -> None:
        self.pause = min(2 * self.pause or 1, MAX_PAUSE)
        self.resting = self.pause

    def kept(self) -> None:
        self.pause //= 2

    def propose(self, history: list[int], limit: int, sampler) -> tuple[list[int], list[np.ndarray] | None]:
        if self.resting:  # each call while resting is one plain step
            self.resting -= 1
            return [], None
        k = min(self.k, limit)
        if k < 1:
            return [], None
        state, held = self.state, self.state.tokens[0]
        common = reusable_prefix(held, history)  # its last fed token's logits draft the first
        state.rewind(common)
        logits = state.feed(history[common:])[0]
        drafts, qs = [], []
        for j in range(k):
            row = logits[: self.cut]
            if self.config.greedy:
                token = int(row.argmax())
            else:
                qs.append(sampler.probabilities(row))
                token = draw(qs[-1], sampler.rng)
            drafts.append(token)
            if j + 1 < k:
                logits = state.feed([token])[0]
        return drafts, (qs or None)


def new_drafter(spec: Speculative, config, target, capacity: int) -> Drafter:
    """The drafter of `spec` for one request of `target` (a Generator) whose sequence holds `capacity` positions."""
    cut = target.sampled_vocab_size
    return LookupDrafter(spec, config, cut) if spec.lookup else ModelDrafter(spec, config, cut, target, capacity)


def speculate(state, row, drafter: Drafter, logits: np.ndarray) -> Iterator[str]:
    """The batch-1 decode loop with drafts: yields the text of the prompt's token, then of each round.

    Args:
        state: the request's `DecodeState` (batch 1), holding the prompt; logits: the prompt's, (1, V).
        row: its `Completion`: every token goes through `row.add` (or `row.sample`), which stops, counts and
            detokenises as the plain loop's; the loop ends when the row finishes.
        drafter: where drafts come from (`new_drafter`).

    A round feeds [last, d1..dk], keeps the accepted prefix and one token of the target's own, and rewinds
    the rest; with no drafts it is a plain decode step, through feed's (1, 1) array fast path.
    """
    next_ids = np.empty((1, 1), dtype=np.int64)
    yield row.sample(logits[0])
    while row.finish_reason is None:
        room = min(row.max_new - len(row.tokens), state.capacity - state.length - 1)
        drafts, qs = drafter.propose(row.prompt + row.tokens, room, row.sampler)
        if not drafts:
            next_ids[0, 0] = row.tokens[-1]
            yield row.sample(state.feed(next_ids)[0])
            continue
        base = state.length
        state.feed([row.tokens[-1], *drafts])
        pieces, used, accepted = _verify(row, state.logits[0], drafts, qs)
        state.rewind(base + used)  # as the plain loop: the cache holds every token before the last emitted
        drafter.record(len(drafts), accepted)
        yield "".join(pieces)


def _verify(row, logits: np.ndarray, drafts: list[int], qs) -> tuple[list[str], int, int]:
    """Emit the accepted drafts and one token of the target's own, stopping where the row finishes.

    logits (k + 1, V): position i picks the token after chunk[i]. -> (pieces, positions used, drafts accepted).
    """
    sampler, pieces = row.sampler, []
    greedy = sampler.config.greedy
    for i in range(len(drafts) + 1):
        draft = drafts[i] if i < len(drafts) else None
        if greedy or draft is None:  # argmax (penalties included) or the bonus token: the Sampler, as the plain loop
            token = sampler(logits[i])
        else:
            token = accept(sampler.probabilities(logits[i]), draft, qs[i] if qs else None, sampler.rng)
        pieces.append(row.add(token))
        if token != draft or row.finish_reason is not None:
            return pieces, i + 1, i + (token == draft)
    raise AssertionError("unreachable: the last position has no draft")
