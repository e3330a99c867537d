"""The bundle contract between export and runtime: `manifest.json`, file hashes and safe paths.

A bundle is a directory: `model.onnx` (+ external data), `tokenizer.json`, `genai_config.json` and
`manifest.json`; with the mobile format (`edgegpt convert-ort`, edgegpt.export.ort_convert) also `model.ort` and
`required_operators.config`, described by the manifest's "ort" section. A device bundle may hold the `.ort`
file alone: then `graph.file` is null and the "ort" section names the graph the runtime loads. The manifest records the format version, the model config, the graph's I/O, the
quantization and the sha256 and size of every other file. Export writes it last; the runtime checks it
before loading anything. Its readers share one reading of it: `bundle_format` (fp32 or the quantization's
"format", one of `FORMATS`) and `model_files` (the graph and its external data). Torch-free: both sides
import it.

`graph.kv_cache.layout` says how the cache flows between steps (both graphs have the same I/O names):
- "concat" (MultiHeadAttention): present = concat(past, new), (B, H, P+T, D), fed back as the next past.
- "shared_buffer" (GroupQueryAttention): the caller binds one (B, H, L, D) buffer per key/value per layer
  as both past and present; the graph writes the T new positions at [S-T, S) in place (S = width of
  attention_mask, left padding included), reads [0, S) and never past S. The mask may grow one column per
  step or stay (B, L) with zeros after the cached positions (the graph reads each row's length from its
  last 1; edgegpt's decode steps and onnxruntime-genai do that). Needs onnxruntime >= 1.22.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgegpt.errors import BundleError
from edgegpt.files import atomic_write_text, recover

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "edgegpt-bundle"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"  # the graph's weights, when stored outside it (always above 2 GB)
ORT_FILE = "model.ort"  # the same graph in onnxruntime's ORT format (mobile and reduced builds)
ORT_OPERATORS = "required_operators.config"  # the operators a reduced onnxruntime build must include

# Bundle formats: fp32 is what export writes; quantization writes the others (QUANTIZED_FORMATS, in the order
# `edgegpt quantize --to` lists them). FORMATS is the order the bench reports them in.
FORMATS = ("fp32", "fp16", "int8", "int4")
QUANTIZED_FORMATS = ("int8", "int4", "fp16")

# Graph I/O names. They follow onnxruntime-genai's "decoder" convention so that genai loads bundles as is.
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    >>> len(sha256_file(__file__))
    64
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_member(bundle: Path, name: str) -> Path:
    """Resolve `name` inside `bundle`, refusing absolute paths, `..`, symlinks and hard links that leave it."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise BundleError(f"{bundle}: file name {name!r} must be a relative path inside the bundle")
    path = bundle / name
    if path.is_symlink():
        raise BundleError(f"{path}: symbolic links are refused in a bundle; copy the file in instead")
    root = bundle.resolve()
    resolved = path.resolve()
    if root != resolved and root not in resolved.parents:
        raise BundleError(f"{path}: resolves to {resolved}, outside the bundle {root}")
    if path.exists() and path.stat().st_nlink > 1:
        raise BundleError(f"{path}: has {path.stat().st_nlink} hard links; a bundle file must be its own copy")
    return path


def describe_files(bundle: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file in the bundle except the manifest, keyed by relative path."""
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        name = path.relative_to(bundle).as_posix()
        files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def write_manifest(bundle: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json` atomically, adding the format header and the hashes of all files.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model.onnx").write_bytes(b"x")
    >>> write_manifest(d, {"model": {}})["files"]["model.onnx"]["size"]
    1
    """
    bundle = Path(bundle)
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest, "files": describe_files(bundle)}
    atomic_write_text(bundle / MANIFEST_NAME, json.dumps(full, indent=2, sort_keys=False) + "\n")
    return full


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """Read and check the manifest header (format and version); does not hash files."""
    bundle = recover(bundle)  # a bundle replaced with --force may wait at its aside name (edgegpt.files)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle directory; create one with `edgegpt export CKPT -o {bundle}`")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; is {bundle} an edgegpt bundle? re-export it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}); re-export the bundle") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: not an {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {version!r}, this edgegpt reads {FORMAT_VERSION}; "
            "upgrade edgegpt or re-export the bundle"
        )
    return manifest


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Check the manifest, then the presence, size and sha256 of every listed file; return the manifest.

    Raises:
        BundleError: naming the first file that is missing, unsafe, resized or altered.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    files = manifest.get("files")
    graphs = [(manifest.get("graph") or {}).get("file", MODEL_FILE), (manifest.get("ort") or {}).get("file")]
    if not isinstance(files, dict) or not any(g in files for g in graphs if g) or "tokenizer.json" not in files:
        raise BundleError(
            f"{bundle}/{MANIFEST_NAME}: must list {MODEL_FILE} (or an ORT-format {ORT_FILE}) and tokenizer.json; "
            "re-export the bundle"
        )
    for name, meta in files.items():
        path = safe_member(bundle, name)
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing; re-export or re-copy the bundle")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise BundleError(
                f"{path}: {size} bytes, the manifest says {meta.get('size')}; the file is truncated or replaced"
            )
        if sha256_file(path) != meta.get("sha256"):
            raise BundleError(f"{path}: sha256 differs from the manifest; the file was modified or corrupted")
    return manifest


def model_files(manifest: dict[str, Any]) -> list[str]:
    """The graph file and, if the weights are stored outside it, their file: the bundle's model, by name
    (an `.ort`-only bundle's: its `.ort` file).

    >>> model_files({"graph": {"file": "model.onnx", "external_data": "model.onnx.data"}})
    ['model.onnx', 'model.onnx.data']
    """
    graph = manifest.get("graph") or {}
    if "file" in graph and graph["file"] is None:  # an .ort-only bundle
        return ort_files(manifest)[:1]
    return [graph.get("file", MODEL_FILE)] + ([graph["external_data"]] if graph.get("external_data") else [])


def ort_files(manifest: dict[str, Any]) -> list[str]:
    """The ORT-format graph and its operator list, when the bundle has them (the "ort" section), by name.

    >>> ort_files({"ort": {"file": "model.ort", "required_operators": "required_operators.config"}})
    ['model.ort', 'required_operators.config']
    >>> ort_files({})
    []
    """
    ort = manifest.get("ort") or {}
    return [name for name in (ort.get("file"), ort.get("required_operators")) if name]


def bundle_format(manifest: dict[str, Any]) -> str:
    """One of `FORMATS`: "fp32" when "quantization" is null (as export writes it), else its "format".

    Raises:
        BundleError: a quantization section without one of `QUANTIZED_FORMATS` as its format.

    >>> bundle_format({"quantization": None}), bundle_format({"quantization": {"format": "int4"}})
    ('fp32', 'int4')
    """
    quantization = manifest.get("quantization")
    if not quantization:
        return "fp32"
    fmt = quantization.get("format") if isinstance(quantization, dict) else None
    if fmt not in QUANTIZED_FORMATS:
        raise BundleError(
            f"{MANIFEST_NAME}: quantization format {fmt!r} is none of {', '.join(QUANTIZED_FORMATS)}; "
            "re-quantize the fp32 bundle with this edgegpt"
        )
    return fmt
