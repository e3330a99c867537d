"""The Llama family's half of the Hugging Face interchange (edgegpt.train.hf owns the files and GPT-2's half).

Three architectures map onto SimpleGPT with the config's family fields (edgegpt.config): LlamaForCausalLM
(Llama 2/3, SmolLM2), Qwen2ForCausalLM (biases on q, k and v only) and Qwen3ForCausalLM (an RMSNorm over each
head of q and k, an explicit head_dim). What one architecture differs in is data in `ARCHITECTURES`; the
tensor names are one table, `PARTS`:

    edgegpt (SimpleGPT)          Hugging Face (model.layers.{i}.*)                    layout
    tok_emb                      model.embed_tokens
    blocks.{i}.ln_1, ln_2        input_layernorm, post_attention_layernorm
    blocks.{i}.attn.qkv          self_attn.q_proj, k_proj, v_proj                     stacked on dim 0
    blocks.{i}.attn.proj         self_attn.o_proj
    blocks.{i}.attn.q_norm, k_norm   self_attn.q_norm, k_norm (Qwen3)
    blocks.{i}.ffn.fc            mlp.gate_proj, mlp.up_proj                           stacked on dim 0
    blocks.{i}.ffn.proj          mlp.down_proj
    ln_f                         model.norm
    lm_head                      lm_head (absent or equal to embed_tokens when tied)

Both Linear layouts are (out, in): no transpose. A setting SimpleGPT does not compute is refused in one line
naming the config.json field: sliding-window layers, mixture-of-experts, a rope type other than default,
linear and llama3, an activation other than silu. transformers 4 writes `rope_theta` and `rope_scaling`;
transformers 5 writes `rope_parameters`; both are read.
References: transformers' models/llama, qwen2, qwen3 (modeling and configuration) and modeling_rope_utils.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgegpt.config import GPTConfig
from edgegpt.errors import CheckpointError, ConfigError

# architecture -> (model_type, how it departs from Llama): "qkv_bias" fixed for Qwen2 (its attention_bias is
# not read), "qk_norm" for Qwen3. tie_word_embeddings defaults to False in all three config classes.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"model_type": "llama", "qk_norm": False, "qkv_bias": None},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "qk_norm": False, "qkv_bias": True},
    "Qwen3ForCausalLM": {"model_type": "qwen3", "qk_norm": True, "qkv_bias": None},
}
# SimpleGPT part -> the Hugging Face parts stacked (on dim 0) into it, under model.layers.{i}.
PARTS: dict[str, tuple[str, ...]] = {
    "ln_1": ("input_layernorm",),
    "ln_2": ("post_attention_layernorm",),
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.proj": ("self_attn.o_proj",),
    "attn.q_norm": ("self_attn.q_norm",),
    "attn.k_norm": ("self_attn.k_norm",),
    "ffn.fc": ("mlp.gate_proj", "mlp.up_proj"),
    "ffn.proj": ("mlp.down_proj",),
}
TOP = {"tok_emb": "model.embed_tokens", "ln_f": "model.norm", "lm_head": "lm_head"}
BUFFERS = ("rotary_emb.inv_freq",)  # older saves carry the rotary frequencies; SimpleGPT computes them
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def _rope(raw: dict, file: Path) -> dict[str, Any]:
    """GPTConfig's rope fields from transformers 4's rope_theta + rope_scaling or 5's rope_parameters."""
    params = raw.get("rope_parameters")
    field = "rope_parameters" if isinstance(params, dict) else "rope_scaling"
    scaling = params if isinstance(params, dict) else raw.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind == "linear":
        return {"rope_theta": float(theta), "rope_scaling": "linear", "rope_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {
            "rope_theta": float(theta),
            "rope_scaling": "llama3",
            "rope_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_positions": int(scaling["original_max_position_embeddings"]),
        }
    raise CheckpointError(
        f"{file}: {field}.rope_type is {kind!r}; SimpleGPT computes default, linear and llama3 rotary positions"
    )


