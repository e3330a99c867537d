"""Tests of edgegpt.train.data: corpus discovery and reading, the token cache, the split and batches."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import edgegpt.train.data as data
from edgegpt.train.data import (
    CorpusFile,
    check_enough,
    corpus_texts_for_tokenizer,
    default_corpus_root,
    find_corpus_files,
    get_batch,
    load_token_ids,
    read_corpus,
    split_ids,
    token_dtype,
)
from edgegpt.errors import ConfigError, DataError
from edgegpt.tokenizer import encode, eot_id, train_tokenizer

DOCS = {"a.txt": "def f(x):\n    return x + 1\n", "b.txt": "naïve café 😀\n", "sub/c.txt": "print('c')\n"}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(list(DOCS.values()) * 5, vocab_size=300)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small directory: three text files, plus files a scan must ignore."""
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    for ignored in (".git/HEAD.txt", "__pycache__/x.txt", "site-packages/y.txt"):
        (root / ignored).parent.mkdir(parents=True, exist_ok=True)
        (root / ignored).write_text("ignored")
    (root / "notes.md").write_text("not matched by *.txt")
    return root


def names(files: list[CorpusFile], root: Path) -> list[str]:
    return [f.path.relative_to(root).as_posix() for f in files]


# -- discovery --------------------------------------------------------------------------------------------


def test_default_corpus_is_the_stdlib():
    files = find_corpus_files()
    root = default_corpus_root()
    rel = [f.path.relative_to(root) for f in files]
    assert len(files) > 500
    assert Path("os.py") in rel and Path("json/__init__.py") in rel
    assert all(p.suffix == ".py" and not f.explicit for p, f in zip(rel, files))
    assert not any({"site-packages", "__pycache__"} & set(p.parts) for p in rel)
    assert [f.path for f in files] == sorted(f.path for f in files)
    assert find_corpus_files() == files  # deterministic


def test_directory_scan_skips_hidden_and_excluded(corpus):
    files = find_corpus_files([corpus], glob="**/*.txt")
    assert names(files, corpus) == ["a.txt", "b.txt", "sub/c.txt"]
    assert names(find_corpus_files([corpus]), corpus) == ["a.txt", "b.txt", "notes.md", "sub/c.txt"]


def test_named_files_are_taken_as_is_and_deduplicated(corpus):
    files = find_corpus_files([corpus / "notes.md", corpus, corpus / "a.txt"], glob="**/*.txt")
    assert names(files, corpus) == ["notes.md", "a.txt", "b.txt", "sub/c.txt"]
    assert [f.explicit for f in files] == [True, False, False, False]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file or directory"):
        find_corpus_files([tmp_path / "nope.txt"])


def test_nothing_matched_says_what_was_searched(corpus):
    with pytest.raises(DataError) as info:
        find_corpus_files([corpus / "sub"], glob="**/*.rst")
    assert f"0 files matched '**/*.rst' under {corpus / 'sub'}" in str(info.value)


# -- reading ----------------------------------------------------------------------------------------------


def test_read_corpus_in_order(corpus):
    assert read_corpus(find_corpus_files([corpus], glob="**/*.txt")) == list(DOCS.values())


def test_explicit_binary_file_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x7fELF\x00\x01")
    with pytest.raises(DataError, match="NUL byte") as info:
        read_corpus([path])
    assert str(path) in str(info.value)


def test_explicit_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: is not UTF-8 \(byte 0xe9 at offset 3\)"):
        read_corpus([path])


def test_scanned_binary_files_are_skipped(corpus, caplog):
    (corpus / "blob.txt").write_bytes(b"\x00\x01\x02")
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))
    with caplog.at_level(logging.DEBUG, logger="edgegpt.train.data"):
        docs = read_corpus(find_corpus_files([corpus], glob="*.txt"))
    assert docs == [DOCS["a.txt"], DOCS["b.txt"]]
    assert "blob.txt" in caplog.text and "latin1.txt" in caplog.text


