"""Constrained decoding: a JSON schema, a regular expression or a grammar turned into per-step token masks.

A `Constraint` says what one row's text must be. `ConstraintCompiler` (one per `Generator`, on first use)
holds the tokenizer's vocabulary in the library's form, checks a constraint before any model call and makes
a `TokenMask` per row. The row's `Completion` asks the mask for the logits of every step (tokens the
constraint forbids at -inf, end-of-text included until the text may end there) and feeds it every token it
adds. So every sampler (greedy, temperature, top-k/p, min-p, penalties, logit_bias) only ever sees allowed
tokens, and a text cut by max_new_tokens is a valid prefix.

The library is llguidance (guidance-ai; onnxruntime-genai and llama.cpp use it), an optional extra
(`pip install "edgegpt[constrain]"`), imported only here and only when a constraint is asked for: torch-free,
it reads JSON schemas, regexes and Lark (or GBNF) grammars and a tokenizer.json as it is. Why this library and
not another, and why the mask is computed on the decoding thread: docs/design.md, "Constrained decoding".

JSON is generated compact (no whitespace between tokens: llguidance's `whitespace_flexible` off), which
suits small models that would otherwise pad with spaces; a schema's own "x-guidance" key can change it.
References: llguidance (github.com/guidance-ai/llguidance, docs/syntax.md, docs/json_schema.md); Willard &
Louf 2023, "Efficient Guided Generation for Large Language Models" (masks from a grammar and a vocabulary).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgegpt.errors import ConstraintError, ExtraMissingError

__all__ = ["EXTRA", "Constraint", "ConstraintCompiler", "TokenMask", "row_constraints"]

EXTRA = 'pip install "edgegpt[constrain]"'
_JSON_OPTIONS = {"whitespace_flexible": False}
_ECHO = re.compile(r"^(\^+|\d+ \|.*)$")  # llguidance's echo of the grammar line and its caret marks


@dataclass(frozen=True)
class Constraint:
    """What one row's text must be: exactly one of a JSON schema, a regular expression or a grammar.

    Attributes:
        json_schema: a JSON schema (a dict, or its JSON text); {"type": "object"} is any JSON object.
        regex: a regular expression the whole text must match (Rust `regex` syntax: no look-around or
            back-references).
        grammar: a Lark grammar (llguidance's dialect, `start` is the top rule) or a GBNF one (llama.cpp's,
            `root ::= ...`).

    >>> Constraint(regex="[0-9]+").kind
    'regex'
    >>> Constraint(regex="a", grammar="start: 'a'")
    Traceback (most recent call last):
    ...
    edgegpt.errors.ConstraintError: give one of json_schema, regex or grammar per row, got regex and grammar
    """

    json_schema: Any = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ConstraintError(f"give one of json_schema, regex or grammar per row, got {got}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ConstraintError(f"regex must be a str, got {type(self.regex).__name__}")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar.strip()):
            raise ConstraintError(f"grammar must be the grammar's text (Lark or GBNF), got {self.grammar!r:.60}")
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ConstraintError(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ConstraintError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
            try:
                json.dumps(schema)
            except (TypeError, ValueError) as exc:
                raise ConstraintError(
                    f"json_schema must be JSON data (dicts, lists, strings, numbers): {exc}"
                ) from None

    @property
    def kind(self) -> str:
        return "json_schema" if self.json_schema is not None else "regex" if self.regex is not None else "grammar"

    def source(self) -> str:
        """The constraint as text (a schema as canonical JSON): the compiler's cache key."""
        if self.json_schema is None:
            return self.regex if self.regex is not None else self.grammar
        schema = json.loads(self.json_schema) if isinstance(self.json_schema, str) else self.json_schema
        return json.dumps(schema, sort_keys=True)


def row_constraints(
    rows: int, json_schema: Any = None, regex: Any = None, grammar: Any = None
) -> list[Constraint | None]:
    """One `Constraint` (or None: a free row) per row, from `generate_batch`'s keywords.

    Each keyword is one value for every row or a list with one entry per row (None where that row is free).

    >>> [c and c.kind for c in row_constraints(3, json_schema=[{"type": "object"}, None, None], regex=[None, "a+", None])]
    ['json_schema', 'regex', None]
    """
    columns = {}
    for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)):
        if isinstance(value, (list, tuple)):
            if len(value) != rows:
                raise ConstraintError(
                    f"{name} has {len(value)} entries for {rows} prompts; give one per prompt (None: free)"
                )
            columns[name] = list(value)
        else:
            columns[name] = [value] * rows
    out = []
    for b in range(rows):
        kw = {name: column[b] for name, column in columns.items() if column[b] is not None}
        out.append(Constraint(**kw) if kw else None)
    return out


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines()]
    return "; ".join(line for line in lines if line and not _ECHO.match(line))


