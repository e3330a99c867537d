"""SimpleGPT -> ONNX: one graph for prefill and decode, with onnxruntime's fused attention op in it.

The graph's I/O follow the bundle contract (edgegpt.manifest, onnxruntime-genai's "decoder" naming):

    input_ids (B, T) int64, attention_mask (B, P+T) int64 (1 real, 0 left padding), position_ids (B, T) int64,
    past_key_values.{i}.key / .value (B, n_head, P, head_size) float32
    -> logits (B, T, vocab_size) float32, present.{i}.key / .value (B, n_head, P+T, head_size) float32

with dynamic B, T and P (P = 0 is an empty past). Two attention graphs, chosen by `attention`:

- "mha" -> KV layout "concat": one `com.microsoft.MultiHeadAttention` per layer; present = concat(past, new),
  a new (B, H, P+T, D) tensor each step that the caller feeds back as the next past.
- "gqa" -> KV layout "shared_buffer": packed QKV MatMul + bias -> one `com.microsoft.GroupQueryAttention` per
  layer (num_heads = kv_num_heads = n_head, no rotary: the learned position embedding is added before; scale
  1/sqrt(head_size)). Its mask-derived inputs are computed once per graph from attention_mask (B, S):
  seqlens_k (B,) int32 = index of each row's last 1 (left padding occupies cache positions like real tokens,
  so a left-padded row's last real key is at S - 1), total_sequence_length = int32 S, and attention_bias
  (B, 1, T, S) float32 = 0 on real keys, -10000 on padding (the kernel applies the causal mask). -10000 is
  MultiHeadAttention's mask_filter_value: exp() of it is 0 in float32, and unlike the lowest float32 it stays
  finite in a float16 conversion, where -inf would turn the rows of padded queries into NaN.
  Semantics of "shared_buffer", as the runtime uses it: the caller allocates per layer one key and one value
  buffer of (B, H, L, D), L >= the longest sequence it will run (prompt + new tokens, at most block_size),
  and binds each buffer as both past_key_values.{i}.* and present.{i}.* (IOBinding). With S = seqlens_k + 1
  (a row's length, padding included), positions [0, S) of a row hold its keys/values; the kernel reads them
  and writes the T new ones at [S - T, S) in place, so nothing is copied per step; positions >= S are never
  read (stale values there are harmless). The prefill's mask is exactly as wide as the prompt, so
  `total_sequence_length` == T tells the first prompt (the past is not read) from decode. The same graph
  also runs like "concat": given a past of exactly P positions it returns a new (B, H, P+T, D) present
  (validation and genai without buffer sharing
  do that). Limits of onnxruntime's CPU kernel: head_size % 8 == 0 (checked before export), and T > 1 after
  a past (a second prompt chunk) needs batch 1; `edgegpt.runtime` never does that (prefill starts from an
  empty cache, decode feeds one token). A static (B, L) mask with zeros after the current length works for
  decode steps, left-padded batches included (seqlens_k is the last 1, not the mask's width): edgegpt's runtime
  decodes that way, as onnxruntime-genai does.

The Llama family (GPTConfig's family fields) exports to the "gqa" graph only, as onnxruntime-genai's builder
writes it: the packed QKV has n_head query and n_kv_head key/value heads (kv_num_heads = n_kv_head, the shared
buffers (B, n_kv_head, L, D)); the kernel applies the rotary itself (do_rotary=1, rotary_interleaved=0 for
transformers' rotate_half) from the initializers cos_cache / sin_cache (block_size + 1, head_size / 2), shared by
every layer (one row past the context: the kernel wants a row for every column of the attention mask, and the
runtime's SlotBatch keeps a scratch column at position block_size), at each token's cache position
seqlens_k + 1 - T onwards: position_ids stays a graph input (the contract) that nothing reads. Under left
padding those positions are shifted by the row's padding, which rotary attention cannot see (export/validate.py
says what that means for parity). Qwen3's q/k RMSNorm comes before the
rotary, so it runs before the kernel (split, norm per head, concat). RMSNorm is traced as the op pattern that
onnxruntime's optimizer fuses into SkipSimplifiedLayerNormalization (after each residual add) and
SimplifiedLayerNormalization (ln_1 of block 0 and the q/k norms). n_kv_head = 1 (multi-query attention) is
the same graph with kv_num_heads 1. Not for this family: "mha".

Behaviour (why each choice, with its measurements: docs/design.md, "3. The graph"):
- Attention is emitted directly as the contrib op, from an autograd.Function `symbolic`, so no optimizer has to
  match an op pattern.
- "gqa" is the default. "mha" is for head sizes that are not a multiple of 8, onnxruntime 1.20-1.21 and fp32 on
  CUDA (onnxruntime's CUDA GroupQueryAttention takes float16/bfloat16 only; a float16 bundle has it).
- The TorchScript-based exporter (`dynamo=False`) traces once with P = 5, which keeps P = 0 and T = 1 correct.
- Opsets 17-19 are accepted (17 by default); 20 is refused: it exports GELU as ONNX's `Gelu(approximate="tanh")`,
  which onnxruntime 1.32's optimizer rewrites into the erf-based `BiasGelu`, a silent change of the function.
- GELU (`GPTConfig.gelu`): at opset 17-19 the tanh approximation is traced as its Mul/Tanh/Add pattern and
  the exact GELU of nanoGPT as Div/Erf/Add/Mul; onnxruntime's optimizer fuses them into FastGelu and
  BiasGelu (Gelu without bias) respectively, and validate.py checks that each graph keeps its function.
References: onnxruntime ContribOperators.md (MultiHeadAttention, GroupQueryAttention); onnxruntime-genai's
model builder (the GroupQueryAttention graph and its mask-derived inputs); torch.onnx TorchScript exporter docs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgegpt.config import GPTConfig
from edgegpt.errors import ExportError
from edgegpt.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
)
from edgegpt.train.model import MultiHeadSelfAttention, SimpleGPT, apply_rotary, rotary

__all__ = [
    "ATTENTIONS",
    "DEFAULT_ATTENTION",
    "DEFAULT_OPSET",
    "OPSETS",
    "attention_op",
    "check_attention",
    "export_onnx",
    "input_names",
    "kv_layout",
    "optimize_graph",
    "output_names",
]

DEFAULT_OPSET = 17
OPSETS = range(17, 20)  # LayerNormalization needs 17; see the module docstring for 20
_TRACE_BATCH, _TRACE_T, _TRACE_PAST = 2, 3, 5  # no 0 or 1 in the example, so no size is specialised

# attention -> (contrib op, manifest graph.kv_cache.layout)
_ATTENTIONS = {
    "mha": ("MultiHeadAttention", "concat"),
    "gqa": ("GroupQueryAttention", "shared_buffer"),
}
ATTENTIONS = tuple(_ATTENTIONS)
DEFAULT_ATTENTION = "gqa"  # decodes faster than "mha" (fp32, int8, int4); see the docstring
_GQA_HEAD_MULTIPLE = 8  # onnxruntime's CPU GroupQueryAttention: "head_size must be a multiple of 8"
_MASK_FILTER = -10000.0  # the attention_bias of a padding key (see the module docstring)


def check_attention(config: GPTConfig, attention: str) -> None:
    """Refuse an unknown attention graph, or "gqa" for a head size that onnxruntime's kernel rejects.

    Raises:
        ExportError: naming the value and the fix.
    """
    if attention not in _ATTENTIONS:
        raise ExportError(f"attention {attention!r} is not supported; choose one of {', '.join(ATTENTIONS)}")
    attention_family = {"position", "n_kv_head", "head_dim", "qk_norm", "qkv_bias", "attn_proj_bias"}
    family = sorted(k for k in config.to_dict() if k in attention_family)
    if attention == "mha" and family:  # its MultiHeadAttention stand-in has n_head keys and no rotary
        raise ExportError(
            f"attention='mha' computes GPT-2's attention only; this model sets {', '.join(family)}: "
            "export with attention='gqa'"
        )
    if attention == "gqa" and config.head_size % _GQA_HEAD_MULTIPLE:
        C = config.n_embd
        fits = [h for h in range(1, C + 1) if C % h == 0 and (C // h) % _GQA_HEAD_MULTIPLE == 0]
        hint = f"train with n_head in {fits}" if fits else f"train with n_embd a multiple of {_GQA_HEAD_MULTIPLE}"
        raise ExportError(
            f"attention='gqa' needs head_size (n_embd {config.n_embd} / n_head {config.n_head} = {config.head_size}) "
            f"to be a multiple of {_GQA_HEAD_MULTIPLE} (onnxruntime's GroupQueryAttention kernel); "
            f"export with attention='mha' (--attention mha) or {hint}"
        )


def attention_op(attention: str) -> str:
    """The contrib op that carries the attention of each layer, e.g. "com.microsoft.GroupQueryAttention"."""
    return "com.microsoft." + _ATTENTIONS[attention][0]


def kv_layout(attention: str) -> str:
    """The manifest's graph.kv_cache.layout of an attention graph: "concat" or "shared_buffer"."""
    return _ATTENTIONS[attention][1]


