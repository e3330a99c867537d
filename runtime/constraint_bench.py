"""What a constraint costs per token: computing and applying the mask, against the model's decode step.

`mask_cost(gen, constraint)` decodes with a constraint on the public engine (`DecodeState`, the row's
`TokenMask` and `Sampler`, as `Completion.sample` runs them) and times each part of every step: the model
call, the mask's computation (llguidance), its application to the logits (numpy) and the matcher's advance
past the picked token. A finished text starts a fresh matcher on the same cache, so any number of tokens
can be timed. It also times the same steps with the mask computed in a second thread while the model runs,
against a control that wakes the same thread with no work at the same point: on a busy 2-core VM, waking any
second thread before `session.run` alone changed the model call several times over (a scheduling effect, see
docs/benchmarks.md), so only the control tells what the overlap itself saves. Random weights are fine: the
mask depends on the grammar's state and the vocabulary, and temperature-1 sampling from a random model walks
through the grammar.

    python -m edgegpt.runtime.constraint_bench BUNDLE [--json-schema FILE] [--tokens 128] [--runs 5]

docs/benchmarks.md ("Constrained decoding") has the figures for `small` and `gpt2` int8.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from edgegpt.runtime.generation.constraints import Constraint
from edgegpt.runtime.generation.generator import Generator

__all__ = ["DEFAULT_SCHEMA", "MaskCost", "mask_cost"]

# Nested objects, an array, an enum, bounded numbers, required and optional keys (the tests' shape).
DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "vip": {"type": "boolean"}},
            "required": ["id"],
        },
    },
    "required": ["name", "kind", "owner"],
}


@dataclass(frozen=True)
class MaskCost:
    """Medians over every timed step of every run, in microseconds (p90 where named).

    Attributes:
        vocab_size: the logits' width.
        tokens: steps timed in all.
        model_us: the decode step (`DecodeState.feed` of one token), no second thread.
        control_model_us: the same in the control runs (a second thread woken before each call).
        compute_us, compute_p90_us: llguidance's mask for the next token.
        apply_us: setting the forbidden logits to -inf (numpy).
        consume_us: advancing the matcher past the picked token.
        mask_us: compute + apply + consume, per step (the median of the per-step sums).
        share: mask_us / the faster of model_us and control_model_us, so that a busy machine's slow model
            calls never flatter it.
        step_us: model + mask + sampling, one after the other (no second thread, as `Generator` runs).
        control_step_us: the same with a second thread woken (no work) before each model call.
        overlapped_step_us: the same with that thread computing the next mask during the model call.
        compiler_s: building the vocabulary's `ConstraintCompiler` (once per model).
        grammar_ms: compiling and checking the constraint (once per new constraint).
    """

    vocab_size: int
    tokens: int
    model_us: float
    control_model_us: float
    compute_us: float
    compute_p90_us: float
    apply_us: float
    consume_us: float
    mask_us: float
    share: float
    step_us: float
    control_step_us: float
    overlapped_step_us: float
    compiler_s: float
    grammar_ms: float


def _nothing() -> None:
    """The control's task: wake the thread, do no work."""


def _decode(
    gen: Generator,
    constraint: Constraint,
    tokens: int,
    seed: int,
    pool: ThreadPoolExecutor | None,
    overlap: bool = False,
) -> dict:
    """One run of `tokens` constrained steps; per-step times in seconds. With `pool`, a task is handed to its
    thread before each model call: the next mask when `overlap`, else nothing (the control)."""
    compiler = gen.constraint_compiler()
    prompt = [gen.eot_id]
    state = gen.new_state(capacity=min(gen.config.block_size, len(prompt) + tokens + 1))
    sampler = gen.new_sampler(temperature=1.0, seed=seed)
    mask = compiler.mask(constraint)
    times = {name: [] for name in ("model", "compute", "apply", "consume", "step")}
    clock = time.perf_counter
    logits = state.feed(prompt)
    allowed = mask.allowed()
    for _ in range(tokens):
        start = clock()
        if not overlap:
            allowed = mask.allowed()
        computed = clock()
        masked = np.where(allowed, logits[0], mask.neg_inf)
        applied = clock()
        token = sampler(masked)
        picked = clock()
        mask.consume(token)
        consumed = clock()
        if mask.stopped or token == gen.eot_id:  # a finished text: a fresh one on the same cache
            mask = compiler.mask(constraint)
        future = None if pool is None else pool.submit(mask.allowed if overlap else _nothing)
        fed = clock()
        logits = state.feed(np.array([[token]], dtype=np.int64))
        done = clock()
        if overlap:
            allowed = future.result()
        elif future is not None:
            future.result()
        ended = clock()
        times["model"].append(done - fed)
        times["compute"].append(ended - done if overlap else computed - start)  # overlap: the wait left
        times["apply"].append(applied - computed)
        times["consume"].append(consumed - picked)
        times["step"].append((consumed - start) + (ended - fed))
    return times


