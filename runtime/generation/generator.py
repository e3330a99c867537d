"""`Generator`: load a bundle, then generate / stream / batch text on one onnxruntime session.

The convenience layer over the step-level engine (`engine.DecodeState`, made by `Generator.new_state`):
each call builds a `_Request` that owns everything mutable: one `DecodeState` (IOBinding, KV cache, mask)
and one `Completion` per prompt (`completion.py`: sampler, detokeniser, stop matching, finish reason).
The session and the bundle are shared read-only, and `InferenceSession.run_with_iobinding` is
thread-safe, so one Generator serves concurrent calls from several threads.

Per step only the last position's logits are sampled. Batches are left-padded, so each row computes what
it would compute alone. With sliding_window, a full context drops its oldest tokens and is recomputed.
Reference loop: edgegpt.train.generate.generate (PyTorch), which greedy decoding here matches token for token.
With `speculative=`, a batch-1 request hands its state and row to `speculative.speculate` instead: drafts are
verified k + 1 positions per model call, and every emitted token goes through the same `Completion.add` as here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from edgegpt.errors import ContextLengthError, PromptError, SamplingError
from edgegpt.runtime.model.bundle import Bundle, check_io, select_graph
from edgegpt.runtime.generation.templates import ChatTemplate
from edgegpt.runtime.generation.budget import token_budget
from edgegpt.runtime.generation.completion import Completion, LogitsProcessor
from edgegpt.runtime.generation.constraints import Constraint, ConstraintCompiler, row_constraints
from edgegpt.runtime.engine.state import DecodeState, check_ids, reusable_prefix
from edgegpt.runtime.model.contract import check_onnxruntime
from edgegpt.runtime.generation.logprobs import TokenLogprob
from edgegpt.runtime.model.providers import SessionConfig, create_session
from edgegpt.runtime.generation.sampling import Sampler, SamplingConfig
from edgegpt.runtime.engine.session import ModelSession
from edgegpt.runtime.engine.slots import SlotBatch
from edgegpt.runtime.generation.speculative import Drafter, Speculative, check_request, new_drafter, speculate
from edgegpt.tokenizer import IncrementalDecoder

__all__ = ["GenerationResult", "Generator", "TextStream", "Timings"]


@dataclass(frozen=True)
class Timings:
    """Wall-clock figures of one request.

    Attributes:
        time_to_first_token_s: from the call to the first sampled token (tokenising and prefill included).
        decode_s: from the first token to the last.
        total_s: the whole call.
        tokens_per_s: decode speed, (tokens - 1) / decode_s (0 with fewer than two tokens).
        session_s: time spent inside onnxruntime over all steps.
        steps: model calls (prefill, one per token, and any sliding-window recomputation; with speculative
            decoding one per verified round).
        draft_steps: the draft model's calls (speculative decoding with a draft model; 0 otherwise).
    """

    time_to_first_token_s: float
    decode_s: float
    total_s: float
    tokens_per_s: float
    session_s: float
    steps: int
    draft_steps: int = 0


@dataclass(frozen=True)
class GenerationResult:
    """What one prompt produced.

    Attributes:
        text: the generated text (the prompt excluded; a matched stop string and what follows cut off).
        tokens: the generated token ids, without a final end-of-text or stop token id.
        finish_reason: "eos" (the model ended the text), "stop" (a stop string or stop token id) or
            "length" (max_new_tokens, or the context was full).
        prompt_tokens: the prompt's token ids as fed (a text's with the BOS its tokenizer adds, if any; an empty
            prompt is that BOS, else the end-of-text token).
        timings: see `Timings`.
        context_shifts: how often the sliding window dropped old tokens and recomputed the cache.
        cached_tokens: prompt tokens the given `state` already held, not fed again (0 without a state).
        drafted_tokens, accepted_tokens: speculative decoding's drafts verified and kept (0 without it).
        logprobs: one `TokenLogprob` per token of `tokens` (its log-probability under the model, and the
            top_logprobs most likely tokens of its step) when logprobs or top_logprobs was asked for, else None.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: list[int]
    timings: Timings
    context_shifts: int = 0
    cached_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    @property
    def acceptance_rate(self) -> float:
        """accepted_tokens / drafted_tokens (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


class _Request:
    """One generate/stream/batch call: rows with their samplers and text, over one `DecodeState`.

    Iterate it to run the loop; after each model step it yields the new text piece of every row ("" if none).
    """

    def __init__(
        self,
        gen: "Generator",
        prompts: list[list[int]],
        config: SamplingConfig,
        started: float,
        state: DecodeState | None = None,
        speculative: Speculative | None = None,
        constraints: Sequence[Constraint | None] = (),
        processors: Sequence[LogitsProcessor] = (),
    ):
        self.gen, self.config, self.started = gen, config, started
        if speculative is not None:
            check_request(
                speculative,
                config,
                len(prompts),
                constrained=any(c is not None for c in constraints),
                processed=bool(processors),
            )
        vocab, block = gen.config.vocab_size, gen.config.block_size
        bad = [i for i in config.stop_token_ids if i >= vocab]
        if bad:
            raise SamplingError(f"stop_token_ids {bad} are outside the vocabulary (0..{vocab - 1})")
        longest = max(len(p) for p in prompts)
        self.max_new = token_budget(longest, config.max_new_tokens, block, sliding_window=config.sliding_window)
        constraints = list(constraints) or [None] * len(prompts)
        self.rows = [
            gen.new_completion(p, config, self.max_new, constraint=c, logits_processor=processors)
            for p, c in zip(prompts, constraints)
        ]
        # The longest sequence the cache will hold (a "shared_buffer" cache allocates that much once).
        windowed = config.sliding_window or config.max_new_tokens is None
        capacity = block if windowed else max(min(block, longest + self.max_new), 1)
        if state is None:
            state = gen.new_state(batch=len(prompts), capacity=capacity)
        elif state.batch != len(prompts) or (state.capacity < capacity and not config.sliding_window):
            raise ContextLengthError(
                f"the state holds {state.batch} row(s) of {state.capacity} positions; this call needs {len(prompts)} "
                f"of {capacity}: make it with gen.new_state(batch={len(prompts)}, capacity={capacity})"
            )
        self.state = state
        self.drafter: Drafter | None = None if speculative is None else new_drafter(speculative, config, gen, capacity)
        self.next_ids = np.empty((len(prompts), 1), dtype=np.int64)
        self.context_shifts = self.cached_tokens = 0
        self.first_token_at: float | None = None

    @property
    def session_s(self) -> float:
        return self.state.session_s

    def __iter__(self) -> Iterator[list[str]]:
        rows, state = self.rows, self.state
        if self.max_new == 0:
            for row in rows:
                row.finish("length")
            return
        feed = [row.prompt for row in rows]
        if self.config.sliding_window and max(map(len, feed)) > state.capacity:
            feed = self._window(feed)
        logits = self._feed_prompts(feed)
        if self.drafter is not None:  # batch 1: the loop with drafts
            for piece in speculate(state, rows[0], self.drafter, logits):
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                yield [piece]
            return
        while True:
            pieces = [""] * len(rows)
            for b, row in enumerate(rows):
                if row.finish_reason is None:
                    pieces[b] = row.sample(logits[b])
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            yield pieces
            if all(row.finish_reason for row in rows):
                return
            if state.length + 1 > state.capacity:  # only with sliding_window
                state.rewind(0)
                logits = state.feed(self._window([row.prompt + row.tokens for row in rows]))
                continue
            for b, row in enumerate(rows):  # finished rows: end-of-text, ignored
                self.next_ids[b, 0] = row.tokens[-1] if row.tokens and row.finish_reason is None else self.gen.eot_id
            logits = state.feed(self.next_ids)

    def _feed_prompts(self, prompts: list[list[int]]) -> np.ndarray:
        """Feed the prompts; a state that already holds a prefix of a single prompt feeds only the rest."""
        state = self.state
        if state.batch == 1 and state.length:
            held, prompt = state.tokens[0], prompts[0]
            common = reusable_prefix(held, prompt)
            state.rewind(common)
            self.cached_tokens = common
            return state.feed(prompt[common:])
        if state.length:
            state.rewind(0)
        return state.feed(prompts)

    def _window(self, histories: list[list[int]]) -> list[list[int]]:
        """Keep the most recent tokens so that the rest of the generation fits with the fewest recomputations."""
        block = self.state.capacity
        remaining = max((self.max_new - len(r.tokens) for r in self.rows if r.finish_reason is None), default=1)
        keep = block - min(max(remaining, 1), block // 2)
        self.context_shifts += 1
        return [h[-keep:] for h in histories]

    def result(self, b: int = 0) -> GenerationResult:
        row = self.rows[b]
        end = row.finished_at or time.perf_counter()
        first = self.first_token_at or end
        decode = end - first
        timings = Timings(
            time_to_first_token_s=first - self.started,
            decode_s=decode,
            total_s=end - self.started,
            tokens_per_s=(len(row.tokens) - 1) / decode if len(row.tokens) > 1 and decode > 0 else 0.0,
            session_s=self.state.session_s,
            steps=self.state.steps,
            draft_steps=self.drafter.steps if self.drafter else 0,
        )
        return GenerationResult(
            text="".join(row.pieces),
            tokens=list(row.tokens),
            finish_reason=row.finish_reason or "length",
            prompt_tokens=list(row.prompt),
            timings=timings,
            context_shifts=self.context_shifts,
            cached_tokens=self.cached_tokens,
            drafted_tokens=self.drafter.drafted if self.drafter else 0,
            accepted_tokens=self.drafter.accepted if self.drafter else 0,
            logprobs=None if row.logprobs is None else list(row.logprobs),
        )


def _processors(logits_processor) -> tuple:
    """The `logits_processor` keyword (None, one callable or several) as a tuple."""
    if logits_processor is None:
        return ()
    return (logits_processor,) if callable(logits_processor) else tuple(logits_processor)


class TextStream:
    """An iterator of text pieces; once exhausted, `.result` holds the `GenerationResult`."""

    def __init__(self, request: _Request):
        self._request, self._steps = request, iter(request)
        self.result: GenerationResult | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        for pieces in self._steps:
            if pieces[0]:
                return pieces[0]
        if self.result is None:
            self.result = self._request.result(0)
        raise StopIteration


class Generator:
    """Text generation from a verified bundle with onnxruntime; no torch.

    Sampling knobs are keyword-only and mirror `SamplingConfig` (an unknown keyword raises
    `UnknownParameterError`, a `TypeError`); `sampling=` passes a whole config, keywords override it.

    >>> gen = Generator.load("bundles/tiny", provider="cpu")  # doctest: +SKIP
    >>> gen.generate("def parse(", max_new_tokens=8).finish_reason  # doctest: +SKIP
    'length'
    >>> "".join(gen.stream("def parse(", max_new_tokens=8, temperature=0.8, seed=0))  # doctest: +SKIP
    '...'
    """

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, session_config: SessionConfig):
        self.bundle, self.session, self.session_config = bundle, session, session_config
        self.config, self.tokenizer, self.eot_id = bundle.config, bundle.tokenizer, bundle.eot_id
        self.special = bundle.special  # BOS, end-of-text and every stop id: decided there, once
        self.stop_ids = bundle.special.stop_ids
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        check_io(f"{bundle.model_path} (onnxruntime)", names_in, names_out, bundle.input_names, bundle.output_names)
        self.model = ModelSession.of(session, bundle, session_config.device_id)  # what every engine on it needs
        self._chat_template: ChatTemplate | None = None
        self._decoder = IncrementalDecoder(self.tokenizer)  # building the byte table costs ms: once
        # Ids 0..sampled_vocab_size-1 may be sampled: not the padding past the tokenizer (nanoGPT's 50304 rows
        # for 50257 tokens), nor an end-of-text token appended to a character vocabulary (edgegpt.train.nanogpt).
        self.sampled_vocab_size = self.config.sampled_ids(self.tokenizer.get_vocab_size())
        self._compiler: ConstraintCompiler | None = None  # on the first constrained request
        self._compiler_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        bundle: str | Path | Bundle,
        session: SessionConfig | None = None,
        *,
        model_format: str = "auto",
        **session_options: Any,
    ) -> "Generator":
        """Verify the bundle (manifest, hashes, external data, I/O, tokenizer), then create the session.

        Args:
            bundle: the bundle directory (or an already verified `Bundle`).
            session: how to build the onnxruntime session (provider, threads, spinning, huge pages, ...); None
                is `SessionConfig()`: provider "auto" (CUDA if usable, else CPU), one thread per physical core.
            model_format: the graph to run: "onnx", "ort" (the mobile format, `edgegpt convert-ort`) or "auto"
                (the `.onnx` when the bundle has it, else the `.ort`).
            **session_options: `SessionConfig` fields that replace `session`'s (`provider="cpu", threads=2`).

        Raises:
            TypeError: a keyword that is no `SessionConfig` field (the message names it), or a `session` that
                is no `SessionConfig`.
            ConfigError: a session option's value is invalid.
            BundleError: the bundle is missing, altered, unsafe or incompatible (its KV layout included: a
                "shared_buffer" bundle needs onnxruntime >= 1.22).
            ProviderError: provider="cuda" and CUDA cannot be used (the message says why).

        >>> gen = Generator.load("bundles/tiny", provider="cpu", threads=2)  # doctest: +SKIP
        >>> gen = Generator.load("bundles/tiny", SessionConfig(provider="cpu", spinning=False))  # doctest: +SKIP
        """
        if session is not None and not isinstance(session, SessionConfig):  # e.g. the provider, once the 2nd argument
            raise TypeError(f"session must be a SessionConfig, got {session!r}; give provider= and threads= by keyword")
        session_config = (session or SessionConfig()).replace(**session_options)  # one dataclasses.replace
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        check_onnxruntime(bundle.kv.layout, ort.__version__, str(bundle.path))
        graph = select_graph(bundle, model_format, ort.__version__)
        return cls(bundle, create_session(graph, session_config), session_config)

    @property
    def chat_template(self) -> ChatTemplate:
        """The bundle's chat template (chat_template.jinja, else tokenizer_config.json's `chat_template`, else
        edgegpt's default),
        read on first use: a Jinja template needs jinja2 (the serve extra) only when a chat asks for it."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_bundle(self.bundle.path)
        return self._chat_template

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as transformers' tokenizer gives them: with `add_special_tokens`, a BOS first when
        the bundle's tokenizer adds one (`special.bos_id`: Llama); GPT-2's adds nothing. Every text prompt
        (generate, stream, generate_batch, the CLI, the server's completions) is encoded here; token ids given
        to the `*_ids` calls are fed as they are. A chat is encoded by `encode_chat`.

        >>> gen.encode("def f"), gen.encode("def f", add_special_tokens=False)  # doctest: +SKIP
        ([1, 563, 269], [563, 269])
        """
        if not isinstance(text, str):
            raise PromptError(f"prompt must be a str, got {type(text).__name__}; use generate_ids for token ids")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.special.with_bos(ids) if add_special_tokens else ids

    def encode_chat(self, text: str) -> list[int]:
        """Token ids of a conversation rendered by `chat_template`: a model's own (Jinja) template renders its BOS
        itself, so nothing is added, as transformers' `apply_chat_template(tokenize=True)` does; edgegpt's default
        transcript is plain text and gets the tokenizer's BOS like any text prompt."""
        return self.encode(text, add_special_tokens=self.chat_template.source is None)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self.tokenizer.decode(self._check_ids(ids), skip_special_tokens=False)

    def generate(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        state: DecodeState | None = None,
        speculative: Speculative | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        **overrides,
    ) -> GenerationResult:
        """Continue `prompt`; returns the text, token ids, finish_reason and timings.

        The prompt is encoded by `encode` (a BOS first where the bundle's tokenizer adds one). The text ends at any
        of the bundle's stop ids (`stop_ids`: finish_reason "eos"), at a stop string or at `stop_token_ids` ("stop").

        `state`: continue on this `DecodeState` (batch 1) instead of a fresh one: the longest common prefix of
        its tokens and the prompt is not fed again (`result.cached_tokens`), and afterwards it holds the prompt
        and the generated tokens (all but the last). A conversation keeps one state across turns this way.

        `speculative`: a `Speculative` (prompt lookup or a draft model) verifies several drafted tokens per
        model call; greedy output is the same token for token, sampling the same in distribution
        (`result.drafted_tokens`, `accepted_tokens`, `acceptance_rate`).

        `json_schema`, `regex` or `grammar` (one of them; needs `pip install "edgegpt[constrain]"`): the text
        must follow it (`Constraint`). Every sampler only sees the tokens it allows, end-of-text included, so
        a text that finished with "eos" is complete and one cut by max_new_tokens ("length") is a valid prefix.
        `{"type": "object"}` is any JSON object. A stop string still ends the text where it matches.

        `logits_processor`: a callable `(ids, logits) -> logits or None` (or a list, run in order) that sees
        each step's ids so far (prompt and output) and a float32 copy of the logits it may change in place;
        it runs before the constraint's mask and the sampler.

        Raises:
            SamplingError: an invalid or unknown sampling keyword (named in the message), or a knob that
                speculative decoding cannot take (sliding_window; top-k/top-p/min-p/penalties when sampling;
                constraints, logits processors, logprobs).
            ConstraintError: a constraint the library refuses (its reason in one line), before any model call.
            ExtraMissingError: a constraint without llguidance installed (an `ImportError` naming the extra).
            ContextLengthError: prompt + max_new_tokens exceed the context (without sliding_window).

        >>> gen.generate("def parse(", max_new_tokens=16, temperature=0.8, top_p=0.95, seed=0).text  # doctest: +SKIP
        >>> gen.generate("Answer: ", regex="(yes|no)", max_new_tokens=4).text  # doctest: +SKIP
        'yes'
        """
        return self._call(
            self.encode,
            [prompt],
            sampling,
            overrides,
            state,
            speculative,
            (json_schema, regex, grammar),
            logits_processor,
        )[0]

    def stream(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        state: DecodeState | None = None,
        speculative: Speculative | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        **overrides,
    ) -> TextStream:
        """Like `generate` (its keywords), but yields text pieces as tokens arrive; never splits a character.

        The pieces joined equal `generate(...).text` for the same seed; `.result` is set when exhausted.

        >>> for piece in gen.stream("def parse(", max_new_tokens=16):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        return self._call(
            self.encode,
            [prompt],
            sampling,
            overrides,
            state,
            speculative,
            (json_schema, regex, grammar),
            logits_processor,
            stream=True,
        )

    def stream_ids(
        self,
        ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        *,
        state: DecodeState | None = None,
        speculative: Speculative | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        **overrides,
    ) -> TextStream:
        """`stream` for a prompt of token ids, fed as given (no BOS added).

        Ids outside the vocabulary raise `PromptError`.
        """
        return self._call(
            self._check_ids,
            [ids],
            sampling,
            overrides,
            state,
            speculative,
            (json_schema, regex, grammar),
            logits_processor,
            stream=True,
        )

    def generate_ids(
        self,
        ids: Sequence[int],
        sampling: SamplingConfig | None = None,
        *,
        state: DecodeState | None = None,
        speculative: Speculative | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        grammar: str | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        **overrides,
    ) -> GenerationResult:
        """Token ids in, token ids out (`result.tokens`); ids outside the vocabulary raise `PromptError`.

        The ids are fed as given: no BOS is added (`gen.encode(text)` gives a text's ids with it).

        The other keywords as for `generate`.

        >>> gen.generate_ids([11, 42, 7], max_new_tokens=4).tokens  # doctest: +SKIP
        """
        return self._call(
            self._check_ids,
            [ids],
            sampling,
            overrides,
            state,
            speculative,
            (json_schema, regex, grammar),
            logits_processor,
        )[0]

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingConfig | None = None,
        *,
        speculative: Speculative | None = None,
        json_schema: Any = None,
        regex: Any = None,
        grammar: Any = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        **overrides,
    ) -> list[GenerationResult]:
        """Several prompts (texts or token-id lists) in one left-padded batch; one result per prompt.

        Texts are encoded by `encode` (with the tokenizer's BOS, if it adds one); token-id lists are fed as given.

        `json_schema`, `regex` and `grammar` (see `generate`) each take one value for every row or a list with
        one entry per prompt, None where a row is free; a row takes at most one of the three, so a batch may
        mix a schema row, a regex row and a free row. `logits_processor` runs on every row (it sees the row's ids).

        Each row samples with its own RNG seeded by `seed`. Rows that finish early keep being fed an
        end-of-text token but produce nothing more. Without sliding_window the longest prompt bounds
        max_new_tokens for all rows. `speculative` takes one prompt only (SamplingError for more).

        Greedy output per prompt equals generating it alone for fp32, fp16 and int8 bundles (the tests check
        each): int8 quantizes activations per row. An int4 bundle's MatMulNBits runs one row through another
        kernel than several, so a near tie can flip a row (docs/design.md, section 5). An int8 bundle quantized
        with `int8_kernel="dynamic"` (the older format; manifest `quantization.kernel`) shares one activation
        scale over the whole batch, so its rows can differ from their runs alone after some tokens.

        >>> [r.text for r in gen.generate_batch(["def ", "import "], max_new_tokens=8)]  # doctest: +SKIP
        """
        if isinstance(prompts, str) or not prompts:
            raise PromptError("generate_batch takes a non-empty list of prompts (texts or token-id lists)")
        return self._call(
            self._prompt_ids,
            prompts,
            sampling,
            overrides,
            None,
            speculative,
            (json_schema, regex, grammar),
            logits_processor,
        )

    def _call(
        self,
        to_ids,
        prompts: Sequence,
        sampling,
        overrides: dict,
        state,
        speculative,
        constraint,
        logits_processor,
        *,
        stream: bool = False,
    ) -> list[GenerationResult] | TextStream:
        """The one body of generate, stream, stream_ids, generate_ids and generate_batch: the prompts (each made
        token ids by `to_ids`) -> a `TextStream` (stream) or one result per prompt."""
        started = time.perf_counter()
        prompts = [to_ids(p) for p in prompts]
        base = SamplingConfig() if sampling is None else sampling
        if not isinstance(base, SamplingConfig):
            raise SamplingError(f"sampling must be a SamplingConfig, got {type(base).__name__}")
        if state is not None and not isinstance(state, DecodeState):
            raise PromptError(f"state must be a DecodeState from Generator.new_state, got {type(state).__name__}")
        config = base.replace(**overrides)
        prompts = [self.special.prompt(p) for p in prompts]  # an empty prompt starts from BOS or end-of-text
        constraints = row_constraints(len(prompts), *constraint)
        processors = _processors(logits_processor)
        request = _Request(self, prompts, config, started, state, speculative, constraints, processors)
        if stream:
            return TextStream(request)
        for _ in request:
            pass
        return [request.result(b) for b in range(len(prompts))]

    def new_state(self, batch: int = 1, capacity: int | None = None) -> DecodeState:
        """An empty `DecodeState` of `batch` rows on this generator's session: the step-level engine.

        Args:
            batch: rows fed together.
            capacity: positions to hold at most (default and maximum: the model's block_size); a
                "shared_buffer" cache allocates this much at once.

        >>> state = gen.new_state()  # doctest: +SKIP
        >>> logits = state.feed(gen.encode("def parse("))  # (1, vocab)  # doctest: +SKIP
        """
        return DecodeState(self.model, batch, capacity)

    def new_slots(self, slots: int, capacity: int | None = None) -> SlotBatch:
        """A `SlotBatch` of `slots` independent sequences on this session (continuous batching, the server).

        Needs a "shared_buffer" (GroupQueryAttention) bundle; BundleError otherwise.
        """
        return SlotBatch(self.model, slots, capacity)

    def new_sampler(
        self, sampling: SamplingConfig | None = None, prompt_ids: Sequence[int] = (), **overrides
    ) -> Sampler:
        """A `Sampler` for this model (keywords as `SamplingConfig`'s): it never picks an id past
        `sampled_vocab_size`, whatever the sampling, greedy included.

        >>> sampler = gen.new_sampler(temperature=0.8, seed=0)  # doctest: +SKIP
        >>> token = sampler(state.feed(gen.encode("def parse("))[0])  # doctest: +SKIP
        """
        config = (SamplingConfig() if sampling is None else sampling).replace(**overrides)
        return Sampler(config, self.config.vocab_size, prompt_ids, sampled_vocab_size=self.sampled_vocab_size)

    def new_completion(
        self,
        prompt: Sequence[int],
        sampling: SamplingConfig | None = None,
        max_new: int | None = None,
        *,
        constraint: Constraint | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    ) -> Completion:
        """A `Completion` for one prompt (its own sampler, detokeniser, stop matching and constraint): what a
        loop over `DecodeState` (a server's slot) feeds each step's logits with `completion.sample(logits)`.

        Args:
            prompt: the prompt's token ids (the repetition penalty covers them; a logits processor sees them).
            sampling: the request's knobs; max_new: tokens at most (default: `token_budget` of the prompt and
                sampling.max_new_tokens in the model's context; None there is what the context has room for).
            constraint: a `Constraint` (JSON schema, regex or grammar), checked here: `ConstraintError` for a bad
                one, `ExtraMissingError` without llguidance.
            logits_processor: a callable `(ids, logits) -> logits or None`, or a list of them.

        Raises:
            ContextLengthError: without max_new, the prompt and sampling.max_new_tokens do not fit the context.

        >>> constraint = Constraint(json_schema={"type": "object"})  # doctest: +SKIP
        >>> row = gen.new_completion(ids, SamplingConfig(max_new_tokens=32), constraint=constraint)  # doctest: +SKIP
        >>> piece = row.sample(state.feed(ids)[0])  # doctest: +SKIP
        """
        config = SamplingConfig() if sampling is None else sampling
        prompt = list(prompt)
        if max_new is None:
            max_new = token_budget(
                len(prompt), config.max_new_tokens, self.config.block_size, sliding_window=config.sliding_window
            )
        mask = None
        if constraint is not None:
            if not isinstance(constraint, Constraint):
                raise SamplingError(f"constraint must be a Constraint, got {type(constraint).__name__}")
            mask = self.constraint_compiler().mask(constraint)
        return Completion(
            prompt,
            self.new_sampler(config, prompt),
            config,
            self.new_decoder(),
            self.stop_ids,
            max_new,
            mask=mask,
            logits_processors=_processors(logits_processor),
        )

    def constraint_compiler(self) -> ConstraintCompiler:
        """This model's `ConstraintCompiler`, built on first use (the vocabulary as llguidance reads it: about
        50 ms for 4096 tokens, 0.5 s for 50257) and shared by every later request.

        Raises:
            ExtraMissingError: llguidance is not installed (`pip install "edgegpt[constrain]"`).
        """
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = ConstraintCompiler(self.tokenizer.to_str(), self.config.vocab_size, self.eot_id)
            return self._compiler

    def new_decoder(self) -> IncrementalDecoder:
        """A fresh incremental detokeniser (token ids in, text pieces out, never half a character)."""
        return self._decoder.fresh()

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        return check_ids(ids, self.config.vocab_size)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt of generate_batch (a text or token ids) as token ids."""
        return self.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
