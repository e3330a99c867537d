"""The training corpus: finding and reading text files, the tokenized cache, the split and batches.

The default corpus is the running interpreter's standard library (`**/*.py`, ~30 MB of Python on CPython
3.11, without site-packages), so `edgegpt train` works offline with no download. Documents are tokenized
once and joined with EOT into one uint16 token stream cached as a `.bin` (a memmap, as in nanoGPT's
prepare.py); the first 90% trains, the last 10% validates; batches are random windows of the stream.

numpy only: the trainer converts batches to torch. Reference: Karpathy's nanoGPT (data/*/prepare.py, train.py).
"""

from __future__ import annotations

import hashlib
import logging
import random
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgegpt.errors import ConfigError, DataError, StorageError
from edgegpt.files import atomic_write, storage_errors
from edgegpt.tokenizer import eot_id

__all__ = [
    "CorpusFile",
    "check_enough",
    "corpus_texts_for_tokenizer",
    "default_corpus_root",
    "find_corpus_files",
    "get_batch",
    "load_token_ids",
    "read_corpus",
    "split_ids",
    "token_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_GLOB = "**/*"  # for directories the user passes
DEFAULT_CORPUS_GLOB = "**/*.py"  # for the default corpus, the standard library
# Never searched inside a directory: installed packages, bytecode, and hidden entries such as .git.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
BINARY_SNIFF_BYTES = 8192
CACHE_FORMAT = "edgegpt-tokens-v1"  # bump when the stream layout changes, to invalidate old caches


@dataclass(frozen=True)
class CorpusFile:
    """One corpus file. `explicit` files were named by the user: a binary one is an error, not skipped."""

    path: Path
    explicit: bool = True


def default_corpus_root() -> Path:
    """The standard library directory of the running interpreter.

    >>> (default_corpus_root() / "os.py").is_file()
    True
    """
    return Path(sysconfig.get_paths()["stdlib"])


def find_corpus_files(paths: Sequence[str | Path] = (), glob: str | None = None) -> list[CorpusFile]:
    """List corpus files, sorted and de-duplicated.

    Files named in `paths` are taken as they are (explicit). Directories are searched with `glob`
    (default "**/*"), skipping hidden entries, `__pycache__`, `site-packages` and `dist-packages`.
    With no `paths`, the corpus is the interpreter's standard library with `glob` default "**/*.py".

    Args:
        paths: files and directories; empty for the default corpus.
        glob: pattern relative to each directory, e.g. "**/*.txt".

    Returns:
        The files in the order of `paths`, each directory's matches sorted by path.

    Raises:
        DataError: a path does not exist, or nothing matched.

    >>> files = find_corpus_files()
    >>> any(f.path.name == "os.py" for f in files), files[0].explicit
    (True, False)
    """
    if paths:
        roots, pattern = [Path(p) for p in paths], glob or DEFAULT_GLOB
    else:
        roots, pattern = [default_corpus_root()], glob or DEFAULT_CORPUS_GLOB
    found: list[CorpusFile] = []
    searched: list[str] = []
    for root in roots:
        if root.is_file():
            found.append(CorpusFile(root, explicit=True))
        elif root.is_dir():
            searched.append(str(root))
            found.extend(CorpusFile(p, explicit=False) for p in _scan(root, pattern))
        else:
            raise DataError(f"{root}: no such file or directory; pass existing corpus files or directories")
    unique, seen = [], set()
    for f in found:  # a file named twice, or both named and scanned, is read once (its first mention)
        if f.path.resolve() not in seen:
            seen.add(f.path.resolve())
            unique.append(f)
    if not unique:
        raise DataError(f"0 files matched {pattern!r} under {', '.join(searched)}; pass text files or a different glob")
    return unique


def _scan(root: Path, pattern: str) -> list[Path]:
    """Files under `root` matching `pattern`, without hidden or excluded directories, sorted."""
    hits = []
    for path in root.glob(pattern):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in EXCLUDED_DIRS for p in parts) or not path.is_file():
            continue
        hits.append(path)
    return sorted(hits)


