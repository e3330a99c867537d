"""Quantization of a bundle into a new bundle: int8 and int4 weights for the CPU, fp16 for CUDA.

`quantize_bundle(src, out, to=...)` reads a verified fp32 bundle, rewrites its graph with onnxruntime's own
tools and writes a complete new bundle (graph, tokenizer and genai files, manifest) through the same
build-beside-then-rename staging as `export_bundle`: the source is only read, and a failure leaves nothing.

- int8, row-local (default, `int8_kernel="rowwise"`): `onnxruntime.quantization.quantize_dynamic` gives every
  MatMul with a constant weight (QKV, attention and MLP projections, lm_head) per-channel int8 weights (7-bit
  range, see INT8_DEFAULTS); each activation it would quantize with one DynamicQuantizeLinear over the whole
  call is instead quantized per row (per token) by a few standard ops, symmetric (scale = max|x| / 127 of the
  row, zero point 128), and the MatMulInteger + Cast + Mul chain becomes one com.microsoft.MatMulIntegerToFloat
  taking that (..., 1) row scale. Integer accumulation is exact, so a row's logits do not depend on the other
  rows of the call: the same greedy tokens alone, in a batch, in the server's slots or a speculative chunk.
- int8, dynamic (`int8_kernel="dynamic"`, the format before): quantize_dynamic as it is, one activation
  scale per call (DynamicQuantizeMatMul at load): faster on this CPU, but rows sharing a call change each
  other's results.
- int8, static (`calibrate=FILE`): `quantize_static` in QDQ format, activation ranges calibrated by running
  the fp32 graph on windows of the corpus text.
- int4: `MatMulNBitsQuantizer` (weight-only, blockwise, symmetric, round to nearest) turns every MatMul
  weight into `MatMulNBits`; the token embedding becomes `GatherBlockQuantized`. Bias-less `Gemm` nodes (which that
  quantizer skips) are first rewritten as MatMul (+ Add). The weights are MatMul inputs, never inputs of the
  fused attention node (MultiHeadAttention or GroupQueryAttention take projected Q, K, V), so nothing large
  stays fp32 but the position table; a weight left fp32 raises `QuantizationError`.
- fp16: `onnxruntime.transformers` float16 conversion; the norms ((Skip)LayerNormalization and
  (Skip)SimplifiedLayerNormalization, `FP16_FP32_OPS`) and Softmax stay fp32 and so does the residual stream
  (their outputs), logits stay fp32; the KV cache becomes float16 (recorded as `graph.kv_cache.dtype`);
  MultiHeadAttention's fp16 kernels accumulate the softmax in fp32.
The quantizers touch only MatMul / Gemm / Gather weights, so the fused kernels (attention,
SkipLayerNormalization, FastGelu) stay: their counts before and after are checked and recorded.

The defaults (`INT8_DEFAULTS`, `INT4_DEFAULTS`) were chosen on perplexity, teacher-forced top-1 agreement and
decode speed against the fp32 bundle (measurements: docs/design.md, "5. Quantization defaults and why").
References: onnxruntime docs "Quantize ONNX models"; ContribOperators.md (MatMulNBits, GatherBlockQuantized,
DynamicQuantizeMatMul); llama.cpp's Q8_0 / Q4_0 for comparable schemes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegpt.errors import ConfigError, QuantizationError
from edgegpt.export.optimize import graph_io, op_counts
from edgegpt.export.tied_embedding import materialize_transposes
from edgegpt.manifest import (
    ATTENTION_MASK,
    EXTERNAL_DATA,
    INPUT_IDS,
    LOGITS,
    MANIFEST_NAME,
    POSITION_IDS,
    QUANTIZED_FORMATS,
    bundle_format,
    model_files,
    ort_files,
    sha256_file,
    write_manifest,
)

__all__ = ["DEFAULT_MAX_KLD", "DEFAULT_MAX_PPL_INCREASE", "FORMATS", "quantize_bundle"]

log = logging.getLogger(__name__)

FORMATS = QUANTIZED_FORMATS  # what `to` takes (defined with the bundle contract in edgegpt.manifest)
# Percent of perplexity increase over the fp32 bundle that the accuracy gate allows (issue defaults; fp16
# should cost nothing measurable, so 1 % only catches a broken conversion).
DEFAULT_MAX_PPL_INCREASE = {"int8": 2.0, "int4": 10.0, "fp16": 1.0}
# Mean KL(fp32 || quantized) in nats (llama-perplexity's definition and windows: edgegpt.runtime.generation.
# evaluate) that the gate allows: set to catch a clearly broken quantization (a doubled output-head scale), not to
# rank good ones; the measurements behind each bound are in docs/design.md, section 5.
DEFAULT_MAX_KLD = {"int8": 0.02, "int4": 0.1, "fp16": 0.005}

# int8 defaults (why each, in words; measurements: docs/design.md, "5. Quantization defaults and why"):
# - QInt8 rather than QUInt8 weights: accuracy is a wash and the signed weights decode and prefill faster.
# - per-channel rather than per-tensor: slightly more accurate at the same speed, for a few more bytes.
# - lm_head: quantized. It is the largest matrix, and every decode step reads all of it.
# - token embedding (a Gather; quantize_dynamic stores it per-tensor uint8): included; it makes the bundle
#   markedly smaller at a negligible accuracy cost and no speed cost (one row per token).
# - static QDQ (calibrate=): less accurate and no faster; an option only.
# - kernel "rowwise" (per-row activations, batch-invariant) rather than "dynamic" (one scale per call): greedy
#   output independent of what shares the batch, and mean KLD from fp32 7.6x lower, for 5-15 % slower decode
#   and prefill steps on the project's AVX2 CPU (the extra ops that find each row's scale).
# - rowwise weights in 7 bits (reduce_range): without VNNI, onnxruntime's u8 x s8 kernel adds pairs of products
#   in int16 (vpmaddubsw) and saturates when activations span 0..255 and weights -127..127: 7-bit weights cannot
#   overflow. Measured KLD: 8-bit weights 0.00020 (saturating), 7-bit 0.000054, uint8 weights 0.000032 but
#   25 % slower. "dynamic" keeps onnxruntime's own choice (8-bit weights) as before.
INT8_DEFAULTS = {"per_channel": True, "weight_type": "QInt8", "embedding": True, "int8_kernel": "rowwise"}
INT8_KERNELS = ("rowwise", "dynamic")
# int4 defaults (same section of docs/design.md):
# - accuracy_level 4 (int8 activations in the kernel): much faster than 0 at the same accuracy.
# - block 32, symmetric: block sizes 32-128 decode within noise of each other; 32 keeps the best top-1 and is
#   the granularity llama.cpp's Q4_0 uses (larger blocks only save a little size). Asymmetric (zero points)
#   is no more accurate in top-1 and decodes slower.
# - token embedding as GatherBlockQuantized: included; it makes the bundle markedly smaller at a negligible
#   perplexity cost.
INT4_DEFAULTS = {"block_size": 32, "accuracy_level": 4, "symmetric": True, "embedding": True}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (CPU)
CALIBRATION_WINDOWS = 32
# Ops that fp16 conversion leaves in fp32: normalisation statistics and any explicit softmax.
FP16_FP32_OPS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Softmax",
)
_MS = "com.microsoft"


def quantize_bundle(
    src: str | Path,
    out: str | Path,
    *,
    to: str,
    force: bool = False,
    accept_gate_failure: bool = False,
    per_channel: bool | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    embedding: bool | None = None,
    int8_kernel: str | None = None,
    calibrate: str | Path | None = None,
    eval_text: str | Path | None = None,
    max_ppl_increase: float | None = None,
    max_kld: float | None = None,
    threads: int | None = None,
) -> Path:
    """Quantize the fp32 bundle `src` into a new bundle `out` (int8, int4 or fp16).

    The new bundle has the source's graph I/O names and shapes (fp16: the KV cache becomes float16), keeps
    its fused kernels and loads unchanged in `edgegpt.runtime` and onnxruntime-genai. Its manifest records
    the method and parameters, op counts before and after, the source bundle's fingerprint (sha256 of its
    manifest, which hashes every file) and, with `eval_text`, the measured quality.

    Args:
        src: an fp32 bundle directory (verified first; never written to).
        out: the bundle directory to create; built beside it and renamed into place when complete.
        to: "int8", "int4" or "fp16".
        force: replace an existing bundle at `out` (only one that verifies and holds no unlisted file; see
            edgegpt.export.bundle). It does not touch the accuracy gate.
        accept_gate_failure: write the bundle even if it misses the accuracy gate; the failure is recorded in
            its manifest (`quantization.gate`: passed false, accepted_failure true).
        per_channel: int8: one scale per output channel (default True) or one per matrix.
        block_size: int4: weights per scale, 16..256, a power of two (default 32).
        accuracy_level: int4: MatMulNBits accuracy_level 0..4 (default 4: int8 activations on CPU).
        embedding: int8/int4: also quantize the token embedding table (default True).
        int8_kernel: int8: "rowwise" (default: activations quantized per row, so each row's result is
            independent of the others in the call) or "dynamic" (one activation scale per call: a little
            faster, but batched rows change each other's greedy tokens; the format before).
        calibrate: int8 only: a text file; use static QDQ quantization with activation ranges calibrated
            on it instead of dynamic quantization.
        eval_text: a text file: measure perplexity, top-1 and greedy agreement and KL-divergence of the new
            bundle against `src` on it (see `edgegpt.runtime.generation.evaluate`), record them and apply
            the accuracy gate: both of its bounds below.
        max_ppl_increase: the gate on perplexity (sliding windows), in percent of the source's perplexity
            (default: 2 for int8, 10 for int4, 1 for fp16); needs `eval_text`.
        max_kld: the gate on the mean KL-divergence KL(src || new) in nats, llama-perplexity's definition
            and windows (default: 0.02 for int8, 0.1 for int4, 0.005 for fp16, so that only a clearly
            broken quantization fails); needs `eval_text`.
        threads: onnxruntime threads for the checks and the evaluation (None: one per core).

    Returns:
        The new bundle directory.

    Raises:
        ConfigError: an unknown format, an option that does not apply to it, a bad value, `out` == `src`.
        BundleError: `src` is not a valid bundle.
        ExportError: `out` exists (without `force`), or is not a bundle that `force` may replace.
        StorageError: the new bundle could not be written (disk full...); a bundle already at `out` is kept.
        QuantizationError: `src` is already quantized; the quantizer failed; the result lost a fused kernel,
            changed the graph I/O, left a weight matrix unquantized or produced non-finite logits; or, with
            `eval_text`, its perplexity or mean KL-divergence exceeds the gate (the message shows both
            perplexities, or the KLD and the same-top share) and `accept_gate_failure` is False.

    >>> quantize_bundle("bundles/small", "bundles/small-int8", to="int8")  # doctest: +SKIP
    PosixPath('bundles/small-int8')
    """
    from edgegpt.export import bundle as staging_dir
    from edgegpt.runtime.model.bundle import Bundle

    src, out = Path(src), Path(out)
    options = _options(
        to,
        per_channel,
        block_size,
        accuracy_level,
        embedding,
        calibrate,
        eval_text,
        max_ppl_increase,
        max_kld,
        int8_kernel,
    )
    if out.resolve() == src.resolve():
        raise ConfigError(
            f"{out}: the output is the source bundle; quantization writes a new bundle, choose another -o"
        )
    source = Bundle.load(src)  # verifies the manifest and every file's hash
    if source.onnx_path is None:
        raise QuantizationError(
            f"{src}: an .ort-only bundle has no ONNX graph to quantize; quantize its fp32 source bundle"
        )
    if (fmt := bundle_format(source.manifest)) != "fp32":
        raise QuantizationError(f"{src}: already quantized ({fmt}); quantize the fp32 bundle")
    staging_dir.check_target(out, force)
    log.info("quantizing %s to %s -> %s", src, to, out)
    with staging_dir.staging(out, force=force) as tmp:
        graph = _quantize_graph(source, tmp / source.model_path.name, to, options)
        skip = {source.model_path.name, source.manifest["graph"].get("external_data"), *ort_files(source.manifest)}
        _copy_other_files(source, tmp, skip=skip)  # the source's ORT file is its fp32 graph: never carried over
        manifest = _manifest(source, to, graph, tmp)
        write_manifest(tmp, manifest)
        manifest["validation"]["quantized"] = _smoke_check(source, tmp, threads=threads)
        manifest["quantization"]["op_counts_runtime"] = _runtime_op_counts(tmp / source.model_path.name, graph)
        if options["eval_text"] is not None:
            manifest["eval"], manifest["quantization"]["gate"] = _evaluate_and_gate(
                source, tmp, out, to, options, accept_failure=accept_gate_failure, threads=threads
            )
        write_manifest(tmp, manifest)
    log.info("wrote %s bundle %s", to, out)
    return out


def _quantize_graph(source, dst: Path, to: str, options: dict) -> dict[str, Any]:
    """Quantize the source graph into `dst` and check the result; return what the manifest records.

    Raises:
        QuantizationError: the quantizer failed, a fused kernel is gone, a weight matrix stayed fp32, the
            graph I/O changed.
    """
    graph = source.manifest["graph"]
    model = onnx.load(str(source.model_path))  # with external data; the quantizers change it in place
    before, fused_before = op_counts(model), _fused_counts(model)
    if to != "fp16":  # the quantizers take a MatMul weight only as an initializer, not as Transpose(table)
        materialize_transposes(model)
    external = bool(graph.get("external_data"))
    method = _QUANTIZERS[to](model, dst, options, source=source, external=external, work=dst.parent / ".work")
    shutil.rmtree(dst.parent / ".work", ignore_errors=True)
    quantized = onnx.load(str(dst), load_external_data=False)
    fused = _check_fused_ops(fused_before, quantized)
    unquantized = _fp32_matrices(quantized)
    left = [
        m for m in unquantized if m["consumer"] != "Gather" or (m["role"] == "token_embedding" and method["embedding"])
    ]
    if to != "fp16" and left:
        raise QuantizationError(
            f"{to}: weight matrices left in fp32: {', '.join(m['name'] for m in left)}; the quantizer skipped their ops"
        )
    io = graph_io(quantized)
    return {
        "method": method,
        "io": io,
        "kv_dtype": _check_io(graph, io, to),
        "opset": next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")),
        "op_counts_before": before,
        "op_counts_after": op_counts(quantized),
        "fused_ops_kept": fused,
        "fp32_matrices": unquantized,
    }


# --------------------------------------------------------------------------------------------- options


def _options(
    to,
    per_channel,
    block_size,
    accuracy_level,
    embedding,
    calibrate,
    eval_text,
    max_ppl_increase,
    max_kld,
    int8_kernel=None,
) -> dict:
    """Check the arguments against the format; return them with the format's defaults filled in."""
    if to not in FORMATS:
        raise ConfigError(f"to must be one of {', '.join(FORMATS)}, got {to!r}")
    given = {
        "per_channel": per_channel,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "embedding": embedding,
        "calibrate": calibrate,
        "int8_kernel": int8_kernel,
    }
    applies = {
        "int8": {"per_channel", "embedding", "calibrate", "int8_kernel"},
        "int4": {"block_size", "accuracy_level", "embedding"},
        "fp16": set(),
    }[to]
    wrong = [name for name, value in given.items() if value is not None and name not in applies]
    if wrong:
        raise ConfigError(
            f"{', '.join(wrong)} do(es) not apply to {to}; {to} takes {', '.join(sorted(applies)) or 'no options'}"
        )
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise ConfigError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")
    if int8_kernel is not None and int8_kernel not in INT8_KERNELS:
        raise ConfigError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
    if int8_kernel is not None and calibrate is not None:
        raise ConfigError("calibrate gives static QDQ int8, which has no int8_kernel; drop one of them")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level must be 0..4, got {accuracy_level!r}")
    for name, value in (("calibrate", calibrate), ("eval_text", eval_text)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}: {value} is not a file")
    if calibrate is not None and embedding:
        raise ConfigError("static int8 (calibrate) keeps the token embedding fp32; drop embedding or calibrate")
    if max_ppl_increase is not None:
        if eval_text is None:
            raise ConfigError("max_ppl_increase needs eval_text (the gate compares perplexities measured on it)")
        if (
            isinstance(max_ppl_increase, bool)
            or not isinstance(max_ppl_increase, (int, float))
            or not max_ppl_increase >= 0
        ):
            raise ConfigError(f"max_ppl_increase is a percentage >= 0, got {max_ppl_increase!r}")
    if max_kld is not None:
        if eval_text is None:
            raise ConfigError("max_kld needs eval_text (the gate compares the two models' distributions on it)")
        if isinstance(max_kld, bool) or not isinstance(max_kld, (int, float)) or not max_kld >= 0:
            raise ConfigError(f"max_kld is a KL-divergence in nats >= 0, got {max_kld!r}")
    defaults = {"int8": INT8_DEFAULTS, "int4": INT4_DEFAULTS, "fp16": {}}[to]
    options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    options["calibrate"], options["eval_text"] = calibrate, eval_text
    options["max_ppl_increase"] = DEFAULT_MAX_PPL_INCREASE[to] if max_ppl_increase is None else float(max_ppl_increase)
    options["max_kld"] = DEFAULT_MAX_KLD[to] if max_kld is None else float(max_kld)
    return options


# ------------------------------------------------------------------------------------------ quantizers


def _embedding_gathers(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: "token_embedding" | "position_embedding"} for the Gathers of a constant table."""
    inits = {i.name for i in model.graph.initializer}
    roles = {INPUT_IDS: "token_embedding", POSITION_IDS: "position_embedding"}
    return {
        n.name: roles[n.input[1]]
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and n.input[1] in roles
    }


class _DropQuantizerChatter(logging.Filter):
    """onnxruntime's quantizers log every node through the root logger (INFO) and warn about things handled
    here (pre-processing, the int4 opset bump); drop those records below ERROR, let everything else through."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.ERROR or not (
            "onnxruntime/quantization" in path or "onnxruntime/transformers" in path
        )


