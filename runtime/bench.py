"""`bench_bundle`: the prefill and decode speed of one bundle on this device, with the runtime alone.

What llama-bench is to llama.cpp: `edgegpt bench BUNDLE` in the base install (no torch, no onnx). The
comparison with PyTorch and onnxruntime-genai on the same weights is `edgegpt.bench` (training extra);
its edgegpt rows are timed by `time_generation` below, so both report the same figures.

Method:
- Prompts are seeded random token ids (never end-of-text) of exactly `prompt_tokens` ids; batch b takes b
  different prompts of that length (no padding).
- A timed generation is the loop `Generator.generate` runs, over the public engine: one `DecodeState`
  sized to the prompt plus the new tokens, greedy `Sampler` per row, the incremental detokeniser per row,
  end-of-text ignored, so that exactly `new_tokens` tokens come out.
- Time to first token = prefill + picking the first token; prefill tokens/s = batch x prompt_tokens / that.
  Decode tokens/s = batch x (new_tokens - 1) / (last token - first token); per-token latency p50 / p95 over
  the decode steps. A short warm-up precedes each batch size; each figure is the median over `runs`.
- Peak resident memory is the process's high-water mark (Linux VmHWM), after loading and timing.

With `lookup` or `draft` set, the bench times speculative decoding against plain decoding on real text
instead (`bench_speculative.py`, its own method and table).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgegpt.checks import check_bool, check_choice, check_int, check_real
from edgegpt.errors import ConfigError
from edgegpt.manifest import bundle_format

__all__ = ["DeviceBenchConfig", "bench_bundle", "figures", "make_prompts", "markdown", "peak_rss_mb", "time_generation"]


@dataclass(frozen=True)
class DeviceBenchConfig:
    """What `bench_bundle` measures.

    Attributes:
        prompt_tokens: prompt length; prompt_tokens + new_tokens must fit the model's block_size
            (None: 128, or half the context when that is smaller).
        new_tokens: tokens generated per run, at least 2 (None: as prompt_tokens' default).
        batch: batch sizes to time.
        runs: repetitions; each figure is the median.
        threads: onnxruntime intra-op threads (None: one per physical core, the runtime's default).
        provider: "cpu", "cuda" or "auto".
        spinning, huge_pages: see `SessionConfig`.
        seed: seeds the prompts.
        lookup: time prompt-lookup speculative decoding against plain decoding (`bench_speculative`).
        draft: or (also) a draft bundle's path, for draft-model speculative decoding.
        text: the text sources of the speculative bench: files or directories (one table row per source and mode).
        prompts: prompts taken from each text source.
        draft_tokens, lookup_ngram: as `Speculative`'s.
        temperature: 0 decodes greedily; above 0 the speculative bench samples (prompt i seeded seed + i),
            where drafts are rarely kept, to show what failing drafts cost.
    """

    prompt_tokens: int | None = None
    new_tokens: int | None = None
    batch: tuple[int, ...] = (1,)
    runs: int = 5
    threads: int | None = None
    provider: str = "cpu"
    spinning: bool = True
    huge_pages: bool = True
    seed: int = 0
    lookup: bool = False
    draft: str | None = None
    text: tuple[str, ...] = ()
    prompts: int = 4
    draft_tokens: int = 4
    lookup_ngram: int = 3
    temperature: float = 0.0

    def __post_init__(self):
        for name in ("prompt_tokens", "new_tokens"):
            check_int(name, getattr(self, name), low=1, optional=True)
        check_int("runs", self.runs, low=1)
        if self.new_tokens is not None and self.new_tokens < 2:
            raise ConfigError(f"new_tokens must be at least 2 (decode speed needs two tokens), got {self.new_tokens}")
        if not self.batch:
            raise ConfigError(f"batch must be positive integers, got {self.batch!r}")
        for size in self.batch:
            check_int("batch", size, low=1)
        check_int("threads", self.threads, low=1, optional=True)
        check_choice("provider", self.provider, ("auto", "cpu", "cuda"))
        for name in ("spinning", "huge_pages", "lookup"):
            check_bool(name, getattr(self, name))
        self._check_speculative()

    def _check_speculative(self) -> None:
        """The speculative fields: paths as strings, and text exactly when drafts are timed, at batch 1."""
        if self.draft is not None:
            if not isinstance(self.draft, (str, os.PathLike)):
                raise ConfigError(f"draft must be a bundle's path, got {self.draft!r}")
            object.__setattr__(self, "draft", os.fspath(self.draft))  # frozen: normalised once, here
        if isinstance(self.text, (str, os.PathLike)) or not all(isinstance(t, (str, os.PathLike)) for t in self.text):
            raise ConfigError(f"text must be a tuple of file or directory paths, got {self.text!r}")
        object.__setattr__(self, "text", tuple(os.fspath(t) for t in self.text))
        check_int("prompts", self.prompts, low=1)
        check_int("draft_tokens", self.draft_tokens, low=1, high=64)
        check_int("lookup_ngram", self.lookup_ngram, low=1, high=16)
        check_real("temperature", self.temperature, low=0.0)
        if self.temperature and not self.speculative:
            raise ConfigError("--temperature goes with --lookup or --draft; the plain bench decodes greedily")
        if self.speculative and not self.text:
            raise ConfigError("--lookup and --draft time decoding of real text: give --text FILE_OR_DIR (repeatable)")
        if self.text and not self.speculative:
            raise ConfigError("--text goes with --lookup or --draft (it names the text the drafts are timed on)")
        if self.speculative and tuple(self.batch) != (1,):
            raise ConfigError(
                f"speculative decoding runs one prompt at a time: drop --batch {','.join(map(str, self.batch))}"
            )

    @property
    def speculative(self) -> bool:
        """Whether this times speculative decoding (lookup or a draft) rather than plain prefill and decode."""
        return self.lookup or self.draft is not None

    @classmethod
    def short(cls, **overrides: Any) -> "DeviceBenchConfig":
        """A quick look: 3 runs of a 32-token prompt and 32 new tokens."""
        return cls(**{"runs": 3, "prompt_tokens": 32, "new_tokens": 32, **overrides})


def make_prompts(vocab_size: int, eot_id: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` seeded random prompts of `length` token ids, none of them `eot_id`.

    >>> p = make_prompts(10, 0, 2, 5, seed=0); len(p), len(p[0]), any(0 in row for row in p)
    (2, 5, False)
    """
    ids = np.random.default_rng(seed).integers(0, vocab_size - 1, size=(count, length))
    ids[ids >= eot_id] += 1  # skip the end-of-text id
    return ids.tolist()


def time_generation(gen, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]], float]:
    """Greedy generation of exactly `new_tokens` per prompt, as `Generator.generate` runs it, timed per step.

    Returns:
        (timestamps: the start, then one after each token is picked; the tokens per row; seconds spent
        inside onnxruntime).
    """
    from edgegpt.runtime.generation.sampling import SamplingConfig

    config = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    stamps = [time.perf_counter()]
    state = gen.new_state(batch=len(prompts), capacity=max(map(len, prompts)) + new_tokens)
    samplers = [gen.new_sampler(config, p) for p in prompts]  # never the padded ids of a padded vocabulary
    decoders = [gen.new_decoder() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    step = np.empty((len(prompts), 1), dtype=np.int64)
    logits = state.feed(prompts)
    for n in range(new_tokens):
        for b, row in enumerate(logits):
            token = samplers[b](row)
            decoders[b].step(token)
            tokens[b].append(token)
            step[b, 0] = token
        stamps.append(time.perf_counter())
        if n + 1 < new_tokens:
            logits = state.feed(step)
    return stamps, tokens, state.session_s


def figures(stamps: list[float], prompt_tokens: int, batch: int) -> dict[str, float]:
    """The figures of one timed generation from its timestamps (start, then one per token)."""
    ttft = stamps[1] - stamps[0]
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # decode steps: token k -> token k + 1
    decode_s = stamps[-1] - stamps[1]
    return {
        "ttft_s": ttft,
        "prefill_tok_s": batch * prompt_tokens / ttft,
        "decode_tok_s": batch * len(steps) / decode_s if decode_s > 0 else 0.0,
        "decode_s": decode_s,
        "step_p50_ms": float(np.percentile(steps, 50)) * 1e3 if steps else 0.0,
        "step_p95_ms": float(np.percentile(steps, 95)) * 1e3 if steps else 0.0,
        "new_tokens": len(steps) + 1,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (1e6 bytes).

    Linux: VmHWM, the high-water mark of this program's own address space. Not ru_maxrss: Linux carries
    it across fork and exec, so a child of a large parent (one that imported torch) would report the
    parent's size. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def bench_bundle(bundle: str | Path, config: DeviceBenchConfig = DeviceBenchConfig()) -> dict[str, Any]:
    """Load `bundle` and time prefill and decode per batch size; the result is JSON-serialisable.

    Raises:
        ConfigError: prompt_tokens + new_tokens exceed the model's context (the message says what fits).
        BundleError, ProviderError: as `Generator.load`.

    With `config.lookup` or `config.draft`, the result is `bench_speculative.bench_speculative`'s.

    >>> result = bench_bundle("bundles/tiny", DeviceBenchConfig.short())  # doctest: +SKIP
    >>> print(markdown(result))  # doctest: +SKIP
    """
    if config.speculative:
        from edgegpt.runtime.bench_speculative import bench_speculative

        return bench_speculative(bundle, config)
    import onnxruntime as ort

    from edgegpt.runtime.generation.generator import Generator

    started = time.perf_counter()
    gen = Generator.load(
        bundle, provider=config.provider, threads=config.threads, spinning=config.spinning, huge_pages=config.huge_pages
    )
    load_s = time.perf_counter() - started
    block = gen.config.block_size
    prompt_tokens = config.prompt_tokens or min(128, block // 2)
    new_tokens = config.new_tokens or min(128, block // 2)
    if prompt_tokens + new_tokens > block:
        half = block // 2
        raise ConfigError(
            f"prompt_tokens {prompt_tokens} + new_tokens {new_tokens} exceed the model's context of "
            f"{block} tokens; lower them (e.g. --prompt-tokens {half} --new-tokens {half})"
        )
    config = dataclasses.replace(config, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    prompts = make_prompts(gen.config.vocab_size, gen.eot_id, max(config.batch), config.prompt_tokens, config.seed)
    rows = []
    for batch in sorted(config.batch):
        chosen = prompts[:batch]
        time_generation(gen, [p[:16] for p in chosen], min(4, config.new_tokens))  # warm-up: allocations, lazy init
        runs = []
        for _ in range(config.runs):
            stamps, _, session_s = time_generation(gen, chosen, config.new_tokens)
            runs.append(
                {
                    **figures(stamps, config.prompt_tokens, batch),
                    "python_share": 1 - session_s / (stamps[-1] - stamps[0]),
                }
            )
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        rows.append({"batch": batch, **medians, "runs": runs})
    return {
        "bundle": str(bundle),
        "format": bundle_format(gen.bundle.manifest),
        "model": gen.config.to_dict(),
        "config": asdict(config),
        "providers": gen.providers,
        "threads": gen.session_config.threads,
        "onnxruntime": ort.__version__,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table, one row per batch size, and a line naming what was measured."""
    if "sources" in result:  # a speculative bench's
        from edgegpt.runtime.bench_speculative import speculative_markdown

        return speculative_markdown(result)
    c, m = result["config"], result["model"]
    lines = [
        f"{result['bundle']} ({result['format']}; {m['n_layer']} layers, {m['n_embd']} wide, vocab {m['vocab_size']}) on "
        f"{result['providers'][0]}, onnxruntime {result['onnxruntime']}, threads {c['threads'] or 'one per core'}: "
        f"prompt {c['prompt_tokens']} tokens, {c['new_tokens']} new, medians of {c['runs']} runs",
        "",
        "| batch | prefill tok/s | decode tok/s | first token ms | step p50 ms | step p95 ms | Python share |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['batch']} | {row['prefill_tok_s']:,.0f} | {row['decode_tok_s']:,.1f} | {row['ttft_s'] * 1e3:.1f} | "
            f"{row['step_p50_ms']:.2f} | {row['step_p95_ms']:.2f} | {row['python_share']:.0%} |"
        )
    lines += ["", f"load {result['load_s']:.2f} s, peak resident memory {result['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines) + "\n"
