"""SimpleGPT: a decoder-only transformer with GPT-2's exact math, and a KV cache.

The five parts of the design: `SelfAttentionHead` (the causal attention computation, applied to any
number of heads at once), `MultiHeadSelfAttention` (fused QKV projection + all heads batched),
`FeedForward`, `TransformerBlock` (pre-LayerNorm) and `SimpleGPT`.

GPT-2 math: learned token + absolute position embeddings, pre-LN blocks, LayerNorm eps 1e-5, MLP of
4 x n_embd with tanh-approximate GELU (or nanoGPT's exact erf GELU: `GPTConfig.gelu`), a final LayerNorm
and an lm_head tied to the token embedding. `bias=False` drops every Linear and LayerNorm bias, as nanoGPT's
option does.
References: Radford et al. 2019 (GPT-2); Hendrycks & Gimpel 2016 (GELU); Karpathy's nanoGPT model.py.

The KV cache is a tuple with one (key, value) pair per layer, each (B, n_head, past, head_size).
`SimpleGPT.forward` with cache inputs is the path that the ONNX export traces.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgegpt.config import GPTConfig
from edgegpt.errors import ContextLengthError

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class SelfAttentionHead(nn.Module):
    """Causal scaled dot-product attention of one or more heads; parameter-free.

    q (B, nh, T, hs), k and v (B, nh, P+T, hs) with P cached positions, an optional key mask
    (B, P+T) of 1 (real) / 0 (padding) -> (B, nh, T, hs). nh = 1 is the design's single head.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout = config.dropout
        causal = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal", causal.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, q, k, v, attention_mask=None):
        T, S = q.size(2), k.size(2)
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None and S == T:
            # Training and plain prefill: the fused kernel's top-left causal mask is right when T == S.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        # With a cache the queries are the *last* T of S positions, so the causal mask is the
        # bottom-right block rows [S-T, S) of the buffer (is_causal=True would align it top-left).
        allowed = self.causal[:, :, S - T : S, :S]  # (1, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        # A finite fill (not -inf) keeps fully masked rows (queries on left padding) free of NaN.
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, torch.finfo(q.dtype).min
        )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)  # (B, nh, T, hs)


class MultiHeadSelfAttention(nn.Module):
    """x (B, T, C) float -> (B, T, C), with a per-layer (key, value) cache of (B, nh, P, hs) each.

    One fused QKV projection and one batched attention over all heads; no loop over heads.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.head = SelfAttentionHead(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, past=None, attention_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P, hs) ++ (B, nh, T, hs) -> (B, nh, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        y = self.head(q, k, v, attention_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh, hs) -> (B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class FeedForward(nn.Module):
    """x (B, T, C) -> (B, T, C): Linear(C, 4C), GELU (tanh-approximate or exact erf), Linear(4C, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + ffn(ln_2(x)). x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = MultiHeadSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.ffn = FeedForward(config)

    def forward(self, x, past=None, attention_mask=None):
        a, present = self.attn(self.ln_1(x), past, attention_mask)
        x = x + a
        x = x + self.ffn(self.ln_2(x))
        return x, present


class SimpleGPT(nn.Module):
    """idx (B, T) int64 -> logits (B, T, vocab_size) float32, plus the updated KV cache.

    >>> model = SimpleGPT(GPTConfig.preset("tiny", vocab_size=256))
    >>> logits, cache = model(torch.zeros(1, 3, dtype=torch.long))
    >>> tuple(logits.shape), tuple(cache[0][0].shape)
    ((1, 3, 256), (1, 2, 3, 32))
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied lm_head counted once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def forward(self, idx, past_key_values: KVCache | None = None, attention_mask=None, position_ids=None):
        """Run the model on new tokens `idx`, continuing from `past_key_values` if given.

        Args:
            idx: (B, T) int64 token ids.
            past_key_values: per layer (key, value), each (B, n_head, P, head_size); None for P = 0.
            attention_mask: (B, P+T), 1 for real tokens and 0 for (left) padding; None means all real.
            position_ids: (B, T) int64; default P, P+1, ..., P+T-1. Pass cumsum(mask) - 1 for padded rows.

        Returns:
            logits (B, T, vocab_size) and the new cache, per layer (key, value) of (B, n_head, P+T, head_size).
        """
        B, T = idx.shape
        P = 0 if past_key_values is None else past_key_values[0][0].size(2)
        if P + T > self.config.block_size:
            raise ContextLengthError(f"{P} cached + {T} new tokens exceed block_size {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(position_ids))  # (B, T, C)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, None if past_key_values is None else past_key_values[i], attention_mask)
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))  # (B, T, C) @ (C, V) -> (B, T, V)
        return logits, tuple(presents)
