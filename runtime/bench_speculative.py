"""`bench_speculative`: plain decoding against speculative decoding (prompt lookup, a draft bundle) on real text.

What `edgegpt bench BUNDLE --lookup [--draft DRAFT] --text FILE_OR_DIR` runs (`bench.bench_bundle` hands a
`DeviceBenchConfig` with `lookup` or `draft` set here). Drafts only pay off on text a model can predict, so
unlike the plain bench the prompts are real text, and each `--text` source is reported on its own.

Method:
- A source is a file or a directory (its UTF-8 files, sorted; others are skipped). Each file offers windows
  of `prompt_tokens` tokens starting at evenly spaced line starts, the first at its first line; `prompts`
  of them, evenly spaced over the source, are the prompts. A directory of files whose first windows suffice
  is continued from each file's first lines (code continuation); one long file, from several places in it.
- Each prompt is decoded for exactly `new_tokens` tokens (end-of-text ignored), greedily unless
  `temperature` is above 0 (sampling, prompt i seeded `seed + i`: drafts are then mostly rejected), by every mode:
  plain, lookup, draft, in interleaved rounds (every mode runs prompt by prompt within a round, so slow
  spells of a shared machine fall on all of them). A round's decode tokens/s for a mode is its tokens
  after the first over its decode seconds, summed over the prompts; figures are medians over the rounds.
- Per mode: acceptance rate (accepted / drafted drafts), tokens per decode call of the target (tokens after
  the first / calls after the prefill; 1 for plain), and whether every prompt's tokens equal plain decoding's
  (greedy only: sampling keeps the distribution, not the draws, which `tests/runtime/test_speculative.py` checks).
- The cost of a chunk: feeding 1, 2, ... draft_tokens + 1 tokens after a prompt-sized prefix, timed in
  interleaved repetitions (medians), relative to one token. A round of k drafts that keeps a of them emits
  a + 1 tokens for one (k + 1)-chunk, so speculation gains when (a + 1) / chunk cost > 1.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any

from edgegpt.errors import ConfigError
from edgegpt.manifest import bundle_format

__all__ = ["bench_speculative", "chunk_costs", "speculative_markdown", "text_prompts"]

MODES = ("plain", "lookup", "draft")
CHUNK_REPEATS = 40  # timed feeds per chunk size (interleaved); each is a few milliseconds on a small model


def _source_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file())
    raise ConfigError(f"--text {source}: no such file or directory; give a text file or a directory of them")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):  # a binary or unreadable file inside a directory is not text to continue
        return None


def _line_starts(text: str, count: int) -> list[int]:
    """`count` offsets evenly spaced over `text`, each moved on to the start of a line (the first is 0)."""
    starts = []
    for j in range(count):
        offset = j * len(text) // count
        if offset:
            newline = text.find("\n", offset)
            offset = newline + 1 if newline >= 0 else len(text)
        if offset < len(text) and offset not in starts:
            starts.append(offset)
    return starts


def text_prompts(encode, source: str | Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids from a text file or directory (see the module's Method).

    Args:
        encode: text -> token ids (`Generator.encode`).
        source: a UTF-8 file, or a directory whose UTF-8 files (sorted) are read.
        count: prompts wanted; length: tokens per prompt.

    Raises:
        ConfigError: no such path, or too little text for `count` windows of `length` tokens.
    """
    source = Path(source)
    files = _source_files(source)
    texts = [t for t in map(_read_text, files) if t]
    per_file = max(1, math.ceil(count / max(len(texts), 1)))
    windows = []
    for text in texts:
        for start in _line_starts(text, per_file):
            ids = encode(text[start : start + 16 * length])  # 16 characters per token is more than any BPE needs here
            if len(ids) >= length:
                windows.append(ids[:length])
    if len(windows) < count:
        raise ConfigError(
            f"--text {source}: {len(windows)} window(s) of {length} tokens in {len(texts)} text file(s), {count} wanted; "
            f"lower --prompts or --prompt-tokens, or give more text"
        )
    return [windows[i * len(windows) // count] for i in range(count)]


def chunk_costs(gen, prompt: list[int], sizes: list[int], repeats: int = CHUNK_REPEATS) -> dict[int, float]:
    """Median seconds of one `DecodeState.feed` of n tokens after `prompt` (n in `sizes`), interleaved repeats.

    The fed tokens are the prompt's own, repeated as needed; prompt + max(sizes) must fit the model's context.
    """
    state = gen.new_state(capacity=len(prompt) + max(sizes))
    state.feed(prompt)
    base, chunk = state.length, [prompt[i % len(prompt)] for i in range(max(sizes))]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats + 1):  # the first round warms up each shape
        for n in sizes:
            state.rewind(base)
            start = time.perf_counter()
            state.feed(chunk[:n])
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t[1:]) for n, t in times.items()}