@contextlib.contextmanager
def _quiet_quantizer():
    """Silence the quantizers' chatter for the duration; matmul_nbits_quantizer also calls
    logging.basicConfig(INFO) when first imported: undo that so the caller's logging stays as it was."""
    root, ours = logging.getLogger(), logging.getLogger("onnxruntime")
    handlers, level, ours_level = list(root.handlers), root.level, ours.level
    chatter = _DropQuantizerChatter()
    root.addFilter(chatter)  # records logged on the root logger itself (logging.info(...) in the quantizers)
    ours.setLevel(logging.ERROR)  # module loggers under onnxruntime.*
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        root.removeFilter(chatter)
        ours.setLevel(ours_level)


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA
        )
    else:
        onnx.save_model(model, str(path))


def _int8(model, dst: Path, options: dict, *, source, external: bool, work: Path) -> dict:
    """int8 MatMul weights (+ token embedding): row-local or dynamic activations, or with `calibrate` static QDQ."""
    from onnxruntime.quantization import QuantType

    gathers = _embedding_gathers(model)
    exclude = [name for name, role in gathers.items() if role == "position_embedding" or not options["embedding"]]
    weight_type = getattr(QuantType, options["weight_type"])
    extra = {
        "DefaultTensorType": TensorProto.FLOAT,
        "MatMulConstBOnly": True,
    }  # contrib ops have no ONNX shape inference
    rowwise = options["int8_kernel"] == "rowwise" and options["calibrate"] is None
    params = {
        "per_channel": options["per_channel"],
        "weight_type": options["weight_type"].lower(),
        "activations": "uint8, dynamic (per call)",
        "embedding": options["embedding"],
        "lm_head": True,
        "kernel": "dynamic",
        "batch_invariant": False,
    }
    if rowwise:
        params.update(
            kernel="rowwise",
            weight_bits=7,
            batch_invariant=True,
            activations="uint8, symmetric per row (scale max|x| / 127, zero point 128)",
        )
    with _quiet_quantizer():
        try:
            if options["calibrate"] is None:
                from onnxruntime.quantization import quantize_dynamic

                quantize_dynamic(
                    model,
                    str(dst),
                    op_types_to_quantize=["MatMul", "Gather"],
                    per_channel=options["per_channel"],
                    weight_type=weight_type,
                    reduce_range=rowwise,
                    nodes_to_exclude=exclude,
                    use_external_data_format=external,
                    extra_options=extra,
                )
                if rowwise:
                    quantized = onnx.load(str(dst))
                    params["row_quantized_activations"] = _row_local_activations(quantized)
                    if external:  # onnx appends to an existing data file: write it afresh
                        (dst.parent / EXTERNAL_DATA).unlink(missing_ok=True)
                    _save(quantized, dst, external)
                return {
                    "method": "onnxruntime.quantization.quantize_dynamic"
                    + (" + row-local activations" if rowwise else ""),
                    **params,
                }
            params.pop("kernel"), params.pop("batch_invariant")
            return _int8_static(model, dst, options, source, external, work, params, extra)
        except QuantizationError:
            raise
        except Exception as exc:  # the quantizer raises assorted ValueError / RuntimeError / onnx errors
            raise QuantizationError(f"int8 quantization failed: {exc}") from exc


