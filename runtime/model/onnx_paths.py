"""Read what the runtime must check in `model.onnx` before onnxruntime opens it: external-data locations,
the graph's input and output names and shapes, and what the main graph says of the model's size.

Why not leave external-data paths to onnxruntime: it checks them only from 1.24 on, and it cannot know
which files the manifest hashes. Measured with a MatMul model saved with external data, opened by
`InferenceSession(path)` on CPU (onnxruntime 1.22.0, 1.22.1, 1.23.2, 1.24.1, 1.32.0):

    location / file                     ort 1.22.0 - 1.23.2  ort 1.24.1, 1.32.0          manifest checks
    "../outside/w.bin"                  loads it             "escapes model directory"   never see it
    an absolute path (in or out)        loads it             "Absolute path not allowed" never see it
    sub/w.bin, sub/ a symlinked dir     loads it             "escapes model directory"   never see it
    w.bin, a symlink to a file outside  loads it             "escapes model directory"   refuse it if listed
    w.bin, also hard-linked outside     loads it             loads it                    refuse it if listed
    w.bin in the bundle, not listed     loads it             loads it                    never see it
    w.bin missing                       "cannot get size"    "does not exist"            refuse it if listed

`verify_bundle` hashes and `safe_member`-checks only the files the manifest lists. So `Bundle.load` reads
every location here and refuses, before any session and with a message naming the location and the fix:
on onnxruntime < 1.24 (pyproject allows >= 1.22), data outside the bundle reached by "..", an absolute
path or a symlinked directory; on every version, data in the bundle that the manifest does not hash,
which onnxruntime would load although nothing checked it. The main graph's input and output names let
`Bundle.load` refuse a graph without the runtime's I/O before a session too (`Generator` checks the
session again; `export.quantize` uses `Bundle.load` alone). Their shapes, the main graph's initializer
dimensions and its nodes let it check the manifest's model settings (vocabulary, heads, layers, context)
against the graph, which the manifest cannot hash itself into. Tests:
tests/runtime/test_generator.py::test_external_data_leaving_the_bundle_is_refused and
::test_manifest_model_settings_must_match_the_graph.

Hand-written on purpose: the runtime may not depend on the `onnx` package (it pulls in protobuf and is
not part of the base install), and these few fields need only protobuf's wire format. The reader walks
    ModelProto.graph (7) and .training_info (20) / .functions (25)
    GraphProto.initializer (5), .sparse_initializer (15), .node (1), .input (11), .output (12)
    NodeProto.input (1), .output (2), .op_type (4), .attribute (5) -> AttributeProto.t (5), .g (6),
                               .tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23)
    ValueInfoProto.name (1), .type (2) -> TypeProto.tensor_type (1) -> .shape (2) -> .dim (1) ->
                               Dimension.dim_value (1) / .dim_param (2)
    TensorProto.dims (1), .name (8), .external_data (13) -> StringStringEntryProto.key (1) / .value (2)
and skips everything else (weights in raw_data are jumped over, not copied).
Field numbers: https://github.com/onnx/onnx/blob/main/onnx/onnx.proto
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgegpt.errors import BundleError

__all__ = ["GraphSummary", "read_graph_summary"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); a deeper file is malformed or hostile


@dataclass
class GraphSummary:
    """What `model.onnx` declares: main-graph I/O, initializer dims and nodes; every external-data location.

    `shapes` maps a main-graph input or output to its dimensions (an int, or the symbolic name of a dynamic
    one); `initializer_dims` a main-graph initializer to its dims; `nodes` lists the main graph's nodes as
    (op_type, inputs, outputs).
    """

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    external_locations: list[str] = field(default_factory=list)
    shapes: dict[str, list[int | str]] = field(default_factory=dict)
    initializer_dims: dict[str, list[int]] = field(default_factory=dict)
    nodes: list[tuple[str, list[str], list[str]]] = field(default_factory=list)


class _WireError(ValueError):
    """Malformed protobuf bytes."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message; LEN values are memoryview slices (no copy)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            value, pos = None, pos + 8
        elif wire == _I32:
            value, pos = None, pos + 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise _WireError(f"unsupported wire type {wire} (field {number})")
        if pos > end or number == 0:
            raise _WireError("field runs past the end of its message")
        yield number, wire, value


def _lens(buf: memoryview, number: int) -> Iterator[memoryview]:
    return (value for n, wire, value in _fields(buf) if n == number and wire == _LEN)