class ConstraintCompiler:
    """A tokenizer's vocabulary in llguidance's form; checks constraints and makes per-row `TokenMask`s.

    Args:
        tokenizer_json: the tokenizer's JSON text (`tokenizers.Tokenizer.to_str()`).
        vocab_size: the model's logits width (ids past the tokenizer's are never allowed).
        eot_id: the end-of-text token: allowed only where the constraint accepts the text as it is.

    Raises:
        ExtraMissingError: llguidance is not installed (the message names the extra).
        ConstraintError: llguidance cannot read the tokenizer (its reason).

    >>> masks = ConstraintCompiler(gen.tokenizer.to_str(), gen.config.vocab_size, gen.eot_id)  # doctest: +SKIP
    >>> mask = masks.mask(Constraint(regex="(yes|no)"))  # doctest: +SKIP
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eot_id: int):
        try:
            import llguidance
        except ImportError:
            raise ExtraMissingError(
                f"constrained generation (a JSON schema, regex or grammar) needs llguidance; install it: {EXTRA}",
                name="llguidance",
            ) from None
        self.llguidance, self.vocab_size = llguidance, vocab_size
        try:
            self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eot_id)
        except ValueError as exc:  # a tokenizer.json llguidance cannot map to bytes
            raise ConstraintError(f"llguidance cannot read this model's tokenizer: {_one_line(str(exc))}") from None
        self._grammars: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def grammar(self, constraint: Constraint) -> str:
        """The constraint as an llguidance grammar, checked; ConstraintError with the library's reason if bad."""
        key = (constraint.kind, constraint.source())
        with self._lock:
            cached = self._grammars.get(key)
        if cached is not None:
            return cached
        llg = self.llguidance
        try:
            if constraint.kind == "json_schema":
                grammar = llg.LLMatcher.grammar_from_json_schema(key[1], defaults=_JSON_OPTIONS)
            elif constraint.kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(key[1])
            else:
                grammar = llg.grammar_from("grammar", key[1])  # Lark, or GBNF converted to Lark
        except ValueError as exc:
            raise ConstraintError(f"{constraint.kind} refused: {_one_line(str(exc))}") from None
        error = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ConstraintError(f"{constraint.kind} refused: {_one_line(error)}")
        with self._lock:
            if len(self._grammars) >= 256:  # a server sees many schemas: keep the recent ones
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = grammar
        return grammar

    def mask(self, constraint: Constraint) -> "TokenMask":
        """A fresh `TokenMask` at the start of the text (ConstraintError for a bad constraint)."""
        matcher = self.llguidance.LLMatcher(self.tokenizer, self.grammar(constraint), log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"{constraint.kind} refused: {_one_line(matcher.get_error())}")
        return TokenMask(matcher, self.vocab_size, constraint)


class TokenMask:
    """One row's matcher: which tokens may come next, advanced by every token the row adds.

    Not thread-safe: it belongs to one `Completion`.
    """

    def __init__(self, matcher, vocab_size: int, constraint: Constraint):
        self.matcher, self.vocab_size, self.constraint = matcher, vocab_size, constraint
        self.bitmask = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)  # one bit per token id
        self.neg_inf = np.full(vocab_size, -np.inf, dtype=np.float32)
        self.last_allowed: np.ndarray | None = None  # the mask `apply` used last

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens that may come next (end-of-text only where the text may end)."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)  # releases the GIL
        return np.unpackbits(self.bitmask.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """(V,) logits -> a new float32 array with every token the constraint forbids at -inf."""
        self.last_allowed = self.allowed()
        return np.where(self.last_allowed, logits, self.neg_inf)

    def check(self, token: int) -> None:
        """ConstraintError if the sampler picked a token the last mask forbids: every allowed one was at -inf."""
        if self.last_allowed is not None and not self.last_allowed[token]:
            raise ConstraintError(
                f"every token the {self.constraint.kind} allows here has a logit of -inf (a logit_bias or a "
                f"logits_processor banned them all); the sampler fell back on token {token}, which it forbids"
            )

    def consume(self, token: int) -> None:
        """Advance past a token the row added; ConstraintError if the constraint forbids it."""
        if not self.matcher.consume_token(token):
            raise ConstraintError(
                f"token {token} breaks the {self.constraint.kind} constraint (a logit_bias or logits_processor that "
                f"banned every allowed token, or a token added without the mask): {_one_line(self.matcher.get_error())}"
            )

    @property
    def stopped(self) -> bool:
        """The text is complete: the constraint allows nothing more but end-of-text."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text may end here."""
        return self.matcher.is_accepting()