def _row_local_activations(model: onnx.ModelProto) -> int:
    """Make quantize_dynamic's int8 MatMuls row-local; return how many activations are now quantized per row.

    quantize_dynamic quantizes each MatMul input x with one DynamicQuantizeLinear: one (scale, zero point) for
    the whole (B, T, K) tensor, so rows batched together change each other's rounding. Each becomes
        m = ReduceMax(|x|, last axis)                                  (B, T, 1): each row's range
        x_q = QuantizeLinear(x / m, 1/127, 128)                        uint8: round(127 x / m) + 128
    and each MatMulInteger(x_q, W_q) -> Cast -> Mul(s_x * s_W) that reads it becomes
        com.microsoft.MatMulIntegerToFloat(x_q, W_q, m, s_W / 127, 128, W_zero_point)
    which scales the exact int32 products by the row's m and the column's s_W / 127. Four small ops per
    activation instead of one: the 1/127 lives in the quantize scale and the weight scales, not in an op. An
    all-zero row (m = 0) quantizes 0/0 to some byte, and its products are scaled by m = 0: zeros, as fp32 gives.
    The bias Add stays a separate node: onnxruntime 1.32 multiplies a bias given to MatMulIntegerToFloat by a
    non-scalar A scale.
    """
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    constants = {
        "rowq_step": np.array(1 / 127, np.float32),
        "rowq_zero_point": np.array(128, np.uint8),
        "rowq_last_axis": np.array([-1], np.int64),
    }
    replace, drop, orphans, count = {}, set(), set(), 0
    for dql in graph.node:
        if dql.op_type != "DynamicQuantizeLinear":
            continue
        x, (x_q, x_scale, _) = dql.input[0], dql.output
        p = f"{x}_rowq"
        reduce = (
            helper.make_node(
                "ReduceMax", [p + "_abs", "rowq_last_axis"], [p + "_max"], name=p + "_ReduceMax", keepdims=1
            )
            if opset >= 18
            else helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], name=p + "_ReduceMax", axes=[-1], keepdims=1)
        )
        reduce.output[0] = x_scale  # the row's max |x| is its scale (times 1/127, moved into the weight scales)
        replace[dql.name] = [
            helper.make_node("Abs", [x], [p + "_abs"], name=p + "_Abs"),
            reduce,
            helper.make_node("Div", [x, x_scale], [p + "_unit"], name=p + "_Div"),
            helper.make_node(
                "QuantizeLinear", [p + "_unit", "rowq_step", "rowq_zero_point"], [x_q], name=p + "_Quantize"
            ),
        ]
        count += 1
        for matmul in consumers.get(x_q, []):
            chain = _dynamic_matmul_chain(matmul, x_scale, consumers, producers)
            if chain is None:
                raise QuantizationError(
                    f"int8 rowwise: unexpected use of {x_q} by {matmul.op_type} {matmul.name}; "
                    "quantize with int8_kernel='dynamic'"
                )
            cast, mul, scales, weight_scale = chain
            orphans.add(weight_scale)
            if weight_scale + "_rowq" not in constants:
                constants[weight_scale + "_rowq"] = numpy_helper.to_array(inits[weight_scale]) / np.float32(127)
            weight_scale += "_rowq"
            replace[matmul.name] = [
                helper.make_node(
                    "MatMulIntegerToFloat",
                    [x_q, matmul.input[1], x_scale, weight_scale, "rowq_zero_point", matmul.input[3]],
                    [mul.output[0]],
                    name=matmul.name + "_RowLocal",
                    domain=_MS,
                )
            ]
            drop.update({cast.name, mul.name, scales.name})
    nodes = [new for node in graph.node if node.name not in drop for new in replace.get(node.name, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name not in orphans or i.name in used]  # the weight scales now / 127
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(
        numpy_helper.from_array(value, name)
        for name, value in constants.items()
        if opset >= 18 or name != "rowq_last_axis"
    )
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    return count


def _dynamic_matmul_chain(matmul, x_scale: str, consumers: dict, producers: dict):
    """quantize_dynamic's MatMulInteger -> Cast -> Mul(Mul(x_scale, w_scale)) after `matmul`:
    (cast, mul, scales, weight scale name), or None if the graph is not that shape."""
    if matmul.op_type != "MatMulInteger" or len(matmul.input) != 4:
        return None
    cast = consumers.get(matmul.output[0], [])
    if len(cast) != 1 or cast[0].op_type != "Cast":
        return None
    mul = consumers.get(cast[0].output[0], [])
    if len(mul) != 1 or mul[0].op_type != "Mul":
        return None
    other = next((i for i in mul[0].input if i != cast[0].output[0]), None)
    scales = producers.get(other)
    if scales is None or scales.op_type != "Mul" or x_scale not in scales.input or len(consumers.get(other, [])) != 1:
        return None
    weight_scale = next(i for i in scales.input if i != x_scale)
    return cast[0], mul[0], scales, weight_scale


def _int8_static(
    model, dst: Path, options: dict, source, external: bool, work: Path, params: dict, extra: dict
) -> dict:
    """QDQ int8: weights per channel, activations uint8 with ranges from the fp32 graph run on corpus windows."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    text = Path(options["calibrate"]).read_text(encoding="utf-8", errors="replace")
    ids = source.tokenizer.encode(text, add_special_tokens=False).ids
    cfg = source.config
    width = min(cfg.block_size, max(2, len(ids)))
    if len(ids) < 2:
        raise QuantizationError(f"{options['calibrate']}: too little text to calibrate on ({len(ids)} tokens)")
    starts = np.linspace(0, len(ids) - width, num=min(CALIBRATION_WINDOWS, max(1, len(ids) // width)), dtype=int)
    past_dtype = np.dtype(source.kv.dtype)

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([_window_feed(ids[s : s + width], source, past_dtype) for s in starts])

        def get_next(self):
            return next(self.feeds, None)

    work.mkdir(parents=True, exist_ok=True)
    (work / "calib").mkdir()
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # onnx's shape inference does not know the contrib ops, and QDQ skips tensors of unknown type;
    # onnxruntime's symbolic inference does (MultiHeadAttention, SkipLayerNormalization, FastGelu...).
    # Only its value_info is taken: it would also rewrite the graph outputs' symbolic dims.
    typed = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(typed.graph.value_info)
    src_path = work / "fp32.onnx"
    _save(model, src_path, external=True)  # quantize_static writes its augmented copy beside its input
    quantize_static(
        str(src_path),
        str(dst),
        Windows(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=options["per_channel"],
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        extra_options=extra,
        calibration_providers=["CPUExecutionProvider"],
    )
    windows = {
        "windows": len(starts),
        "tokens": int(len(starts) * width),
        "file": Path(options["calibrate"]).name,
        "sha256": sha256_file(options["calibrate"]),
        "method": "MinMax",
    }
    return {
        "method": "onnxruntime.quantization.quantize_static (QDQ)",
        **params,
        "embedding": False,
        "activations": "uint8, static (calibrated)",
        "calibration": windows,
    }


def _window_feed(ids: list[int], source, past_dtype) -> dict[str, np.ndarray]:
    """One row of `ids` from an empty cache: the graph inputs."""
    cfg, T = source.config, len(ids)
    feed = {
        INPUT_IDS: np.asarray([ids], np.int64),
        ATTENTION_MASK: np.ones((1, T), np.int64),
        POSITION_IDS: np.arange(T, dtype=np.int64)[None],
    }
    empty = np.zeros((1, cfg.kv_heads, 0, cfg.head_size), past_dtype)
    return {**feed, **{name: empty for name in source.kv.past_names(cfg.n_layer)}}


def _int4(model, dst: Path, options: dict, *, source, external: bool, work: Path) -> dict:
    """Weight-only 4-bit blockwise: MatMul -> MatMulNBits, the token embedding Gather -> GatherBlockQuantized."""
    _gemm_to_matmul(model)
    gathers = _embedding_gathers(model)
    exclude = [name for name, role in gathers.items() if role == "position_embedding" or not options["embedding"]]
    with _quiet_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        config = DefaultWeightOnlyQuantConfig(
            block_size=options["block_size"],
            is_symmetric=options["symmetric"],
            accuracy_level=options["accuracy_level"],
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=4,
        )
        try:
            quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
            quantizer.process()
        except Exception as exc:  # the quantizer raises assorted ValueError / AssertionError / onnx errors
            raise QuantizationError(f"int4 quantization failed: {exc}") from exc
        _save(quantizer.model.model, dst, external)
    return {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer (RTN)",
        "bits": 4,
        "block_size": options["block_size"],
        "accuracy_level": options["accuracy_level"],
        "symmetric": options["symmetric"],
        "embedding": options["embedding"],
        "lm_head": True,
    }


def _gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(x, W, b) with a constant W as MatMul(x, W') (+ Add b): MatMulNBits takes MatMul only."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes, changed = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.T), node.input[1]))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [mm_out], name=node.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_Add"))
        changed += 1
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return changed


def _fp16(model, dst: Path, options: dict, *, source, external: bool, work: Path) -> dict:
    """fp16 weights and compute, with normalisation, the residual stream and logits kept fp32."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    inputs = [copy.deepcopy(i) for i in model.graph.input]
    wrapped = OnnxModel(model)
    try:
        with _quiet_quantizer():
            wrapped.convert_float_to_float16(keep_io_types=[LOGITS], op_block_list=list(FP16_FP32_OPS))
            wrapped.topological_sort()  # the converter appends its Cast nodes out of order
    except Exception as exc:  # the converter raises whatever shape inference or its passes hit
        raise QuantizationError(f"fp16 conversion failed: {exc}") from exc
    _restore_unread_inputs(wrapped.model, inputs)
    _save(wrapped.model, dst, external)
    return {
        "method": "onnxruntime.transformers float16 conversion",
        "fp32_ops": list(FP16_FP32_OPS),
        "fp32_outputs": [LOGITS],
        "kv_cache": "float16",
        "provider": "CUDAExecutionProvider (CPU runs it with casts)",
    }


def _restore_unread_inputs(model: onnx.ModelProto, inputs: list) -> None:
    """Put back the graph inputs that a converter pruned as unread, at their places: a rotary graph's
    `position_ids` (GroupQueryAttention takes positions from seqlens_k), which the bundle contract keeps."""
    names = {i.name for i in model.graph.input}
    for index, value in enumerate(inputs):
        if value.name not in names:
            model.graph.input.insert(index, value)


_QUANTIZERS = {"int8": _int8, "int4": _int4, "fp16": _fp16}


# -------------------------------------------------------------------------------------------- checks


def _fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of the com.microsoft ops: the fused kernels (attention, SkipLayerNormalization, FastGelu...)."""
    return op_counts(model, domain=_MS)


def _check_fused_ops(was: dict[str, int], after: onnx.ModelProto) -> dict[str, int]:
    """Every fused kernel of the source is still there, as many times; return their counts."""
    now = _fused_counts(after)
    lost = {op: (now.get(op, 0), n) for op, n in was.items() if now.get(op, 0) != n}
    if lost:
        raise QuantizationError(
            "the quantized graph lost fused kernels, (found, expected): "
            + ", ".join(f"{op} {v}" for op, v in lost.items())
        )
    return was


def _fp32_matrices(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """2-D float32 initializers still read by MatMul / Gemm / Gather: what quantization left in full precision."""
    floats = {
        i.name: list(i.dims) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
    }
    roles = _embedding_gathers(model)
    found = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in floats:
            found.append(
                {"name": node.input[1], "shape": floats[node.input[1]], "consumer": node.op_type, "role": "weight"}
            )
        elif node.op_type == "Gather" and node.input[0] in floats:
            found.append(
                {
                    "name": node.input[0],
                    "shape": floats[node.input[0]],
                    "consumer": "Gather",
                    "role": roles.get(node.name, "table"),
                }
            )
    return found


def _check_io(graph: dict, io: tuple[list[dict], list[dict]], to: str) -> str:
    """The new graph's I/O must equal the source's (fp16: the KV cache may be float16); return the KV dtype."""
    inputs, outputs = io
    cache = {d["name"] for d in inputs[3:]} | {d["name"] for d in outputs[1:]}
    kv_dtypes = {d["dtype"] for d in inputs + outputs if d["name"] in cache}
    kv_dtype = kv_dtypes.pop() if len(kv_dtypes) == 1 else None
    relax = lambda d: {**d, "dtype": "kv"} if d["name"] in cache and to == "fp16" else d  # noqa: E731
    same = [relax(d) for d in inputs] == [relax(d) for d in graph["inputs"]] and [relax(d) for d in outputs] == [
        relax(d) for d in graph["outputs"]
    ]
    if not same or kv_dtype is None:
        raise QuantizationError(
            f"the quantized graph's I/O differ from the source's: {inputs + outputs} "
            f"vs {graph['inputs'] + graph['outputs']}"
        )
    return kv_dtype


def _smoke_check(source, tmp: Path, *, threads: int | None) -> dict[str, Any]:
    """Load the new bundle as the runtime does; prefill + one decode step on CPU against the source graph:
    finite logits of the source's shapes (a broken graph raises); the differences are recorded."""
    from edgegpt.errors import BundleError
    from edgegpt.runtime.model.bundle import Bundle
    from edgegpt.runtime.model.providers import SessionConfig, create_session

    new = Bundle.load(tmp)
    config = SessionConfig(provider="cpu", threads=threads)
    try:
        sessions = [create_session(source.model_path, config), create_session(new.model_path, config)]
    except BundleError as exc:
        if new.kv.dtype != "float16":
            raise QuantizationError(f"onnxruntime cannot load the quantized graph on CPU: {exc}") from exc
        # fp16 targets CUDA; this onnxruntime's CPU provider runs every op of today's graphs (it inserts
        # casts around ops without fp16 kernels), but a future op may not have that fallback.
        log.warning("fp16 graph not checked: the CPU provider cannot run it (%s); check it on CUDA", exc)
        return {"provider": None, "finite": None, "skipped": f"the CPU provider cannot run this graph: {exc}"}
    cfg = source.config
    T = min(16, cfg.block_size - 1)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, T + 1).tolist()
    results = []
    for sess, bundle in zip(sessions, (source, new)):
        feed = _window_feed(ids[:T], bundle, np.dtype(bundle.kv.dtype))
        first = sess.run(None, feed)
        step = {
            INPUT_IDS: np.asarray([[ids[T]]], np.int64),
            ATTENTION_MASK: np.ones((1, T + 1), np.int64),
            POSITION_IDS: np.asarray([[T]], np.int64),
            **dict(zip(bundle.kv.past_names(cfg.n_layer), first[1:])),
        }
        second = sess.run(None, step)
        results.append(
            (np.concatenate([first[0][0], second[0][0]]).astype(np.float32), [o.shape for o in first + second])
        )
    (ref, ref_shapes), (got, got_shapes) = results
    if got_shapes != ref_shapes:
        raise QuantizationError(
            f"the quantized graph's output shapes {got_shapes} differ from the source's {ref_shapes}"
        )
    if not np.isfinite(got).all():
        raise QuantizationError("the quantized graph produced non-finite logits (NaN or inf) on CPU")
    return {
        "provider": "CPUExecutionProvider",
        "finite": True,
        "positions": T + 1,
        "max_abs_logit_diff": float(np.abs(got - ref).max()),
        "top1_agreement_random_ids": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def _runtime_op_counts(path: Path, graph_result: dict) -> dict[str, int] | None:
    """Op counts after onnxruntime's own CPU optimisations at session load (where MatMulInteger + scales
    become DynamicQuantizeMatMul, QDQ pairs QLinearMatMul); None for external-data graphs or fp16."""
    import onnxruntime as ort

    if graph_result["kv_dtype"] != "float32" or (path.parent / EXTERNAL_DATA).exists():
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # its warning about hardware-specific optimisations in the saved copy
    work = path.parent / ".work"
    work.mkdir(exist_ok=True)
    options.optimized_model_filepath = str(work / "optimized.onnx")
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath, load_external_data=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _evaluate_and_gate(
    source, tmp: Path, out: Path, to: str, options: dict, *, accept_failure: bool, threads
) -> tuple[dict, dict]:
    """Measure the new bundle against the source on eval_text; refuse it past the gate unless `accept_failure`."""
    from edgegpt.runtime.generation.evaluate import evaluate_bundle

    result = evaluate_bundle(tmp, options["eval_text"], reference=source.path, threads=threads)
    result["bundle"] = str(out)
    ppl, ref_ppl = result["perplexity"], result["reference"]["perplexity"]
    increase = 100.0 * (ppl / ref_ppl - 1.0)
    limit, kld, kld_limit = options["max_ppl_increase"], result["kld"]["mean"], options["max_kld"]
    gate = {
        "metrics": ["perplexity", "kld"],
        "max_increase_percent": limit,
        "increase_percent": increase,
        "max_kld": kld_limit,
        "kld": kld,
        "kld_scoring": result["kld"]["scoring"],
        "passed": bool(increase <= limit and kld <= kld_limit),
        "accepted_failure": False,
    }
    if not gate["passed"]:
        text = Path(options["eval_text"]).name
        failed, raise_ = [], []
        if not increase <= limit:
            failed.append(
                f"perplexity {ppl:.4f} vs fp32 {ref_ppl:.4f} on {text}: +{increase:.2f} %, over the {limit:g} % limit"
            )
            raise_.append("max_ppl_increase")
        if not kld <= kld_limit:
            failed.append(
                f"mean KL-divergence from fp32 {kld:.6f} on {text} (same top token "
                f"{result['kld']['same_top_percent']:.1f} %), over the {kld_limit:g} limit"
            )
            raise_.append("max_kld")
        message = f"{to} {'; '.join(failed)}"
        if not accept_failure:  # the CLI shows the keywords as its flags (edgegpt.cli.support)
            raise QuantizationError(
                f"{message}; not written. Raise {' and '.join(raise_)}, or pass "
                "accept_gate_failure=True to write it anyway"
            )
        gate["accepted_failure"] = True
        log.warning("%s; written anyway (accept_gate_failure)", message)
    return result, gate


# -------------------------------------------------------------------------------------------- bundle


def _copy_other_files(source, tmp: Path, skip: set) -> None:
    """Tokenizer and genai files: byte copies of every hashed file but the graph."""
    from edgegpt.manifest import safe_member

    for name in source.manifest["files"]:
        if name in skip:
            continue
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_member(source.path, name), target)


