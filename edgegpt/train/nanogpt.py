"""Bring your own checkpoint: a nanoGPT `ckpt.pt` -> an edgegpt checkpoint directory (`import_nanogpt`).

nanoGPT's train.py saves `torch.save({"model": state_dict, "optimizer": ..., "model_args": {n_layer, n_head,
n_embd, block_size, bias, vocab_size, dropout}, "iter_num": ..., "best_val_loss": ..., "config": {...}})`.
The file is read only through `torch.load(weights_only=True)`: tensors, numbers, strings and containers.
Anything else (a class, a function) is refused as possibly hostile, never unpickled. nanoGPT's model is
SimpleGPT's math with the exact erf GELU (`nn.GELU()`), so the import sets `gelu="erf"`; its projections
are `nn.Linear`, so the mapping is a renaming with no transpose:

    edgegpt (SimpleGPT)           nanoGPT (GPT)
    tok_emb, pos_emb              transformer.wte, transformer.wpe
    blocks.{i}.ln_1, ln_2         transformer.h.{i}.ln_1, ln_2
    blocks.{i}.attn.qkv, proj     transformer.h.{i}.attn.c_attn, attn.c_proj
    blocks.{i}.ffn.fc, proj       transformer.h.{i}.mlp.c_fc, mlp.c_proj
    ln_f                          transformer.ln_f
    lm_head (tied to tok_emb)     lm_head (tied to wte; equal if stored)

Keys may carry the `_orig_mod.` prefix of a `torch.compile`d model (nanoGPT #325). `attn.bias`, the causal
mask buffer of nanoGPT versions without flash attention, is not a weight and is skipped. With bias=False
the LayerNorms and Linears have no bias tensors. Every other missing or unexpected tensor is refused by name.

Tokenizers (`tokenizer=`), each turned into a `tokenizers` JSON so the runtime needs no pickle:
- a Hugging Face tokenizer.json, or GPT-2's vocab.json + merges.txt (byte-level BPE, "<|endoftext|>");
- nanoGPT's character-level `meta.pkl` ({"stoi", "itos", "vocab_size"}), read by `read_meta` with an
  unpickler that resolves no global at all (so no code can run) and accepts only dicts, strings and
  integers. It becomes a byte-level WordLevel tokenizer, one token per character (`char_tokenizer`).
Without `tokenizer=`, as nanoGPT's sample.py does, `data/<config["dataset"]>/meta.pkl` is looked for
beside the checkpoint's directory, in it, and in the working directory; else the error names what to pass.

Vocabulary: a model vocab_size above the tokenizer's (nanoGPT pads GPT-2's 50257 tokens to 50304) is kept,
and `sampled_vocab_size` = the tokenizer's size, so the padded ids are never sampled. A character
vocabulary has no end-of-text token, which edgegpt feeds for an empty prompt, left padding and finished
batch rows, so "<|endoftext|>" is appended at id len(itos). The model's vocabulary grows to cover it (a zero
embedding row, if vocab_size == len(itos)), and `sampled_vocab_size` = len(itos) keeps it, like the
padding, out of sampling: the model generates exactly nanoGPT's distribution and never ends a text by itself
(max_new_tokens or a stop string does). A character outside the vocabulary encodes as "<|endoftext|>", as
GPT-2's Hugging Face tokenizer does with unknown input (nanoGPT raises KeyError).

References: Karpathy's nanoGPT (model.py, train.py, sample.py, data/shakespeare_char/prepare.py).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgegpt.config import GPTConfig
from edgegpt.errors import CheckpointError, ConfigError
from edgegpt.tokenizer import EOT
from edgegpt.train.checkpoint import TIED, load_tensors_only, save_checkpoint
from edgegpt.train.hf import bpe_from_files, check_out_dir
from edgegpt.train.model import SimpleGPT

__all__ = ["MODEL_ARGS", "char_tokenizer", "import_nanogpt", "read_meta"]

log = logging.getLogger(__name__)

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to every key (nanoGPT #325)
MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.bias")  # the causal mask, not a weight
META_MAX_BYTES = 64 << 20  # a character vocabulary's meta.pkl is kilobytes; refuse a pickle bomb unread
# (edgegpt sub-module, nanoGPT sub-module); both nn.Linear, so no transpose
LAYER_PARTS = (
    ("ln_1", "ln_1"),
    ("attn.qkv", "attn.c_attn"),
    ("attn.proj", "attn.c_proj"),
    ("ln_2", "ln_2"),
    ("ffn.fc", "mlp.c_fc"),
    ("ffn.proj", "mlp.c_proj"),
)


def _name_map(n_layer: int, bias: bool) -> dict[str, str]:
    """edgegpt name -> nanoGPT name, for every stored tensor (biases only with `bias`)."""
    names = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight"}
    parts = [
        (f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}") for i in range(n_layer) for ours, theirs in LAYER_PARTS
    ]
    for ours, theirs in [*parts, ("ln_f", "transformer.ln_f")]:
        names[f"{ours}.weight"] = f"{theirs}.weight"
        if bias:
            names[f"{ours}.bias"] = f"{theirs}.bias"
    return names


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first(names: list[str], n: int = 4) -> str:
    """The first `n` names, and how many more."""
    return f"{names[:n]}" + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _load(file: Path) -> dict[str, Any]:
    """The checkpoint dict, through torch.load(weights_only=True) only (`load_tensors_only`: a file that
    needs more is refused as possibly hostile, and torch's advice to load it unrestricted is not passed on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols it may not support
        data = load_tensors_only(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds a {type(data).__name__}, not nanoGPT's checkpoint dict")
    missing = [key for key in ("model", "model_args") if key not in data]
    if missing:
        raise CheckpointError(
            f"{file}: no {' or '.join(repr(k) for k in missing)} entry; a nanoGPT checkpoint (train.py's ckpt.pt) "
            f"has 'model' (the state dict) and 'model_args'; this file has {sorted(map(str, data))[:8]}"
        )
    return data


def _config(args: Any, state: dict[str, torch.Tensor], file: Path) -> GPTConfig:
    """GPTConfig (gelu="erf") from model_args, refusing keys that SimpleGPT does not compute."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{file}: model_args is a {type(args).__name__}, not a dict")
    unknown = sorted(map(str, args.keys() - set(MODEL_ARGS)))
    if unknown:
        raise CheckpointError(
            f"{file}: model_args has {unknown}, which nanoGPT's GPT does not take (a fork?); SimpleGPT computes "
            f"exactly {', '.join(MODEL_ARGS)}"
        )
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise CheckpointError(f"{file}: model_args lacks {missing}; re-save the checkpoint from nanoGPT's train.py")
    bias = args.get("bias", "transformer.ln_f.bias" in state)  # nanoGPT before its bias option: biases everywhere
    try:
        return GPTConfig(
            vocab_size=args["vocab_size"],
            block_size=args["block_size"],
            n_layer=args["n_layer"],
            n_head=args["n_head"],
            n_embd=args["n_embd"],
            dropout=float(args.get("dropout", 0.0)),
            bias=bias,
            gelu="erf",
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: model_args {args}: {exc}") from None


def _weights(raw: Any, config: GPTConfig, file: Path) -> dict[str, torch.Tensor]:
    """nanoGPT's state dict -> SimpleGPT's (float32), checked name by name and shape by shape."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise CheckpointError(f"{file}: 'model' is not a state dict of named tensors")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        short = name.removeprefix(COMPILED_PREFIX)
        if short in state:
            raise CheckpointError(f"{file}: {short} is stored both with and without the {COMPILED_PREFIX!r} prefix")
        if not MASK_BUFFER.fullmatch(short):
            state[short] = tensor
    head = state.pop(TIED, None)
    wte = state.get("transformer.wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise CheckpointError(
            f"{file}: lm_head.weight differs from transformer.wte.weight; SimpleGPT ties them as nanoGPT does, "
            "so an untied head cannot be imported without changing the model's outputs"
        )
    names = _name_map(config.n_layer, config.bias)
    missing = [theirs for theirs in names.values() if theirs not in state]
    unexpected = sorted(state.keys() - set(names.values()))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: tensors do not match a nanoGPT GPT with n_layer={config.n_layer}, bias={config.bias}: "
            f"missing {_first(missing)}, unexpected {_first(unexpected)}; refused rather than guessed"
        )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SimpleGPT(config).state_dict().items()}
    out = {}
    for ours, theirs in names.items():
        tensor = state[theirs]
        if tensor.shape != expected[ours]:
            raise CheckpointError(
                f"{file}: {theirs} has shape {tuple(tensor.shape)} but model_args imply {tuple(expected[ours])}"
            )
        out[ours] = tensor.float().contiguous()
    return out


