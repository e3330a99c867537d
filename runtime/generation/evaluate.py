"""Measured quality of a bundle, through onnxruntime and without torch: `evaluate_bundle`.

- Perplexity over a text file with sliding windows (Hugging Face's "perplexity of fixed-length models"):
  windows of `block_size` tokens every `stride` tokens; each window scores only the tokens that no earlier
  window scored, so every token but the first is predicted once, with at least block_size - stride tokens
  of context (all it has in the first window).
- With a reference bundle (the fp32 one): its perplexity on the same windows, next-token top-1 agreement
  (teacher-forced: both models see the true text, their argmax is compared at every scored position) and
  greedy-sequence agreement (free-running greedy continuations of prompts cut from the text, through
  `edgegpt.runtime.Generator`: position-wise agreement, common prefix, identical sequences). Teacher-forced
  agreement is the stable measure; greedy agreement shows what a user sees, but one near-tie flips the rest.
- Sizes: the graph's bytes (model.onnx + external data) and the whole bundle's.
Both bundles run in the same loop, batch by batch, so a busy machine slows both alike. The decode speed
of the greedy runs is reported for information (32 tokens: noisy; use `edgegpt bench` for speed).
Imports only numpy, onnxruntime, tokenizers and torch-free edgegpt modules, so it runs on a device.
References: https://huggingface.co/docs/transformers/perplexity
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from edgegpt.errors import ConfigError, DataError
from edgegpt.manifest import MANIFEST_NAME, bundle_format, model_files, sha256_file

__all__ = ["all_logits", "evaluate_bundle", "sliding_windows", "summary_text"]

log = logging.getLogger(__name__)

BATCH = 8  # windows per session run


def evaluate_bundle(
    bundle: str | Path,
    text_file: str | Path,
    *,
    reference: str | Path | None = None,
    tail: float | None = None,
    max_tokens: int | None = None,
    stride: int | None = None,
    prompts: int = 8,
    new_tokens: int = 32,
    provider: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Perplexity of `bundle` on a text file; with `reference`, agreement with that bundle; file sizes.

    Args:
        bundle: the bundle to measure.
        text_file: UTF-8 text, ideally held out from training.
        reference: a bundle to compare with (the fp32 one): same windows, same prompts.
        tail: use only the last `tail` fraction of the file's characters (0 < tail <= 1), e.g. 0.1 for the
            validation split that `edgegpt train` holds out of a single file.
        max_tokens: score at most this many tokens (the first ones of the text).
        stride: tokens between window starts; default block_size // 2.
        prompts: greedy prompts, cut from the text at even spacing (with `reference`); 0 skips them.
        new_tokens: greedy tokens per prompt.
        provider, threads: onnxruntime execution provider ("cpu", "cuda", "auto") and threads.

    Returns:
        A JSON-ready dict: "perplexity", "top1_accuracy", "scored_tokens", "windows", "model_bytes",
        "bundle_bytes", "text"; with `reference` also "reference" (its perplexity, accuracy, sizes),
        "ppl_increase_percent", "top1_agreement", "greedy" and "decode_tokens_per_s".

    Raises:
        ConfigError: a bad argument; DataError: the text is too short for one window or unreadable;
        BundleError: a bundle fails verification.

    >>> evaluate_bundle("bundles/small-int8", "held_out.txt", reference="bundles/small")["top1_agreement"]  # doctest: +SKIP
    0.987
    """
    from edgegpt.runtime import Generator

    _check_args(tail, max_tokens, stride, prompts, new_tokens)
    gens = [Generator.load(bundle, provider=provider, threads=threads)]
    if reference is not None:
        gens.append(Generator.load(reference, provider=provider, threads=threads))
        _check_same_model(gens[0].bundle, gens[1].bundle)
    cfg = gens[0].config
    text, ids = _read_ids(Path(text_file), gens[0], tail)
    stride = stride or max(1, cfg.block_size // 2)
    if stride > cfg.block_size:
        raise ConfigError(f"stride {stride} exceeds the context of {cfg.block_size} tokens; windows would skip tokens")
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    windows = sliding_windows(len(ids), cfg.block_size, stride)
    stats = _score(gens, np.asarray(ids, np.int64), windows)
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "format": bundle_format(gens[0].bundle.manifest),
        "text": {"file": str(text_file), "sha256": sha256_file(text_file), "tail": tail, "characters": len(text),
                 "tokens": len(ids)},
        "windows": {"size": cfg.block_size, "stride": stride, "count": len(windows)},
        "scored_tokens": stats["scored"],
        "perplexity": math.exp(stats["nll"][0] / stats["scored"]),
        "top1_accuracy": stats["correct"][0] / stats["scored"],
        **_sizes(gens[0].bundle),
    }
    if reference is None:
        return result
    ref_ppl = math.exp(stats["nll"][1] / stats["scored"])
    result["reference"] = {"bundle": str(reference), "format": bundle_format(gens[1].bundle.manifest), "perplexity": ref_ppl,
                           "top1_accuracy": stats["correct"][1] / stats["scored"], **_sizes(gens[1].bundle)}
    result["ppl_increase_percent"] = 100.0 * (result["perplexity"] / ref_ppl - 1.0)
    result["top1_agreement"] = stats["agree"] / stats["scored"]
    greedy, speeds = _greedy(gens, ids, prompts, new_tokens)
    result["greedy"] = greedy
    result["decode_tokens_per_s"] = speeds[0]
    result["reference"]["decode_tokens_per_s"] = speeds[1]
    return result