def _decode(gen, prompt: list[int], new_tokens: int, speculative, temperature: float, seed: int) -> dict[str, Any]:
    result = gen.generate_ids(
        prompt, max_new_tokens=new_tokens, ignore_eos=True, temperature=temperature, seed=seed, speculative=speculative
    )
    t = result.timings
    return {
        "tokens": result.tokens,
        "decode_s": t.decode_s,
        "calls": t.steps - 1,
        "draft_calls": t.draft_steps,
        "drafted": result.drafted_tokens,
        "accepted": result.accepted_tokens,
    }


def _diverges_at(tokens: list[int], reference: list[int]) -> int | None:
    """The first position where `tokens` differs from `reference`; None where they are equal."""
    if tokens == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def _mode_figures(rounds: list[list[dict[str, Any]]], plain_tokens: list[list[int]]) -> dict[str, Any]:
    """One mode's figures from its rounds (each a list of per-prompt decodes)."""
    speeds = [sum(len(d["tokens"]) - 1 for d in r) / sum(d["decode_s"] for d in r) for r in rounds]
    last = rounds[-1]
    drafted, accepted = sum(d["drafted"] for d in last), sum(d["accepted"] for d in last)
    diverged = [_diverges_at(d["tokens"], ref) for d, ref in zip(last, plain_tokens)]
    return {
        "decode_tok_s": statistics.median(speeds),
        "round_tok_s": speeds,
        "acceptance_rate": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "tokens_per_call": sum(len(d["tokens"]) - 1 for d in last) / max(sum(d["calls"] for d in last), 1),
        "draft_calls": sum(d["draft_calls"] for d in last),
        "identical": diverged.count(None),
        "diverges_at": diverged,  # per prompt: the first token that differs from plain decoding's, or None
    }