class _DataOnlyUnpickler(pickle.Unpickler):
    """Resolves no global at all: classes and functions (so every `__reduce__` payload) are refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names the Python object {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference")


def _plain_data(value: Any, file: Path) -> None:
    """Refuse anything but dicts, strings and integers (no bool, float, list, bytes ...), iteratively."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif type(item) not in (str, int):
            raise CheckpointError(
                f"{file}: refused: it holds a {type(item).__name__}; a meta.pkl holds only dicts, strings and integers"
            )


def read_meta(path: str | Path) -> dict[str, Any]:
    """nanoGPT's character-level `meta.pkl`, read without running any code.

    Its unpickler resolves no global, so a payload (`__reduce__` and the like) is refused before anything
    runs, and the result must be dicts, strings and integers only.

    Returns:
        {"stoi": {char: id}, "itos": {id: char}, "vocab_size": n}, checked: one character per token, ids
        0..n-1, stoi and itos inverse of each other.

    Raises:
        CheckpointError: unreadable, a payload or other object, or maps that are not a character vocabulary.

    >>> import tempfile, pickle, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "meta.pkl"
    >>> _ = path.write_bytes(pickle.dumps({"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}}))
    >>> read_meta(path)["vocab_size"]
    2
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > META_MAX_BYTES:
            raise CheckpointError(
                f"{file}: {size} bytes; a character vocabulary's meta.pkl is far smaller, refused unread"
            )
        meta = _DataOnlyUnpickler(io.BytesIO(file.read_bytes())).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{file}: unreadable ({exc.strerror or exc})") from None
    except Exception as exc:  # UnpicklingError (a global: maybe hostile), EOFError, ValueError ... (corrupt)
        raise CheckpointError(
            f"{file}: refused: {_one_line(str(exc)) or type(exc).__name__}; a nanoGPT meta.pkl holds only dicts, "
            "strings and integers, and a pickle that needs more may be hostile, so it is never unpickled"
        ) from None
    _plain_data(meta, file)
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict) or not isinstance(meta.get("itos"), dict):
        raise CheckpointError(
            f"{file}: not a character-level meta.pkl: it needs 'stoi' and 'itos' maps (nanoGPT's prepare.py)"
        )
    stoi, itos = meta["stoi"], meta["itos"]
    n = len(itos)
    ids_ok = all(type(i) is int for i in itos) and sorted(itos) == list(range(n))
    if not ids_ok or not all(isinstance(c, str) for c in itos.values()):
        raise CheckpointError(f"{file}: itos must map the ids 0..{n - 1} to characters")
    long = [c for c in itos.values() if len(c) != 1]
    if long:
        raise CheckpointError(
            f"{file}: itos holds {long[:3]}, not single characters; only character vocabularies import"
        )
    if stoi != {c: i for i, c in itos.items()}:
        raise CheckpointError(f"{file}: stoi and itos are not inverse maps of each other")
    if meta.get("vocab_size", n) != n:
        raise CheckpointError(f"{file}: vocab_size {meta['vocab_size']} but itos has {n} characters")
    return {"stoi": stoi, "itos": itos, "vocab_size": n}


def char_tokenizer(itos: dict[int, str]):
    """A `tokenizers` tokenizer with one token per character of `itos` (same ids) and "<|endoftext|>" after.

    Byte-level like GPT-2's: each character's token is its UTF-8 bytes in GPT-2's printable byte alphabet,
    found by a WordLevel model after a pre-tokenizer splits the text into characters, and the ByteLevel
    decoder gives the exact text back (edgegpt's incremental decoder reads the same byte table). A
    character outside `itos` encodes as "<|endoftext|>".

    >>> tok = char_tokenizer({0: "h", 1: "i", 2: " ", 3: "é"})
    >>> ids = tok.encode("hi é", add_special_tokens=False).ids
    >>> ids, tok.decode(ids), tok.token_to_id("<|endoftext|>")
    ([0, 1, 2, 3], 'hi é', 4)
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    byte_char = _gpt2_byte_chars()
    vocab = {"".join(byte_char[b] for b in char.encode("utf-8")): i for i, char in itos.items()}
    vocab[EOT] = len(itos)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),  # every character is a pre-token
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # ... in GPT-2's byte alphabet
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already in the vocabulary: keeps its id, and a literal one is never split
    return tok


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode in GPT-2's encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def _read_tokenizer_json(file: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(
            f"{file}: unreadable tokenizer ({_one_line(str(exc))[:200]}); pass GPT-2's tokenizer.json"
        ) from None


