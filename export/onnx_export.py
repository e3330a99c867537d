"""SimpleGPT -> ONNX: one graph for prefill and decode, with onnxruntime's fused attention op in it.

The graph's I/O follow the bundle contract (edgegpt.manifest, onnxruntime-genai's "decoder" naming):

    input_ids (B, T) int64, attention_mask (B, P+T) int64 (1 real, 0 left padding), position_ids (B, T) int64,
    past_key_values.{i}.key / .value (B, n_head, P, head_size) float32
    -> logits (B, T, vocab_size) float32, present.{i}.key / .value (B, n_head, P+T, head_size) float32

with dynamic B, T and P (P = 0 is an empty past). KV layout "concat": present = concat(past, new).

Choices, measured on the `small` preset (random weights, batch 1, prompt 32, 128 greedy tokens, 2 threads,
interleaved rounds, medians of 5-9; decode speed relative to PyTorch eager with its KV cache, same rounds):
- Attention is emitted directly as `com.microsoft.MultiHeadAttention` (unidirectional=1, a (B, P+T)
  key-padding mask, the QKV bias as its bias input, separate BNSH past/present), from an autograd.Function
  `symbolic`: 2.9-3.3x eager. onnxruntime's transformer optimizer fuses attention only when it is written
  as the classic GPT-2 op pattern, so a traced SDPA stays ~20 unfused ops per layer: 2.4x. The GPT-2
  `Attention` op with one combined (2, B, H, P, D) past per layer ran at the same speed (within 3 %) and
  would break the separate-key/value contract (genai "decoder" naming). GroupQueryAttention with a shared
  past/present buffer was 1.07-1.11x faster but needs another KV layout and cannot take a multi-token chunk
  after a past at batch > 1. The CPU MultiHeadAttention kernel takes an empty past (P = 0), left padding
  and a causal block at any offset: exactly the contract.
- Exporter: the TorchScript-based one (`dynamo=False`). Its custom-op `symbolic` is a few lines, it traces
  `small` in ~1 s (dynamo: ~19 s), and one trace with P = 5 keeps P = 0 and T = 1 correct. `dynamo=True`
  also leaves SDPA unfused (2.5-2.9x); emitting the contrib op there needs a torch.library op plus an
  onnxscript translation, and torch.export specialises example sizes 0 and 1. TorchScript export is
  deprecated upstream: porting `symbolic` to a dynamo translation is the way out when it goes.
- Opset 17: the lowest with LayerNormalization as one op (what the fusions match); older onnxruntime
  builds (mobile) run it. 18 and 19 give the same fused graph. 20 is refused: it exports GELU as ONNX's
  `Gelu(approximate="tanh")`, which onnxruntime 1.32's optimizer rewrites into the erf-based `BiasGelu`,
  a silent change of the model's function.
References: onnxruntime ContribOperators.md (MultiHeadAttention); torch.onnx TorchScript exporter docs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
from edgegpt.model import MultiHeadSelfAttention, SimpleGPT

__all__ = ["DEFAULT_OPSET", "OPSETS", "export_onnx", "input_names", "output_names"]

DEFAULT_OPSET = 17
OPSETS = range(17, 20)  # LayerNormalization needs 17; see the module docstring for 20
_TRACE_BATCH, _TRACE_T, _TRACE_PAST = 2, 3, 5  # no 0 or 1 in the example, so no size is specialised


def input_names(n_layer: int) -> list[str]:
    """The graph's input names, in order."""
    past = [name.format(i) for i in range(n_layer) for name in (PAST_KEY, PAST_VALUE)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past]


def output_names(n_layer: int) -> list[str]:
    """The graph's output names, in order."""
    return [LOGITS, *(name.format(i) for i in range(n_layer) for name in (PRESENT_KEY, PRESENT_VALUE))]


def _dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    """Axis names as onnxruntime-genai's model builder writes them."""
    b, t, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    axes = {INPUT_IDS: {0: b, 1: t}, ATTENTION_MASK: {0: b, 1: total}, POSITION_IDS: {0: b, 1: t}, LOGITS: {0: b, 1: t}}
    for name in input_names(n_layer)[3:]:
        axes[name] = {0: b, 2: past}
    for name in output_names(n_layer)[1:]:
        axes[name] = {0: b, 2: total}
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
            q, k, v, absent if bias is None else bias, mask32, absent, past_k, past_v,  # attention_bias absent
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


class _FlatIO(nn.Module):
    """SimpleGPT with the graph's flat I/O: (ids, mask, positions, *past) -> (logits, *present)."""

    def __init__(self, model: SimpleGPT):
        super().__init__()
        self.model = copy.deepcopy(model).eval()  # the caller's model is left untouched
        for block in self.model.blocks:
            block.attn = _ExportAttention(block.attn)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = tuple(zip(past[0::2], past[1::2]))
        logits, presents = self.model(input_ids, cache, attention_mask, position_ids)
        return (logits, *(t for kv in presents for t in kv))


def example_inputs(model: SimpleGPT, batch: int, new: int, past: int) -> tuple[torch.Tensor, ...]:
    """Random ids, an all-ones mask, positions past..past+new-1 and random past tensors, in graph order."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new)
    kv = [torch.randn(batch, cfg.n_head, past, cfg.head_size) for _ in range(2 * cfg.n_layer)]
    return (ids, mask, positions, *kv)


def export_onnx(model: SimpleGPT, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Trace `model` into an ONNX file at `path` (weights as external data beside it above 2 GB).

    Raises:
        ExportError: an opset outside `OPSETS`, or the exporter failed.
    """
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    path = Path(path)
    n_layer = model.config.n_layer
    args = example_inputs(model, _TRACE_BATCH, _TRACE_T, _TRACE_PAST)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about the Python-int size check in SimpleGPT.forward
            torch.onnx.export(
                _FlatIO(model),
                args,
                str(path),
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                dynamic_axes=_dynamic_axes(n_layer),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises assorted RuntimeError / OnnxExporterError subclasses
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc
    return path
