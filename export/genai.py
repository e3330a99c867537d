"""onnxruntime-genai interop: the `genai_config.json` and `tokenizer_config.json` that let genai load a bundle.

With them, `onnxruntime_genai.Model(bundle_dir)` runs `model.onnx` as it is, so C, C++, C# and Java apps can
embed the model through onnxruntime-genai. The graph has separate past keys and values
(`past_key_values.%d.key`), so a GPT-2-shaped model's type is genai's generic `decoder`; its `gpt2` type would need
one combined (2, B, H, P, D) past per layer, which the fused MultiHeadAttention kernel does not take and which
was no faster (docs/design.md, "3. The graph"). A Llama-family model gets the type genai's own builder writes
for its architecture ("llama", "qwen2", "qwen3": `model_type`, from edgegpt.train.hf_llama's table), which
genai runs with the same decoder I/O names, KV heads (`num_key_value_heads`) and `head_size`; its special ids
are the imported model's (bos, every eos id as a list, pad). `search.past_present_share_buffer` follows the KV
layout: off for "concat" (the MultiHeadAttention graph grows its cache by concatenation), on for "shared_buffer"
(the GroupQueryAttention graph updates one (B, H, max_length, D) buffer in place, as genai's own builder does).
genai's tokenizer (onnxruntime-extensions) reads `tokenizer.json` through the Hugging Face
`tokenizer_config.json`; edgegpt's byte-level BPE is GPT-2's tokenizer class.
References: onnxruntime-genai docs "Config reference"; onnxruntime_genai/models/builders/base.py
(`make_genai_config`); src/models/model_type.h (the LLM types).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgegpt.config import GPTConfig
from edgegpt.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
)
from edgegpt.tokenizer import EOT, TOKENIZER_CONFIG

__all__ = ["GENAI_CONFIG", "TOKENIZER_CONFIG", "genai_config", "model_type", "tokenizer_config", "write_genai_files"]

GENAI_CONFIG = "genai_config.json"
# tokenizer_config.json keys an imported model's own values replace (Checkpoint.special_tokens)
SPECIAL_KEYS = ("tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token")


def model_type(config: GPTConfig) -> str:
    """genai's model.type: the Hugging Face model_type of a Llama-family architecture ("llama", "qwen2", "qwen3"),
    which genai's builder writes too; "decoder" (genai's generic decoder) for a GPT-2-shaped model.

    >>> model_type(GPTConfig.preset("tiny", vocab_size=320))
    'decoder'
    """
    if config.position != "rope":
        return "decoder"
    from edgegpt.train import hf_llama  # torch: only for the family's table

    return hf_llama.ARCHITECTURES[hf_llama.architecture_of(config)]["model_type"]


def genai_config(
    config: GPTConfig,
    eot_token_id: int,
    model_file: str = MODEL_FILE,
    *,
    share_buffer: bool = False,
    model_type: str = "decoder",
    generation_config: dict | None = None,
) -> dict[str, Any]:
    """genai_config.json for `model_file`: greedy search over the whole context.

    `share_buffer` (KV layout "shared_buffer") sets search.past_present_share_buffer. The special ids are an
    imported model's `generation_config` (bos_token_id, eos_token_id: one id or a list, pad_token_id), each
    missing one `eot_token_id`; without it (GPT-2), end-of-text is bos, eos and pad.

    >>> genai_config(GPTConfig.preset("tiny", vocab_size=320), 0)["model"]["decoder"]["num_hidden_layers"]
    2
    """
    genai_name = lambda name: name.replace("{}", "%d")  # noqa: E731  edgegpt's "{}" -> genai's "%d"
    special = {key: (generation_config or {}).get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {
        "model": {
            "type": model_type,
            **{key: eot_token_id if value is None else value for key, value in special.items()},
            "context_length": config.block_size,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": config.head_size,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.kv_heads,
                "num_hidden_layers": config.n_layer,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": genai_name(PAST_KEY),
                    "past_value_names": genai_name(PAST_VALUE),
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": genai_name(PRESENT_KEY),
                    "present_value_names": genai_name(PRESENT_VALUE),
                },
            },
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": config.block_size,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def tokenizer_config(
    config: GPTConfig, chat_template: str | None = None, special: dict | None = None
) -> dict[str, Any]:
    """The Hugging Face tokenizer_config.json that genai's tokenizer needs beside tokenizer.json, with the
    model's chat template when it has one (where `transformers` and edgegpt's runtime read it). An imported
    model's own special tokens (`special`: its kept tokenizer_config, e.g. Llama 3's <|begin_of_text|> and
    add_bos_token) replace GPT-2's: a chat template renders them as `bos_token` and `eos_token`."""
    own = {key: special[key] for key in SPECIAL_KEYS if special.get(key) is not None} if special else {}
    return {
        "tokenizer_class": "GPT2Tokenizer",
        **({} if special else {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}),
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        **own,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    }


def write_genai_files(
    bundle: Path,
    config: GPTConfig,
    eot_token_id: int,
    *,
    share_buffer: bool = False,
    chat_template: str | None = None,
    special: tuple[dict, dict] = ({}, {}),
    model_type: str = "decoder",
) -> list[str]:
    """Write genai_config.json and tokenizer_config.json into `bundle`; return their names. `special`: an imported
    model's (tokenizer_config, generation_config) (`Checkpoint.special_tokens`), ({}, {}) for edgegpt's own."""
    genai = genai_config(
        config, eot_token_id, share_buffer=share_buffer, model_type=model_type, generation_config=special[1]
    )
    tokenizer = tokenizer_config(config, chat_template, special[0])
    for name, content in ((GENAI_CONFIG, genai), (TOKENIZER_CONFIG, tokenizer)):
        (bundle / name).write_text(json.dumps(content, indent=2) + "\n")
    return [GENAI_CONFIG, TOKENIZER_CONFIG]