def _check_args(tail, max_tokens, stride, prompts, new_tokens) -> None:
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0 < tail <= 1):
        raise ConfigError(f"tail is a fraction of the file in (0, 1], got {tail!r}")
    for name, value, low in (("max_tokens", max_tokens, 1), ("stride", stride, 1), ("prompts", prompts, 0),
                             ("new_tokens", new_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_same_model(bundle, reference) -> None:
    """Agreement is only meaningful between two graphs of one model: same config and tokenizer."""
    if bundle.config != reference.config or bundle.tokenizer.to_str() != reference.tokenizer.to_str():
        raise ConfigError(
            f"{reference.path} is not the same model as {bundle.path} (config or tokenizer differ); "
            "compare a quantized bundle with the fp32 bundle it was made from"
        )


def _read_ids(path: Path, gen, tail: float | None) -> tuple[str, list[int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the evaluation text ({exc}); pass a UTF-8 text file") from exc
    if tail is not None:
        text = text[len(text) - int(round(len(text) * tail)) :]
    ids = gen.encode(text)
    if len(ids) < 2:
        raise DataError(f"{path}: {len(ids)} token(s) of text{' in the tail' if tail else ''}; at least 2 are needed")
    return text, ids


def sliding_windows(n: int, size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first scored offset) per window over n tokens: inputs ids[start:start+length],
    targets ids[start+1:start+length+1], scored from `offset` on.

    >>> sliding_windows(10, 4, 2)
    [(0, 4, 0), (2, 4, 2), (4, 4, 2), (6, 3, 2)]
    """
    windows, done, start = [], 0, 0  # done: targets 1..done already scored
    while done < n - 1:
        length = min(size, n - 1 - start)
        windows.append((start, length, done - start))
        done = start + length
        start += stride
    return windows


def _score(gens, ids: np.ndarray, windows) -> dict[str, Any]:
    """Run every window through each generator's session; sum NLL, correct and agreeing predictions."""
    nll, correct, agree, scored = [0.0] * len(gens), [0] * len(gens), 0, 0
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1], []).append(w)  # batch windows of equal length
    for length, group in groups.items():
        for i in range(0, len(group), BATCH):
            batch = group[i : i + BATCH]
            x = np.stack([ids[s : s + length] for s, _, _ in batch])
            y = np.stack([ids[s + 1 : s + length + 1] for s, _, _ in batch])
            keep = np.arange(length)[None, :] >= np.asarray([off for _, _, off in batch])[:, None]  # (B, T)
            top = []
            for k, gen in enumerate(gens):
                logits = all_logits(gen, x)[keep].astype(np.float64)  # (n, V) at the scored positions
                m = logits.max(-1, keepdims=True)
                logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
                nll[k] += float((logz - logits[np.arange(len(logits)), y[keep]]).sum())
                top.append(logits.argmax(-1))
                correct[k] += int((top[-1] == y[keep]).sum())
            if len(top) > 1:
                agree += int((top[0] == top[1]).sum())
            scored += int(keep.sum())
    return {"nll": nll, "correct": correct, "agree": agree, "scored": scored}


def all_logits(gen, x: np.ndarray) -> np.ndarray:
    """(B, T) token ids, each row from an empty cache -> the logits of every position, (B, T, V)."""
    state = gen.new_state(batch=x.shape[0], capacity=x.shape[1])
    state.feed(x)
    return state.logits


def _greedy(gens, ids: list[int], prompts: int, new_tokens: int) -> tuple[dict | None, list]:
    """Greedy continuations of `prompts` prompts cut from the text, by both generators; their agreement."""
    cfg = gens[0].config
    prompt_len = min(32, cfg.block_size - new_tokens)
    if prompts == 0 or prompt_len < 1 or len(ids) < prompt_len:
        return None, [None, None]
    starts = np.linspace(0, len(ids) - prompt_len, num=prompts, dtype=int)
    same = prefix = identical = 0
    speeds: list[list[float]] = [[], []]
    for s in starts:
        prompt = ids[s : s + prompt_len]
        outs = []
        for k, gen in enumerate(gens):
            result = gen.generate_ids(prompt, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            outs.append(result.tokens)
            speeds[k].append(result.timings.tokens_per_s)
        a, b = outs
        same += sum(x == y for x, y in zip(a, b))
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += common
        identical += int(a == b)
    total = prompts * new_tokens
    greedy = {"prompts": prompts, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
              "token_agreement": same / total, "prefix_agreement": prefix / total, "identical_sequences": identical}
    return greedy, [statistics.median(v) for v in speeds]


def _sizes(bundle) -> dict[str, int]:
    files = bundle.manifest["files"]
    total = sum(meta["size"] for meta in files.values()) + (bundle.path / MANIFEST_NAME).stat().st_size
    return {"model_bytes": sum(files[name]["size"] for name in model_files(bundle.manifest)), "bundle_bytes": total}


def summary_text(r: dict) -> str:
    """A few human lines of an `evaluate_bundle` result (what `edgegpt eval` prints without --json)."""
    lines = [f"{r['bundle']} ({r['format']}): perplexity {r['perplexity']:.4f} over {r['scored_tokens']} tokens "
             f"({r['windows']['count']} windows of {r['windows']['size']}, stride {r['windows']['stride']}), "
             f"top-1 accuracy {r['top1_accuracy']:.4f}, model {r['model_bytes'] / 1e6:.2f} MB"]
    ref = r.get("reference")
    if ref:
        lines.append(f"reference {ref['bundle']} ({ref['format']}): perplexity {ref['perplexity']:.4f}, "
                     f"model {ref['model_bytes'] / 1e6:.2f} MB")
        lines.append(f"perplexity {r['ppl_increase_percent']:+.2f} %, top-1 agreement {r['top1_agreement']:.4f}")
        g = r.get("greedy")
        if g:
            lines.append(f"greedy ({g['prompts']} prompts x {g['new_tokens']} tokens): token agreement "
                         f"{g['token_agreement']:.3f}, common prefix {g['prefix_agreement']:.3f}, "
                         f"identical {g['identical_sequences']}/{g['prompts']}")
    return "\n".join(lines)