def _manifest(source, to: str, graph_result: dict, tmp: Path) -> dict:
    """The new manifest: the source's, with graph I/O, quantization, producer and validation updated."""
    import onnxruntime

    from edgegpt import __version__

    src_manifest = source.manifest
    graph = json.loads(json.dumps(src_manifest["graph"]))
    graph["inputs"], graph["outputs"] = graph_result["io"]
    graph["kv_cache"]["dtype"] = graph_result["kv_dtype"]
    graph["opset"] = graph_result["opset"]  # MatMulNBitsQuantizer moves the graph to opset 21 (int4 types)
    model_bytes = lambda root, g: sum((root / f).stat().st_size for f in model_files({"graph": g}))  # noqa: E731
    quantization = {
        "format": to,
        **graph_result["method"],
        "source_bundle": str(source.path.resolve()),
        "source_bundle_fingerprint": sha256_file(source.path / MANIFEST_NAME),
        "model_bytes_before": model_bytes(source.path, src_manifest["graph"]),
        "model_bytes_after": model_bytes(tmp, graph),
        **{k: graph_result[k] for k in ("op_counts_before", "op_counts_after", "fused_ops_kept", "fp32_matrices")},
        "gate": None,
    }
    manifest = {k: v for k, v in src_manifest.items() if k not in ("format", "format_version", "files", "ort")}
    manifest.update(
        graph=graph,
        quantization=quantization,
        producer={
            **src_manifest.get("producer", {}),
            "quantizer": {"edgegpt": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        },
        validation={"source": src_manifest.get("validation"), "quantized": None},
        eval=None,
    )
    return manifest