def _resolve_tokenizer(given: Sequence[Path]) -> tuple[str, Any, dict | None]:
    """(what was read, the tokenizer, the meta dict for a character vocabulary or None)."""
    files = list(given)
    if len(files) == 1 and files[0].is_dir():
        folder = files[0]
        for candidate in ("tokenizer.json", "vocab.json", "meta.pkl"):
            if (folder / candidate).is_file():
                files = [folder / candidate]
                break
        else:
            raise CheckpointError(f"{folder}: no tokenizer.json, vocab.json + merges.txt or meta.pkl in it")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: no such tokenizer file")
    names = sorted(f.name for f in files)
    if len(files) == 1 and files[0].suffix == ".pkl":
        meta = read_meta(files[0])
        return str(files[0]), char_tokenizer(meta["itos"]), meta
    if len(files) == 1 and files[0].name == "vocab.json":
        files.append(files[0].with_name("merges.txt"))
        if not files[1].is_file():
            raise CheckpointError(
                f"{files[0]}: no merges.txt beside it; pass both: --tokenizer vocab.json --tokenizer merges.txt"
            )
    if len(files) == 2:
        vocab = next((f for f in files if f.suffix == ".json"), None)
        merges = next((f for f in files if f.suffix == ".txt"), None)
        if vocab is None or merges is None:
            raise CheckpointError(f"{names}: two tokenizer files must be GPT-2's vocab.json and merges.txt")
        return f"{vocab} + {merges}", bpe_from_files(vocab, merges), None
    if len(files) == 1 and files[0].suffix == ".json":
        return str(files[0]), _read_tokenizer_json(files[0]), None
    raise CheckpointError(
        f"{names}: not a tokenizer; pass a Hugging Face tokenizer.json, GPT-2's vocab.json + merges.txt, or nanoGPT's meta.pkl"
    )


