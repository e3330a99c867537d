"""`run_bench`: speed and memory of every backend on the same weights, side by side, in one run.

Backends: PyTorch eager with the KV cache (the reference), the edgegpt runtime on the fp32, int8 and int4
bundles (fp16 too on CUDA), and onnxruntime-genai on the same bundles when it is installed. The source is
a checkpoint (exported and quantized into a work directory), existing bundles, or a random-weight preset.

How it measures (the choices that make figures comparable):
- Every measurement runs in a fresh process (`edgegpt.bench.worker`): peak resident memory is that
  backend's alone, and the runtime's process never imports torch, as on a device.
- Rounds are interleaved: round r runs every backend once (and the bandwidth probe), in an order rotated
  by r, so that machine noise hits all backends alike. Each figure is the median over rounds, shown with
  its min-max; ratios between backends are taken within a round, then their median.
- Prompts are seeded random token ids (never the end-of-text id) of exactly `prompt_tokens` tokens;
  decoding is greedy and ignores end-of-text, so every backend generates exactly `new_tokens` tokens.
  Batch b uses b different prompts of the same length (no padding); batch tokens/s counts all rows.
- Time to first token is prefill plus picking the first token; prefill tokens/s = batch x prompt / that.
  Decode tokens/s = (new_tokens - 1) x batch / (last token - first token). Per-token latency p50/p95 are
  over the decode steps of a run, then the median over runs.
- The decode bound of a bundle is bandwidth / (bytes of weights read per token): the bytes of all
  initializers except those only gathered from (the token and position embedding tables), lm_head
  included; the KV cache is not counted. Bandwidth is the best of the probe's rounds (see
  `edgegpt.bench.worker.bandwidth_probe`).
- Agreement: the batch-1 tokens of each edgegpt row are compared with PyTorch's, each genai row's with
  edgegpt's on the same bundle ("n/N": the first n of N tokens are equal). Quantized rows differ from
  PyTorch by design; on random weights near-ties also flip greedy tokens, so read them as a sanity check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgegpt.checks import check_bool, check_choice, check_int
from edgegpt.config import PRESETS, GPTConfig
from edgegpt.errors import BundleError, ConfigError, EdgeGPTError
from edgegpt.files import aside, recover
from edgegpt.manifest import FORMATS, MANIFEST_NAME, bundle_format, model_files, read_manifest
from edgegpt.runtime.bench import make_prompts

__all__ = ["BACKENDS", "FORMATS", "BenchConfig", "BenchError", "BenchReport", "Subject", "run_bench"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "edgegpt", "genai")
PRESET_VOCAB = {"tiny": 512, "small": 4096, "gpt2": 50257}  # gpt2: GPT-2's 124 M shape needs its vocabulary
WORKER_TIMEOUT_S = 1800


class BenchError(EdgeGPTError):
    """The benchmark could not run (no backend left, a bundle that cannot be read)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how often.

    Attributes:
        formats: bundle formats to build or take, from fp32, fp16 (CUDA), int8, int4.
        backends: torch (PyTorch eager, the reference), edgegpt (the runtime), genai (onnxruntime-genai).
        runs: rounds; each figure is the median over them (use >= 5 for figures to report).
        prompt_tokens: prompt length; prompt_tokens + new_tokens must fit the model's block_size.
        new_tokens: tokens generated per run (greedy, end-of-text ignored).
        batch: batch sizes to time (1 is the per-token latency and the targets' figure).
        threads: intra-op threads of every backend.
        provider: "cpu" or "cuda".
        spinning: let idle onnxruntime threads busy-wait (edgegpt's `SessionConfig.spinning`), for edgegpt and
            genai alike; on by default, as in both runtimes (on a busy machine spinning threads slow both).
        huge_pages: edgegpt's `SessionConfig.huge_pages` (its default, on): weights moved to 2 MiB pages
            after loading; the load time column shows what it costs.
        seed: seeds the prompts (and a preset's random weights).

    >>> BenchConfig(runs=0)
    Traceback (most recent call last):
    ...
    edgegpt.errors.ConfigError: runs must be a positive integer, got 0
    """

    formats: tuple[str, ...] = ("fp32", "int8", "int4")
    backends: tuple[str, ...] = BACKENDS
    runs: int = 5
    prompt_tokens: int = 128
    new_tokens: int = 128
    batch: tuple[int, ...] = (1, 8)
    threads: int = 2
    provider: str = "cpu"
    spinning: bool = True
    huge_pages: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("runs", "prompt_tokens", "new_tokens", "threads"):
            check_int(name, getattr(self, name), low=1)
        if self.new_tokens < 2:
            raise ConfigError(f"new_tokens must be at least 2 (decode speed needs two tokens), got {self.new_tokens}")
        for name, allowed in (("formats", FORMATS), ("backends", BACKENDS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values or len(set(values)) != len(values):
                raise ConfigError(
                    f"{name} must be distinct values from {', '.join(allowed)}, got {','.join(values) or 'none'}"
                )
        if not self.batch:
            raise ConfigError(f"batch must be positive integers, got {self.batch!r}")
        for size in self.batch:
            check_int("batch", size, low=1)
        for name in ("spinning", "huge_pages"):
            check_bool(name, getattr(self, name))
        check_choice("provider", self.provider, ("cpu", "cuda"))

    @classmethod
    def short(cls) -> "BenchConfig":
        """A quick look (the demo's): 3 rounds, 32-token prompt, 32 new tokens, batch 1."""
        return cls(runs=3, prompt_tokens=32, new_tokens=32, batch=(1,))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Subject:
    """One measured thing: a backend on a checkpoint or bundle."""

    backend: str  # torch, edgegpt, genai
    format: str  # fp32, fp16, int8, int4 (torch: fp32 eager)
    path: Path

    @property
    def name(self) -> str:
        return "torch eager" if self.backend == "torch" else f"{self.backend} {self.format}"


@dataclass
class BenchReport:
    """Everything one run measured; `edgegpt.bench.report` renders it (Markdown, JSON, plot)."""

    config: BenchConfig
    model: dict[str, Any]
    source: dict[str, Any]
    environment: dict[str, Any]
    subjects: list[Subject]
    bundles: dict[str, dict[str, Any]]  # format -> path, size, decode weight bytes
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # subject name -> per-round results
    bandwidth: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    order: list[list[str]] = field(default_factory=list)  # the order of each round
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        from edgegpt.bench.report import summarize

        return summarize(self)

    def markdown(self) -> str:
        from edgegpt.bench.report import markdown

        return markdown(self)

    def to_json(self) -> dict[str, Any]:
        from edgegpt.bench.report import to_json

        return to_json(self)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def plot(self, path: str | Path) -> Path:
        from edgegpt.bench.report import plot

        return plot(self, Path(path))


def run_bench(
    config: BenchConfig,
    *,
    checkpoint: str | Path | None = None,
    bundles: tuple[str | Path, ...] = (),
    preset: str | None = None,
    vocab_size: int | None = None,
    work_dir: str | Path | None = None,
    attention: str | None = None,
) -> BenchReport:
    """Measure every backend on the same weights; give exactly one of checkpoint, bundles and preset.

    Args:
        config: what to measure (see `BenchConfig`).
        checkpoint: a checkpoint directory: exported and quantized into `work_dir`.
        bundles: existing bundle directories (their formats are read from the manifests); PyTorch runs on
            the checkpoint recorded in the fp32 manifest when it still exists.
        preset: tiny, small or gpt2: a seeded random-weight model (no training), exported and quantized.
        vocab_size: the preset's vocabulary (default 512 tiny, 4096 small, 50257 gpt2).
        work_dir: where checkpoint and bundles are built; kept, and reused by a later run when they are
            there already. Default: a temporary directory, removed at the end.
        attention: the exported graph's attention ("mha", "gqa": `export_bundle(attention=...)`); None
            exports with export_bundle's default.

    Returns:
        A `BenchReport`; `.markdown()` is the table, `.write_json(...)`, `.plot(...)` the files.

    Raises:
        ConfigError: no or several sources, a prompt + new tokens longer than the model's context.
        BenchError: a bundle without a manifest, or no backend could run.

    >>> report = run_bench(BenchConfig.short(), preset="tiny")  # doctest: +SKIP
    >>> print(report.markdown())  # doctest: +SKIP
    """
    if sum(x is not None and x != () for x in (checkpoint, tuple(bundles), preset)) != 1:
        raise ConfigError("give exactly one source: a CHECKPOINT, --bundle directories or --preset")
    if bundles and (attention or work_dir):
        raise ConfigError(
            "--attention and --work-dir shape the bundles that bench builds; they do not go with --bundle"
        )
    if vocab_size is not None and preset is None:
        raise ConfigError("--vocab-size sizes a --preset model; a checkpoint or bundle has its own vocabulary")
    started = time.perf_counter()
    temp = None
    if work_dir is None and not bundles:
        temp = tempfile.TemporaryDirectory(prefix="edgegpt-bench-")
        work_dir = temp.name
    try:
        from edgegpt.bench.report import environment

        env = environment()
        if bundles:
            ckpt, paths, source = _take_bundles(bundles)
        else:
            work = Path(work_dir)
            work.mkdir(parents=True, exist_ok=True)
            if preset is not None:
                checkpoint = _preset_checkpoint(preset, vocab_size, config.seed, work / "checkpoint")
            from edgegpt.train.checkpoint import resolve

            ckpt = resolve(checkpoint)  # a run directory -> its checkpoint/
            paths = _build_bundles(ckpt, work, config.formats, attention)
            source = {
                "checkpoint": str(ckpt),
                "preset": preset,
                "attention": attention,
                "work_dir": None if temp else str(work),
            }
        report = _measure(config, ckpt, paths, source, env)
        report.wall_s = time.perf_counter() - started
        return report
    finally:
        if temp is not None:
            temp.cleanup()


# ------------------------------------------------------------------ sources


def placeholder_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly `vocab_size` tokens (EOT, 256 bytes, then byte pairs) for random-weight models.

    >>> placeholder_tokenizer(300).get_vocab_size()
    300
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from edgegpt.tokenizer import EOT, MIN_VOCAB_SIZE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if not MIN_VOCAB_SIZE <= vocab_size <= MIN_VOCAB_SIZE + len(alphabet) ** 2:
        raise ConfigError(
            f"vocab_size must be in {MIN_VOCAB_SIZE}..{MIN_VOCAB_SIZE + len(alphabet) ** 2}, got {vocab_size}"
        )
    vocab = {EOT: 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    merges = []
    pairs = ((a, b) for a in alphabet for b in alphabet)
    while len(vocab) < vocab_size:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def _preset_checkpoint(preset: str, vocab_size: int | None, seed: int, out: Path) -> Path:
    """A seeded random-weight checkpoint of `preset` (reused when `out` already holds the same one)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = GPTConfig.preset(preset, vocab_size=vocab_size or PRESET_VOCAB.get(preset, 4096))
    marker = out / "bench_seed.json"
    wanted = {"preset": preset, "seed": seed, "config": config.to_dict()}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log.info("reusing the random-weight %s checkpoint in %s", preset, out)
        return out
    import torch

    from edgegpt.train.checkpoint import save_checkpoint
    from edgegpt.train.model import SimpleGPT

    log.info("building a random-weight %s model (vocab %d, seed %d)", preset, config.vocab_size, seed)
    torch.manual_seed(seed)
    model = SimpleGPT(config)
    save_checkpoint(out, model, placeholder_tokenizer(config.vocab_size).to_str())
    marker.write_text(json.dumps(wanted) + "\n")
    import shutil

    # Bundles of the previous weights, and any left aside by an interrupted replacement (edgegpt.files):
    # only directories with a manifest, so that nothing but bundles is deleted from a user's --work-dir.
    for stale in [*out.parent.glob("bundle-*"), *out.parent.glob(aside("bundle-*").name)]:
        if (stale / MANIFEST_NAME).is_file() and not stale.is_symlink():
            shutil.rmtree(stale)
    return out


def _build_bundles(checkpoint: Path, work: Path, formats: tuple[str, ...], attention: str | None) -> dict[str, Path]:
    """Export (fp32) and quantize `checkpoint` into `work`/bundle-FORMAT[-ATTENTION]; existing bundles are reused."""
    paths: dict[str, Path] = {}
    suffix = f"-{attention}" if attention else ""
    fp32 = work / f"bundle-fp32{suffix}"
    if not (recover(fp32) / MANIFEST_NAME).is_file():
        from edgegpt.export import export_bundle

        log.info("exporting %s -> %s", checkpoint, fp32)
        # No parity checks here: the table's agreement column compares the tokens with PyTorch's.
        export_bundle(checkpoint, fp32, force=True, validate=False, **({"attention": attention} if attention else {}))
    else:
        log.info("reusing %s (delete it to export again, e.g. after upgrading edgegpt)", fp32)
    if "fp32" in formats:
        paths["fp32"] = fp32
    for fmt in (f for f in formats if f != "fp32"):
        out = work / f"bundle-{fmt}{suffix}"
        if not (recover(out) / MANIFEST_NAME).is_file():
            from edgegpt.export.quantize import quantize_bundle

            log.info("quantizing %s -> %s (%s)", fp32, out, fmt)
            quantize_bundle(fp32, out, to=fmt, force=True)
        else:
            log.info("reusing %s", out)
        paths[fmt] = out
    return paths


def _take_bundles(bundles) -> tuple[Path | None, dict[str, Path], dict[str, Any]]:
    """Existing bundles by format, and the checkpoint that PyTorch can run (from the manifest's source)."""
    paths: dict[str, Path] = {}
    ckpt = None
    for bundle in map(Path, bundles):
        try:
            manifest = read_manifest(bundle)  # also restores one that an interrupted --force left aside
            fmt = bundle_format(manifest)
        except BundleError as exc:
            raise BenchError(str(exc)) from exc
        if fmt in paths:
            raise ConfigError(f"two {fmt} bundles given ({paths[fmt]}, {bundle}); give one per format")
        paths[fmt] = bundle
        recorded = (manifest.get("source") or {}).get("checkpoint")
        if recorded and Path(recorded).is_dir() and ckpt is None:
            ckpt = Path(recorded)
    return ckpt, paths, {"bundles": {f: str(p) for f, p in paths.items()}, "checkpoint": str(ckpt) if ckpt else None}


# ------------------------------------------------------------------ measurement


def decode_weight_bytes(model_path: Path) -> dict[str, int]:
    """Bytes of the initializers a decode step reads: all but those only gathered from (embedding tables).

    Returns {"read": bytes read per token, "gathered": bytes only indexed, "total": all initializers}.
    """
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    read = gathered = 0
    for init in model.graph.initializer:
        size = (
            int(np.prod(init.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        )
        ops = consumers.get(init.name, set())
        if ops and all(op.startswith("Gather") for op in ops):
            gathered += size
        else:
            read += size
    return {"read": read, "gathered": gathered, "total": read + gathered}


def _bundle_info(path: Path) -> dict[str, Any]:
    manifest = read_manifest(path)
    model = model_files(manifest)
    sizes = {
        name: (path / name).stat().st_size
        for name in [*manifest.get("files", {}), MANIFEST_NAME]
        if (path / name).is_file()
    }
    info = {
        "path": str(path),
        "size_bytes": sum(sizes.values()),
        "model_bytes": sum(sizes.get(f, 0) for f in model),
        "quantization": manifest.get("quantization"),
        "model": manifest.get("model"),
    }
    try:
        info["weights"] = decode_weight_bytes(path / model[0])
    except ImportError as exc:
        info["weights"] = None
        info["weights_error"] = f"{exc}: install onnx to compute the decode bound"
    return info


def _subjects(config: BenchConfig, ckpt: Path | None, paths: dict[str, Path], notes: list[str]) -> list[Subject]:
    subjects = []
    if "torch" in config.backends:
        if ckpt is None:
            notes.append("torch: skipped, no checkpoint (the bundles' manifests name none that exists)")
        else:
            subjects.append(Subject("torch", "fp32", ckpt))
    genai = "genai" in config.backends and _genai_available(notes)
    for fmt in (f for f in FORMATS if f in paths):
        if "edgegpt" in config.backends:
            subjects.append(Subject("edgegpt", fmt, paths[fmt]))
        if genai:
            subjects.append(Subject("genai", fmt, paths[fmt]))
    for fmt in config.formats:
        if fmt not in paths:
            notes.append(f"{fmt}: no bundle (quantization unavailable or not given)")
    if not subjects:
        raise BenchError(
            "nothing to measure: no backend has weights to run; check --backends, --formats and the source"
        )
    return subjects


def _genai_available(notes: list[str]) -> bool:
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        notes.append('genai: skipped, onnxruntime-genai is not installed (pip install "edgegpt[genai]")')
        return False
    return True


def _measure(config: BenchConfig, ckpt: Path | None, paths: dict[str, Path], source: dict, env: dict) -> BenchReport:
    """Check the lengths, build the report and the prompts, then run the interleaved rounds."""
    notes: list[str] = []
    bundles = {fmt: _bundle_info(p) for fmt, p in paths.items()}
    model_cfg = _model_config(ckpt, bundles)
    if config.prompt_tokens + config.new_tokens > model_cfg.block_size:
        raise ConfigError(
            f"prompt_tokens {config.prompt_tokens} + new_tokens {config.new_tokens} exceed the model's block_size "
            f"{model_cfg.block_size}; lower them (e.g. --prompt-tokens {model_cfg.block_size // 2} "
            f"--new-tokens {model_cfg.block_size // 2})"
        )
    if ckpt is not None:
        size = sum(p.stat().st_size for p in ckpt.iterdir() if p.suffix in (".safetensors", ".json"))
        bundles["torch"] = {"path": str(ckpt), "size_bytes": size}
    subjects = _subjects(config, ckpt, paths, notes)
    eot = _eot_id(ckpt, paths)
    prompts = make_prompts(model_cfg.vocab_size, eot, max(config.batch), config.prompt_tokens, config.seed)
    report = BenchReport(
        config=config,
        model={**model_cfg.to_dict(), "eot_token_id": eot},
        source=source,
        environment=env,
        subjects=subjects,
        bundles=bundles,
        notes=notes,
    )
    spec = {
        "threads": config.threads,
        "provider": config.provider,
        "spinning": config.spinning,
        "huge_pages": config.huge_pages,
        "prompts": prompts,
        "new_tokens": config.new_tokens,
        "batches": sorted(config.batch),
        "text": _prompt_text(next(iter(paths.values()), ckpt), prompts[0]),
    }
    items: list[Subject | None] = [*subjects]
    if config.provider == "cpu":
        items.append(None)  # None: the (host) memory bandwidth probe
    else:
        notes.append("no bandwidth bound: the probe measures host memory, the decode runs on the GPU")
    failed: set[str] = set()
    for r in range(config.runs):
        order = items[r % len(items) :] + items[: r % len(items)]  # rotated: noise hits every backend alike
        report.order.append([s.name if s else "bandwidth" for s in order])
        for subject in order:
            if subject is None:
                _probe(report, r)
            elif subject.name not in failed and not _run_subject(report, subject, spec, r):
                failed.add(subject.name)
    if not report.runs:
        raise BenchError("every backend failed: " + "; ".join(notes))
    return report


def _probe(report: BenchReport, r: int) -> None:
    result = _spawn({"kind": "bandwidth", "threads": report.config.threads})
    if not result.get("ok"):
        report.notes.append(f"bandwidth probe failed in round {r + 1}: {result.get('error')}")
        return
    report.bandwidth.append(result)
    log.info("round %d/%d: bandwidth %.1f GB/s", r + 1, report.config.runs, result["gbs"])


def _run_subject(report: BenchReport, subject: Subject, spec: dict, r: int) -> bool:
    """One measurement of `subject` in round `r` (and `edgegpt generate`'s memory for edgegpt); False if it failed."""
    config = report.config
    result = _spawn({**spec, "kind": subject.backend, "path": str(subject.path)})
    if not result.get("ok"):
        report.notes.append(f"{subject.name}: failed in round {r + 1}, skipped from then on: {result.get('error')}")
        log.warning("%s failed: %s", subject.name, result.get("error"))
        return False
    result["round"] = r
    if subject.backend == "edgegpt" and min(config.batch) == 1:  # `edgegpt generate` itself, for its memory
        result["cli"] = _spawn({**spec, "kind": "cli", "path": str(subject.path)})
        if not result["cli"].get("ok"):
            report.notes.append(
                f"{subject.name}: `edgegpt generate` failed in round {r + 1}: {result['cli'].get('error')}"
            )
    report.runs.setdefault(subject.name, []).append(result)
    first = result["batches"][str(min(config.batch))]
    log.info(
        "round %d/%d: %-13s decode %8.1f tok/s, first token %7.1f ms, peak RSS %6.0f MB",
        r + 1,
        config.runs,
        subject.name,
        first["decode_tok_s"],
        first["ttft_s"] * 1e3,
        result["peak_rss_mb"],
    )
    return True


def _model_config(ckpt: Path | None, bundles: dict[str, dict]) -> GPTConfig:
    for info in bundles.values():
        if info.get("model"):
            return GPTConfig.from_dict(info["model"])
    if ckpt is not None:
        return GPTConfig.from_json(ckpt / "config.json")
    raise BenchError("no model config: neither a bundle manifest nor a checkpoint config.json was found")


def _eot_id(ckpt: Path | None, paths: dict[str, Path]) -> int:
    from edgegpt.tokenizer import eot_id, load_tokenizer

    for path in paths.values():
        meta = read_manifest(path).get("tokenizer") or {}
        if isinstance(meta.get("eot_token_id"), int):
            return meta["eot_token_id"]
    return eot_id(load_tokenizer(ckpt))


def _prompt_text(path: Path, ids: list[int]) -> str:
    """Text that encodes back to at most len(ids) tokens (for `edgegpt generate`, which takes text)."""
    from edgegpt.tokenizer import decode, encode, load_tokenizer

    tok = load_tokenizer(path)
    text = decode(tok, ids)
    for _ in range(5):
        again = encode(tok, text)
        if len(again) <= len(ids):
            break
        text = decode(tok, again[: len(ids)])
    return text


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its result, or {"ok": False, "error": ...}."""
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edgegpt.bench.worker"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            env=env,
            timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])
