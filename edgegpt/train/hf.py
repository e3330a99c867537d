"""Weights interchange with Hugging Face model directories: `import_hf` and `export_hf`.

GPT-2 (GPT2LMHeadModel) is mapped here; the Llama family (LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM) in edgegpt.train.hf_llama, chosen by config.json's `architectures` (else `model_type`). This
file owns the files either way: the weights (single or sharded safetensors), the tokenizer, the chat template,
and the special tokens: tokenizer_config.json's bos/eos/pad tokens and whether the tokenizer adds a BOS, and
every stop id of generation_config.json (whose eos_token_id may be a list), kept in the checkpoint under the
same two file names (`SPECIAL_FILES`) and written back by `export_hf`.

This file owns the mapping between a local Hugging Face GPT-2 directory (config.json, model.safetensors,
tokenizer.json or vocab.json + merges.txt) and an edgegpt checkpoint directory (see checkpoint.py).
SimpleGPT has GPT-2's exact math, so the mapping is a renaming plus one transpose. GPT-2 stores its
projections as `Conv1D`, whose weight is (in, out): the transpose of `nn.Linear`'s (out, in).

    edgegpt (SimpleGPT)         Hugging Face (GPT2LMHeadModel)         layout
    tok_emb, pos_emb            transformer.wte, transformer.wpe
    blocks.{i}.ln_1, ln_2       transformer.h.{i}.ln_1, ln_2
    blocks.{i}.attn.qkv         transformer.h.{i}.attn.c_attn          Conv1D: transposed
    blocks.{i}.attn.proj        transformer.h.{i}.attn.c_proj          Conv1D: transposed
    blocks.{i}.ffn.fc           transformer.h.{i}.mlp.c_fc             Conv1D: transposed
    blocks.{i}.ffn.proj         transformer.h.{i}.mlp.c_proj           Conv1D: transposed
    ln_f                        transformer.ln_f
    lm_head (tied to tok_emb)   lm_head (tied to wte, not stored)

`activation_function` "gelu_new" or "gelu_pytorch_tanh" imports as `gelu="tanh"`, "gelu" (the exact erf
GELU) as `gelu="erf"`. A model vocabulary larger than the tokenizer's (nanoGPT pads GPT-2's 50257 tokens to
50304) imports with `sampled_vocab_size` = the tokenizer's size, so the padded ids are never sampled.
Only local files are read, and `transformers` is never imported. Safetensors files are preferred. A
`pytorch_model.bin` is read only through `torch.load(weights_only=True)`.
References: Radford et al. 2019 (GPT-2); transformers' models/gpt2/modeling_gpt2.py; nanoGPT's
`GPT.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgegpt.train import hf_llama
from edgegpt.train.checkpoint import (
    CHAT_TEMPLATE,
    CONFIG,
    GENERATION_CONFIG,
    TIED,
    TOKENIZER,
    TOKENIZER_SPECIALS,
    TRAIN_STATE_JSON,
    TRAIN_STATE_PT,
    WEIGHTS,
    load_checkpoint,
    load_tensors_only,
    save_checkpoint,
)
from edgegpt.config import FAMILY_FIELDS, GPTConfig
from edgegpt.errors import CheckpointError, ConfigError, DataError
from edgegpt.files import recover, staged_dir
from edgegpt.tokenizer import EOT, TOKENIZER_CONFIG, chat_template_of, read_tokenizer_config  # EOT: GPT-2's bos and eos
from edgegpt.train.model import SimpleGPT

__all__ = ["import_hf", "export_hf", "EOT"]

log = logging.getLogger(__name__)

# transformers' activation_function -> GPTConfig.gelu: its two tanh approximations, and the exact erf GELU
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}
# (edgegpt sub-module, GPT-2 sub-module, Conv1D weight stored transposed)
LAYER_PARTS = (
    ("ln_1", "ln_1", False),
    ("attn.qkv", "attn.c_attn", True),
    ("attn.proj", "attn.c_proj", True),
    ("ln_2", "ln_2", False),
    ("ffn.fc", "mlp.c_fc", True),
    ("ffn.proj", "mlp.c_proj", True),
)
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some GPT-2 files carry; not weights
HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)  # GPT2Config's


def _name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """edgegpt name -> (GPT-2 name without the `transformer.` prefix, stored transposed)."""
    names = {"tok_emb.weight": ("wte.weight", False), "pos_emb.weight": ("wpe.weight", False)}
    for i in range(n_layer):
        for ours, theirs, conv1d in LAYER_PARTS:
            names[f"blocks.{i}.{ours}.weight"] = (f"h.{i}.{theirs}.weight", conv1d)
            names[f"blocks.{i}.{ours}.bias"] = (f"h.{i}.{theirs}.bias", False)
    names.update({"ln_f.weight": ("ln_f.weight", False), "ln_f.bias": ("ln_f.bias", False)})
    return names


def _architecture(raw: dict, file: Path) -> str:
    """config.json's architecture: the first of `architectures`, else GPT-2's or one named by `model_type`."""
    names = raw.get("architectures")
    if names:
        arch = names[0] if isinstance(names, list) else names
        if arch != "GPT2LMHeadModel" and arch not in hf_llama.ARCHITECTURES:
            known = ", ".join(["GPT2LMHeadModel", *hf_llama.ARCHITECTURES])
            raise CheckpointError(f"{file}: architectures is {names!r}; edgegpt imports {known}")
        return arch
    by_type = {family["model_type"]: arch for arch, family in hf_llama.ARCHITECTURES.items()}
    return by_type.get(raw.get("model_type"), "GPT2LMHeadModel")  # GPT-2's rules name a wrong model_type


def _read_hf_config(src: Path) -> tuple[GPTConfig, dict]:
    """(the GPTConfig of config.json, the raw dict), refusing every setting SimpleGPT does not compute."""
    file = src / "config.json"
    raw = _read_json(file)
    arch = _architecture(raw, file)
    if arch in hf_llama.ARCHITECTURES:
        return hf_llama.config_from_hf(raw, arch, file), raw
    return _gpt2_config(raw, file), raw


def _read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a Hugging Face model directory needs its config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc}); re-download or re-save the model") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: must be a JSON object, got {type(raw).__name__}")
    return raw


def _gpt2_config(raw: dict, file: Path) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json."""
    n_embd = raw.get("n_embd", HF_DEFAULTS["n_embd"])
    # (key, GPT2Config's default, accepted values, why and how to fix)
    rules = [
        ("model_type", None, ("gpt2",), "only GPT-2 checkpoints map onto SimpleGPT; pick a GPT-2 model"),
        (
            "activation_function",
            "gelu_new",
            tuple(ACTIVATIONS),
            f"SimpleGPT computes the tanh-approximate or the exact GELU; only {', '.join(ACTIVATIONS)} import exactly",
        ),
        ("layer_norm_epsilon", 1e-5, (1e-5,), "SimpleGPT's LayerNorms use 1e-5; only models trained with it import"),
        (
            "n_inner",
            None,
            (None, 4 * n_embd),
            f"SimpleGPT's MLP width is 4 * n_embd; set n_inner to null or {4 * n_embd}",
        ),
        ("scale_attn_weights", True, (True,), "SimpleGPT always scales attention by 1/sqrt(head_size)"),
        ("scale_attn_by_inverse_layer_idx", False, (False,), "SimpleGPT has no per-layer attention scaling"),
        ("add_cross_attention", False, (False,), "SimpleGPT is decoder-only, without cross-attention"),
    ]
    for key, default, accepted, fix in rules:
        value = raw.get(key, default)
        if value not in accepted:
            raise CheckpointError(f"{file}: {key} is {value!r}; {fix}")
    fields = {k: raw.get(k, v) for k, v in HF_DEFAULTS.items()}
    try:
        return GPTConfig(
            vocab_size=fields["vocab_size"],
            block_size=fields["n_positions"],
            n_layer=fields["n_layer"],
            n_head=fields["n_head"],
            n_embd=fields["n_embd"],
            dropout=0.0,
            bias=True,
            gelu=ACTIVATIONS[raw.get("activation_function", "gelu_new")],
        )
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file, or of a pickle checkpoint read with weights_only=True."""
    if file.suffix != ".safetensors":
        state = load_tensors_only(file)  # refuses a pickle that asks to run code, without relaying torch's advice
    else:
        try:
            return load_file(file)
        except Exception as exc:  # SafetensorError, OSError
            raise CheckpointError(f"{file}: unreadable weights ({exc}); re-download or re-save the model") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors; save the model with save_pretrained")
    return state


def _read_hf_weights(src: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, its tensors) with the `transformer.` prefix and mask buffers removed, as float32."""
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        file, state = src / "model.safetensors", _load_tensors(src / "model.safetensors")
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc}); re-save the model") from exc
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards missing from {src}: {missing[:3]}; download all shards")
        file, state = index, {k: v for s in shards for k, v in _load_tensors(src / s).items()}
    elif (src / "pytorch_model.bin").is_file():
        log.info("%s: no model.safetensors; reading pytorch_model.bin with torch.load(weights_only=True)", src)
        file, state = src / "pytorch_model.bin", _load_tensors(src / "pytorch_model.bin")
    else:
        raise CheckpointError(
            f"{src}: no model.safetensors (nor model.safetensors.index.json or pytorch_model.bin); "
            "save the model with save_pretrained(dir, safe_serialization=True)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        short = name.removeprefix("transformer.")
        if short.endswith(BUFFERS):
            continue
        if short in out:
            raise CheckpointError(f"{file}: {short} appears both with and without the 'transformer.' prefix")
        out[short] = tensor.float() if tensor.is_floating_point() else tensor
    return file, out


def _to_edgegpt(state: dict[str, torch.Tensor], config: GPTConfig, file: Path) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (prefix stripped) -> a full SimpleGPT state dict, checked name by name and
    shape by shape."""
    if config.position == "rope":
        with torch.device("meta"):
            expected = {
                k: v.shape for k, v in SimpleGPT(config).state_dict().items() if k != TIED or not config.tied_head
            }
        return hf_llama.to_edgegpt(state, config, expected, file)
    state = dict(state)
    head = state.pop(TIED, None)
    if head is not None and "wte.weight" in state:
        if head.shape != state["wte.weight"].shape or not torch.equal(head, state["wte.weight"]):
            raise CheckpointError(
                f"{file}: lm_head.weight differs from transformer.wte.weight; SimpleGPT ties them as GPT-2 "
                "does, so an untied (fine-tuned) head cannot be imported without changing its outputs"
            )
    names = _name_map(config.n_layer)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SimpleGPT(config).state_dict().items() if k != TIED}
    missing = sorted(theirs for theirs, _ in names.values() if theirs not in state)
    unexpected = sorted(state.keys() - {theirs for theirs, _ in names.values()})
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: tensors do not match a GPT-2 with n_layer={config.n_layer}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; is config.json the one saved with these weights?"
        )
    out = {}
    for ours, (theirs, conv1d) in names.items():
        tensor = state[theirs].t() if conv1d else state[theirs]
        if tensor.shape != expected[ours]:
            stored = tuple(state[theirs].shape)
            want = tuple(expected[ours])[::-1] if conv1d else tuple(expected[ours])
            raise CheckpointError(
                f"{file}: {theirs} has shape {stored} but config.json implies {want}; "
                "the config does not belong to these weights"
            )
        out[ours] = tensor.contiguous()
    out[TIED] = out["tok_emb.weight"]
    return out


def bpe_from_files(vocab: Path, merges: Path):
    """A GPT-2 byte-level BPE tokenizer (like GPT-2's tokenizer.json) from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise CheckpointError(f"{vocab} + {merges}: unreadable BPE files ({exc}); re-download them") from exc
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(EOT) is not None:
        tok.add_special_tokens([EOT])  # already in the vocabulary: keeps its id, is never split
    return tok


def _read_hf_tokenizer(src: Path, vocab_size: int):
    """tokenizer.json, else one built from vocab.json + merges.txt; at most vocab_size tokens."""
    from tokenizers import Tokenizer

    file = src / TOKENIZER
    if file.is_file():
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{file}: unreadable tokenizer ({exc}); re-download or re-save it") from exc
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        file, tok = src / "vocab.json", bpe_from_files(src / "vocab.json", src / "merges.txt")
    else:
        raise CheckpointError(
            f"{src}: no tokenizer.json (nor vocab.json + merges.txt); copy the model's tokenizer files "
            "next to config.json, e.g. tokenizer.save_pretrained(dir)"
        )
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise CheckpointError(
            f"{file}: the tokenizer has {n} tokens but config.json vocab_size is only {vocab_size}; "
            "ids above the embedding would crash the model; use the tokenizer saved with these weights"
        )
    return tok


CHECKPOINT_FILES = frozenset(
    {CONFIG, WEIGHTS, TOKENIZER, TRAIN_STATE_PT, TRAIN_STATE_JSON, CHAT_TEMPLATE, TOKENIZER_SPECIALS, GENERATION_CONFIG}
)
HF_EXPORT_FILES = frozenset(
    {"config.json", "model.safetensors", "tokenizer.json", TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE}
)
# tokenizer_config.json's special tokens, kept in a checkpoint (with add_bos_token / add_eos_token, read by name)
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its "content"."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def token_ids(value: Any) -> list[int]:
    """A token id or a list of them (generation_config.json's eos_token_id may be either) as a list."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _read_special_tokens(src: Path, raw: dict, tok) -> tuple[dict, dict] | tuple[None, None]:
    """(tokenizer_config, generation_config) for the checkpoint: the special tokens, whether the tokenizer adds a BOS
    (its post-processor does, or add_bos_token says so), and every stop id (generation_config.json's eos_token_id,
    config.json's, and the eos_token's). (None, None) for a model that names no special token at all."""
    try:
        tconf = read_tokenizer_config(src)
    except DataError as exc:
        log.warning("%s: special tokens not read (%s)", src, exc)
        tconf = {}
    gen = _read_json(src / GENERATION_CONFIG) if (src / GENERATION_CONFIG).is_file() else {}
    special = {k: text for k in SPECIAL_KEYS if (text := _token_text(tconf.get(k))) is not None}
    bos_ids = token_ids(gen.get("bos_token_id", raw.get("bos_token_id")))
    bos = tok.token_to_id(special["bos_token"]) if "bos_token" in special else (bos_ids[0] if bos_ids else None)
    eos = [*token_ids(gen.get("eos_token_id")), *token_ids(raw.get("eos_token_id"))]
    if "eos_token" in special and tok.token_to_id(special["eos_token"]) is not None:
        eos.append(tok.token_to_id(special["eos_token"]))
    eos = list(dict.fromkeys(eos))
    if bos is None and not eos and not special:
        return None, None
    probe = tok.encode("a", add_special_tokens=True).ids
    adds_bos = (
        bos is not None
        and bool(probe)
        and probe[0] == bos
        and tok.encode("a", add_special_tokens=False).ids[:1] != [bos]
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": adds_bos or tconf.get("add_bos_token") is True,
        "add_eos_token": tconf.get("add_eos_token") is True,
    }
    pad = token_ids(gen.get("pad_token_id", raw.get("pad_token_id")))
    generation_config = {
        "bos_token_id": bos,
        "eos_token_id": eos if len(eos) != 1 else eos[0],  # transformers' own form: an int, or a list of them
        **({"pad_token_id": pad[0]} if pad else {}),
    }
    return tokenizer_config, generation_config


def check_out_dir(out: Path, force: bool, replaceable: frozenset[str] = CHECKPOINT_FILES) -> None:
    """Refuse a file; a non-empty directory unless `force`; and even with `force`, a directory holding anything
    but the `replaceable` files (what this writer writes): replacing it would delete what edgegpt did not write."""
    if recover(out).exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise CheckpointError(f"{out}: exists and is not empty; choose another directory or pass force=True")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in replaceable or not p.is_file() or p.is_symlink())
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise CheckpointError(
            f"{out}: holds files edgegpt did not write ({shown}); refusing to replace it even with force, which would "
            "delete them: move them out, or choose another directory"
        )


def import_hf(src_dir: str | Path, out_ckpt_dir: str | Path, *, force: bool = False) -> Path:
    """Convert a local Hugging Face GPT-2 directory into an edgegpt checkpoint.

    Reads config.json, the weights (model.safetensors, a sharded model.safetensors.index.json, or else
    pytorch_model.bin through `torch.load(weights_only=True)`), tokenizer.json or vocab.json +
    merges.txt, and the model's chat template if it has one (kept as chat_template.jinja; `export` puts it
    in the bundle's tokenizer_config.json, where `edgegpt chat` and `edgegpt serve` read it). Keys may
    carry the `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model). The checkpoint gets bias=True
    and dropout=0.0, and the weights are stored as float32. A config.json
    vocab_size above the tokenizer's size (a padded embedding) sets `sampled_vocab_size` to the latter.

    Args:
        src_dir: the Hugging Face model directory, e.g. one written by `save_pretrained`.
        out_ckpt_dir: the checkpoint directory to write (atomically, with `save_checkpoint`).
        force: replace an existing non-empty `out_ckpt_dir`.

    Returns:
        The checkpoint directory, loadable with `edgegpt.train.checkpoint.load_checkpoint`.

    Raises:
        CheckpointError: a missing or unreadable file. Also a config that SimpleGPT cannot compute
            exactly: model_type other than gpt2, an activation other than gelu_new/gelu_pytorch_tanh/gelu,
            layer_norm_epsilon other than 1e-5, or a custom n_inner. Also an lm_head that differs from
            wte, tensors that miss or mismatch the config, a tokenizer with more tokens than vocab_size,
            or a non-empty `out_ckpt_dir` without `force`.

    >>> import_hf("hf/gpt2", "ckpt/gpt2")  # doctest: +SKIP
    PosixPath('ckpt/gpt2')
    """
    src, out = recover(src_dir), Path(out_ckpt_dir)  # `src` may be an `export_hf` directory
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory; pass a local Hugging Face model directory")
    check_out_dir(out, force)
    config, raw = _read_hf_config(src)
    file, hf_state = _read_hf_weights(src)
    state = _to_edgegpt(hf_state, config, file)
    tok = _read_hf_tokenizer(src, config.vocab_size)
    if tok.get_vocab_size() < config.vocab_size:  # padded (nanoGPT's 50304): those rows are never sampled
        config = dataclasses.replace(config, sampled_vocab_size=tok.get_vocab_size())
    model = SimpleGPT(config)
    model.load_state_dict(state, strict=True)
    log.info("imported %s (%s, %d parameters) into %s", src, file.name, model.num_params(), out)
    tokenizer_config, generation_config = (
        _read_special_tokens(src, raw, tok) if config.position == "rope" else (None, None)
    )
    return save_checkpoint(
        out,
        model,
        tok.to_str(),
        chat_template=_read_chat_template(src),
        tokenizer_config=tokenizer_config,
        generation_config=generation_config,
    )


def _read_chat_template(src: Path) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`; None when it
    has none. One that cannot be read is dropped with a warning: the weights import without it."""
    if (src / CHAT_TEMPLATE).is_file():
        return (src / CHAT_TEMPLATE).read_text(encoding="utf-8")
    try:
        return chat_template_of(read_tokenizer_config(src))
    except DataError as exc:
        log.warning("%s: no chat template kept (%s)", src, exc)
        return None


def _hf_config(config: GPTConfig, eot: int | None) -> dict[str, Any]:
    """A GPT2Config dict (transformers' field names) describing a SimpleGPT."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write an edgegpt checkpoint as a Hugging Face directory that `transformers` loads.

    A Llama-family checkpoint (position "rope") becomes a LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM
    directory (edgegpt.train.hf_llama.architecture_of) with its special-token files and chat template; the rest
    of this docstring is about GPT-2.

    Writes config.json (a GPT2Config for GPT2LMHeadModel; activation_function "gelu_new" for the tanh GELU,
    "gelu" for the exact one; bos/eos are the id of "<|endoftext|>" if the tokenizer has it, else null),
    model.safetensors (`transformer.*` keys, Conv1D weights transposed, lm_head.weight omitted because it
    is tied to wte, as `save_pretrained` writes it), tokenizer.json
    (the checkpoint's, byte for byte) and tokenizer_config.json (for `AutoTokenizer`). Everything is
    written to a temporary sibling directory and then renamed into place.

    Args:
        ckpt_dir: an edgegpt checkpoint directory, or a run directory holding `checkpoint/`.
        out_dir: the directory to create.
        force: replace an existing non-empty `out_dir`.

    Returns:
        `out_dir`, loadable with `transformers.GPT2LMHeadModel.from_pretrained(out_dir)`.

    Raises:
        CheckpointError: an unloadable checkpoint, a checkpoint without biases (bias=False has no
            GPT-2 equivalent), or an existing non-empty `out_dir` without `force`.

    >>> export_hf("ckpt/gpt2", "hf/gpt2-roundtrip")  # doctest: +SKIP
    PosixPath('hf/gpt2-roundtrip')
    """
    out = Path(out_dir)
    check_out_dir(out, force, HF_EXPORT_FILES)
    ckpt = load_checkpoint(ckpt_dir)
    if ckpt.config.position == "rope":
        return _export_llama(ckpt, out)
    config = ckpt.config
    if not config.bias:
        raise CheckpointError(
            f"{ckpt.path}: bias=False, but GPT-2 has biases in every Linear and LayerNorm; "
            "only checkpoints trained with bias=True can be exported to the GPT-2 format"
        )
    off = sorted(k for k in FAMILY_FIELDS if k in config.to_dict())  # to_dict keeps a family field off its default
    if off:
        raise CheckpointError(
            f"{ckpt.path}: {', '.join(off)} differ from GPT-2's; GPT2LMHeadModel cannot compute this model"
        )
    state = ckpt.model.state_dict()
    tensors = {
        f"transformer.{theirs}": (state[ours].t() if conv1d else state[ours]).detach().cpu().contiguous().clone()
        for ours, (theirs, conv1d) in _name_map(config.n_layer).items()
    }
    eot = ckpt.tokenizer.token_to_id(EOT)
    if config.sampled_ids(ckpt.tokenizer.get_vocab_size()) < ckpt.tokenizer.get_vocab_size():
        log.warning(
            "%s: ids from %d on are never sampled (sampled_vocab_size), which GPT-2's config cannot say; "
            "transformers will sample them",
            ckpt.path,
            config.sampled_vocab_size,
        )
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eot is not None else {}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size, **special}
    with staged_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})  # transformers checks "format"
        (tmp / "config.json").write_text(json.dumps(_hf_config(config, eot), indent=2) + "\n")
        shutil.copyfile(ckpt.path / TOKENIZER, tmp / TOKENIZER)
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    log.info("exported %s to %s", ckpt.path, out)
    return out


def _export_llama(ckpt, out: Path) -> Path:
    """export_hf for a rotary (Llama-family) checkpoint: its architecture's config.json, model.* tensors, the
    tokenizer, the special-token files kept by `import_hf` and the chat template."""
    config = ckpt.config
    try:
        arch = hf_llama.architecture_of(config)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from exc
    tokenizer_config, generation_config = ckpt.special_tokens()
    special = {k: generation_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    tensors = hf_llama.from_edgegpt(ckpt.model.state_dict(), config)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.block_size,
        **tokenizer_config,
    }
    template = ckpt.chat_template
    with staged_dir(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_llama.hf_config(config, special), indent=2) + "\n")
        shutil.copyfile(ckpt.path / TOKENIZER, tmp / TOKENIZER)
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        if generation_config:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(generation_config, indent=2) + "\n")
        if template is not None:
            (tmp / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    log.info("exported %s to %s as %s", ckpt.path, out, arch)
    return out