def input_names(n_layer: int) -> list[str]:
    """The graph's input names, in order."""
    past = [name.format(i) for i in range(n_layer) for name in (PAST_KEY, PAST_VALUE)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past]


def output_names(n_layer: int) -> list[str]:
    """The graph's output names, in order."""
    return [LOGITS, *(name.format(i) for i in range(n_layer) for name in (PRESENT_KEY, PRESENT_VALUE))]


def _dynamic_axes(n_layer: int, attention: str) -> dict[str, dict[int, str]]:
    """Axis names as onnxruntime-genai's model builder writes them.

    A "gqa" present is max(past length, total) long (the buffer's length when shared), hence its own name.
    """
    b, t, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    present = "present_sequence_length" if attention == "gqa" else total
    axes = {INPUT_IDS: {0: b, 1: t}, ATTENTION_MASK: {0: b, 1: total}, POSITION_IDS: {0: b, 1: t}, LOGITS: {0: b, 1: t}}
    for name in input_names(n_layer)[3:]:
        axes[name] = {0: b, 2: past}
    for name in output_names(n_layer)[1:]:
        axes[name] = {0: b, 2: present}
    return axes


class _MultiHeadAttentionOp(torch.autograd.Function):
    """Exported as one com.microsoft.MultiHeadAttention node; computes the same in torch while tracing.

    q, k, v (B, T, C) before the bias, bias (3C) or None, mask (B, P+T) int64,
    past_k / past_v (B, nh, P, hs) -> y (B, T, C), present_k / present_v (B, nh, P+T, hs).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, past_k, past_v, n_head: int):
        B, T, C = q.shape
        if bias is not None:
            q, k, v = q + bias[:C], k + bias[C : 2 * C], v + bias[2 * C :]
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nh, P+T, hs)
        S = k.size(2)
        allowed = torch.ones(S, S, dtype=torch.bool).tril()[S - T :] & mask[:, None, None, :].bool()  # (B, 1, T, S)
        bias_mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_mask)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C), k, v

    @staticmethod
    def symbolic(g, q, k, v, bias, mask, past_k, past_v, n_head: int):
        absent = g.op("prim::Constant")  # an omitted optional input ("")
        absent.setType(torch._C.OptionalType.ofTensor())
        mask32 = g.op("Cast", mask, to_i=6)  # the kernel reads an int32 key-padding mask; ORT's CSE shares it
        y, present_k, present_v = g.op(
            "com.microsoft::MultiHeadAttention",
            q,
            k,
            v,
            absent if bias is None else bias,
            mask32,
            absent,
            past_k,
            past_v,  # attention_bias absent
            num_heads_i=n_head,
            unidirectional_i=1,  # causal, aligned bottom-right: query t sees keys <= P + t
            outputs=3,
        )
        y.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return y, present_k, present_v


class _ExportAttention(nn.Module):
    """Stands in for MultiHeadSelfAttention in the traced copy, sharing its `qkv` and `proj` weights.

    The QKV bias goes into the attention node (which adds it while splitting heads) instead of an Add.
    """

    def __init__(self, attn: MultiHeadSelfAttention):
        super().__init__()
        self.qkv, self.proj, self.n_head = attn.qkv, attn.proj, attn.n_head

    def forward(self, x, past, attention_mask, rope=None):
        B, T, C = x.shape
        q, k, v = F.linear(x, self.qkv.weight).split(C, dim=2)  # 3 x (B, T, C), bias not yet added
        y, present_k, present_v = _MultiHeadAttentionOp.apply(
            q, k, v, self.qkv.bias, attention_mask, past[0], past[1], self.n_head
        )
        return self.proj(y), (present_k, present_v)


def _constant(g, values, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


class _GQAMaskInputs(torch.autograd.Function):
    """GroupQueryAttention's mask-derived inputs, computed once per graph (every layer reads them).

    attention_mask (B, S) int64, input_ids (B, T) -> seqlens_k (B,) int32 (index of each row's last 1),
    total_sequence_length (1,) int32 (S), attention_bias (B, 1, T, S) float32 (0 real, -10000 padding).
    """

    @staticmethod
    def forward(ctx, mask, input_ids):
        B, S = mask.shape
        T = input_ids.size(1)
        seqlens = (S - 1 - mask.flip(1).argmax(1)).to(torch.int32)  # (B,): the last 1 of each row
        total = torch.tensor([S], dtype=torch.int32)
        padding = ~mask.bool()[:, None, None, :].expand(B, 1, T, S)  # (B, 1, T, S)
        bias = torch.zeros(B, 1, T, S).masked_fill(padding, _MASK_FILTER)
        return seqlens, total, bias

    @staticmethod
    def symbolic(g, mask, input_ids):
        last = g.op("ArgMax", mask, axis_i=1, keepdims_i=0, select_last_index_i=1)  # (B,) int64
        seqlens = g.op("Cast", last, to_i=torch.onnx.TensorProtoDataType.INT32)
        total = g.op("Cast", g.op("Shape", mask, start_i=1, end_i=2), to_i=torch.onnx.TensorProtoDataType.INT32)
        real = g.op("Cast", mask, to_i=torch.onnx.TensorProtoDataType.BOOL)
        bias = g.op(
            "Where", real, _constant(g, 0.0, torch.float32), _constant(g, _MASK_FILTER, torch.float32)
        )  # (B, S)
        bias = g.op("Unsqueeze", bias, _constant(g, [1, 2]))  # (B, 1, 1, S)
        rows = g.op(
            "Concat", _constant(g, [1, 1]), g.op("Shape", input_ids, start_i=1, end_i=2), _constant(g, [1]), axis_i=0
        )
        return seqlens, total, g.op("Expand", bias, rows)  # (B, 1, 1, S) x (1, 1, T, 1) -> (B, 1, T, S)


class _GroupQueryAttentionOp(torch.autograd.Function):
    """Exported as one com.microsoft.GroupQueryAttention node; computes the same in torch while tracing.

    qkv (B, T, (nh + 2 nkv) hs) packed with the bias added, past_k / past_v (B, nkv, P, hs), the
    `_GQAMaskInputs`, and for rotary models cos / sin caches (block_size + 1, hs/2) (else None)
    -> y (B, T, nh hs), present_k / present_v (B, nkv, P+T, hs).
    With the caches the kernel rotates q and k itself (do_rotary, the halves convention: rotary_interleaved 0)
    at the cache positions seqlens_k + 1 - T onwards, as onnxruntime-genai's builder has it.
    The head size comes in as a Python int, never as a traced `past_k.size(3)`: a traced size times n_kv_head = 1
    records `aten::mul(size, 1)` in this op's traced sub-block, and the TorchScript exporter's peephole pass
    (x * 1 -> x, alias-sensitive) then fails on that sub-block ("Argument passed to at() was not in the map").
    """

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens, total, bias, cos, sin, n_head: int, n_kv_head: int, hs: int):
        B, T, _ = qkv.shape
        q, k, v = qkv.split([n_head * hs, n_kv_head * hs, n_kv_head * hs], dim=2)
        q = q.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, n_kv_head, hs).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if cos is not None:
            pos = (seqlens.long() + 1 - T)[:, None] + torch.arange(T)  # (B, T): cache positions of the new tokens
            c, s = (torch.cat([t[pos], t[pos]], dim=-1)[:, None] for t in (cos, sin))  # (B, 1, T, hs)
            q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nkv, P+T, hs)
        S = k.size(2)
        ks, vs = (t.repeat_interleave(n_head // n_kv_head, dim=1) for t in (k, v))  # (B, nh, P+T, hs)
        causal = torch.ones(S, S, dtype=torch.bool).tril()[S - T :]  # (T, S)
        y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=bias.masked_fill(~causal, torch.finfo(q.dtype).min))
        return y.transpose(1, 2).reshape(B, T, n_head * hs), k, v  # (B, nh, T, hs) -> (B, T, nh hs)

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens, total, bias, cos, sin, n_head: int, n_kv_head: int, hs: int):
        absent = g.op("prim::Constant")  # an omitted optional input ("")
        absent.setType(torch._C.OptionalType.ofTensor())
        rotary = {} if cos is None else {"do_rotary_i": 1, "rotary_interleaved_i": 0}
        y, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv,
            absent,
            absent,
            past_k,
            past_v,
            seqlens,
            total,  # packed QKV: key and value absent
            # rotary caches (or none); position_ids absent: the kernel takes positions from seqlens_k;
            # attention_bias for left padding
            absent if cos is None else cos,
            absent if sin is None else sin,
            absent,
            bias,
            num_heads_i=n_head,
            kv_num_heads_i=n_kv_head,
            outputs=3,
            **rotary,
        )
        sizes = qkv.type().varyingSizes()
        y.setType(qkv.type().with_sizes([sizes[0], sizes[1], n_head * hs]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return y, present_k, present_v


class _ExportGQAAttention(nn.Module):
    """Stands in for MultiHeadSelfAttention in the "gqa" traced copy, sharing its `qkv`, `proj` and q/k norms.

    Qwen3's q/k norms come before the rotary, which the kernel applies: they run here, outside it.
    """

    def __init__(self, attn: MultiHeadSelfAttention):
        super().__init__()
        self.qkv, self.proj, self.n_head, self.n_kv_head, self.hs = (
            attn.qkv,
            attn.proj,
            attn.n_head,
            attn.n_kv_head,
            attn.hs,
        )
        self.q_norm, self.k_norm, self.widths = attn.q_norm, attn.k_norm, attn.widths
        self.qk_norm = not isinstance(attn.q_norm, nn.Identity)

    def forward(self, x, past, gqa_inputs, rope=None):
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, C) @ (C, (nh + 2 nkv) hs) + bias: the kernel takes Q, K, V packed
        if self.qk_norm:
            q, k, v = qkv.split(self.widths, dim=2)  # (B, T, nh hs), 2 x (B, T, nkv hs)
            q = self.q_norm(q.view(B, T, self.n_head, self.hs)).view(B, T, self.n_head * self.hs)
            k = self.k_norm(k.view(B, T, self.n_kv_head, self.hs)).view(B, T, self.n_kv_head * self.hs)
            qkv = torch.cat([q, k, v], dim=2)
        heads = (self.n_head, self.n_kv_head, self.hs)  # Python ints: no traced size reaches the op (see its docstring)
        y, present_k, present_v = _GroupQueryAttentionOp.apply(qkv, past[0], past[1], *gqa_inputs, *heads)
        return self.proj(y), (present_k, present_v)


class _ExportRMSNorm(nn.Module):
    """Stands in for nn.RMSNorm (which the TorchScript exporter cannot write at opset 17), sharing its weight.

    Written as the op pattern onnxruntime's optimizer fuses into (Skip)SimplifiedLayerNormalization:
    x * Reciprocal(Sqrt(mean(x^2) + eps)) * weight.
    """

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1): Sqrt then Reciprocal
        return x * inv_rms * self.weight


class _FlatIO(nn.Module):
    """SimpleGPT with the graph's flat I/O: (ids, mask, positions, *past) -> (logits, *present)."""

    def __init__(self, model: SimpleGPT, attention: str = DEFAULT_ATTENTION):
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the caller's model is left untouched
        self.gqa = attention == "gqa"
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.RMSNorm):
                    setattr(parent, name, _ExportRMSNorm(child))
        for block in self.model.blocks:
            block.attn = _ExportGQAAttention(block.attn) if self.gqa else _ExportAttention(block.attn)
        self.rope = None
        if model.inv_freq is not None:  # one pair of caches for every layer: initializers cos_cache, sin_cache
            # block_size + 1 rows: onnxruntime refuses a mask wider than the caches ("cos_cache dimension 0 shall
            # not be less than total_sequence_length"), and SlotBatch's mask has a scratch column past the context.
            positions = torch.arange(model.config.block_size + 1)
            cos, sin = (t[0, 0, :, : model.config.head_size // 2] for t in rotary(model.inv_freq, positions[None]))
            self.register_buffer("cos_cache", cos.contiguous(), persistent=False)
            self.register_buffer("sin_cache", sin.contiguous(), persistent=False)
            self.rope = True

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = tuple(zip(past[0::2], past[1::2]))
        # The blocks hand `attention_mask` to their attention module untouched: for "gqa" it carries the
        # mask-derived inputs (and the rotary caches), computed once here instead of once per layer.
        mask = attention_mask
        if self.gqa:
            caches = (self.cos_cache, self.sin_cache) if self.rope else (None, None)
            mask = (*_GQAMaskInputs.apply(attention_mask, input_ids), *caches)
        logits, presents = self.model(input_ids, cache, mask, position_ids)
        return (logits, *(t for kv in presents for t in kv))


def example_inputs(model: SimpleGPT, batch: int, new: int, past: int) -> tuple[torch.Tensor, ...]:
    """Random ids, an all-ones mask, positions past..past+new-1 and random past tensors, in graph order."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new)
    kv = [torch.randn(batch, cfg.kv_heads, past, cfg.head_size) for _ in range(2 * cfg.n_layer)]
    return (ids, mask, positions, *kv)


def export_onnx(
    model: SimpleGPT, path: str | Path, *, opset: int = DEFAULT_OPSET, attention: str = DEFAULT_ATTENTION
) -> Path:
    """Trace `model` into an ONNX file at `path` (weights as external data beside it above 2 GB).

    Args:
        attention: "mha" (MultiHeadAttention, KV layout "concat") or "gqa" (GroupQueryAttention, KV layout
            "shared_buffer"); see the module docstring.

    Raises:
        ExportError: an opset outside `OPSETS`, an attention that `check_attention` refuses, or the exporter failed.
    """
    if opset not in OPSETS:
        raise ExportError(
            f"opset {opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})"
        )
    check_attention(model.config, attention)
    path = Path(path)
    n_layer = model.config.n_layer
    args = example_inputs(model, _TRACE_BATCH, _TRACE_T, _TRACE_PAST)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about the Python-int size check in SimpleGPT.forward
            torch.onnx.export(
                _FlatIO(model, attention),
                args,
                str(path),
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                dynamic_axes=_dynamic_axes(n_layer, attention),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises assorted RuntimeError / OnnxExporterError subclasses
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc
    _finish_rotary_graph(path)
    return path


def _finish_rotary_graph(path: Path) -> None:
    """Two touches to a rotary graph, where GroupQueryAttention takes each token's position from seqlens_k:
    `position_ids` goes back among the inputs (the exporter and the optimizer prune it, unread, but the bundle
    contract and genai feed it), and the rotary tables become the initializers `cos_cache` / `sin_cache` that
    every layer reads (the exporter leaves them as Constant nodes), as onnxruntime-genai's builder names them."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 8 and n.input[7]]
    if not gqa:
        return
    if not any(i.name == POSITION_IDS for i in model.graph.input):
        positions = copy.deepcopy(next(i for i in model.graph.input if i.name == INPUT_IDS))  # (B, T) int64 too
        positions.name = POSITION_IDS
        model.graph.input.insert(2, positions)
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for index, name in ((7, "cos_cache"), (8, "sin_cache")):
        sources = {node.input[index] for node in gqa} & constants.keys()  # one, or one per layer: the same table
        for source in sources:
            if name not in {i.name for i in model.graph.initializer}:
                model.graph.initializer.append(
                    numpy_helper.from_array(numpy_helper.to_array(constants[source].attribute[0].t), name)
                )
            model.graph.node.remove(constants[source])
        for node in gqa:
            node.input[index] = name if node.input[index] in sources else node.input[index]
    onnx.save_model(model, str(path))


def optimize_graph(
    src: Path, dst: Path, config: GPTConfig, *, attention: str, external_data: bool
) -> tuple[dict, dict]:
    """onnxruntime's transformer fusions on either attention graph; -> (op counts before, op counts after).

    Raises:
        ExportError: the optimizer failed or left LayerNorm / GELU / attention unfused.
    """
    from edgegpt.export.optimize import optimize_onnx

    counts = optimize_onnx(src, dst, config, external_data=external_data, attention_op=_ATTENTIONS[attention][0])
    _finish_rotary_graph(dst)  # the optimizer prunes the unread position_ids too
    return counts
