"""The tokenizer: byte-level BPE (GPT-2 style) trained with HF `tokenizers`, saved as a `tokenizer.json`.

Every byte is in the initial alphabet, so any UTF-8 text encodes and decodes back unchanged; one special
token, `EOT` ("<|endoftext|>"), separates documents. `IncrementalDecoder` turns ids generated one at a time
into text pieces that never split a multi-byte character.

Torch-free on purpose: the on-device runtime imports this module (stdlib + `tokenizers` only).
References: Radford et al. 2019 (GPT-2, byte-level BPE); Sennrich et al. 2016 (BPE); Karpathy's minbpe.
"""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgegpt.errors import ConfigError, DataError

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "EOT",
    "MIN_VOCAB_SIZE",
    "TOKENIZER_CONFIG",
    "IncrementalDecoder",
    "chat_template_of",
    "decode",
    "encode",
    "eot_id",
    "load_tokenizer",
    "read_tokenizer_config",
    "train_tokenizer",
]

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# Hugging Face's files beside tokenizer.json: the tokenizer's settings, where a model's chat_template lives,
# and the template on its own (what newer transformers releases save).
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# 256 single-byte tokens + EOT: the smallest vocabulary that still encodes every byte.
MIN_VOCAB_SIZE = 257


def read_tokenizer_config(folder: str | Path) -> dict:
    """`folder`'s tokenizer_config.json as a dict ({} when there is none); DataError when it is not a JSON object."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def chat_template_of(config: dict) -> str | None:
    """The Jinja chat template of a tokenizer_config dict, as transformers reads it: a string, or the "default"
    entry of the named-templates list; None when it has none. DataError for any other form.

    >>> chat_template_of({"chat_template": [{"name": "default", "template": "{{ messages }}"}]})
    '{{ messages }}'
    """
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
        if template is None:
            raise DataError("chat_template is a list without a 'default' entry")
    if template is not None and not isinstance(template, str):
        raise DataError("chat_template must be a Jinja string (or a list with a 'default' entry)")
    return template


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `EOT` as its only special token (id 0).

    The result may hold fewer than `vocab_size` tokens when the texts run out of merges; size the model
    with `tok.get_vocab_size()`. Save it with `tok.save("tokenizer.json")`. Training is deterministic.

    Args:
        texts: the training documents (any iterable, read once).
        vocab_size: the largest vocabulary, at least `MIN_VOCAB_SIZE` (256 bytes + EOT).

    Returns:
        The trained `tokenizers.Tokenizer`.

    Raises:
        ConfigError: `vocab_size` is not an integer >= 257.
        DataError: `texts` held no non-empty text.

    >>> tok = train_tokenizer(["def add(a, b):\\n    return a + b\\n"] * 10, vocab_size=300)
    >>> decode(tok, encode(tok, "return a + b")), eot_id(tok)
    ('return a + b', 0)
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 byte tokens + {EOT}), got {vocab_size!r}; "
            "4096 suits a small code corpus"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the texts or not
        show_progress=False,
    )
    seen = [0]

    def non_empty() -> Iterator[str]:
        for text in texts:
            if text:
                seen[0] += 1
                yield text

    tok.train_from_iterator(non_empty(), trainer=trainer)
    if not seen[0]:
        raise DataError(
            "train_tokenizer got no non-empty text; pass the corpus documents (edgegpt.train.data.read_corpus)"
        )
    return tok


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> Tokenizer:
    """Load a `tokenizer.json`, given as the file or as the directory (checkpoint, bundle) that holds it.

    Args:
        path: the file, or the directory that holds `tokenizer.json`.
        vocab_size: the model's vocabulary size, which the tokenizer's must equal; None skips that check.

    Raises:
        DataError: the file is missing, is not a valid tokenizer JSON, or has another vocabulary size than
            `vocab_size`; the message names the path.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); train_tokenizer(["abc abd"], vocab_size=260).save(os.path.join(d, "tokenizer.json"))
    >>> load_tokenizer(d).get_vocab_size() >= 257
    True
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"{file}: no tokenizer file; pass the {TOKENIZER_FILE} saved with the checkpoint or bundle, "
            "or train one with edgegpt.tokenizer.train_tokenizer(...).save(path)"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON or an unknown model
        raise DataError(
            f"{file}: not a valid tokenizer.json ({exc}); re-save it with Tokenizer.save() or retrain it"
        ) from exc
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise DataError(
            f"{file}: the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is {vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    return tok


def eot_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token `EOT`.

    Raises:
        DataError: the tokenizer has no `EOT` token (it was not made by `train_tokenizer`).

    >>> eot_id(train_tokenizer(["hello world"], vocab_size=260))
    0
    """
    token_id = tok.token_to_id(EOT)
    if token_id is None:
        raise DataError(f"tokenizer has no {EOT!r} token; train it with edgegpt.tokenizer.train_tokenizer")
    return token_id


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added around it.

    A literal "<|endoftext|>" inside `text` becomes the EOT id (as in GPT-2's HF tokenizer); decoding gives
    the same text back either way.

    >>> tok = train_tokenizer(["aaa"], vocab_size=260)
    >>> len(encode(tok, "")), decode(tok, encode(tok, "é\\t😀"))
    (0, 'é\\t😀')
    """
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """The text of `ids`; special tokens are kept, so `decode(tok, encode(tok, s)) == s` for any string.

    Invalid UTF-8 byte runs (possible in sampled ids) become U+FFFD, one per maximal invalid run.

    Raises:
        ConfigError: an id is outside the vocabulary (a model whose vocab_size exceeds the tokenizer's).

    >>> tok = train_tokenizer(["aaa"], vocab_size=260)
    >>> decode(tok, [eot_id(tok)])
    '<|endoftext|>'
    """
    ids = [int(i) for i in ids]
    if ids:
        _check_ids(ids, tok.get_vocab_size())
    return tok.decode(ids, skip_special_tokens=False)


def _check_ids(ids: list[int], vocab_size: int) -> None:
    """Raise ConfigError for the first id outside [0, vocab_size)."""
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ConfigError(
            f"token id {bad} is outside the tokenizer's vocabulary (0..{vocab_size - 1}); "
            f"the model's vocab_size must equal the tokenizer's {vocab_size}"
        )


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted: the character a byte-level token uses -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


def _token_bytes(tok: Tokenizer) -> list[bytes]:
    """The raw bytes of every token id (special tokens: their UTF-8 text), indexed by id."""
    u2b = _unicode_to_byte()
    special = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    table: list[bytes | None] = [None] * tok.get_vocab_size()
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in special:
            table[i] = special[i].encode("utf-8")
        elif all(c in u2b for c in token):
            table[i] = bytes(u2b[c] for c in token)
        else:
            raise DataError(f"token {token!r} (id {i}) is not byte-level BPE; train the tokenizer with train_tokenizer")
    missing = [i for i, b in enumerate(table) if b is None]
    if missing:
        raise DataError(f"tokenizer vocabulary has no token for id(s) {missing[:5]}; retrain it with train_tokenizer")
    return table  # type: ignore[return-value]


class IncrementalDecoder:
    """Token ids in, one at a time -> text pieces that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a character (an emoji is often two tokens), so bytes are
    held back until they complete a character. The pieces joined, plus `flush()`, equal `decode(tok, ids)`.

    Done by hand rather than with `tokenizers.decoders.DecodeStream` (present in tokenizers 0.23): that
    one has no flush, so a stream cut mid-character (max_new_tokens) loses its last bytes; it holds back
    any piece that genuinely ends in U+FFFD; older releases that pyproject allows (>=0.19) lack it; and it
    is slower per token (measurements: docs/design.md, "8. The decoding engine"). Here each id maps to its
    bytes once, then Python's incremental UTF-8 decoder (errors="replace": the same U+FFFD rule as `decode`)
    does the rest.

    >>> tok = train_tokenizer(["no merges at vocab_size 257"], vocab_size=257)  # one token per byte
    >>> dec = IncrementalDecoder(tok)
    >>> [dec.step(i) for i in encode(tok, "a😀")] + [dec.flush()]
    ['a', '', '', '', '😀', '']
    """

    def __init__(self, tok: Tokenizer):
        self._bytes = _token_bytes(tok)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def fresh(self) -> "IncrementalDecoder":
        """A new decoder with no held-back bytes that shares this one's id -> bytes table (no rebuild)."""
        new = object.__new__(IncrementalDecoder)
        new._bytes, new._utf8 = self._bytes, codecs.getincrementaldecoder("utf-8")(errors="replace")
        return new

    def step(self, token_id: int) -> str:
        """Feed one id; return the newly completed text ("" while a character is still incomplete)."""
        if not 0 <= token_id < len(self._bytes):
            _check_ids([int(token_id)], len(self._bytes))
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        """End the stream: held-back bytes of an unfinished character come out as U+FFFD; then reset."""
        return self._utf8.decode(b"", final=True)