def bench_speculative(bundle: str | Path, config) -> dict[str, Any]:
    """Time plain, lookup and draft-model decoding of `bundle` on each text source of `config` (a
    `DeviceBenchConfig` with `lookup` or `draft` and `text`); the result is JSON-serialisable.

    Raises:
        ConfigError: prompt_tokens + new_tokens exceed the model's context, or a source has too little text.
        SamplingError: the draft bundle's tokenizer or vocabulary differs from the target's.
        BundleError, ProviderError: as `Generator.load`.
    """
    import onnxruntime as ort

    from edgegpt.runtime.bench import peak_rss_mb
    from edgegpt.runtime.generation.generator import Generator
    from edgegpt.runtime.generation.speculative import Speculative

    session = dict(
        provider=config.provider, threads=config.threads, spinning=config.spinning, huge_pages=config.huge_pages
    )
    started = time.perf_counter()
    gen = Generator.load(bundle, **session)
    load_s = time.perf_counter() - started
    block = gen.config.block_size
    prompt_tokens = config.prompt_tokens or min(128, block // 2)
    new_tokens = config.new_tokens or min(128, block // 2)
    if prompt_tokens + new_tokens > block:
        raise ConfigError(
            f"prompt_tokens {prompt_tokens} + new_tokens {new_tokens} exceed the model's context of {block} tokens; "
            f"lower them (e.g. --prompt-tokens {block // 2} --new-tokens {block // 2})"
        )
    speculatives = {"plain": None}
    if config.lookup:
        speculatives["lookup"] = Speculative(
            lookup=True, draft_tokens=config.draft_tokens, lookup_ngram=config.lookup_ngram
        )
    draft = None
    if config.draft is not None:
        draft = Generator.load(config.draft, **session)
        speculatives["draft"] = Speculative(draft=draft, draft_tokens=config.draft_tokens)
    sources, first_prompt = [], None
    for source in config.text:
        prompts = text_prompts(gen.encode, source, config.prompts, prompt_tokens)
        first_prompt = first_prompt or prompts[0]
        for speculative in speculatives.values():  # warm-up, and an early refusal of a draft that does not fit
            gen.generate_ids(prompts[0][:16], max_new_tokens=4, ignore_eos=True, speculative=speculative)
        rounds: dict[str, list[list[dict[str, Any]]]] = {mode: [] for mode in speculatives}
        for _ in range(config.runs):
            decodes: dict[str, list[dict[str, Any]]] = {mode: [] for mode in speculatives}
            for i, prompt in enumerate(prompts):
                for mode, speculative in speculatives.items():
                    decodes[mode].append(
                        _decode(gen, prompt, new_tokens, speculative, config.temperature, config.seed + i)
                    )
            for mode in speculatives:
                rounds[mode].append(decodes[mode])
        plain_tokens = [d["tokens"] for d in rounds["plain"][-1]]
        modes = {mode: _mode_figures(rounds[mode], plain_tokens) for mode in speculatives}
        sources.append({"text": str(source), "prompts": len(prompts), "modes": modes})
    sizes = list(range(1, min(config.draft_tokens + 1, block - 1) + 1))  # a round's calls: 1 to k + 1 tokens
    costs = chunk_costs(gen, first_prompt[: block - sizes[-1]], sizes)
    config = dataclasses.replace(config, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    return {
        "bundle": str(bundle),
        "format": bundle_format(gen.bundle.manifest),
        "model": gen.config.to_dict(),
        "draft": None
        if draft is None
        else {
            "bundle": str(config.draft),
            "format": bundle_format(draft.bundle.manifest),
            "model": draft.config.to_dict(),
        },
        "config": dataclasses.asdict(config),
        "providers": gen.providers,
        "threads": gen.session_config.threads,
        "onnxruntime": ort.__version__,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "sources": sources,
        "chunk_ms": {str(n): s * 1e3 for n, s in costs.items()},
    }


def speculative_markdown(result: dict[str, Any]) -> str:
    """The result as one Markdown table (a row per source, by its name, and mode) and a line of chunk costs."""
    c, m = result["config"], result["model"]
    draft = result["draft"]
    drafted_by = (
        f"; draft {draft['bundle']} ({draft['format']}, {draft['model']['n_layer']} x {draft['model']['n_embd']})"
        if draft
        else ""
    )
    sources = ", ".join(s["text"] for s in result["sources"])
    decoding = f"temperature {c['temperature']:g}" if c["temperature"] else "greedy"
    lines = [
        f"{result['bundle']} ({result['format']}; {m['n_layer']} layers, {m['n_embd']} wide, vocab {m['vocab_size']}) on "
        f"{result['providers'][0]}, onnxruntime {result['onnxruntime']}, threads {c['threads'] or 'one per core'}: "
        f"{c['prompts']} prompts of {c['prompt_tokens']} tokens per source, {c['new_tokens']} new tokens "
        f"({decoding}), up to {c['draft_tokens']} drafts per call{drafted_by}; medians of {c['runs']} interleaved rounds; text: {sources}",
        "",
        "| text | mode | decode tok/s | vs plain | acceptance | tokens per call | same tokens as plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for source in result["sources"]:
        plain = source["modes"]["plain"]["decode_tok_s"]
        for mode, f in source["modes"].items():
            rate = "" if f["acceptance_rate"] is None else f"{f['acceptance_rate']:.0%}"
            same = "" if mode == "plain" or c["temperature"] else f"{f['identical']}/{source['prompts']}"
            lines.append(
                f"| {Path(source['text']).name} | {mode} | {f['decode_tok_s']:,.1f} | {f['decode_tok_s'] / plain:.2f}x | "
                f"{rate} | {f['tokens_per_call']:.2f} | {same} |"
            )
    one = result["chunk_ms"]["1"]
    costs = ", ".join(f"{n} tokens {ms / one:.2f}x" for n, ms in result["chunk_ms"].items() if n != "1")
    lines += [
        "",
        f"one call: 1 token {one:.2f} ms; {costs}",
        f"load {result['load_s']:.2f} s, peak resident memory {result['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines) + "\n"