def _read_text(file: CorpusFile) -> str | None:
    """The file's text; None (logged) for a binary or non-UTF-8 scanned file, DataError for an explicit one."""
    try:
        data = file.path.read_bytes()
    except OSError as exc:
        raise DataError(f"{file.path}: cannot read ({exc.strerror}); check its permissions") from exc
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        reason = "looks binary (NUL byte in its first 8 KB)"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"is not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})"
    if file.explicit:
        raise DataError(f"{file.path}: {reason}; pass UTF-8 text files only, or convert it with iconv")
    logger.debug("skipping %s: %s", file.path, reason)
    return None


def read_corpus(files: Sequence[CorpusFile | str | Path]) -> list[str]:
    """Read the documents of `files` in order, dropping empty ones.

    Plain paths count as explicit: a binary or non-UTF-8 one raises. Scanned files
    (`CorpusFile(explicit=False)`, from a directory) are skipped instead and logged at debug level.

    Returns:
        One string per non-empty file.

    Raises:
        DataError: an explicit file is binary, unreadable or not UTF-8; or no file held any text.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"; _ = p.write_text("hello")
    >>> read_corpus([p])
    ['hello']
    """
    files = [_as_corpus_file(f) for f in files]
    texts = [_read_text(f) for f in files]
    docs = [t for t in texts if t]
    if not docs:
        skipped = sum(t is None for t in texts)
        detail = f"{len(files) - skipped} empty, {skipped} binary or not UTF-8 (skipped)" if skipped else "all empty"
        raise DataError(f"no text in the corpus: {len(files)} file(s), {detail}; pass non-empty UTF-8 text files")
    return docs


def _as_corpus_file(file: CorpusFile | str | Path) -> CorpusFile:
    return file if isinstance(file, CorpusFile) else CorpusFile(Path(file), explicit=True)