def _refuse_unsupported(raw: dict, file: Path) -> None:
    """One line per setting SimpleGPT does not compute, naming the field."""
    if raw.get("use_sliding_window"):
        raise CheckpointError(
            f"{file}: use_sliding_window is true; SimpleGPT attends to the whole context in every layer"
        )
    sliding = [t for t in raw.get("layer_types") or () if t != "full_attention"]
    if sliding:
        raise CheckpointError(
            f"{file}: layer_types has {sliding[0]!r} layers; SimpleGPT attends to the whole context in every layer"
        )
    for key in MOE_FIELDS:
        if raw.get(key):
            raise CheckpointError(
                f"{file}: {key} is {raw[key]!r}; SimpleGPT has one dense MLP per layer, not a mixture of experts"
            )
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act is {raw['hidden_act']!r}; SimpleGPT's SwiGLU uses silu")


def config_from_hf(raw: dict, architecture: str, file: Path) -> GPTConfig:
    """The GPTConfig of a Llama-family config.json, refusing every setting SimpleGPT does not compute."""
    family = ARCHITECTURES[architecture]
    _refuse_unsupported(raw, file)
    try:
        n_embd, n_head = raw["hidden_size"], raw["num_attention_heads"]
        shape = dict(
            vocab_size=raw["vocab_size"],
            block_size=raw["max_position_embeddings"],
            n_layer=raw["num_hidden_layers"],
            n_head=n_head,
            n_embd=n_embd,
            n_inner=raw["intermediate_size"],
        )
    except KeyError as exc:
        raise CheckpointError(f"{file}: no {exc.args[0]}; a {architecture} config.json has it") from None
    kv = raw.get("num_key_value_heads") or n_head
    head_dim = raw.get("head_dim") or n_embd // n_head
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = attention_bias if family["qkv_bias"] is None else family["qkv_bias"]
    try:
        return GPTConfig(
            **shape,
            dropout=0.0,
            bias=False,
            norm="rmsnorm",
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            position="rope",
            **_rope(raw, file),
            mlp="swiglu",
            n_kv_head=None if kv == n_head else kv,
            head_dim=None if n_embd % n_head == 0 and head_dim == n_embd // n_head else head_dim,
            qk_norm=family["qk_norm"],
            qkv_bias=qkv_bias or None,
            attn_proj_bias=attention_bias or None,
            mlp_bias=bool(raw.get("mlp_bias", False)) or None,
            tied_head=bool(raw.get("tie_word_embeddings", False)),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def _split(config: GPTConfig, part: str) -> list[int]:
    """Rows of each stacked Hugging Face tensor in one SimpleGPT part (the same for weight and bias)."""
    if part == "attn.qkv":
        return [
            config.n_head * config.head_size,
            config.kv_heads * config.head_size,
            config.kv_heads * config.head_size,
        ]
    if part == "ffn.fc":
        return [config.mlp_width, config.mlp_width]
    return []


def _names(ours: str) -> tuple[str, tuple[str, ...]]:
    """(SimpleGPT part, the Hugging Face names stacked into `ours`), e.g. blocks.0.attn.qkv.bias -> q/k/v biases."""
    stem, kind = ours.rsplit(".", 1)
    if stem in TOP:
        return stem, (f"{TOP[stem]}.{kind}",)
    _, i, part = stem.split(".", 2)
    return part, tuple(f"model.layers.{i}.{theirs}.{kind}" for theirs in PARTS[part])


def to_edgegpt(
    state: dict[str, torch.Tensor], config: GPTConfig, expected: dict[str, torch.Size], file: Path
) -> dict[str, torch.Tensor]:
    """Llama-family tensors -> a SimpleGPT state dict (`expected`: its names and shapes), checked by name and shape."""
    state = {k: v for k, v in state.items() if not k.endswith(BUFFERS)}
    head = state.pop("lm_head.weight", None) if config.tied_head else None
    if head is not None and not torch.equal(head, state.get("model.embed_tokens.weight", head)):
        raise CheckpointError(
            f"{file}: lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings is true; "
            "transformers would ignore the stored head: set tie_word_embeddings to false if the head is meant"
        )
    names = {ours: _names(ours) for ours in expected}
    wanted = {theirs for _, group in names.values() for theirs in group}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: tensors do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "is config.json the one saved with these weights (its bias, head_dim and tie_word_embeddings settings)?"
        )
    out = {}
    for ours, (part, group) in names.items():
        tensor = torch.cat([state[theirs] for theirs in group]) if len(group) > 1 else state[group[0]]
        if tensor.shape != expected[ours]:
            shapes = ", ".join(f"{theirs} {tuple(state[theirs].shape)}" for theirs in group)
            raise CheckpointError(
                f"{file}: {shapes} but config.json implies {tuple(expected[ours])} for {ours}; "
                "the config does not belong to these weights"
            )
        out[ours] = tensor.contiguous()
    if config.tied_head:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def from_edgegpt(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """A SimpleGPT state dict -> Hugging Face tensors (a tied lm_head left out, as save_pretrained does)."""
    out = {}
    for ours, tensor in state.items():
        if ours == "lm_head.weight" and config.tied_head:
            continue
        part, group = _names(ours)
        pieces = tensor.split(_split(config, part)) if len(group) > 1 else (tensor,)
        for theirs, piece in zip(group, pieces, strict=True):
            out[theirs] = piece.detach().cpu().contiguous().clone()
    return out


def architecture_of(config: GPTConfig) -> str:
    """The transformers class that computes a Llama-family SimpleGPT: Qwen3 with q/k norm, Qwen2 with biases on
    q, k and v only, else Llama.

    Raises:
        ConfigError: a mix that no class computes (q/k norm with learned positions, say).
    """
    if config.norm != "rmsnorm" or config.position != "rope" or config.mlp != "swiglu":
        raise ConfigError(
            "only GPT-2 (layernorm, learned, gelu) or Llama-family (rmsnorm, rope, swiglu) models export to Hugging Face; "
            f"this one has norm {config.norm!r}, position {config.position!r}, mlp {config.mlp!r}"
        )
    qkv, proj = config.bias_of("qkv"), config.bias_of("attn_proj")
    if config.qk_norm:
        arch = "Qwen3ForCausalLM"
    elif qkv and not proj and not config.bias_of("mlp"):
        arch = "Qwen2ForCausalLM"
    else:
        arch = "LlamaForCausalLM"
    if qkv != proj and arch != "Qwen2ForCausalLM":
        raise ConfigError(f"qkv_bias {qkv} with attn_proj_bias {proj}: {arch}'s attention_bias sets both together")
    if config.bias_of("mlp") and arch != "LlamaForCausalLM":
        raise ConfigError(f"mlp_bias True: only LlamaForCausalLM has MLP biases, and this model needs {arch}")
    return arch


def hf_config(config: GPTConfig, special: dict[str, Any]) -> dict[str, Any]:
    """A config.json (transformers' field names) for a Llama-family SimpleGPT; `special`: bos/eos/pad token ids."""
    arch = architecture_of(config)
    rope: dict[str, Any] = {"rope_type": "default"}
    if config.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_positions,
        }
    out = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch]["model_type"],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "attention_bias": config.bias_of("qkv") if arch != "Qwen2ForCausalLM" else False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tied_head,
        "use_cache": True,
        "torch_dtype": "float32",
        # transformers 4 reads rope_theta/rope_scaling, 5 reads rope_parameters (and converts the former)
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else rope,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        **special,
    }
    if arch == "LlamaForCausalLM":
        out["mlp_bias"] = config.bias_of("mlp")
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return out
