"""One copy of the tied token-embedding / lm_head matrix in model.onnx.

SimpleGPT ties lm_head.weight to tok_emb.weight (as GPT-2). torch.onnx's TorchScript exporter writes the
matrix twice: the (V, C) table for the embedding Gather and a transposed (C, V) copy for the lm_head
MatMul: 6.3 MB of 55.6 for `small`, 154 MB of 653 for the gpt2 shape. `share_tied_lm_head` drops the copy
and feeds the MatMul from `Transpose(table)`; onnxruntime's constant folding turns that back into a (C, V)
initializer in memory when the session is created, so the MatMul is prepacked and runs as before.
The TorchScript exporter's own deduplication merges identical initializers only, not a transposed copy.

The quantizers want the MatMul weight as an initializer (quantize_dynamic and MatMulNBitsQuantizer skip a
MatMul fed by a node), so `materialize_transposes` undoes the sharing before quantizing: int8 and int4 keep
their own layouts of the two matrices anyway (a per-row table for Gather, blocks along C for the MatMul).

>>> import onnx
>>> share_tied_lm_head(onnx.ModelProto())  # no Gather table with a transposed MatMul copy: unchanged
False
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["materialize_transposes", "share_tied_lm_head"]

log = logging.getLogger(__name__)


def share_tied_lm_head(model: onnx.ModelProto) -> bool:
    """Replace a MatMul weight that equals the transpose of a Gather table by Transpose(table); -> whether it did.

    The model must hold its weights (loaded with external data).
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    tables = {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[0] in initializers}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in tables:
        by_shape.setdefault(tuple(initializers[name].dims), []).append(name)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        if len(weight.dims) != 2:
            continue
        candidates = by_shape.get((weight.dims[1], weight.dims[0]), [])
        if not candidates:  # no table of the transposed shape: skip the conversion of this weight
            continue
        matrix = numpy_helper.to_array(weight)  # (C, V)
        table = next((t for t in candidates if np.array_equal(numpy_helper.to_array(initializers[t]).T, matrix)), None)
        if table is None:
            continue
        transposed = f"{table}/transposed"
        graph.node.insert(
            0, helper.make_node("Transpose", [table], [transposed], name=f"{table}/Transpose", perm=[1, 0])
        )
        for user in graph.node:
            if weight.name in user.input:
                user.input[:] = [transposed if name == weight.name else name for name in user.input]
        graph.initializer.remove(weight)
        log.info("lm_head reads %s through a Transpose: one copy of the tied matrix in the file", table)
        return True
    return False


def materialize_transposes(model: onnx.ModelProto) -> int:
    """Turn each Transpose of an initializer back into an initializer of its own; -> how many.

    The model must hold its weights (loaded with external data).
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    done = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = numpy_helper.to_array(initializers[node.input[0]])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), node.output[0]))
        graph.node.remove(node)
        done += 1
    return done
