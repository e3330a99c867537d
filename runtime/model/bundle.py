"""`Bundle.load`: verify a bundle directory completely before any onnxruntime session reads it.

Checks, in order: the manifest's format and version, the size and sha256 of every listed file
(`edgegpt.manifest.verify_bundle`), the model config, the KV-cache layout, the external-data locations
inside `model.onnx` (each must be a safe, hashed member of the bundle), the graph's input and output names
and the model settings it implies (`check_model_settings`), and the tokenizer (loadable, an end-of-text token, no more tokens than the model's vocabulary: a model
vocabulary larger than the tokenizer's is padding, e.g. nanoGPT's 50304 for GPT-2's 50257, and those ids are
never sampled).

A bundle with the mobile format (the manifest's "ort" section, `edgegpt convert-ort`) gets the same graph
checks on `model.ort`, read through onnxruntime's FlatBuffers schema (`ort_format.py`): its I/O names and
shapes and the model settings they imply, before any session exists. An `.ort`-only bundle (`graph.file`
null) gets those checks only; it has no external data (an ORT file holds its weights). `select_graph` picks
the file a session loads and refuses an ORT file written by a newer onnxruntime than the one running.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegpt.config import GPTConfig
from edgegpt.errors import BundleError, ConfigError, DataError
from edgegpt.manifest import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MANIFEST_NAME,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    safe_member,
    verify_bundle,
)
from edgegpt.runtime.model.contract import KV_LAYOUTS, version_tuple
from edgegpt.runtime.model.onnx_paths import GraphSummary, read_graph_summary
from edgegpt.runtime.model.ort_format import read_ort_model

__all__ = ["Bundle", "KVCacheSpec", "MODEL_FORMATS", "select_graph"]

MODEL_FORMATS = ("auto", "onnx", "ort")  # which graph file a session loads; see `select_graph`

KV_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class KVCacheSpec:
    """The graph's cache contract: layout, dtype and the per-layer I/O names."""

    layout: str
    dtype: str
    past_key: str = PAST_KEY
    past_value: str = PAST_VALUE
    present_key: str = PRESENT_KEY
    present_value: str = PRESENT_VALUE

    def past_names(self, n_layer: int) -> list[str]:
        return [name.format(i) for i in range(n_layer) for name in (self.past_key, self.past_value)]

    def present_names(self, n_layer: int) -> list[str]:
        return [name.format(i) for i in range(n_layer) for name in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: paths, manifest, model config, KV-cache contract and tokenizer.

    >>> bundle = Bundle.load("bundles/tiny")  # doctest: +SKIP
    >>> bundle.config.block_size, bundle.kv.layout  # doctest: +SKIP
    (64, 'concat')
    """

    path: Path
    manifest: dict[str, Any]
    config: GPTConfig
    kv: KVCacheSpec
    tokenizer: Any  # tokenizers.Tokenizer
    eot_id: int

    @property
    def onnx_path(self) -> Path | None:
        """The ONNX graph; None for an `.ort`-only bundle."""
        name = self.manifest["graph"].get("file", MODEL_FILE)
        return None if name is None else self.path / name

    @property
    def ort_path(self) -> Path | None:
        """The ORT-format graph (the manifest's "ort" section); None without one."""
        ort = self.manifest.get("ort")
        return self.path / ort["file"] if ort else None

    @property
    def model_path(self) -> Path:
        """The graph a session loads by default: the ONNX graph, or the ORT file of an `.ort`-only bundle."""
        return self.onnx_path or self.ort_path

    @property
    def input_names(self) -> list[str]:
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.kv.past_names(self.config.n_layer)]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS, *self.kv.present_names(self.config.n_layer)]

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Verify and load a bundle directory; nothing is handed to onnxruntime until all checks pass.

        Raises:
            BundleError: missing, altered or unsafe files, an unknown format version or KV layout,
                missing graph inputs/outputs, a tokenizer that does not fit the model.
        """
        path = Path(path)
        manifest = verify_bundle(path)
        where = path / MANIFEST_NAME
        config = _config(manifest, where)
        kv = _kv_spec(manifest, where)
        graph = manifest.get("graph")
        if not isinstance(graph, dict):
            raise BundleError(f"{where}: no 'graph' section; re-export the bundle")
        model_file = graph.get("file", MODEL_FILE)
        ort_file = _ort_file(manifest, where)
        if model_file is None and ort_file is None:
            raise BundleError(
                f"{where}: graph.file is null and there is no 'ort' section: the bundle has no graph; re-export"
            )
        expected_in = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *kv.past_names(config.n_layer)]
        expected_out = [LOGITS, *kv.present_names(config.n_layer)]
        declared_in = [i.get("name") for i in graph.get("inputs", []) if isinstance(i, dict)]
        declared_out = [o.get("name") for o in graph.get("outputs", []) if isinstance(o, dict)]
        check_io(f"{where} 'graph'", declared_in, declared_out, expected_in, expected_out)
        if model_file is not None:
            if not isinstance(model_file, str):
                raise BundleError(f"{where}: graph.file must be a file name, got {model_file!r}")
            model_path = safe_member(path, model_file)
            if model_file not in manifest["files"]:
                raise BundleError(f"{where}: graph file {model_file!r} is not listed (hashed) in 'files'; re-export")
            summary = read_graph_summary(model_path)
            _check_external_data(path, summary.external_locations, manifest["files"], model_path)
            check_io(str(model_path), summary.inputs, summary.outputs, expected_in, expected_out)
            check_model_settings(summary, config, kv, where)
        if ort_file is not None:
            ort_path = safe_member(path, ort_file)
            summary = read_ort_model(ort_path).summary
            check_io(str(ort_path), summary.inputs, summary.outputs, expected_in, expected_out)
            check_model_settings(summary, config, kv, where)
        tokenizer, eot = _tokenizer(path, manifest, config, where)
        return cls(path, manifest, config, kv, tokenizer, eot)


def select_graph(bundle: Bundle, model_format: str, onnxruntime_version: str) -> Path:
    """The graph file a session loads: "onnx", "ort", or "auto" (the `.onnx` when the bundle has one, else the `.ort`).

    Raises:
        ConfigError: an unknown model_format.
        BundleError: the bundle lacks that format, or its ORT file needs a newer onnxruntime (ORT files are
            not forward compatible: onnxruntime reads those of its own version and older).
    """
    if model_format not in MODEL_FORMATS:
        raise ConfigError(f"model_format must be one of {', '.join(MODEL_FORMATS)}, got {model_format!r}")
    if model_format == "onnx" or (model_format == "auto" and bundle.onnx_path is not None):
        if bundle.onnx_path is None:
            raise BundleError(
                f"{bundle.path}: an .ort-only bundle has no ONNX graph; load it with model_format='ort' (or 'auto')"
            )
        return bundle.onnx_path
    if bundle.ort_path is None:
        raise BundleError(f"{bundle.path}: has no ORT-format graph; add one with `edgegpt convert-ort {bundle.path}`")
    need = bundle.manifest["ort"].get("min_onnxruntime", "0")
    if version_tuple(onnxruntime_version) < version_tuple(need):
        raise BundleError(
            f"{bundle.ort_path}: written by onnxruntime {bundle.manifest['ort'].get('onnxruntime')}, which needs "
            f"onnxruntime >= {need} to read it; this is {onnxruntime_version}: upgrade onnxruntime, or re-convert "
            "the bundle with this onnxruntime (`edgegpt convert-ort`)"
        )
    return bundle.ort_path


def _ort_file(manifest: dict, where: Path) -> str | None:
    """The "ort" section's graph file name (None without the section), checked to be listed (hashed)."""
    ort = manifest.get("ort")
    if ort is None:
        return None
    name = ort.get("file") if isinstance(ort, dict) else None
    if not isinstance(name, str) or name not in manifest["files"]:
        raise BundleError(
            f"{where}: ort.file {name!r} is not a file listed (hashed) in 'files'; re-convert with `edgegpt convert-ort`"
        )
    return name


