"""Tests of edgegpt.tokenizer: lossless round trips on random Unicode, streaming decode, errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from edgegpt.errors import ConfigError, DataError
from edgegpt.tokenizer import (
    EOT,
    IncrementalDecoder,
    decode,
    encode,
    eot_id,
    load_tokenizer,
    train_tokenizer,
)

# (low, high) code point ranges, drawn from with equal weight: ASCII, Latin-1, combining marks, Greek,
# Cyrillic, CJK, Hangul, emoji, astral symbols, whitespace; plus any scalar value at all.
RANGES = [
    (0x20, 0x7E),
    (0xA0, 0xFF),
    (0x300, 0x36F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x10FFFF),
]
WHITESPACE = "\n\t\r \u00a0\u2028"
SPECIAL_SNIPPETS = ["👩\u200d💻", "e\u0301", "🇫🇷", "\ufeff", "<|endoftext|>", "\x00", "\r\n"]


def random_text(rng: random.Random, max_len: int = 120) -> str:
    """Random Unicode text without surrogates or U+FFFD."""
    out = []
    for _ in range(rng.randrange(max_len + 1)):
        kind = rng.random()
        if kind < 0.1:
            out.append(rng.choice(WHITESPACE))
        elif kind < 0.15:
            out.append(rng.choice(SPECIAL_SNIPPETS))
        elif kind < 0.2:
            cp = rng.randrange(0x110000)
            out.append(chr(cp) if not (0xD800 <= cp <= 0xDFFF or cp == 0xFFFD) else "x")
        else:
            out.append(chr(rng.randint(*rng.choice(RANGES))))
    return "".join(out)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(0)
    corpus = [random_text(rng, 300) for _ in range(200)] + ["def main(argv):\n    return 0\n"] * 50
    return train_tokenizer(corpus, vocab_size=512)


def test_train_fills_vocab_and_puts_eot_first(tok):
    assert tok.get_vocab_size() == 512
    assert eot_id(tok) == 0
    assert decode(tok, [0]) == EOT


def test_every_byte_is_a_token(tok):
    text = "".join(chr(b) for b in range(256))  # code points 0..255: 384 UTF-8 bytes covering many byte values
    assert decode(tok, encode(tok, text)) == text
    # Bytes never seen in training (0xF4 starts plane-16 characters) still encode.
    assert decode(tok, encode(tok, "\U0010fffd")) == "\U0010fffd"


def test_roundtrip_is_lossless_on_random_unicode(tok):
    rng = random.Random(1)
    texts = ["", " ", "\n\n\t", EOT, EOT + EOT + "x", "".join(SPECIAL_SNIPPETS)]
    texts += [random_text(rng) for _ in range(400)]
    for text in texts:
        assert decode(tok, encode(tok, text)) == text, repr(text)


def test_encode_adds_nothing(tok):
    assert encode(tok, "") == []
    assert encode(tok, EOT) == [eot_id(tok)]  # GPT-2 convention: the literal marker is the special token


def test_training_is_deterministic():
    texts = ["alpha beta gamma", "beta gamma delta", "δέλτα 😀 😀"] * 20
    assert train_tokenizer(texts, vocab_size=300).to_str() == train_tokenizer(texts, vocab_size=300).to_str()


@pytest.mark.parametrize("bad", [0, 256, True, 4096.0, "4096"])
def test_train_rejects_bad_vocab_size(bad):
    with pytest.raises(ConfigError, match=r"vocab_size must be an integer >= 257") as info:
        train_tokenizer(["abc"], vocab_size=bad)
    assert repr(bad) in str(info.value)


def test_train_rejects_empty_texts():
    with pytest.raises(DataError, match="no non-empty text"):
        train_tokenizer(iter(["", ""]), vocab_size=300)


def test_save_and_load_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        loaded = load_tokenizer(where)
        assert loaded.to_str() == tok.to_str()
        assert encode(loaded, "héllo 😀") == encode(tok, "héllo 😀")


def test_load_checks_the_vocabulary_size_against_the_model(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path, vocab_size=tok.get_vocab_size()).to_str() == tok.to_str()
    with pytest.raises(DataError, match=f"has {tok.get_vocab_size()} tokens but the model's vocab_size is 64") as info:
        load_tokenizer(tmp_path, vocab_size=64)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(DataError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    assert "train_tokenizer" in str(info.value)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"model": {"type": "Nonsense"}})])
def test_load_invalid_file_names_path(tmp_path, content):
    path = tmp_path / "tok.json"
    path.write_text(content)
    with pytest.raises(DataError, match="not a valid tokenizer.json") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_eot_id_missing():
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(DataError, match=r"no '<\|endoftext\|>' token"):
        eot_id(bare)


def test_out_of_range_ids_are_refused(tok):
    with pytest.raises(ConfigError, match=r"token id 512 is outside .*0\.\.511.*vocab_size must equal .*512"):
        decode(tok, [1, 512])
    with pytest.raises(ConfigError, match=r"token id -1"):
        decode(tok, [-1])
    with pytest.raises(ConfigError, match=r"token id 9999"):
        IncrementalDecoder(tok).step(9999)


def stream(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [dec.step(i) for i in ids] + [dec.flush()]


def test_stream_never_splits_characters(tok):
    rng = random.Random(2)
    dec = IncrementalDecoder(tok)
    held_back = 0
    for _ in range(300):
        text = random_text(rng)
        ids = encode(tok, text)
        pieces = stream(dec, ids)
        assert all("\ufffd" not in p for p in pieces), (text, pieces)
        assert "".join(pieces) == decode(tok, ids) == text
        held_back += pieces.count("") - 1
    assert held_back > 100  # multi-token characters really occurred and were held back


def test_stream_matches_decode_on_arbitrary_ids(tok):
    """Sampled ids may form invalid UTF-8; the stream must still agree with decode, U+FFFD for U+FFFD."""
    rng = random.Random(3)
    dec = IncrementalDecoder(tok)
    for _ in range(2000):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(12))]
        assert "".join(stream(dec, ids)) == decode(tok, ids), ids


def test_stream_cut_mid_character_flushes_replacement():
    tok = train_tokenizer(["plain ascii only"], vocab_size=257)  # no merges: one token per byte
    ids = encode(tok, "a😀")
    assert len(ids) == 5
    dec = IncrementalDecoder(tok)
    pieces = [dec.step(i) for i in ids[:3]]
    assert pieces == ["a", "", ""]
    assert dec.flush() == "\ufffd"
    assert "".join(pieces) + "\ufffd" == decode(tok, ids[:3])
    assert [dec.step(i) for i in ids] == ["a", "", "", "", "😀"]  # flush left the decoder clean


def test_fresh_decoder_shares_table_not_state(tok):
    dec = IncrementalDecoder(tok)
    emoji = encode(tok, "😀")
    for i in emoji[:-1]:
        dec.step(i)
    other = dec.fresh()
    assert other._bytes is dec._bytes
    assert "".join(stream(other, encode(tok, "ok"))) == "ok"
    assert len(emoji) > 1 and dec.step(emoji[-1]) == "😀"  # the first stream's state is untouched


def test_tokenizer_module_is_torch_free():
    code = "import edgegpt.tokenizer, sys; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