def corpus_texts_for_tokenizer(docs: Sequence[str], max_chars: int = 4_000_000, seed: int = 0) -> list[str]:
    """A deterministic sample of about `max_chars` characters of `docs`, to train the BPE quickly.

    Whole documents are taken in a seeded random order (so every part of the corpus is represented, not
    just the alphabetically first files); the last one is cut to fit. On the default corpus the sample
    trains several times faster than the whole corpus, at the cost of only slightly more tokens for the
    whole corpus (measurements: docs/design.md, "9. Training data").

    Raises:
        ConfigError: `max_chars` is not positive.

    >>> corpus_texts_for_tokenizer(["abcd", "ef", "ghij"], max_chars=5)
    ['abcd', 'g']
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise ConfigError(f"max_chars must be a positive integer, got {max_chars!r}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sample, used = [], 0
    for i in order:
        if used >= max_chars:
            break
        text = docs[i][: max_chars - used]
        sample.append(text)
        used += len(text)
    return sample


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32.

    >>> token_dtype(4096), token_dtype(70_000)
    (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def load_token_ids(files: Sequence[CorpusFile | str | Path], tokenizer: Tokenizer, cache_dir: str | Path) -> np.memmap:
    """The token ids of all documents joined by EOT, tokenized once and cached in `cache_dir`.

    The cache key is a sha256 over the documents' contents (not paths or mtimes: a moved corpus still
    hits, an edited file misses), the tokenizer's JSON and the dtype; the file is
    `cache_dir/tokens-<key>.<dtype>.bin`, written atomically. A cache hit costs only reading and hashing
    the documents, far less than tokenizing them (measurements: docs/design.md, "9. Training data").

    Args:
        files: as for `read_corpus` (scanned binary files are skipped, explicit ones raise).
        tokenizer: a tokenizer from `edgegpt.tokenizer` (it must have EOT).
        cache_dir: created if missing.

    Returns:
        A read-only 1-D memmap of uint16 ids (uint32 for vocabularies over 65536).

    Raises:
        DataError: as for `read_corpus`, or the tokenizer lacks EOT.
        StorageError: the cache cannot be written (disk full...); the message names the file and the free space.

    >>> import tempfile, pathlib
    >>> from edgegpt.tokenizer import train_tokenizer
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("ab"); _ = (d / "b.txt").write_text("c")
    >>> load_token_ids([d / "a.txt", d / "b.txt"], train_tokenizer(["ab c"], vocab_size=257), d).tolist()
    [65, 66, 0, 67]
    """
    docs = read_corpus(files)
    eot = eot_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{dtype.name}\0".encode())
    key.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    key.update(b"\1" if getattr(tokenizer, "encode_special_tokens", False) else b"\0")
    for doc in docs:
        data = doc.encode("utf-8")
        key.update(len(data).to_bytes(8, "little"))
        key.update(hashlib.sha256(data).digest())
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokens-{key.hexdigest()[:32]}.{dtype.name}.bin"
    if path.is_file() and path.stat().st_size > 0 and path.stat().st_size % dtype.itemsize == 0:
        logger.debug("token cache hit: %s", path)
        return np.memmap(path, dtype=dtype, mode="r")
    try:
        with storage_errors(cache_dir):
            cache_dir.mkdir(parents=True, exist_ok=True)
        _write_tokens(path, docs, tokenizer, eot, dtype)
    except StorageError as exc:
        raise StorageError(f"{exc}; the token cache can be elsewhere: --cache-dir DIR (or XDG_CACHE_HOME)") from exc
    return np.memmap(path, dtype=dtype, mode="r")


def _encode_batch(tokenizer: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, in parallel; `encode_batch_fast` (no offsets) is used where present (faster)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(docs, add_special_tokens=False)]


def _write_tokens(
    path: Path, docs: list[str], tokenizer: Tokenizer, eot: int, dtype: np.dtype, chunk: int = 256
) -> None:
    """Tokenize `docs` chunk by chunk (bounded memory) into a temp file beside `path`, then rename it."""
    with atomic_write(path, "wb") as f:
        for start in range(0, len(docs), chunk):
            ids: list[int] = []
            for i, doc_ids in enumerate(_encode_batch(tokenizer, docs[start : start + chunk]), start):
                if i:
                    ids.append(eot)  # EOT between documents, not after the last
                ids.extend(doc_ids)
            np.asarray(ids, dtype=dtype).tofile(f)
    logger.info("tokenized %d documents into %s", len(docs), path)


def split_ids(ids: np.ndarray, val_fraction: float = 0.1, *, eot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split the token stream into (train, val) views: val is the last `val_fraction` of the tokens.

    Deterministic and contiguous, as in nanoGPT (first 90% / last 10%). With `eot`, the cut moves forward
    to just after the next EOT, so no document is split between the two (unless that empties val).

    Raises:
        ConfigError: `val_fraction` is not in [0, 1).

    >>> train, val = split_ids(np.arange(10), 0.3)
    >>> train.tolist(), val.tolist()
    ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
    """
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}; 0.1 keeps 10% for validation")
    cut = len(ids) - int(round(len(ids) * val_fraction))
    if eot is not None and 0 < cut < len(ids):
        after = np.flatnonzero(ids[cut - 1 :] == eot)  # an EOT at cut - 1 already ends a document
        if after.size and cut + after[0] < len(ids):
            cut += int(after[0])
    return ids[:cut], ids[cut:]


def check_enough(ids: np.ndarray, block_size: int, name: str = "token stream") -> None:
    """Raise DataError unless `ids` holds at least `block_size + 1` tokens (one input window + its target).

    >>> check_enough(np.zeros(17), block_size=16)
    """
    needed = block_size + 1
    if len(ids) < needed:
        raise DataError(
            f"{name} has {len(ids)} tokens, block_size {block_size} needs at least {needed}; "
            "add text to the corpus, lower block_size or lower val_fraction"
        )


def get_batch(
    ids: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of windows: x (B, T) int64 and y (B, T) int64, y being x shifted by one token.

    Deterministic given the state of `rng`.

    Raises:
        DataError: `ids` is shorter than `block_size + 1`.

    >>> x, y = get_batch(np.arange(100), 4, 8, np.random.default_rng(0))
    >>> x.shape, y.dtype, bool((y[:, :-1] == x[:, 1:]).all())
    ((4, 8), dtype('int64'), True)
    """
    check_enough(ids, block_size)
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # (B,), last start is len - T - 1
    window = np.asarray(ids[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T + 1)
    return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])  # (B, T), (B, T)
