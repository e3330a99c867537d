"""The timing primitives every bench of `edgegpt.bench` shares: seeded prompts, a timed greedy generation,
its figures, and the process's peak memory.

Device-side (tests/test_layout.py): the standard library, numpy and the runtime's public layer, so that
`edgegpt bench BUNDLE` on a base install and the comparison's edgegpt rows (worker.py) time generation
the same way.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from edgegpt.errors import ConfigError

__all__ = ["figures", "fit_lengths", "make_prompts", "peak_rss_mb", "time_generation"]


def fit_lengths(block_size: int, prompt_tokens: int | None, new_tokens: int | None) -> tuple[int, int]:
    """The prompt and new-token counts of a timed run in a context of `block_size` tokens (None: 128, or half
    the context when that is smaller); ConfigError when the two exceed it, naming lengths that fit.

    >>> fit_lengths(64, None, None)
    (32, 32)
    """
    prompt_tokens = prompt_tokens or min(128, block_size // 2)
    new_tokens = new_tokens or min(128, block_size // 2)
    if prompt_tokens + new_tokens > block_size:
        half = block_size // 2
        raise ConfigError(
            f"prompt_tokens {prompt_tokens} + new_tokens {new_tokens} exceed the model's context of "
            f"{block_size} tokens; lower them (e.g. --prompt-tokens {half} --new-tokens {half})"
        )
    return prompt_tokens, new_tokens


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