def _find_meta(file: Path, data: dict) -> Path | None:
    """data/<config["dataset"]>/meta.pkl, as nanoGPT's sample.py finds it (relative to its repository)."""
    config = data.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if not isinstance(dataset, str) or not re.fullmatch(r"[\w.-]+", dataset) or dataset in (".", ".."):
        return None
    for root in dict.fromkeys((file.parent.parent, file.parent, Path.cwd())):
        meta = root / "data" / dataset / "meta.pkl"
        if meta.is_file():
            return meta
    return None


def _no_tokenizer(file: Path, data: dict, config: GPTConfig) -> CheckpointError:
    """The error that says which tokenizer to pass."""
    run = data.get("config") if isinstance(data.get("config"), dict) else {}
    dataset = run.get("dataset")
    where = (
        f"dataset {dataset!r}, no data/{dataset}/meta.pkl found beside it"
        if isinstance(dataset, str)
        else "no dataset recorded"
    )
    if config.vocab_size in (50257, 50304):
        hint = (
            f"its vocab_size {config.vocab_size} is GPT-2's BPE, which nanoGPT uses without a meta.pkl: pass GPT-2's "
            "tokenizer.json, or its vocab.json and merges.txt, with --tokenizer"
        )
    else:
        hint = f"pass the meta.pkl its data was prepared with (vocab_size {config.vocab_size}) or a tokenizer.json with --tokenizer"
    return CheckpointError(f"{file}: no tokenizer ({where}); {hint}")