def _string(buf: memoryview, number: int) -> str:
    for value in _lens(buf, number):
        return bytes(value).decode("utf-8", errors="surrogateescape")
    return ""


def _strings(buf: memoryview, number: int) -> list[str]:
    return [bytes(v).decode("utf-8", errors="surrogateescape") for v in _lens(buf, number)]


def _ints(buf: memoryview, number: int) -> list[int]:
    """A repeated integer field, packed (one LEN value) or not (one VARINT each)."""
    values = []
    for n, wire, value in _fields(buf):
        if n != number:
            continue
        if wire == _VARINT:
            values.append(value)
        elif wire == _LEN:
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                values.append(item)
    return values


def _tensor(buf: memoryview, out: GraphSummary, main: bool = False) -> None:
    for entry in _lens(buf, 13):  # TensorProto.external_data
        if _string(entry, 1) == "location":
            out.external_locations.append(_string(entry, 2))
    if main:
        out.initializer_dims[_string(buf, 8)] = _ints(buf, 1)


def _shape(value_info: memoryview) -> list[int | str]:
    """ValueInfoProto -> its tensor's dims (dim_value, or dim_param for a dynamic one; "?" when absent)."""
    dims: list[int | str] = []
    for kind in _lens(value_info, 2):  # .type
        for tensor in _lens(kind, 1):  # TypeProto.tensor_type
            for shape in _lens(tensor, 2):  # .shape
                for dim in _lens(shape, 1):
                    known = _ints(dim, 1)
                    dims.append(known[0] if known else (_string(dim, 2) or "?"))
    return dims


def _sparse(buf: memoryview, out: GraphSummary) -> None:
    for number in (1, 2):  # SparseTensorProto.values, .indices
        for tensor in _lens(buf, number):
            _tensor(tensor, out)


def _node(buf: memoryview, out: GraphSummary, depth: int, main: bool = False) -> None:
    if main:
        out.nodes.append((_string(buf, 4), _strings(buf, 1), _strings(buf, 2)))
    for attr in _lens(buf, 5):  # NodeProto.attribute
        for n, wire, value in _fields(attr):
            if wire != _LEN:
                continue
            if n in (5, 10):  # AttributeProto.t, .tensors
                _tensor(value, out)
            elif n in (6, 11):  # .g, .graphs
                _graph(value, out, depth + 1, main=False)
            elif n in (22, 23):  # .sparse_tensor, .sparse_tensors
                _sparse(value, out)


def _graph(buf: memoryview, out: GraphSummary, depth: int, main: bool) -> None:
    if depth > _MAX_DEPTH:
        raise _WireError(f"subgraphs nested more than {_MAX_DEPTH} deep")
    for n, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if n == 5:
            _tensor(value, out, main)
        elif n == 15:
            _sparse(value, out)
        elif n == 1:
            _node(value, out, depth, main)
        elif main and n in (11, 12):  # ValueInfoProto.name (1)
            name = _string(value, 1)
            (out.inputs if n == 11 else out.outputs).append(name)
            out.shapes[name] = _shape(value)


def read_graph_summary(path: str | Path) -> GraphSummary:
    """Parse `model.onnx` enough to list its I/O names and external-data locations.

    Raises:
        BundleError: the file is not a readable ONNX model.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.onnx"; _ = p.write_bytes(b"")
    >>> read_graph_summary(p).inputs
    []
    """
    path = Path(path)
    out = GraphSummary()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Mapped, not read: weights inside the file (up to 2 GB) are skipped over without a copy.
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from exc
    try:
        with memoryview(data) as buf:
            _model(buf, out)
    except _WireError as exc:
        raise BundleError(f"{path}: not a valid ONNX model ({exc}); re-export the bundle") from exc
    finally:
        if isinstance(data, mmap.mmap):
            try:
                data.close()
            except BufferError:  # a traceback still holds a slice; the map closes when that is collected
                pass
    return out


def _model(buf: memoryview, out: GraphSummary) -> None:
    for n, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if n == 7:  # ModelProto.graph
            _graph(value, out, 0, main=True)
        elif n == 20:  # ModelProto.training_info: initialization (1), algorithm (2)
            for graph in (*_lens(value, 1), *_lens(value, 2)):
                _graph(graph, out, 1, main=False)
        elif n == 25:  # ModelProto.functions: FunctionProto.node (7)
            for node in _lens(value, 7):
                _node(node, out, 1)
