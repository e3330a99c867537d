"""Reference generation in PyTorch with the KV cache: the oracle that the ONNX runtime is tested against.

Greedy decoding here and in `edgegpt.runtime` must give identical token ids on the same weights.
"""

from __future__ import annotations

import torch

from edgegpt.errors import ContextLengthError, SamplingError
from edgegpt.config import GPTConfig  # noqa: F401  (used by the doctest)
from edgegpt.train.model import SimpleGPT


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits -> (B, V) logits with temperature applied and tokens outside top-k / top-p at -inf."""
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: SimpleGPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    sampled_vocab_size: int | None = None,
) -> torch.Tensor:
    """Continue the prompts `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + new) ids.

    temperature 0 is greedy. Prefill runs once, then one token per step through the KV cache.
    `sampled_vocab_size`: ids at or above it are never picked (a padded vocabulary; see
    `GPTConfig.sampled_ids`), as in `edgegpt.runtime.Sampler`.

    >>> model = SimpleGPT(GPTConfig.preset("tiny", vocab_size=64)).eval()
    >>> generate(model, torch.zeros(1, 2, dtype=torch.long), 3).shape
    torch.Size([1, 5])
    """
    if temperature < 0 or temperature != temperature:
        raise SamplingError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or max_new_tokens < 0:
        raise SamplingError(f"top_k and max_new_tokens must be >= 0, got {top_k} and {max_new_tokens}")
    if idx.size(1) + max_new_tokens > model.config.block_size:
        raise ContextLengthError(
            f"prompt of {idx.size(1)} + {max_new_tokens} new tokens exceed block_size {model.config.block_size}"
        )
    generator = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    model.eval()
    out, cache, step_input = idx, None, idx
    for _ in range(max_new_tokens):
        logits, cache = model(step_input, cache)
        logits = logits[:, -1, :sampled_vocab_size].float()  # (B, V): only the last position, never padded ids
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)  # (B, 1)
        else:
            probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        out = torch.cat([out, next_id], dim=1)
        step_input = next_id
        if eos_token_id is not None and bool((next_id == eos_token_id).all()):
            break
    return out