def test_all_empty_corpus_is_explained(tmp_path):
    for name in ("x.txt", "y.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"no text in the corpus: 2 file\(s\), all empty"):
        read_corpus(find_corpus_files([tmp_path]))
    (tmp_path / "z.txt").write_bytes(b"\x00")
    with pytest.raises(DataError, match=r"3 file\(s\), 2 empty, 1 binary or not UTF-8 \(skipped\)"):
        read_corpus(find_corpus_files([tmp_path]))


# -- tokenizer sample -------------------------------------------------------------------------------------


def test_tokenizer_sample_is_deterministic_and_bounded():
    docs = [f"doc {i} " * (i + 1) for i in range(100)]
    sample = corpus_texts_for_tokenizer(docs, max_chars=500)
    assert sample == corpus_texts_for_tokenizer(docs, max_chars=500)
    assert sum(map(len, sample)) == 500
    assert sample != corpus_texts_for_tokenizer(docs, max_chars=500, seed=1)
    assert corpus_texts_for_tokenizer(docs, max_chars=10**9) != docs  # shuffled
    assert sorted(corpus_texts_for_tokenizer(docs, max_chars=10**9)) == sorted(docs)
    with pytest.raises(ConfigError, match="max_chars must be a positive integer, got 0"):
        corpus_texts_for_tokenizer(docs, max_chars=0)


# -- token cache ------------------------------------------------------------------------------------------


@pytest.fixture
def count_encodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = data._encode_batch

    def counting(tokenizer, docs):
        calls.append(len(docs))
        return real(tokenizer, docs)

    monkeypatch.setattr(data, "_encode_batch", counting)
    return calls


def test_token_ids_are_documents_joined_by_eot(corpus, tok, tmp_path):
    files = find_corpus_files([corpus], glob="**/*.txt")
    ids = load_token_ids(files, tok, tmp_path / "cache")
    eot = eot_id(tok)
    expected = encode(tok, DOCS["a.txt"]) + [eot] + encode(tok, DOCS["b.txt"]) + [eot] + encode(tok, DOCS["sub/c.txt"])
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == expected


def test_cache_is_reused_and_invalidated(corpus, tok, tmp_path, count_encodes):
    files = find_corpus_files([corpus], glob="**/*.txt")
    cache = tmp_path / "cache"
    first = load_token_ids(files, tok, cache)
    assert count_encodes == [3]
    second = load_token_ids(files, tok, cache)
    assert count_encodes == [3]  # not tokenized again
    assert second.filename == first.filename and second.tolist() == first.tolist()

    (corpus / "b.txt").write_text("changed\n")  # an edited file misses the cache
    third = load_token_ids(files, tok, cache)
    assert count_encodes == [3, 3]
    assert third.filename != first.filename and third.tolist() != first.tolist()

    other_tok = train_tokenizer(["something else entirely"] * 5, vocab_size=280)  # so does another tokenizer
    load_token_ids(files, other_tok, cache)
    assert count_encodes == [3, 3, 3]
    assert sorted(p.name.endswith(".uint16.bin") for p in cache.iterdir()) == [True] * 3  # no temp files left


def test_interrupted_write_leaves_no_cache(corpus, tok, tmp_path, monkeypatch):
    def boom(tokenizer, docs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_encode_batch", boom)
    with pytest.raises(KeyboardInterrupt):
        load_token_ids([corpus / "a.txt"], tok, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# -- split, size check, batches ---------------------------------------------------------------------------


def test_split_is_deterministic_tail_views():
    ids = np.arange(1000, dtype=np.uint16)
    train, val = split_ids(ids, 0.1)
    assert len(train) == 900 and len(val) == 100 and val[0] == 900
    assert np.shares_memory(train, ids) and np.shares_memory(val, ids)
    again = split_ids(ids, 0.1)
    assert again[0].tolist() == train.tolist() and again[1].tolist() == val.tolist()
    assert len(split_ids(ids, 0.0)[1]) == 0


def test_split_moves_to_a_document_boundary():
    ids = np.array([1, 1, 1, 1, 1, 1, 1, 0, 2, 2], dtype=np.uint16)  # EOT (0) ends document 1 at index 7
    train, val = split_ids(ids, 0.5, eot=0)
    assert train.tolist() == [1, 1, 1, 1, 1, 1, 1, 0] and val.tolist() == [2, 2]
    train, val = split_ids(np.ones(10, dtype=np.uint16), 0.5, eot=0)  # no boundary: keep the plain cut
    assert len(train) == 5 and len(val) == 5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "0.1"])
def test_split_rejects_bad_fraction(bad):
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        split_ids(np.arange(10), bad)


def test_check_enough_reports_numbers():
    check_enough(np.zeros(17), block_size=16)
    with pytest.raises(DataError, match=r"validation split has 10 tokens, block_size 16 needs at least 17"):
        check_enough(np.zeros(10), block_size=16, name="validation split")


def test_get_batch_windows_and_determinism():
    ids = np.arange(50, dtype=np.uint16)
    x, y = get_batch(ids, 8, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == y.dtype == np.int64
    assert (y == x + 1).all()  # consecutive windows of arange, targets shifted by one
    assert (x[:, 0] <= 50 - 11).all()
    x2, _ = get_batch(ids, 8, 10, np.random.default_rng(0))
    x3, _ = get_batch(ids, 8, 10, np.random.default_rng(1))
    assert (x == x2).all() and not (x == x3).all()


def test_get_batch_at_minimum_length_and_too_short():
    x, y = get_batch(np.arange(11), 3, 10, np.random.default_rng(0))  # exactly block_size + 1: one window
    assert x.tolist() == [list(range(10))] * 3 and y.tolist() == [list(range(1, 11))] * 3
    with pytest.raises(DataError, match=r"has 10 tokens, block_size 10 needs at least 11"):
        get_batch(np.arange(10), 3, 10, np.random.default_rng(0))


def test_data_module_is_torch_free():
    code = "import edgegpt.train.data, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