def mask_cost(
    gen: Generator, constraint: Constraint | None = None, *, tokens: int = 128, runs: int = 5, seed: int = 0
) -> MaskCost:
    """Time a constraint's per-token work against the decode step of `gen` (see the module docstring).

    Args:
        gen: the model.
        constraint: default: `DEFAULT_SCHEMA` as a JSON-schema constraint.
        tokens: constrained steps per run (at most the context less one).
        runs: runs of each mode, interleaved (sequential, control, overlapped); medians over all steps.
        seed: the first run's sampling seed.

    >>> cost = mask_cost(Generator.load("bundles/small-int8", provider="cpu"))  # doctest: +SKIP
    >>> f"{cost.mask_us:.0f} us a token, {cost.share:.1%} of a step"  # doctest: +SKIP
    """
    constraint = constraint or Constraint(json_schema=DEFAULT_SCHEMA)
    tokens = min(tokens, gen.config.block_size - 2)
    started = time.perf_counter()
    compiler = gen.constraint_compiler()
    compiler_s = time.perf_counter() - started
    started = time.perf_counter()
    compiler.grammar(constraint)
    grammar_ms = (time.perf_counter() - started) * 1e3
    plain: dict[str, list[float]] = {}
    control: dict[str, list[float]] = {}
    overlapped: list[float] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for run in range(runs):
            for name, values in _decode(gen, constraint, tokens, seed + run, None).items():
                plain.setdefault(name, []).extend(values)
            for name, values in _decode(gen, constraint, tokens, seed + run, pool).items():
                control.setdefault(name, []).extend(values)
            overlapped += _decode(gen, constraint, tokens, seed + run, pool, overlap=True)["step"]
    us = lambda values: statistics.median(values) * 1e6  # noqa: E731
    per_step = [c + a + s for c, a, s in zip(plain["compute"], plain["apply"], plain["consume"])]
    return MaskCost(
        vocab_size=gen.config.vocab_size,
        tokens=len(per_step),
        model_us=us(plain["model"]),
        control_model_us=us(control["model"]),
        compute_us=us(plain["compute"]),
        compute_p90_us=float(np.percentile(plain["compute"], 90) * 1e6),
        apply_us=us(plain["apply"]),
        consume_us=us(plain["consume"]),
        mask_us=us(per_step),
        share=statistics.median(per_step) / min(statistics.median(plain["model"]), statistics.median(control["model"])),
        step_us=us(plain["step"]),
        control_step_us=us(control["step"]),
        overlapped_step_us=us(overlapped),
        compiler_s=compiler_s,
        grammar_ms=grammar_ms,
    )


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--json-schema", type=click.Path(exists=True, dir_okay=False), help="The constraint [default: DEFAULT_SCHEMA]."
)
@click.option("--tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Constrained steps per run.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: one per core]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def main(bundle, json_schema, tokens, runs, threads, as_json):
    """Per-token cost of a JSON-schema constraint's mask on BUNDLE, against its decode step."""
    gen = Generator.load(bundle, provider="cpu", threads=threads)
    constraint = Constraint(json_schema=json.loads(Path(json_schema).read_text())) if json_schema else None
    cost = mask_cost(gen, constraint, tokens=tokens, runs=runs)
    if as_json:
        click.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(cost).items()}))
        return
    click.echo(
        f"{bundle}: vocab {cost.vocab_size}, {cost.tokens} tokens: mask {cost.mask_us:.0f} us a token (compute "
        f"{cost.compute_us:.0f}, p90 {cost.compute_p90_us:.0f}; apply {cost.apply_us:.0f}; consume {cost.consume_us:.0f}) "
        f"= {cost.share:.1%} of a decode step (model call {cost.model_us:.0f} us, {cost.control_model_us:.0f} us in the "
        f"control); step {cost.step_us:.0f} us; with a second thread: control {cost.control_step_us:.0f} us, mask "
        f"overlapped {cost.overlapped_step_us:.0f} us; first use: vocabulary {cost.compiler_s:.2f} s, schema {cost.grammar_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
