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
  `total_sequence_length` == T tells the first prompt (the past is not read) from decode. The same graph also runs like "concat": given a past of
  exactly P positions it returns a new (B, H, P+T, D) present (validation and genai without buffer sharing
  do that). Limits of onnxruntime's CPU kernel: head_size % 8 == 0 (checked before export), and T > 1 after
  a past (a second prompt chunk) needs batch 1; `edgegpt.runtime` never does that (prefill starts from an
  empty cache, decode feeds one token). A static (B, L) mask with zeros after the current length works for
  decode steps, left-padded batches included (seqlens_k is the last 1, not the mask's width): edgegpt's runtime
  decodes that way, as onnxruntime-genai does.

Choices (measurements: docs/design.md, "3. The graph"):
- Attention is emitted directly as `com.microsoft.MultiHeadAttention` (unidirectional=1, a (B, P+T)
  key-padding mask, the QKV bias as its bias input, separate BNSH past/present), from an autograd.Function
  `symbolic`. onnxruntime's transformer optimizer fuses attention only when it is written as the classic
  GPT-2 op pattern, so a traced SDPA stays ~20 unfused ops per layer and decodes slower. The GPT-2
  `Attention` op with one combined (2, B, H, P, D) past per layer was no faster and would break the
  separate-key/value contract (genai "decoder" naming). GroupQueryAttention with a shared past/present
  buffer is faster but needs another KV layout and cannot take a multi-token chunk after a past at
  batch > 1: it is the "gqa" graph above. The CPU MultiHeadAttention kernel takes an empty past (P = 0),
  left padding and a causal block at any offset: exactly the "concat" contract.
- Default "gqa": through `edgegpt.runtime.Generator` it decodes faster than "mha" in fp32, int8 and int4,
  with fp32 greedy tokens equal to PyTorch's. The gain is the in-place cache (no per-step allocation or
  copy), packed QKV without a Split, and less Python per step (no presents to fetch and rebind);
  attention_bias costs nothing measurable. "mha" stays for head sizes that are not a multiple of 8,
  onnxruntime 1.20-1.21, and fp32 on CUDA (onnxruntime's CUDA GroupQueryAttention kernel takes
  float16/bfloat16 only; a float16 bundle has it).
- Exporter: the TorchScript-based one (`dynamo=False`). Its custom-op `symbolic` is a few lines, it traces
  much faster than dynamo, and one trace with P = 5 keeps P = 0 and T = 1 correct. `dynamo=True` also
  leaves SDPA unfused; emitting the contrib op there needs a torch.library op plus an onnxscript
  translation, and torch.export specialises example sizes 0 and 1. TorchScript export is deprecated
  upstream: porting `symbolic` to a dynamo translation is the way out when it goes.
- Opset 17: the lowest with LayerNormalization as one op (what the fusions match); older onnxruntime
  builds (mobile) run it. 18 and 19 give the same fused graph. 20 is refused: it exports GELU as ONNX's
  `Gelu(approximate="tanh")`, which onnxruntime 1.32's optimizer rewrites into the erf-based `BiasGelu`,
  a silent change of the model's function.
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
from edgegpt.train.model import MultiHeadSelfAttention, SimpleGPT

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

    def forward(self, x, past, attention_mask):
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

    qkv (B, T, 3C) with the bias added, past_k / past_v (B, nh, P, hs), the `_GQAMaskInputs`
    -> y (B, T, C), present_k / present_v (B, nh, P+T, hs).
    """

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens, total, bias, n_head: int):
        B, T, C3 = qkv.shape
        q, k, v = (
            t.view(B, T, n_head, C3 // (3 * n_head)).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2)
        )  # (B, nh, T, hs)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, nh, P+T, hs)
        S = k.size(2)
        causal = torch.ones(S, S, dtype=torch.bool).tril()[S - T :]  # (T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~causal, torch.finfo(q.dtype).min))
        return y.transpose(1, 2).reshape(B, T, C3 // 3), k, v  # (B, nh, T, hs) -> (B, T, C)

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens, total, bias, n_head: int):
        absent = g.op("prim::Constant")  # an omitted optional input ("")
        absent.setType(torch._C.OptionalType.ofTensor())
        y, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv,
            absent,
            absent,
            past_k,
            past_v,
            seqlens,
            total,  # packed QKV: key and value absent
            absent,
            absent,
            absent,
            bias,  # no rotary (cos, sin, position_ids); attention_bias for left padding
            num_heads_i=n_head,
            kv_num_heads_i=n_head,
            outputs=3,
        )
        sizes = qkv.type().varyingSizes()
        y.setType(qkv.type().with_sizes([sizes[0], sizes[1], sizes[2] // 3 if sizes[2] else None]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return y, present_k, present_v


class _ExportGQAAttention(nn.Module):
    """Stands in for MultiHeadSelfAttention in the "gqa" traced copy, sharing its `qkv` and `proj` weights."""

    def __init__(self, attn: MultiHeadSelfAttention):
        super().__init__()
        self.qkv, self.proj, self.n_head = attn.qkv, attn.proj, attn.n_head

    def forward(self, x, past, gqa_inputs):
        qkv = self.qkv(x)  # (B, T, C) @ (C, 3C) + bias -> (B, T, 3C): the kernel takes Q, K, V packed
        y, present_k, present_v = _GroupQueryAttentionOp.apply(qkv, past[0], past[1], *gqa_inputs, self.n_head)
        return self.proj(y), (present_k, present_v)


class _FlatIO(nn.Module):
    """SimpleGPT with the graph's flat I/O: (ids, mask, positions, *past) -> (logits, *present)."""

    def __init__(self, model: SimpleGPT, attention: str = DEFAULT_ATTENTION):
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the caller's model is left untouched
        self.gqa = attention == "gqa"
        for block in self.model.blocks:
            block.attn = _ExportGQAAttention(block.attn) if self.gqa else _ExportAttention(block.attn)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = tuple(zip(past[0::2], past[1::2]))
        # The blocks hand `attention_mask` to their attention module untouched: for "gqa" it carries the
        # mask-derived inputs, computed once here instead of once per layer.
        mask = _GQAMaskInputs.apply(attention_mask, input_ids) if self.gqa else attention_mask
        logits, presents = self.model(input_ids, cache, mask, position_ids)
        return (logits, *(t for kv in presents for t in kv))


def example_inputs(model: SimpleGPT, batch: int, new: int, past: int) -> tuple[torch.Tensor, ...]:
    """Random ids, an all-ones mask, positions past..past+new-1 and random past tensors, in graph order."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new)
    kv = [torch.randn(batch, cfg.n_head, past, cfg.head_size) for _ in range(2 * cfg.n_layer)]
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
    return path


def optimize_graph(
    src: Path, dst: Path, config: GPTConfig, *, attention: str, external_data: bool
) -> tuple[dict, dict]:
    """onnxruntime's transformer fusions on either attention graph; -> (op counts before, op counts after).

    Raises:
        ExportError: the optimizer failed or left LayerNorm / GELU / attention unfused.
    """
    from edgegpt.export.optimize import optimize_onnx

    return optimize_onnx(src, dst, config, external_data=external_data, attention_op=_ATTENTIONS[attention][0])
