"""edgegpt.export: a checkpoint -> a validated, fused ONNX bundle with a KV cache (`export_bundle`).

The steps, one module each: onnx_export.py (torch -> ONNX with GroupQueryAttention or MultiHeadAttention
nodes), optimize.py (onnxruntime's fusions, op counts), validate.py (checker, parity with PyTorch, greedy
generation),
genai.py (onnxruntime-genai's config files), ort_convert.py (the mobile ORT format, `convert_to_ort`) and
bundle.py (atomic directory). The manifest contract
lives in edgegpt.manifest. Importing this package is cheap: torch and onnx are imported when
`export_bundle` runs, so the CLI can import its command at start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgegpt.manifest import EXTERNAL_DATA, MODEL_FILE

__all__ = ["convert_to_ort", "export_bundle", "quantize_bundle"]


def __getattr__(name: str):
    """`quantize_bundle` and `convert_to_ort` are loaded on first use: their modules import onnx, and this
    package stays cheap."""
    if name == "quantize_bundle":
        from edgegpt.export.quantize import quantize_bundle

        return quantize_bundle
    if name == "convert_to_ort":
        from edgegpt.export.ort_convert import convert_to_ort

        return convert_to_ort
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31  # bytes: a larger ONNX file must keep its weights as external data


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    optimize: bool = True,
    external_data: bool = False,
    validate: bool = True,
    opset: int | None = None,
    attention: str = "gqa",
    ort: bool = False,
) -> Path:
    """Export a checkpoint to a bundle directory: model.onnx, tokenizer files, genai_config.json, manifest.json.

    The graph serves prefill and decode (dynamic batch, sequence and past axes; left padding through
    attention_mask / position_ids). It is checked by onnx.checker and, unless `validate=False`, against
    PyTorch (logits and presents within 1e-4 before and after optimisation, greedy tokens equal).

    Args:
        checkpoint: a checkpoint directory (or a training run directory holding `checkpoint/`).
        out: the bundle directory to create; built beside it and renamed into place when complete.
        force: replace an existing bundle at `out`: only one that verifies (manifest and hashes) and holds no
            file its manifest does not list, or an empty directory (see edgegpt.export.bundle).
        optimize: apply onnxruntime's fusions (SkipLayerNormalization, FastGelu); off leaves the plain export.
        external_data: store weights in `model.onnx.data` (always done above 2 GB).
        validate: run the parity and greedy checks (the ONNX checker always runs).
        opset: ONNX opset, 17..19; default 17.
        attention: "gqa" (GroupQueryAttention; KV layout "shared_buffer": one preallocated cache updated in
            place, the faster decode; needs head_size % 8 == 0 and onnxruntime >= 1.22 to run) or "mha"
            (MultiHeadAttention; KV layout "concat": a new present each step). See edgegpt.export.onnx_export.
        ort: also write the mobile format, `model.ort` and `required_operators.config` (see
            edgegpt.export.ort_convert), in the same atomic bundle.

    Returns:
        The bundle directory.

    Raises:
        CheckpointError: a missing or corrupt checkpoint, a config that does not fit the weights, a tokenizer
            with more tokens than the model's vocab_size, or without an end-of-text token (an imported model's
            first eos_token_id, else "<|endoftext|>"); raised before any
            export work. (Fewer tokens is a padded vocabulary: the manifest's tokenizer.sampled_vocab_size
            tells the runtime which ids it may sample.)
        ExportError: `out` exists (without `force`, or with it but is no bundle that verifies, or holds unlisted
            files), the exporter, optimizer or checker failed.
        StorageError: the bundle could not be written (disk full...); a bundle already at `out` is kept.
        ParityError: the graph's outputs or greedy tokens differ from PyTorch's; names output, case, difference.

    >>> export_bundle("runs/tiny/checkpoint", "bundles/tiny")  # doctest: +SKIP
    PosixPath('bundles/tiny')
    """
    import shutil

    from edgegpt.train.checkpoint import TOKENIZER, WEIGHTS, load_checkpoint
    from edgegpt.errors import ExportError
    from edgegpt.export import bundle, genai, onnx_export
    from edgegpt.manifest import sha256_file, write_manifest

    out = Path(out)
    opset = onnx_export.DEFAULT_OPSET if opset is None else opset
    if opset not in onnx_export.OPSETS:
        raise ExportError(
            f"opset {opset} is not supported; choose {min(onnx_export.OPSETS)}..{max(onnx_export.OPSETS)}"
        )
    bundle.check_target(out, force)
    ckpt = load_checkpoint(checkpoint)
    special = ckpt.special_tokens()
    eot = _end_of_text(ckpt, special)
    model, cfg = ckpt.model, ckpt.config
    onnx_export.check_attention(cfg, attention)
    n_bytes = 4 * (
        sum(p.numel() for p in model.parameters()) + cfg.vocab_size * cfg.n_embd
    )  # + the export's lm_head copy
    external_data = external_data or n_bytes > 0.9 * _PROTOBUF_LIMIT
    log.info("exporting %s (%.1f M parameters) to %s", ckpt.path, model.num_params() / 1e6, out)

    with bundle.staging(out, force=force) as tmp:
        graph = _build_graph(
            model,
            tmp / MODEL_FILE,
            opset=opset,
            optimize=optimize,
            external_data=external_data,
            validate=validate,
            attention=attention,
        )
        shutil.copyfile(ckpt.path / TOKENIZER, tmp / TOKENIZER)
        model_type = genai.model_type(cfg)
        genai.write_genai_files(
            tmp,
            cfg,
            eot,
            share_buffer=onnx_export.kv_layout(attention) == "shared_buffer",
            chat_template=ckpt.chat_template,
            special=special,
            model_type=model_type,
        )
        manifest = {
            "model": cfg.to_dict(),
            "tokenizer": _tokenizer_section(cfg, TOKENIZER, ckpt.tokenizer.get_vocab_size(), eot, special),
            "graph": _graph_section(tmp / MODEL_FILE, external_data, attention),
            "quantization": None,
            "producer": _producer(),
            "source": {"checkpoint": str(ckpt.path.resolve()), "fingerprint": sha256_file(ckpt.path / WEIGHTS)},
            "optimization": graph["optimization"],
            "validation": graph["validation"],
            "genai": {"config": genai.GENAI_CONFIG, "model_type": model_type},
        }
        write_manifest(tmp, manifest)
        if ort:
            from edgegpt.export.ort_convert import add_ort

            add_ort(tmp, manifest)
    log.info("wrote bundle %s", out)
    return out


def _build_graph(
    model, final: Path, *, opset: int, optimize: bool, external_data: bool, validate: bool, attention: str
) -> dict:
    """Export, check, optimise and validate the graph into `final`; return the manifest's two sections."""
    import shutil

    import onnx

    from edgegpt.export import onnx_export
    from edgegpt.export import validate as check
    from edgegpt.export.optimize import op_counts
    from edgegpt.export.tied_embedding import share_tied_lm_head

    cfg, work = model.config, final.parent / ".work"
    work.mkdir()
    raw = onnx_export.export_onnx(model, work / "exported.onnx", opset=opset, attention=attention)
    check.check_graph(raw, cfg)
    parity = {"exported": check.check_parity(model, raw, stage="exported")} if validate else {}
    if optimize:
        before, after = onnx_export.optimize_graph(raw, final, cfg, attention=attention, external_data=external_data)
        check.check_graph(final, cfg)
        if validate:
            parity["optimized"] = check.check_parity(model, final, stage="optimized")
    else:
        plain = onnx.load(str(raw))
        share_tied_lm_head(plain)
        onnx.save_model(plain, str(final), save_as_external_data=external_data, location=EXTERNAL_DATA)
        before = after = op_counts(onnx.load(str(final), load_external_data=False))
    greedy = check.check_greedy(model, final) if validate else None
    shutil.rmtree(work)
    optimizer = "onnxruntime.transformers.optimizer (model_type gpt2, opt_level 0)" if optimize else None
    return {
        "optimization": {"optimizer": optimizer, "op_counts_before": before, "op_counts_after": after},
        "validation": _validation_section(parity, greedy),
    }


