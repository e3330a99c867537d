"""The Llama family through edgegpt.export.quantize: int8, int4 (MatMulNBits) and fp16 bundles of a tied and an
untied (multi-query) tiny Llama pass the default accuracy gate, keep their fused kernels, and run.

Measured here (onnxruntime 1.32, CPU, the `llama_bundles` models, held-out stdlib text): perplexity +1.2 % int8,
+1.3 % int4, +0.00 % fp16 for the tied model (+0.5 %, -0.3 %, +0.00 % untied); mean KLD 0.0024 / 0.0025 / < 1e-7
(tied), 0.0072 / 0.0044 / < 1e-7 (untied): a gate's default bounds pass each by 2x at least.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from edgegpt.export.optimize import UNFUSED_NORM_OPS
from edgegpt.export.quantize import DEFAULT_MAX_KLD, DEFAULT_MAX_PPL_INCREASE, quantize_bundle
from edgegpt.manifest import verify_bundle
from edgegpt.runtime import Generator

pytestmark = pytest.mark.slow  # trains two models and quantizes each three ways with the gate

FORMATS = ("int8", "int4", "fp16")
SIZE_RATIO = {"int8": 0.45, "int4": 0.30, "fp16": 0.60}  # model bytes / fp32 model bytes, at most


@pytest.fixture(scope="module")
def quantized(llama_bundles, llama_texts, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(variant, format) -> the bundle, quantized with --eval-text (the default gate)."""
    root = tmp_path_factory.mktemp("llama_quantized")
    return {
        (name, fmt): quantize_bundle(src, root / f"{name}-{fmt}", to=fmt, eval_text=llama_texts[1], threads=2)
        for name, src in llama_bundles.items()
        for fmt in FORMATS
    }


def _fused(n: int) -> dict[str, int]:
    """The com.microsoft kernels of a tiny Llama graph: one attention per layer, a norm after each residual add,
    and a plain SimplifiedLayerNormalization for block 0's ln_1 (it reads the embedding alone)."""
    return {"GroupQueryAttention": n, "SkipSimplifiedLayerNormalization": 2 * n, "SimplifiedLayerNormalization": 1}


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_the_fp32_graph_is_fused_and_holds_one_copy_of_each_matrix(llama_bundles, variant):
    manifest = verify_bundle(llama_bundles[variant])
    config, ops = manifest["model"], manifest["optimization"]["op_counts_after"]
    n = config["n_layer"]
    assert {op: ops.get(op) for op in _fused(n)} == _fused(n)
    assert ops["MatMul"] == 4 * n + 1 and not set(UNFUSED_NORM_OPS) & set(ops)  # qkv, proj, fc, mlp proj; lm_head
    graph = onnx.load(str(llama_bundles[variant] / "model.onnx"))
    V, C = config["vocab_size"], config["n_embd"]
    tables = sorted(tuple(i.dims) for i in graph.graph.initializer if set(i.dims) == {V, C})
    # tied: the table once, the head reading Transpose(table) (export/tied_embedding.py); untied: both matrices
    assert tables == ([(V, C)] if variant == "tied" else [(C, V), (V, C)])
    assert ops.get("Transpose", 0) == (1 if variant == "tied" else 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_each_format_passes_the_default_gate_and_generates(quantized, llama_bundles, variant, fmt):
    bundle = quantized[variant, fmt]
    manifest = verify_bundle(bundle)
    gate, result = manifest["quantization"]["gate"], manifest["eval"]
    assert gate["passed"] and not gate["accepted_failure"], gate
    assert gate["increase_percent"] <= DEFAULT_MAX_PPL_INCREASE[fmt] and gate["kld"] <= DEFAULT_MAX_KLD[fmt] / 2, gate
    assert result["reference"]["bundle"] == str(llama_bundles[variant]) and result["scored_tokens"] > 1000
    assert result["model_bytes"] <= SIZE_RATIO[fmt] * result["reference"]["model_bytes"]
    gen = Generator.load(bundle, provider="cpu", threads=1)
    assert len(gen.generate("def parse(self", max_new_tokens=12, ignore_eos=True).tokens) == 12


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_fused_kernels_and_quantized_matrices_per_format(quantized, llama_bundles, variant, fmt):
    manifest = verify_bundle(quantized[variant, fmt])
    q, n = manifest["quantization"], manifest["model"]["n_layer"]
    after, runtime, matmuls = q["op_counts_after"], q["op_counts_runtime"], 4 * n + 1
    assert {op: after.get(op) for op in _fused(n)} == _fused(n)
    # what quantize checks and records: the com.microsoft kernels (SimplifiedLayerNormalization is in ONNX's domain)
    assert q["fused_ops_kept"] == {op: k for op, k in _fused(n).items() if op != "SimplifiedLayerNormalization"}
    assert not set(UNFUSED_NORM_OPS) & set(after)
    if fmt == "int4":
        assert after["MatMulNBits"] == matmuls and "MatMul" not in after and after["GatherBlockQuantized"] == 1
        assert runtime["MatMulNBits"] == matmuls and runtime["GroupQueryAttention"] == n
    elif fmt == "int8":
        # the row-local default: every matrix through MatMulIntegerToFloat with its per-row activation scale
        assert after["MatMulIntegerToFloat"] == matmuls and "MatMul" not in after and q["kernel"] == "rowwise"
        assert runtime["MatMulIntegerToFloat"] == matmuls and runtime["GroupQueryAttention"] == n
    if fmt != "fp16":
        assert q["fp32_matrices"] == []  # rotary: no position table; the head and the table are both quantized
        return
    # fp16: matrices and the KV cache in half precision; the norms (their weights and statistics) stay fp32
    assert after["MatMul"] == matmuls and manifest["graph"]["kv_cache"]["dtype"] == "float16"
    assert [i["name"] for i in manifest["graph"]["inputs"][:3]] == ["input_ids", "attention_mask", "position_ids"]
    graph = onnx.load(str(quantized[variant, fmt] / "model.onnx"))
    types = {i.name: i.data_type for i in graph.graph.initializer}
    norms = [node for node in graph.graph.node if node.op_type.endswith("SimplifiedLayerNormalization")]
    assert len(norms) == 2 * n + 1 and all(types[node.input[-1]] == onnx.TensorProto.FLOAT for node in norms)
    assert types["cos_cache"] == types["sin_cache"] == onnx.TensorProto.FLOAT16  # the kernel's dtype