def check_io(where: str, inputs: list, outputs: list, expected_in: list[str], expected_out: list[str]) -> None:
    """Raise BundleError naming the graph inputs/outputs that the runtime needs and `where` lacks."""
    missing = [n for n in expected_in if n not in inputs] + [n for n in expected_out if n not in outputs]
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise BundleError(f"{where}: the graph lacks {shown}; re-export the bundle with this edgegpt")


def check_model_settings(summary: GraphSummary, config: GPTConfig, kv: KVCacheSpec, where: Path) -> None:
    """BundleError where the manifest's model settings disagree with what the graph itself says.

    The manifest cannot hash itself, so an edited block_size (or any shape) would otherwise surface as a raw
    onnxruntime error mid-generation, or as a huge allocation. Checked: the vocabulary (the logits' last
    dimension), the layers (past inputs), the heads and head size (a past input's dims), the context
    (the rows of the table that position_ids index) and the GELU (FastGelu is the tanh one; Gelu, BiasGelu
    or a bare Erf the exact one). A dimension the graph leaves dynamic is not checked.
    """
    said: dict[str, int] = {}
    logits = summary.shapes.get(LOGITS, [])
    if len(logits) == 3 and isinstance(logits[2], int):
        said["vocab_size"] = logits[2]
    said["n_layer"] = sum(name.startswith(kv.past_key.split("{")[0]) for name in summary.inputs) // 2
    past = summary.shapes.get(kv.past_names(1)[0], [])
    if len(past) == 4 and isinstance(past[1], int) and isinstance(past[3], int):
        said["n_head"], said["head_size"] = past[1], past[3]
    rows = _position_table_rows(summary)
    if rows is not None:
        said["block_size"] = rows
    ops = {op for op, _, _ in summary.nodes}
    if ops & {"FastGelu", "Erf", "Gelu", "BiasGelu"}:  # fused or not, the two GELUs leave different ops
        said["gelu"] = "tanh" if "FastGelu" in ops else "erf"
    wrong = [
        f"{name} {getattr(config, name)} (the graph: {value})"
        for name, value in said.items()
        if getattr(config, name) != value
    ]
    if wrong:
        raise BundleError(
            f"{where}: 'model' disagrees with the graph: {', '.join(wrong)}; the manifest was edited or belongs to "
            "another model: re-export the bundle"
        )