def _end_of_text(ckpt, special: tuple[dict, dict]) -> int:
    """The end-of-text id: an imported model's first eos_token_id (generation_config.json, kept by import-hf), else
    the tokenizer's "<|endoftext|>" (edgegpt's and GPT-2's). CheckpointError, naming the fix, without either, or
    for a tokenizer said to add a BOS that names none."""
    from edgegpt.errors import CheckpointError, DataError
    from edgegpt.tokenizer import eot_id
    from edgegpt.train.hf import token_ids

    tokenizer_config, generation_config = special
    if tokenizer_config.get("add_bos_token") and generation_config.get("bos_token_id") is None:
        raise CheckpointError(
            f"{ckpt.path}: the tokenizer adds a BOS but no bos_token_id is recorded; import the "
            "model again with its generation_config.json or config.json bos_token_id"
        )
    stops = token_ids(generation_config.get("eos_token_id"))
    if stops:
        return stops[0]
    try:
        return eot_id(ckpt.tokenizer)
    except DataError as exc:
        raise CheckpointError(
            f"{ckpt.path}/tokenizer.json: {exc}, or import the model with its "
            "generation_config.json (edgegpt import-hf) so that its eos_token_id names the end of text"
        ) from exc


def _tokenizer_section(cfg, file: str, size: int, eot: int, special: tuple[dict, dict] = ({}, {})) -> dict:
    """The manifest's "tokenizer". With a padded model vocabulary (nanoGPT's 50304 for GPT-2's 50257 tokens)
    `vocab_size` here is below model.vocab_size, and ids from `sampled_vocab_size` on are never sampled.
    An imported model's special tokens (`Checkpoint.special_tokens`) add its BOS, whether the tokenizer adds it,
    and every stop id: the runtime's `SpecialTokens` reads them (an older bundle without them: end-of-text only)."""
    section = {"file": file, "vocab_size": size, "eot_token_id": eot, "sampled_vocab_size": cfg.sampled_ids(size)}
    tokenizer_config, generation_config = special
    if generation_config:
        from edgegpt.train.hf import token_ids

        section.update(
            bos_token_id=generation_config.get("bos_token_id"),
            add_bos_token=bool(tokenizer_config.get("add_bos_token")),
            stop_token_ids=token_ids(generation_config.get("eos_token_id")),
        )
    return section


