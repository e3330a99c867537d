"""SimpleGPT: a decoder-only transformer with GPT-2's exact math or the Llama family's, and a KV cache.

The five parts of the design: `SelfAttentionHead` (the causal attention computation, applied to any
number of heads at once), `MultiHeadSelfAttention` (fused QKV projection + all heads batched),
`FeedForward`, `TransformerBlock` (pre-norm) and `SimpleGPT`.

GPT-2 math (the config's defaults): learned token + absolute position embeddings, pre-LN blocks, LayerNorm
eps 1e-5, MLP of 4 x n_embd with tanh-approximate GELU (or nanoGPT's exact erf GELU: `GPTConfig.gelu`), a
final LayerNorm and an lm_head tied to the token embedding. `bias=False` drops every Linear and LayerNorm
bias, as nanoGPT's option does.
The Llama family is the same spine with other config data, read here and nowhere else in the model:
`norm="rmsnorm"` (torch.nn.RMSNorm, `norm_eps`), `position="rope"` (rotary q and k, no position table;
`rope_scaling` "linear" or "llama3"), `mlp="swiglu"` (proj(silu(gate) * up); gate and up stacked in `fc`),
`n_kv_head` < n_head (grouped-query attention: `qkv` projects n_kv_head key and value heads, the cache holds
them, and each serves n_head / n_kv_head query heads), `qk_norm` (Qwen3), per-part bias flags and an untied
lm_head. The rotary follows transformers' Llama (rotate_half: the two halves of a head are the pairs).
References: Radford et al. 2019 (GPT-2); Hendrycks & Gimpel 2016 (GELU); Karpathy's nanoGPT model.py;
Touvron et al. 2023 (Llama); Su et al. 2021 (RoPE); transformers' models/llama/modeling_llama.py.

The KV cache is a tuple with one (key, value) pair per layer, each (B, n_kv_head, past, head_size).
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
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, 1, T, hs)


def make_norm(config: GPTConfig, width: int) -> nn.Module:
    """The config's norm over the last dimension: LayerNorm (bias per `bias`) or RMSNorm (weight only)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config: GPTConfig) -> torch.Tensor:
    """Rotary inverse frequencies (hs/2,) float32, scaled as `rope_scaling` says (transformers' formulas)."""
    hs = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if config.rope_scaling == "linear":
        return inv_freq / config.rope_factor
    if config.rope_scaling == "llama3":  # Llama 3.1: long wavelengths slowed by `factor`, short kept, a blend between
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_max_positions
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rotary(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> Rope:
    """cos and sin (B, 1, T, hs) of positions (B, T): each frequency twice, for the two halves of a head."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, 1) * (1, 1, hs/2) -> (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated: dimension i pairs with i + hs/2 (transformers' rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, nh, T, hs)


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
    """x (B, T, C) float -> (B, T, C), with a per-layer (key, value) cache of (B, nkv, P, hs) each.

    One fused QKV projection (nh query heads, nkv = n_kv_head key and value heads) and one batched attention
    over all heads; no loop over heads. Optional: q/k RMSNorm per head, then the rotary, before the cache.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.kv_heads, config.head_size
        self.widths = (self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs)
        self.qkv = nn.Linear(config.n_embd, sum(self.widths), bias=config.bias_of("qkv"))
        self.proj = nn.Linear(self.n_head * self.hs, config.n_embd, bias=config.bias_of("attn_proj"))
        self.q_norm = nn.RMSNorm(self.hs, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.hs, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.head = SelfAttentionHead(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, past=None, attention_mask=None, rope: Rope | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.widths, dim=2)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        q = self.q_norm(q.view(B, T, self.n_head, self.hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.hs)).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, P, hs) ++ (B, nkv, T, hs) -> (B, nkv, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        group = self.n_head // self.n_kv_head  # query heads per key/value head; 1 is multi-head attention
        ks, vs = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))  # (B, nh, P+T, hs)
        y = self.head(q, ks, vs, attention_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.hs)  # (B, T, nh, hs) -> (B, T, nh*hs)
        return self.resid_dropout(self.proj(y)), (k, v)


class FeedForward(nn.Module):
    """x (B, T, C) -> (B, T, C), W = `mlp_width` (4C by default).

    "gelu": Linear(C, W), GELU (tanh-approximate or exact erf), Linear(W, C).
    "swiglu": Linear(C, 2W) giving gate and up, silu(gate) * up, Linear(W, C).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width, bias = config.mlp_width, config.bias_of("mlp")
        self.fc = nn.Linear(config.n_embd, 2 * width if self.swiglu else width, bias=bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.proj = nn.Linear(width, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)  # (B, T, C) @ (C, W) -> (B, T, W); swiglu: (B, T, 2W), gate then up
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # 2 x (B, T, W)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.proj(h))  # (B, T, W) @ (W, C) -> (B, T, C)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + ffn(ln_2(x)). x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = MultiHeadSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.ffn = FeedForward(config)

    def forward(self, x, past=None, attention_mask=None, rope: Rope | None = None):
        a, present = self.attn(self.ln_1(x), past, attention_mask, rope)
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
        # Learned positions are a table; rotary positions are frequencies (a buffer, not a weight).
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        rope = rope_frequencies(config) if config.position == "rope" else None
        self.register_buffer("inv_freq", rope, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tied_head:
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
        return n - self.pos_emb.weight.numel() if non_embedding and self.pos_emb is not None else n

    def forward(self, idx, past_key_values: KVCache | None = None, attention_mask=None, position_ids=None):
        """Run the model on new tokens `idx`, continuing from `past_key_values` if given.

        Args:
            idx: (B, T) int64 token ids.
            past_key_values: per layer (key, value), each (B, n_kv_head, P, head_size); None for P = 0.
            attention_mask: (B, P+T), 1 for real tokens and 0 for (left) padding; None means all real.
            position_ids: (B, T) int64; default P, P+1, ..., P+T-1. Pass cumsum(mask) - 1 for padded rows.

        Returns:
            logits (B, T, vocab_size) and the new cache, per layer (key, value) of (B, n_kv_head, P+T, head_size).
        """
        B, T = idx.shape
        P = 0 if past_key_values is None else past_key_values[0][0].size(2)
        if P + T > self.config.block_size:
            raise ContextLengthError(f"{P} cached + {T} new tokens exceed block_size {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None if self.inv_freq is None else rotary(self.inv_freq, position_ids)  # 2 x (B, 1, T, hs)
        x = self.drop(x if self.pos_emb is None else x + self.pos_emb(position_ids))
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, None if past_key_values is None else past_key_values[i], attention_mask, rope)
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))  # (B, T, C) @ (C, V) -> (B, T, V)
        return logits, tuple(presents)
