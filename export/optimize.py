"""Graph optimisation: onnxruntime's transformer fusions on the exported graph; op counts and graph I/O.

`onnxruntime.transformers.optimizer` with the GPT-2 model type fuses the embedding sum and every
residual-add + LayerNorm into `SkipLayerNormalization`, and the MLP's GELU by the function it computes
(`GPTConfig.gelu`): the tanh approximation into `FastGelu` (with the bias add before it, if any), the exact
erf GELU into `BiasGelu` (with a bias) or `Gelu` (com.microsoft's Gelu is the erf one). Its
`enable_gelu_approximation` would turn an erf Gelu into FastGelu, so it stays off, and `gelu_kinds` checks
that the graph still computes the config's GELU and no other: ONNX's opset-20 `Gelu(approximate="tanh")`
is rewritten by this optimizer into the erf BiasGelu (hence opset 17-19 only, onnx_export.py).
Attention is already one GroupQueryAttention or MultiHeadAttention node per layer (see onnx_export.py), so
no attention fusion is needed. Only the optimizer's Python fusions run here (opt_level 0): onnxruntime
applies its own hardware-specific graph optimisations when a session loads the file.
`op_counts` and `graph_io` describe any graph as the manifest records it; validate.py and quantize.py
use them too. Torch-free, so that quantization does not load torch.
References: onnxruntime/python/tools/transformers (optimizer.py, onnx_model_gpt2.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from edgegpt.config import GPTConfig
from edgegpt.errors import ExportError
from edgegpt.export.tied_embedding import share_tied_lm_head

__all__ = ["check_gelu", "fused_op_shortfall", "gelu_kinds", "graph_io", "op_counts", "optimize_onnx"]

log = logging.getLogger(__name__)


def op_counts(model: onnx.ModelProto, domain: str | None = None) -> dict[str, int]:
    """Node count per op type of the main graph (only ops of `domain`, if given), most frequent first.

    >>> op_counts(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [], [])))
    {'Relu': 1}
    """
    nodes = (node for node in model.graph.node if domain is None or node.domain == domain)
    return dict(Counter(node.op_type for node in nodes).most_common())


def graph_io(model: onnx.ModelProto | str | Path) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs as the manifest records them: [{"name", "dtype", "shape"}], symbolic
    axes by name. `model` is a loaded graph or the path of one (read without its external data)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)

    def describe(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return describe(model.graph.input), describe(model.graph.output)


# The GELU kernel onnxruntime's optimizer fuses, per GPTConfig.gelu: (with the MLP's bias, without).
_FUSED_GELU = {"tanh": ("FastGelu", "FastGelu"), "erf": ("BiasGelu", "Gelu")}


def fused_gelu(config: GPTConfig) -> str:
    """The fused GELU op of an optimised graph of `config`: FastGelu (tanh), BiasGelu or Gelu (erf)."""
    return _FUSED_GELU[config.gelu][0 if config.bias else 1]


def gelu_kinds(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes compute each GELU function: {"tanh": n, "erf": n, "other": n}, fused or not.

    Fused: FastGelu (tanh), com.microsoft Gelu / BiasGelu (erf), ONNX Gelu by its `approximate`, QuickGelu
    (sigmoid: "other"). Unfused, as the exporter writes them: each Tanh or Erf node (SimpleGPT has no other).

    >>> gelu_kinds(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Erf", ["x"], ["y"])], "g", [], [])))
    {'tanh': 0, 'erf': 1, 'other': 0}
    """
    kinds = {"tanh": 0, "erf": 0, "other": 0}
    for node in model.graph.node:
        if node.op_type in ("FastGelu", "Tanh"):
            kinds["tanh"] += 1
        elif node.op_type in ("BiasGelu", "Erf") or node.op_type == "Gelu" and node.domain == "com.microsoft":
            kinds["erf"] += 1
        elif node.op_type == "Gelu":  # ONNX's own (opset 20): erf unless approximate="tanh"
            approximate = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
            kinds["tanh" if approximate == "tanh" else "erf"] += 1
        elif node.op_type == "QuickGelu":
            kinds["other"] += 1
    return kinds


def check_gelu(model: onnx.ModelProto, config: GPTConfig, name: str) -> None:
    """Raise ExportError unless the graph computes `config.gelu` once per layer and no other GELU."""
    kinds = gelu_kinds(model)
    others = {k: n for k, n in kinds.items() if k != config.gelu and n}
    if others or kinds[config.gelu] < config.n_layer:
        raise ExportError(
            f"{name}: the graph's GELU nodes compute {kinds} but the model uses the {config.gelu} GELU in each of "
            f"{config.n_layer} layers: a graph rewrite changed the model's function; export with optimize=False "
            "(--no-optimize) and report the onnxruntime version"
        )


def expected_fused_ops(config: GPTConfig, attention_op: str = "MultiHeadAttention") -> dict[str, int]:
    """The fused kernels a fully optimised graph holds: per layer one attention, one GELU, two LayerNorms."""
    return {
        attention_op: config.n_layer,
        fused_gelu(config): config.n_layer,
        # each LayerNorm follows an add: ln_1 of block 0 the embedding sum, the other 2 n_layer the residuals
        "SkipLayerNormalization": 2 * config.n_layer + 1,
    }


def fused_op_shortfall(
    counts: dict[str, int], config: GPTConfig, attention_op: str = "MultiHeadAttention"
) -> dict[str, tuple[int, int]]:
    """{op: (found, expected)} for each fused op that the graph holds too few of."""
    expected = expected_fused_ops(config, attention_op)
    return {op: (counts.get(op, 0), n) for op, n in expected.items() if counts.get(op, 0) < n}


def optimize_onnx(
    src: Path, dst: Path, config: GPTConfig, *, external_data: bool, attention_op: str = "MultiHeadAttention"
) -> tuple[dict, dict]:
    """Fuse `src` into `dst`; return (op counts before, op counts after).

    `attention_op` is the contrib op the exporter already emitted per layer (MultiHeadAttention or
    GroupQueryAttention); the optimizer's own attention fusion stays off, and the op is checked for.

    Raises:
        ExportError: the optimizer failed, left LayerNorm / GELU / attention unfused, or changed the GELU's
            function (`check_gelu`).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    before = op_counts(onnx.load(str(src), load_external_data=False))
    options = FusionOptions("gpt2")
    options.enable_attention = False  # already fused: the exporter emitted one attention node per layer
    options.enable_gelu_approximation = False  # erf Gelu -> tanh FastGelu would change the model's function
    try:
        optimized = optimize_model(
            str(src),
            model_type="gpt2",
            num_heads=config.n_head,
            hidden_size=config.n_embd,
            optimization_options=options,
            opt_level=0,
        )
        share_tied_lm_head(optimized.model)
        optimized.save_model_to_file(str(dst), use_external_data_format=external_data)
    except Exception as exc:  # the optimizer raises whatever its passes hit
        raise ExportError(
            f"onnxruntime transformer optimizer failed on {src.name}: {exc}; retry with optimize=False"
        ) from exc
    graph = onnx.load(str(dst), load_external_data=False)
    check_gelu(graph, config, dst.name)
    after = op_counts(graph)
    shortfall = fused_op_shortfall(after, config, attention_op)
    if shortfall:
        raise ExportError(
            "the optimized graph lacks fused kernels, (found, expected): "
            + ", ".join(f"{op} {v}" for op, v in shortfall.items())
            + "; check the onnxruntime version or export with optimize=False (--no-optimize)"
        )
    log.info("op counts before optimisation: %s", before)
    log.info("op counts after optimisation:  %s", after)
    return before, after