def _graph_section(final: Path, external_data: bool, attention: str) -> dict:
    """The manifest's "graph": file, opset, I/O and the KV-cache contract."""
    import onnx

    from edgegpt.export.onnx_export import attention_op, kv_layout
    from edgegpt.export.optimize import graph_io
    from edgegpt.manifest import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

    model = onnx.load(str(final), load_external_data=False)
    inputs, outputs = graph_io(model)
    return {
        "file": final.name,
        "external_data": EXTERNAL_DATA if external_data else None,
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": {
            "layout": kv_layout(attention),  # see edgegpt.export.onnx_export and edgegpt.runtime.engine.cache
            "past_key": PAST_KEY,
            "past_value": PAST_VALUE,
            "present_key": PRESENT_KEY,
            "present_value": PRESENT_VALUE,
            "dtype": "float32",
        },
        "attention": attention_op(attention),
    }


def _validation_section(parity: dict, greedy: dict | None) -> dict:
    """The manifest's "validation": the checker, per-case parity figures and the greedy check."""
    from edgegpt.export.validate import ATOL

    if greedy is None:
        return {"checker": "onnx.checker full_check", "parity": None, "greedy": None}
    worst = max(d for stage in parity.values() for case in stage.values() for d in case.values())
    return {
        "checker": "onnx.checker full_check",
        "atol": ATOL,
        "max_abs_diff": worst,
        "parity": parity,
        "greedy": greedy,
    }


def _producer() -> dict:
    """Versions of everything that shaped the graph."""
    import onnx
    import onnxruntime
    import torch

    from edgegpt import __version__

    return {
        "edgegpt": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "exporter": "torch.onnx.export(dynamo=False)",
    }
