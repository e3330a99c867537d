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
- With a reference, the "kld" section: llama.cpp's `llama-perplexity --kl-divergence` statistics, same
  definitions (tools/perplexity/perplexity.cpp, `kl_divergence` and `log_softmax(..., kl_divergence_result&)`),
  over the scored tokens t of its own windows, p = the reference's distribution, q = the bundle's:
  * KLD_t = sum_v p_t(v) (ln p_t(v) - ln q_t(v)), i.e. KL(reference || bundle), in nats; mean with its
    uncertainty (standard error: sqrt((mean(x^2) - mean(x)^2) / (n - 1))), median, 90/99/99.9th
    percentiles (linear interpolation between sorted values, llama.cpp's `percentile`) and maximum.
  * same top: the share of tokens where both argmaxes agree, +- sqrt(s (1 - s) / (n - 1)).
  * Δp_t = q_t(true next token) - p_t(true next token); RMS Δp = sqrt(mean(Δp^2)), +- 0.5 / RMS x the
    standard error of mean(Δp^2).
  * PPL(Q) and PPL(base) over those tokens, each +- PPL x the standard error of the mean NLL; ln(PPL(Q) /
    PPL(base)) +- sqrt(u_Q^2 + u_base^2 - 2 cov), cov = the covariance of the two mean NLLs (the tokens are
    shared); and PPL(Q) - PPL(base) +- sqrt(uPPL_Q^2 + uPPL_base^2 - 2 PPL(Q) PPL(base) cov).
  Differences from llama.cpp, both for exactness: log-softmax in float64 over the full logits (llama.cpp
  stores the base log-probs in 16 bits and drops terms with ln p <= -16), and no BOS token is put first
  (edgegpt's models have none). An uncertainty over 10 tokens or fewer is None (llama.cpp prints 0).
  Scoring ("half", the default, llama.cpp's): non-overlapping windows of block_size tokens, the logits of
  positions block_size/2 .. block_size-2 scored (the first half is context only); a text shorter than one
  window is one window, its second half scored. Each window runs alone and whole, as in llama-perplexity:
  an int8 bundle of the older "dynamic" kernel quantizes the activations once per call, so batching windows
  (as the perplexity fields do, 8 per call) or cutting the unscored last token would change what is measured.
  "sliding": the perplexity fields' own windows and batches, every token scored once, no extra pass. The top-level
  "perplexity", "top1_accuracy" and "top1_agreement" keep the sliding windows whatever the scoring, so the
  two perplexities differ: llama.cpp's numbers compare with the "kld" section's.
- Sizes: the graph's bytes (model.onnx + external data) and the whole bundle's.
Both bundles run in the same loop, batch by batch, so a busy machine slows both alike. The decode speed
of the greedy runs is reported for information (32 tokens: noisy; use `edgegpt bench` for speed).
Imports only numpy, onnxruntime, tokenizers and torch-free edgegpt modules, so it runs on a device.
References: https://huggingface.co/docs/transformers/perplexity; llama.cpp tools/perplexity/perplexity.cpp
(https://github.com/ggml-org/llama.cpp, the `--kl-divergence` statistics) and its README's KLD section.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgegpt.errors import ConfigError, DataError
from edgegpt.manifest import MANIFEST_NAME, bundle_format, model_files, sha256_file

__all__ = ["SCORINGS", "all_logits", "evaluate_bundle", "half_windows", "sliding_windows", "summary_text"]

log = logging.getLogger(__name__)

BATCH = 8  # windows per session run
ROWS = 512  # scored positions per float64 log-softmax (a GPT-2 vocabulary: 200 MB a copy)
SCORINGS = ("half", "sliding")  # windows of the "kld" comparison: llama-perplexity's, or the perplexity fields'


def evaluate_bundle(
    bundle: str | Path,
    text_file: str | Path,
    *,
    reference: str | Path | None = None,
    tail: float | None = None,
    max_tokens: int | None = None,
    stride: int | None = None,
    scoring: str = "half",
    prompts: int = 8,
    new_tokens: int = 32,
    provider: str = "cpu",
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of `bundle` on a text file; with `reference`, agreement and KL-divergence against it; sizes.

    Args:
        bundle: the bundle to measure.
        text_file: UTF-8 text, ideally held out from training.
        reference: a bundle to compare with (the fp32 one): same windows, same prompts.
        tail: use only the last `tail` fraction of the file's characters (0 < tail <= 1), e.g. 0.1 for the
            validation split that `edgegpt train` holds out of a single file.
        max_tokens: score at most this many tokens (the first ones of the text).
        stride: tokens between window starts of the perplexity fields; default block_size // 2.
        scoring: the windows of the "kld" comparison (with `reference`): "half" (llama-perplexity's:
            non-overlapping windows, second halves scored; one more pass over the text) or "sliding" (the
            perplexity fields' windows, no extra pass). See the module docstring.
        prompts: greedy prompts, cut from the text at even spacing (with `reference`); 0 skips them.
        new_tokens: greedy tokens per prompt.
        provider, threads: onnxruntime execution provider ("cpu", "cuda", "auto") and threads.
        progress: called as progress(done, total) after each batch of windows and each greedy prompt, in
            work units (windows, prompts); the CLI draws it as a progress bar.

    Returns:
        A JSON-ready dict: "perplexity", "top1_accuracy", "scored_tokens", "windows", "model_bytes",
        "bundle_bytes", "text"; with `reference` also "reference" (its perplexity, accuracy, sizes),
        "ppl_increase_percent", "top1_agreement", "kld" (llama-perplexity's statistics: "mean",
        "mean_uncertainty", "median", "p90", "p99", "p99_9", "max", "same_top_percent", "rms_dp_percent",
        "ppl", "reference_ppl", "ln_ppl_ratio", "ppl_difference", each figure with its "_uncertainty";
        "scoring", "windows", "scored_tokens"), "greedy" and "decode_tokens_per_s".

    Raises:
        ConfigError: a bad argument; DataError: the text is too short for one window or unreadable;
        BundleError: a bundle fails verification.

    >>> result = evaluate_bundle("bundles/small-int8", "held_out.txt", reference="bundles/small")  # doctest: +SKIP
    >>> result["kld"]["mean"]  # doctest: +SKIP
    0.00039
    """
    from edgegpt.runtime import Generator

    _check_args(tail, max_tokens, stride, prompts, new_tokens)
    if scoring not in SCORINGS:
        raise ConfigError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
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
    halves = half_windows(len(ids), cfg.block_size) if reference is not None and scoring == "half" else []
    tick = _Ticker(progress, len(windows) + len(halves) + (prompts if reference is not None else 0))
    tokens = _score(gens, np.asarray(ids, np.int64), [(*w, w[1]) for w in windows], tick, BATCH)
    scored = len(tokens["nll"][0])
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "format": bundle_format(gens[0].bundle.manifest),
        "text": {
            "file": str(text_file),
            "sha256": sha256_file(text_file),
            "tail": tail,
            "characters": len(text),
            "tokens": len(ids),
        },
        "windows": {"size": cfg.block_size, "stride": stride, "count": len(windows)},
        "scored_tokens": scored,
        "perplexity": math.exp(float(tokens["nll"][0].sum()) / scored),
        "top1_accuracy": int(tokens["correct"][0].sum()) / scored,
        **_sizes(gens[0].bundle),
    }
    if reference is None:
        return result
    ref_ppl = math.exp(float(tokens["nll"][1].sum()) / scored)
    result["reference"] = {
        "bundle": str(reference),
        "format": bundle_format(gens[1].bundle.manifest),
        "perplexity": ref_ppl,
        "top1_accuracy": int(tokens["correct"][1].sum()) / scored,
        **_sizes(gens[1].bundle),
    }
    result["ppl_increase_percent"] = 100.0 * (result["perplexity"] / ref_ppl - 1.0)
    result["top1_agreement"] = int((tokens["top"][0] == tokens["top"][1]).sum()) / scored
    if scoring == "half":
        kld_windows = {
            "size": halves[0][1],
            "stride": cfg.block_size,
            "count": len(halves),
            "scored_from": halves[0][2],
        }
        tokens = _score(gens, np.asarray(ids, np.int64), halves, tick, 1)  # alone and whole: module docstring
    else:
        kld_windows = dict(result["windows"])
    result["kld"] = {"scoring": scoring, "windows": kld_windows, **_kld_statistics(tokens)}
    greedy, speeds = _greedy(gens, ids, prompts, new_tokens, tick)
    result["greedy"] = greedy
    result["decode_tokens_per_s"] = speeds[0]
    result["reference"]["decode_tokens_per_s"] = speeds[1]
    return result


class _Ticker:
    """Counts work units done and reports (done, total) to the caller's progress callback, if any."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, units: int = 1) -> None:
        self.done += units
        if self.callback is not None:
            self.callback(self.done, self.total)


def _check_args(tail, max_tokens, stride, prompts, new_tokens) -> None:
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0 < tail <= 1):
        raise ConfigError(f"tail is a fraction of the file in (0, 1], got {tail!r}")
    for name, value, low in (
        ("max_tokens", max_tokens, 1),
        ("stride", stride, 1),
        ("prompts", prompts, 0),
        ("new_tokens", new_tokens, 1),
    ):
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


def half_windows(n: int, size: int) -> list[tuple[int, int, int, int]]:
    """llama-perplexity's KL-divergence windows over n tokens, as (start, length, first, stop): feed
    ids[start:start+length]; score positions first .. stop-1, whose targets are ids[start+first+1 ..
    start+stop]. Non-overlapping chunks of `size` tokens, positions size//2 .. size-2 scored (the first half
    is context only). Fewer than `size` tokens: one chunk of all n, its second half scored.

    >>> half_windows(10, 4), half_windows(5, 8)
    ([(0, 4, 2, 3), (4, 4, 2, 3)], [(0, 5, 2, 4)])
    """
    chunks = [(i * size, size, size // 2, size - 1) for i in range(n // size)]
    return chunks or [(0, n, (n - 1) // 2, n - 1)]


def _score(gens, ids: np.ndarray, windows, tick, batch_size: int) -> dict[str, Any]:
    """Run (start, length, first, stop) windows through each generator's session, `batch_size` windows of
    one length per call. Per scored token, in one fixed order: each model's NLL of the true next token,
    argmax and whether it is right; with two models, KL(second || first) and Δp = p_first(true) -
    p_second(true) (the first is the measured bundle, the second the reference)."""
    out: dict[str, list] = {
        "nll": [[] for _ in gens],
        "top": [[] for _ in gens],
        "correct": [[] for _ in gens],
        "kld": [],
        "dp": [],
    }
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1], []).append(w)  # batch windows of equal length
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            x = np.stack([ids[s : s + length] for s, *_ in batch])
            y = ids[np.minimum(np.asarray([s for s, *_ in batch])[:, None] + np.arange(1, length + 1), len(ids) - 1)]
            first, stop = np.asarray([w[2:] for w in batch]).T[:, :, None]  # (B, 1) each
            pos = np.arange(length)[None, :]
            keep = (pos >= first) & (pos < stop)  # (B, T); y past the text's end is never kept
            logits = [all_logits(gen, x)[keep] for gen in gens]  # (n, V) float32 each, at the scored positions
            targets = y[keep]
            for r in range(0, len(targets), ROWS):  # float64 copies of a few rows at a time: bounded memory
                target = targets[r : r + ROWS]
                logps = [_log_softmax(part[r : r + ROWS].astype(np.float64)) for part in logits]
                for k, logp in enumerate(logps):
                    out["nll"][k].append(-logp[np.arange(len(logp)), target])
                    out["top"][k].append(logp.argmax(-1))
                    out["correct"][k].append(out["top"][k][-1] == target)
                if len(gens) == 2:
                    q, p = logps
                    out["kld"].append((np.exp(p) * (p - q)).sum(-1))
                    out["dp"].append(np.exp(-out["nll"][0][-1]) - np.exp(-out["nll"][1][-1]))
            tick(len(batch))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    return {
        key: [cat(v) for v in value] if key in ("nll", "top", "correct") else cat(value) for key, value in out.items()
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n, V) -> log-probabilities, (n, V), stable (the max subtracted first)."""
    m = logits.max(-1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))


def _kld_statistics(tokens: dict[str, Any]) -> dict[str, Any]:
    """llama-perplexity's statistics of `_score`'s per-token values (definitions: the module docstring)."""
    nll_q, nll_p = tokens["nll"]
    kld, dp = tokens["kld"], tokens["dp"]
    n = len(kld)
    mean_q, unc_q = _mean_and_uncertainty(nll_q)
    mean_p, unc_p = _mean_and_uncertainty(nll_p)
    cov = float((nll_q * nll_p).mean() - mean_q * mean_p) / (n - 1) if n >= 10 else 0.0  # llama.cpp's `covariance`
    ppl_q, ppl_p = math.exp(mean_q), math.exp(mean_p)
    both = unc_q is not None and unc_p is not None
    mse, mse_unc = _mean_and_uncertainty(dp * dp)
    rms = math.sqrt(mse)
    same = float((tokens["top"][0] == tokens["top"][1]).mean())
    mean_kld, kld_unc = _mean_and_uncertainty(kld)
    q90, q99, q999 = (float(v) for v in np.percentile(kld, [90.0, 99.0, 99.9]))  # numpy's "linear" = llama.cpp's
    return {
        "scored_tokens": n,
        "mean": mean_kld,
        "mean_uncertainty": kld_unc,
        "median": float(np.median(kld)),
        "p90": q90,
        "p99": q99,
        "p99_9": q999,
        "max": float(kld.max()),
        "same_top_percent": 100.0 * same,
        "same_top_uncertainty_percent": 100.0 * math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else None,
        "rms_dp_percent": 100.0 * rms,
        "rms_dp_uncertainty_percent": None if mse_unc is None else 100.0 * (0.5 / rms * mse_unc if rms else 0.0),
        "ppl": ppl_q,
        "ppl_uncertainty": None if unc_q is None else ppl_q * unc_q,
        "reference_ppl": ppl_p,
        "reference_ppl_uncertainty": None if unc_p is None else ppl_p * unc_p,
        "ln_ppl_ratio": mean_q - mean_p,
        "ln_ppl_ratio_uncertainty": math.sqrt(max(unc_q**2 + unc_p**2 - 2.0 * cov, 0.0)) if both else None,
        "ppl_difference": ppl_q - ppl_p,
        "ppl_difference_uncertainty": math.sqrt(
            max((ppl_q * unc_q) ** 2 + (ppl_p * unc_p) ** 2 - 2.0 * ppl_q * ppl_p * cov, 0.0)
        )
        if both
        else None,
    }


def _mean_and_uncertainty(x: np.ndarray) -> tuple[float, float | None]:
    """Mean and its standard error, as llama.cpp's `mean_and_uncertainty` (None for 10 values or fewer)."""
    n, mean = len(x), float(x.mean())
    if n <= 10:
        return mean, None
    var = float((x * x).mean()) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 else 0.0


def all_logits(gen, x: np.ndarray) -> np.ndarray:
    """(B, T) token ids, each row from an empty cache -> the logits of every position, (B, T, V)."""
    state = gen.new_state(batch=x.shape[0], capacity=x.shape[1])
    state.feed(x)
    return state.logits


def _greedy(gens, ids: list[int], prompts: int, new_tokens: int, tick) -> tuple[dict | None, list]:
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
        tick()
    total = prompts * new_tokens
    greedy = {
        "prompts": prompts,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "token_agreement": same / total,
        "prefix_agreement": prefix / total,
        "identical_sequences": identical,
    }
    return greedy, [statistics.median(v) for v in speeds]


def _sizes(bundle) -> dict[str, int]:
    files = bundle.manifest["files"]
    total = sum(meta["size"] for meta in files.values()) + (bundle.path / MANIFEST_NAME).stat().st_size
    return {"model_bytes": sum(files[name]["size"] for name in model_files(bundle.manifest)), "bundle_bytes": total}


def summary_text(r: dict) -> str:
    """A few human lines of an `evaluate_bundle` result (what `edgegpt eval` prints without --json)."""
    lines = [
        f"{r['bundle']} ({r['format']}): perplexity {r['perplexity']:.4f} over {r['scored_tokens']} tokens "
        f"({r['windows']['count']} windows of {r['windows']['size']}, stride {r['windows']['stride']}), "
        f"top-1 accuracy {r['top1_accuracy']:.4f}, model {r['model_bytes'] / 1e6:.2f} MB"
    ]
    ref = r.get("reference")
    if ref:
        lines.append(
            f"reference {ref['bundle']} ({ref['format']}): perplexity {ref['perplexity']:.4f}, "
            f"model {ref['model_bytes'] / 1e6:.2f} MB"
        )
        lines.append(f"perplexity {r['ppl_increase_percent']:+.2f} %, top-1 agreement {r['top1_agreement']:.4f}")
        if r.get("kld"):  # results recorded before the KLD fields have none
            lines += _kld_lines(r["kld"])
        g = r.get("greedy")
        if g:
            lines.append(
                f"greedy ({g['prompts']} prompts x {g['new_tokens']} tokens): token agreement "
                f"{g['token_agreement']:.3f}, common prefix {g['prefix_agreement']:.3f}, "
                f"identical {g['identical_sequences']}/{g['prompts']}"
            )
    return "\n".join(lines)


def _kld_lines(k: dict) -> list[str]:
    """The "kld" section as llama-perplexity prints its statistics, on three lines."""
    pm = lambda value, unc, fmt: f"{value:{fmt}}" + ("" if unc is None else f" ± {unc:{fmt.lstrip('+')}}")  # noqa: E731
    w = k["windows"]
    how = (
        f"second halves of {w['count']} windows of {w['size']}"
        if k["scoring"] == "half"
        else f"the {w['count']} sliding windows"
    )
    return [
        f"KL divergence vs reference ({how}, {k['scored_tokens']} tokens): "
        f"mean {pm(k['mean'], k['mean_uncertainty'], '.6f')}, "
        f"median {k['median']:.6f}, 90 % {k['p90']:.6f}, 99 % {k['p99']:.6f}, 99.9 % {k['p99_9']:.6f}, "
        f"max {k['max']:.6f}",
        f"same top {pm(k['same_top_percent'], k['same_top_uncertainty_percent'], '.3f')} %, "
        f"RMS Δp {pm(k['rms_dp_percent'], k['rms_dp_uncertainty_percent'], '.3f')} %",
        f"PPL(Q) {pm(k['ppl'], k['ppl_uncertainty'], '.4f')}, "
        f"PPL(base) {pm(k['reference_ppl'], k['reference_ppl_uncertainty'], '.4f')}, "
        f"PPL(Q)-PPL(base) {pm(k['ppl_difference'], k['ppl_difference_uncertainty'], '+.4f')}, "
        f"ln(PPL(Q)/PPL(base)) {pm(k['ln_ppl_ratio'], k['ln_ppl_ratio_uncertainty'], '+.6f')}",
    ]