def _position_table_rows(summary: GraphSummary) -> int | None:
    """Rows of the table that position_ids index (through a dequantization, if any); None if not found."""
    producers = {output: inputs for _, inputs, outputs in summary.nodes for output in outputs}
    for op, inputs, _ in summary.nodes:
        if op.startswith("Gather") and len(inputs) > 1 and inputs[1] == POSITION_IDS:
            table = inputs[0]
            for _ in range(3):  # e.g. DequantizeLinear(table_q) -> Gather
                if table in summary.initializer_dims:
                    dims = summary.initializer_dims[table]
                    return dims[0] if dims else None
                table = (producers.get(table) or [""])[0]
    return None


def _config(manifest: dict, where: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(manifest.get("model"))
    except ConfigError as exc:
        raise BundleError(f"{where}: bad 'model' config ({exc}); re-export the bundle") from exc


def _kv_spec(manifest: dict, where: Path) -> KVCacheSpec:
    kv = (manifest.get("graph") or {}).get("kv_cache")
    if not isinstance(kv, dict):
        raise BundleError(f"{where}: no graph.kv_cache section; re-export the bundle")
    layout, dtype = kv.get("layout"), kv.get("dtype", "float32")
    if layout not in KV_LAYOUTS:
        raise BundleError(
            f"{where}: KV-cache layout {layout!r} is not supported by this runtime (it runs {', '.join(KV_LAYOUTS)}); "
            "upgrade edgegpt or re-export the bundle"
        )
    if dtype not in KV_DTYPES:
        raise BundleError(f"{where}: KV-cache dtype {dtype!r} is not one of {', '.join(KV_DTYPES)}")
    names = {k: kv[k] for k in ("past_key", "past_value", "present_key", "present_value") if k in kv}
    for key, name in names.items():
        if not isinstance(name, str) or name.count("{}") != 1:
            raise BundleError(
                f"{where}: graph.kv_cache.{key} must be a name with one '{{}}' for the layer, got {name!r}"
            )
    return KVCacheSpec(layout=layout, dtype=dtype, **names)


def _check_external_data(bundle: Path, locations: list[str], files: dict, model_path: Path) -> None:
    """Every external-data location must resolve inside the bundle and be a hashed manifest entry.

    onnxruntime < 1.24 loads data from outside the model's folder, and no version knows the manifest:
    see runtime/model/onnx_paths.py for the cases and the versions measured.
    """
    base = model_path.parent.relative_to(bundle)
    for location in dict.fromkeys(locations):
        try:
            member = safe_member(bundle, (base / location).as_posix() if location else "")
        except BundleError as exc:
            raise BundleError(f"{model_path}: external data location {location!r} refused: {exc}") from None
        if not member.is_file():
            raise BundleError(
                f"{model_path}: external data {location!r} is missing ({member}); re-copy or re-export the bundle"
            )
        name = member.relative_to(bundle).as_posix()
        if name not in files:
            raise BundleError(
                f"{model_path}: external data {location!r} is not listed (hashed) in the manifest; re-export the bundle"
            )


def _tokenizer(path: Path, manifest: dict, config: GPTConfig, where: Path):
    from edgegpt.tokenizer import eot_id, load_tokenizer

    meta = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    name = meta.get("file", "tokenizer.json")
    if not isinstance(name, str) or name not in manifest["files"]:
        raise BundleError(f"{where}: tokenizer file {name!r} is not listed (hashed) in 'files'; re-export the bundle")
    file = safe_member(path, name)
    try:
        tok = load_tokenizer(file)
    except DataError as exc:  # its message names the file
        raise BundleError(f"{exc}; re-export the bundle from one checkpoint") from exc
    if tok.get_vocab_size() > config.vocab_size:  # fewer: a padded vocabulary, whose extra ids are never sampled
        raise BundleError(
            f"{file}: the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is only "
            f"{config.vocab_size}; re-export the bundle from one checkpoint"
        )
    try:
        eot = eot_id(tok)
    except DataError as exc:
        raise BundleError(f"{file}: {exc}") from exc
    size = tok.get_vocab_size()
    if meta.get("vocab_size", size) != size:
        raise BundleError(
            f"{where}: tokenizer.vocab_size is {meta['vocab_size']} but {file} has {size} tokens; re-export the bundle"
        )
    if meta.get("eot_token_id", eot) != eot:
        raise BundleError(f"{where}: tokenizer.eot_token_id {meta['eot_token_id']} but the tokenizer's is {eot}")
    sampled = config.sampled_ids(size)
    if meta.get("sampled_vocab_size", sampled) != sampled:
        raise BundleError(
            f"{where}: tokenizer.sampled_vocab_size {meta['sampled_vocab_size']} but the model and tokenizer "
            f"sample ids 0..{sampled - 1}; re-export the bundle"
        )
    return tok, eot
