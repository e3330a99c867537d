"""The mobile format: add `model.ort` and `required_operators.config` to a bundle (`convert_to_ort`, `add_ort`).

onnxruntime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`, the Python API behind
`python -m onnxruntime.tools.convert_onnx_models_to_ort`) does the work: it optimizes the graph (style
"Fixed", level "all", without the x86-only NCHWc layout) and saves it in the ORT format that reduced and
minimal onnxruntime builds load, and lists the operators the optimized graph needs, the input of a reduced
build (`--include_ops_by_config`). edgegpt copies both into the bundle, records them in the manifest's "ort"
section and hashes them like every other file; then the runtime loads the `.ort` file and its greedy tokens
are checked against the `.onnx` graph's.

Compatibility: ORT files are read by the onnxruntime that wrote them and newer ones, not older ones
(https://onnxruntime.ai/docs/performance/model-optimizations/ort-format-models.html, "Backwards
compatibility"): the manifest's `ort.min_onnxruntime` is the converter's version, and `Generator.load` refuses
the file under an older onnxruntime. To target an older device runtime, convert with that onnxruntime
version installed. The graph's ONNX IR version must be one the converting onnxruntime reads (checked first).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from edgegpt.errors import BundleError, ExportError
from edgegpt.manifest import MANIFEST_NAME, ORT_FILE, ORT_OPERATORS, ort_files, safe_member, write_manifest

__all__ = ["add_ort", "convert_to_ort"]

log = logging.getLogger(__name__)

TARGET_PLATFORMS = ("arm", "amd64")  # the converter's --target_platform: "arm" keeps the graph portable
GREEDY_CHECK_TOKENS = 8


def convert_to_ort(
    bundle: str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    keep_onnx: bool = True,
    target_platform: str = "arm",
) -> Path:
    """Add `model.ort` and `required_operators.config` to a bundle of any format (fp32, int8, int4, fp16).

    Args:
        bundle: the source bundle; verified first. It must hold its `.onnx` graph.
        out: the bundle to write; None rewrites `bundle` itself (a new copy is staged and renamed into place,
            so a failure leaves the old bundle as it was).
        force: replace an existing bundle at `out` (when `out` is another directory).
        keep_onnx: keep `model.onnx` (and its external data); False writes an `.ort`-only bundle for devices,
            which `Generator.load` runs as is (`edgegpt web` and onnxruntime-genai need the `.onnx`).
        target_platform: the converter's "arm" (portable; the default) or "amd64" (x86-specific fusions).

    Returns:
        The bundle directory.

    Raises:
        BundleError: the source does not verify or has no `.onnx` graph.
        ExportError: the converter failed; the `.ort` graph's greedy tokens differ from the `.onnx` graph's.

    >>> convert_to_ort("bundles/tiny-int4")  # doctest: +SKIP
    PosixPath('bundles/tiny-int4')
    """
    from edgegpt.export import bundle as staging_dir
    from edgegpt.runtime.model.bundle import Bundle

    source = Bundle.load(bundle)
    if source.onnx_path is None:
        raise BundleError(
            f"{source.path}: holds no .onnx graph to convert (an .ort-only bundle); convert its fp32 or quantized source"
        )
    in_place = out is None or Path(out).resolve() == source.path.resolve()
    out = source.path if in_place else Path(out)
    skip = set(ort_files(source.manifest)) | {MANIFEST_NAME}
    with staging_dir.staging(out, force=force or in_place) as tmp:
        for name in source.manifest["files"]:
            if name not in skip:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(safe_member(source.path, name), tmp / name)
        manifest = {k: v for k, v in source.manifest.items() if k not in ("format", "format_version", "files", "ort")}
        add_ort(tmp, manifest, keep_onnx=keep_onnx, target_platform=target_platform)
    log.info("wrote %s with %s", out, ORT_FILE)
    return out


def add_ort(
    tmp: Path, manifest: dict[str, Any], *, keep_onnx: bool = True, target_platform: str = "arm"
) -> dict[str, Any]:
    """Convert the staged bundle `tmp`'s graph into `tmp/model.ort` + `tmp/required_operators.config`, check its
    greedy tokens against the `.onnx` graph, and write the manifest (with its "ort" section); -> the manifest.

    `manifest` is the bundle's manifest without the header and files (as `write_manifest` takes it).
    """
    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if target_platform not in TARGET_PLATFORMS:
        raise ExportError(f"target_platform must be one of {', '.join(TARGET_PLATFORMS)}, got {target_platform!r}")
    graph = manifest["graph"]
    work = tmp / ".ort-work"
    work.mkdir()
    model = _ort_compatible(tmp / graph["file"], work / "source")
    chatter = io.StringIO()  # the converter prints its progress: keep stdout for the command's result
    # Its config writer logs through a logger that onnxruntime pins at DEBUG (onnxruntime.tools.logger), naming
    # the staging folder: shown only with --debug, so that --quiet stays quiet.
    logging.getLogger("ort_format_model.utils").setLevel(
        logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    )
    try:
        with contextlib.redirect_stdout(chatter):
            convert_onnx_models_to_ort(
                model, output_dir=work, optimization_styles=[OptimizationStyle.Fixed], target_platform=target_platform
            )
    except Exception as exc:  # the converter raises onnxruntime's own exception types
        raise ExportError(f"{model}: onnxruntime's ORT-format converter failed: {exc}") from exc
    finally:
        log.debug("convert_onnx_models_to_ort: %s", chatter.getvalue().strip())
    shutil.move(work / f"{model.stem}.ort", tmp / ORT_FILE)  # the converter names its outputs after the graph
    _write_operators(work / f"{model.stem}.{ORT_OPERATORS}", tmp / ORT_OPERATORS)
    shutil.rmtree(work)
    from edgegpt.runtime.model.ort_format import read_ort_model

    info = read_ort_model(tmp / ORT_FILE)
    manifest["ort"] = {
        "file": ORT_FILE,
        "required_operators": ORT_OPERATORS,
        "converter": "onnxruntime.tools.convert_onnx_models_to_ort (optimization style Fixed, level all)",
        "target_platform": target_platform,
        "onnxruntime": onnxruntime.__version__,
        "min_onnxruntime": ".".join(onnxruntime.__version__.split(".")[:2]),
        "format_version": info.format_version,
        "ir_version": info.ir_version,
        "operators": _operators(tmp / ORT_OPERATORS),
        "greedy_check": None,
    }
    write_manifest(tmp, manifest)
    manifest["ort"]["greedy_check"] = _greedy_check(tmp)
    if not keep_onnx:
        for name in (graph["file"], graph.get("external_data")):
            if name:
                (tmp / name).unlink()
        manifest["graph"] = {**graph, "file": None, "external_data": None}
    return write_manifest(tmp, manifest)


def _ort_compatible(model: Path, work: Path) -> Path:
    """`model`, or a copy of it in `work` whose 4-bit initializers are stored as packed uint8, the same values.

    The ORT format's tensor types stop before ONNX's INT4/UINT4 (onnxruntime 1.32's schema): the converter writes
    an int4 bundle's quantized embedding table (GatherBlockQuantized data, INT4) but no onnxruntime can load the
    result ("Unsupported tensor data type"). GatherBlockQuantized also takes uint8 data holding two 4-bit
    values per byte, low nibble first, with an implicit zero point of 8: int4 value v is stored as v + 8 and
    dequantizes to the same number. The `.ort` graph's greedy check against the `.onnx` graph proves it.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    four_bit = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    packed = {t.name: t for t in proto.graph.initializer if t.data_type in four_bit}
    if not packed:
        return model
    for node in proto.graph.node:
        used = [name for name in node.input if name in packed]
        if not used:
            continue
        if (
            node.op_type != "GatherBlockQuantized"
            or list(node.input).index(used[0]) != 0
            or len(node.input) > 3
            or packed[used[0]].data_type != onnx.TensorProto.INT4
        ):
            raise ExportError(
                f"{model}: a 4-bit initializer feeds {node.op_type} {node.name!r}; the ORT format cannot "
                "store 4-bit tensors and edgegpt only repacks GatherBlockQuantized's int4 data"
            )
        tensor = packed.pop(used[0])
        values = numpy_helper.to_array(tensor).astype(np.int16) + 8  # int4 -> 0..15 (rows, cols), cols even
        tensor.CopyFrom(
            numpy_helper.from_array((values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8), tensor.name)
        )
    work.mkdir()
    onnx.save_model(proto, str(work / model.name))
    return work / model.name


def _write_operators(written: Path, target: Path) -> None:
    """The converter's operator list, its comment naming the model by its name in the bundle: the staging path
    it records would be meaningless (and would make two conversions of one graph differ)."""
    lines = written.read_text().splitlines()
    lines = [f"# - {ORT_FILE}" if line.startswith("# - ") else line for line in lines]
    target.write_text("\n".join(lines) + "\n")


def _operators(config: Path) -> dict[str, list[str]]:
    """{domain: sorted op types} from a required_operators.config ("domain;opset;Op1,Op2" lines)."""
    ops: dict[str, set[str]] = {}
    for line in config.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _, names = line.split(";", 2)
            ops.setdefault(domain, set()).update(n for n in names.split(",") if n)
    return {domain: sorted(names) for domain, names in sorted(ops.items())}


def _greedy_check(tmp: Path) -> dict[str, Any]:
    """Greedy tokens of the `.ort` graph against the `.onnx` graph's, from the end-of-text token, on CPU.

    Raises:
        ExportError: they differ.
    """
    from edgegpt.runtime.model.bundle import Bundle
    from edgegpt.runtime.generation.generator import Generator

    bundle, runs = Bundle.load(tmp), {}  # verified once for both graphs
    for model_format in ("onnx", "ort"):
        gen = Generator.load(bundle, provider="cpu", threads=1, model_format=model_format, huge_pages=False)
        n = min(GREEDY_CHECK_TOKENS, gen.config.block_size - 1)
        runs[model_format] = gen.generate("", max_new_tokens=n, ignore_eos=True).tokens
    if runs["ort"] != runs["onnx"]:
        raise ExportError(
            f"{tmp}: the ORT-format graph's greedy tokens {runs['ort']} differ from the ONNX graph's {runs['onnx']}"
        )
    return {"tokens": len(runs["ort"]), "equal": True}
