"""onnxruntime-genai interop: the `genai_config.json` and `tokenizer_config.json` that let genai load a bundle.

With them, `onnxruntime_genai.Model(bundle_dir)` runs `model.onnx` as it is, so C, C++, C# and Java apps can
embed the model through onnxruntime-genai. The graph has separate past keys and values
(`past_key_values.%d.key`), so the model type is genai's generic `decoder`; its `gpt2` type would need one
combined (2, B, H, P, D) past per layer, which the fused MultiHeadAttention kernel does not take and which
was no faster (docs/design.md, "3. The graph"). `search.past_present_share_buffer` follows the KV layout: off
for "concat" (the MultiHeadAttention graph grows its cache by concatenation), on for "shared_buffer" (the
GroupQueryAttention graph updates one (B, H, max_length, D) buffer in place, as genai's own builder does).
genai's tokenizer (onnxruntime-extensions) reads `tokenizer.json` through the Hugging Face
`tokenizer_config.json`; edgegpt's byte-level BPE is GPT-2's tokenizer class.
References: onnxruntime-genai docs "Config reference"; onnxruntime_genai/models/builders/base.py
(`make_genai_config`).
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

__all__ = ["GENAI_CONFIG", "TOKENIZER_CONFIG", "genai_config", "tokenizer_config", "write_genai_files"]

GENAI_CONFIG = "genai_config.json"


def genai_config(
    config: GPTConfig, eot_token_id: int, model_file: str = MODEL_FILE, *, share_buffer: bool = False
) -> dict[str, Any]:
    """genai_config.json for `model_file`: greedy search over the whole context, EOT as bos, eos and pad.

    `share_buffer` (KV layout "shared_buffer") sets search.past_present_share_buffer.

    >>> genai_config(GPTConfig.preset("tiny", vocab_size=320), 0)["model"]["decoder"]["num_hidden_layers"]
    2
    """
    genai_name = lambda name: name.replace("{}", "%d")  # noqa: E731  edgegpt's "{}" -> genai's "%d"
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": eot_token_id,
            "eos_token_id": eot_token_id,
            "pad_token_id": eot_token_id,
            "context_length": config.block_size,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": config.head_size,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.n_head,
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


def tokenizer_config(config: GPTConfig, chat_template: str | None = None) -> dict[str, Any]:
    """The Hugging Face tokenizer_config.json that genai's tokenizer needs beside tokenizer.json, with the
    model's chat template when it has one (where `transformers` and edgegpt's runtime read it)."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    }


def write_genai_files(
    bundle: Path, config: GPTConfig, eot_token_id: int, *, share_buffer: bool = False, chat_template: str | None = None
) -> list[str]:
    """Write genai_config.json and tokenizer_config.json into `bundle`; return their names."""
    genai = genai_config(config, eot_token_id, share_buffer=share_buffer)
    for name, content in ((GENAI_CONFIG, genai), (TOKENIZER_CONFIG, tokenizer_config(config, chat_template))):
        (bundle / name).write_text(json.dumps(content, indent=2) + "\n")
    return [GENAI_CONFIG, TOKENIZER_CONFIG]