def import_nanogpt(
    checkpoint: str | Path,
    out_ckpt_dir: str | Path,
    *,
    tokenizer: str | Path | Sequence[str | Path] | None = None,
    force: bool = False,
) -> Path:
    """Convert a nanoGPT checkpoint (`ckpt.pt`) into an edgegpt checkpoint directory.

    The result exports, quantizes and generates like any edgegpt checkpoint; the model keeps nanoGPT's
    exact erf GELU (`gelu="erf"`), its bias setting and its (possibly padded) vocabulary.

    Args:
        checkpoint: nanoGPT's `ckpt.pt` (read with `torch.load(weights_only=True)` only).
        out_ckpt_dir: the checkpoint directory to write (atomically, with `save_checkpoint`).
        tokenizer: a tokenizer.json; vocab.json + merges.txt (both paths, or vocab.json with merges.txt beside
            it); nanoGPT's character-level meta.pkl; or a directory holding one of these. None: the
            meta.pkl of the checkpoint's dataset if found (data/<dataset>/meta.pkl), else an error that
            says what to pass.
        force: replace an existing non-empty `out_ckpt_dir`.

    Returns:
        The checkpoint directory, loadable with `edgegpt.train.checkpoint.load_checkpoint`.

    Raises:
        CheckpointError: in one line, naming the file: a file that needs more than weights-only loading
            (refused as possibly hostile), missing or unexpected tensors or model_args, an untied lm_head,
            shapes that do not fit model_args, a meta.pkl with anything but dicts, strings and integers, a
            tokenizer with more tokens than the model or without "<|endoftext|>", no tokenizer found, or
            a non-empty `out_ckpt_dir` without `force`.

    >>> import_nanogpt("out-shakespeare-char/ckpt.pt", "runs/shakespeare/checkpoint")  # doctest: +SKIP
    PosixPath('runs/shakespeare/checkpoint')
    """
    file, out = Path(checkpoint), Path(out_ckpt_dir)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file; pass nanoGPT's ckpt.pt (its out_dir/ckpt.pt)")
    check_out_dir(out, force)
    data = _load(file)
    config = _config(data["model_args"], data["model"] if isinstance(data["model"], dict) else {}, file)
    state = _weights(data["model"], config, file)
    if tokenizer is None:
        meta_file = _find_meta(file, data)
        if meta_file is None:
            raise _no_tokenizer(file, data, config)
        log.info("%s: using %s (its dataset's meta.pkl, as nanoGPT's sample.py does)", file, meta_file)
        tokenizer = meta_file
    paths = [Path(tokenizer)] if isinstance(tokenizer, (str, Path)) else [Path(t) for t in tokenizer]
    source, tok, meta = _resolve_tokenizer(paths)
    size = tok.get_vocab_size()
    if meta is not None:  # characters, then the appended EOT: the model must cover it, sampling never picks it
        if meta["vocab_size"] > config.vocab_size:
            raise CheckpointError(
                f"{source}: {meta['vocab_size']} characters but the model's vocab_size is {config.vocab_size}; "
                "pass the meta.pkl of the dataset this model was trained on"
            )
        if size > config.vocab_size:
            grow = size - config.vocab_size
            state["tok_emb.weight"] = torch.cat(
                [state["tok_emb.weight"], state["tok_emb.weight"].new_zeros(grow, config.n_embd)]
            )
            config = dataclasses.replace(config, vocab_size=size)
        config = dataclasses.replace(config, sampled_vocab_size=meta["vocab_size"])
    else:
        if tok.token_to_id(EOT) is None:
            raise CheckpointError(
                f"{source}: the tokenizer has no {EOT!r} token, which edgegpt needs; pass GPT-2's tokenizer"
            )
        if size > config.vocab_size:
            raise CheckpointError(
                f"{source}: the tokenizer has {size} tokens but the model's vocab_size is only {config.vocab_size}; "
                "pass the tokenizer this model was trained with"
            )
        if size < config.vocab_size:  # padded (nanoGPT's 50304 for GPT-2's 50257): never sampled
            config = dataclasses.replace(config, sampled_vocab_size=size)
    model = SimpleGPT(config)
    state[TIED] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    log.info(
        "imported %s (iter %s, %d parameters, vocab %d, tokenizer %d from %s) into %s",
        file,
        data.get("iter_num", "?"),
        model.num_params(),
        config.vocab_size,
        size,
        source,
        out,
    )
    return save_checkpoint(out, model, tok.to_str())
