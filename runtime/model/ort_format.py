"""Read what an ORT-format model (`model.ort`, onnxruntime's FlatBuffers format) declares, without a session.

The counterpart of `onnx_paths.read_graph_summary` for the mobile format, so that `Bundle.load` runs the same
cross-checks on a bundle that holds only `model.ort` (its I/O names and shapes, the position table's rows,
the GELU op) before onnxruntime reads the file. It uses the FlatBuffers schema classes that onnxruntime ships
(`onnxruntime.tools.ort_format_model`, built on the `flatbuffers` package that onnxruntime depends on) rather
than a parser of its own. An ORT file keeps its weights inside it: there is no external data to check.
Reference: https://onnxruntime.ai/docs/performance/model-optimizations/ort-format-models.html
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from edgegpt.errors import BundleError
from edgegpt.runtime.model.onnx_paths import GraphSummary

__all__ = ["OrtModelInfo", "read_ort_model"]

_ORT_IDENTIFIER = b"ORTM"  # the FlatBuffers file identifier of an ORT-format model


class OrtModelInfo:
    """An ORT-format file's format version (its `ort_version`), ONNX IR version and `GraphSummary`."""

    def __init__(self, format_version: str, ir_version: int, summary: GraphSummary):
        self.format_version, self.ir_version, self.summary = format_version, ir_version, summary


def read_ort_model(path: str | Path) -> OrtModelInfo:
    """Parse an ORT-format file's header and main graph.

    Raises:
        BundleError: the file is not an ORT-format model, or is malformed.

    >>> read_ort_model(__file__)
    Traceback (most recent call last):
    ...
    edgegpt.errors.BundleError: ...: not an ORT-format model (no 'ORTM' identifier); re-convert the bundle with `edgegpt convert-ort`
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(8)[4:8] != _ORT_IDENTIFIER:
            raise BundleError(
                f"{path}: not an ORT-format model (no 'ORTM' identifier); re-convert the bundle with `edgegpt convert-ort`"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:  # the weights are never read: map, not load
            return _read(buf, path)


def _read(buf, path: Path) -> OrtModelInfo:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    try:
        session = InferenceSession.GetRootAs(buf, 0)
        model = session.Model()
        return OrtModelInfo(_text(session.OrtVersion()), model.IrVersion(), _summary(model.Graph()))
    except (IndexError, ValueError, AttributeError, UnicodeDecodeError, TypeError, struct.error) as exc:  # bad offsets
        raise BundleError(f"{path}: malformed ORT-format model ({exc!r}); re-convert the bundle") from None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _summary(graph) -> GraphSummary:
    """The main graph's I/O (with shapes), initializer dims and nodes, as `onnx_paths` reads them from ONNX."""
    summary = GraphSummary()
    summary.inputs = [_text(graph.Inputs(i)) for i in range(graph.InputsLength())]
    summary.outputs = [_text(graph.Outputs(i)) for i in range(graph.OutputsLength())]
    io = set(summary.inputs) | set(summary.outputs)
    for i in range(graph.NodeArgsLength()):
        arg = graph.NodeArgs(i)
        name = _text(arg.Name())
        if name in io:
            summary.shapes[name] = _shape(arg)
    for i in range(graph.InitializersLength()):
        tensor = graph.Initializers(i)
        summary.initializer_dims[_text(tensor.Name())] = (
            [int(d) for d in tensor.DimsAsNumpy()] if tensor.DimsLength() else []
        )
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        summary.nodes.append(
            (
                _text(node.OpType()),
                [_text(node.Inputs(j)) for j in range(node.InputsLength())],
                [_text(node.Outputs(j)) for j in range(node.OutputsLength())],
            )
        )
    summary.inputs = [name for name in summary.inputs if name not in summary.initializer_dims]
    return summary


def _shape(value_info) -> list[int | str]:
    """A tensor's dims: an int, or the symbolic name of a dynamic one ("" when unnamed)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.DimensionValueType import DimensionValueType
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TensorTypeAndShape import TensorTypeAndShape
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TypeInfoValue import TypeInfoValue

    type_info = value_info.Type()
    if type_info is None or type_info.ValueType() != TypeInfoValue.tensor_type:
        return []
    tensor = TensorTypeAndShape()
    table = type_info.Value()
    tensor.Init(table.Bytes, table.Pos)
    shape = tensor.Shape()
    if shape is None:
        return []
    dims: list[int | str] = []
    for i in range(shape.DimLength()):
        value = shape.Dim(i).Value()
        if value is not None and value.DimType() == DimensionValueType.VALUE:
            dims.append(int(value.DimValue()))
        else:
            dims.append(_text(value.DimParam()) if value is not None else "")
    return dims
