"""Validation of an exported graph: ONNX checker, shape inference, the I/O contract, the GELU's function,
parity with PyTorch.

Parity feeds the same ids to SimpleGPT and to onnxruntime for prefill and decode steps: batch 1 and 3,
T = 1 and T = block_size, an empty and a filled past, a multi-token chunk after a past, and a left-padded
batch (prefill, then a decode step on its cache). It compares logits and presents at the real positions
only: a query on left padding sees no key at all, PyTorch and onnxruntime fill such rows differently, and
no real position ever reads them. A greedy generation through the graph must then equal
`edgegpt.train.generate.generate` token for token. Parity runs the model itself, so it honours every
config choice (the tanh or erf GELU, bias=False, a padded vocabulary); `check_graph` also checks that the
graph's GELU nodes compute the config's function (a tanh/erf mix-up can hide inside 1e-4 on a random model).

A GroupQueryAttention graph (KV layout "shared_buffer") runs the same cases with a past of exactly P
positions (the kernel then returns a concatenated present), except one: onnxruntime's CPU kernel rejects a
multi-token chunk after a past at batch > 1 ("batch_size must be 1 when sequence_length > 1 and past
context is given"), so that case runs at batch 1; the runtime never feeds such a chunk. Its greedy check
runs the way the runtime does: one (1, H, L, D) buffer per key/value bound as both past and present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgegpt.config import GPTConfig
from edgegpt.errors import ExportError, ParityError
from edgegpt.export.onnx_export import input_names, output_names
from edgegpt.export.optimize import check_gelu, graph_io
from edgegpt.train.generate import generate
from edgegpt.train.model import SimpleGPT

__all__ = [
    "ATOL",
    "GREEDY_TOKENS",
    "Case",
    "check_graph",
    "check_greedy",
    "check_parity",
    "graph_attention",
    "greedy_onnx",
    "parity_cases",
]

log = logging.getLogger(__name__)

ATOL = 1e-4  # fp32: max abs difference of logits and presents
GREEDY_TOKENS = 32


def check_graph(path: Path, config: GPTConfig) -> None:
    """The ONNX checker (full check: strict shape inference included), the graph's I/O contract and its GELU.

    Raises:
        ExportError: the checker rejects the graph, its inputs/outputs are not the bundle contract's, or its
            GELU nodes compute another function than `config.gelu` (tanh approximation or exact erf).
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(
            onnx.load(str(path), load_external_data=False), check_type=True, strict_mode=True
        )
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"{path.name}: rejected by the ONNX checker or shape inference: {exc}") from exc
    inputs, outputs = graph_io(inferred)
    names = ([i["name"] for i in inputs], [o["name"] for o in outputs])
    if names != (input_names(config.n_layer), output_names(config.n_layer)):
        raise ExportError(f"{path.name}: graph I/O {names} differ from the bundle contract (edgegpt.manifest)")
    dtypes = {io["name"]: io["dtype"] for io in inputs + outputs}
    if dtypes["input_ids"] != "int64" or dtypes["attention_mask"] != "int64" or dtypes["logits"] != "float32":
        raise ExportError(
            f"{path.name}: graph dtypes {dtypes} differ from the contract (ids/mask int64, logits float32)"
        )
    if outputs[0]["shape"][-1] != config.vocab_size:
        raise ExportError(f"{path.name}: logits have shape {outputs[0]['shape']}, expected [..., {config.vocab_size}]")
    check_gelu(inferred, config, path.name)


def graph_attention(path: Path) -> str:
    """ "gqa" if the graph's attention is GroupQueryAttention (KV layout "shared_buffer"), else "mha"."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return "gqa" if any(node.op_type == "GroupQueryAttention" for node in graph.node) else "mha"


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with all of onnxruntime's graph optimisations, as the runtime opens it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Case:
    """One parity check: `new` tokens after `past` cached ones, for `batch` rows left-padded by `pads`."""

    name: str
    batch: int
    new: int
    past: int
    pads: tuple[int, ...] = ()


def parity_cases(block_size: int, attention: str = "mha") -> list[Case]:
    """The parity cases for a context of `block_size` tokens (all fit in it).

    For "gqa" the chunk after a past runs at batch 1: the kernel rejects it at batch > 1 (module docstring).
    """
    n = block_size
    short = min(12, n - 1)
    pads = (0, short // 4, short // 2)
    chunk = max(1, min(5, n // 4))
    cases = [
        Case("prefill_b1_t1", 1, 1, 0),
        Case(f"prefill_b1_t{n}", 1, n, 0),
        Case(f"prefill_b3_t{n}", 3, n, 0),
        Case(f"decode_b1_p{n - 1}", 1, 1, n - 1),
        Case(f"decode_b3_p{n // 2}", 3, 1, n // 2),
        Case(f"chunk_b1_t{chunk}_p{n - chunk}", 1, chunk, n - chunk)
        if attention == "gqa"
        else Case(f"chunk_b3_t{chunk}_p{n - chunk}", 3, chunk, n - chunk),
        Case(f"left_padded_prefill_b3_t{short}", 3, short, 0, pads),
        Case(f"left_padded_decode_b3_p{short}", 3, 1, short, pads),
    ]
    return [c for c in cases if c.new >= 1 and c.past + c.new <= n]


def _case_inputs(model: SimpleGPT, case: Case, seed: int):
    """(onnx feed, torch logits, torch presents, real-query mask (B, T), real-key mask (B, P+T))."""
    cfg, (B, T, P) = model.config, (case.batch, case.new, case.past)
    ids = torch.randint(0, cfg.vocab_size, (B, P + T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, P + T, dtype=torch.long)
    for row, pad in enumerate(case.pads):
        mask[row, :pad] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P+T): padding gets position 0, never read
    with torch.no_grad():
        cache = model(ids[:, :P], None, mask[:, :P], positions[:, :P])[1] if P else None
        logits, presents = model(ids[:, P:], cache, mask, positions[:, P:])
    empty = torch.zeros(B, cfg.n_head, 0, cfg.head_size)
    past = [t for kv in cache for t in kv] if cache else [empty] * (2 * cfg.n_layer)
    values = [ids[:, P:], mask, positions[:, P:], *past]
    feed = {name: t.numpy() for name, t in zip(input_names(cfg.n_layer), values)}
    return (
        feed,
        logits.numpy(),
        [t.numpy() for kv in presents for t in kv],
        mask[:, P:].bool().numpy(),
        mask.bool().numpy(),
    )


def _case_diffs(model: SimpleGPT, sess: ort.InferenceSession, case: Case, seed: int) -> dict[str, float]:
    """Max abs difference per graph output, over the case's real positions."""
    feed, logits, presents, real_q, real_k = _case_inputs(model, case, seed)
    names = output_names(model.config.n_layer)
    got = sess.run(names, feed)
    diffs = {names[0]: float(np.abs(got[0] - logits)[real_q].max())}
    for name, onnx_t, torch_t in zip(names[1:], got[1:], presents):
        diffs[name] = float(np.abs(onnx_t - torch_t).transpose(0, 2, 1, 3)[real_k].max())  # (B, S, H, D)[real]
    return diffs


def check_parity(model: SimpleGPT, path: Path, *, atol: float = ATOL, stage: str = "") -> dict[str, dict[str, float]]:
    """Run every parity case; return {case: {"logits": diff, "present": worst present diff}}.

    Raises:
        ParityError: naming the output, the case and the difference, for the first case beyond `atol`.
    """
    sess, results = session(path), {}
    for seed, case in enumerate(parity_cases(model.config.block_size, graph_attention(path))):
        diffs = _case_diffs(model, sess, case, seed)
        worst = max(diffs, key=lambda k: (np.isnan(diffs[k]), diffs[k]))
        if not diffs[worst] <= atol:  # `not <=` also catches NaN
            raise ParityError(
                f"{stage} graph: {worst} differs from PyTorch by {diffs[worst]:.3g} (atol {atol}) in case {case.name} "
                f"(batch {case.batch}, {case.new} new after {case.past} cached, left pads {list(case.pads)})",
                output=worst,
                case=case.name,
                max_abs_diff=diffs[worst],
                atol=atol,
            )
        results[case.name] = {"logits": diffs["logits"], "present": max(v for k, v in diffs.items() if k != "logits")}
        log.info("parity %s %-28s logits %.2e  present %.2e", stage, case.name, *results[case.name].values())
    return results


def greedy_onnx(
    sess: ort.InferenceSession,
    prompt: np.ndarray,
    max_new_tokens: int,
    config: GPTConfig,
    *,
    shared_buffer: bool = False,
):
    """Greedy decoding through the graph with a growing cache: (new ids (B, n), step logits (B, n, V)).

    `shared_buffer` (a GroupQueryAttention graph only): bind one (B, H, prompt + n, D) buffer per key/value
    as both past and present, updated in place, instead of feeding each present back as the next past.
    """
    if shared_buffer:
        return _greedy_shared(sess, prompt, max_new_tokens, config)
    B = prompt.shape[0]
    names = input_names(config.n_layer)
    past = {name: np.zeros((B, config.n_head, 0, config.head_size), np.float32) for name in names[3:]}
    step, P, tokens, step_logits = prompt, 0, [], []
    for _ in range(max_new_tokens):
        T = step.shape[1]
        feed = {
            names[0]: step,
            names[1]: np.ones((B, P + T), np.int64),
            names[2]: np.tile(np.arange(P, P + T), (B, 1)),
            **past,
        }
        logits, *presents = sess.run(output_names(config.n_layer), feed)
        step_logits.append(logits[:, -1])
        step = logits[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        tokens.append(step)
        past, P = dict(zip(names[3:], presents)), P + T
    return np.concatenate(tokens, 1), np.stack(step_logits, 1)


def _greedy_shared(sess: ort.InferenceSession, prompt: np.ndarray, max_new_tokens: int, config: GPTConfig):
    """`greedy_onnx` with the KV layout "shared_buffer": the past and present of a layer are one OrtValue."""
    (B, T), names, outputs = prompt.shape, input_names(config.n_layer), output_names(config.n_layer)
    binding = sess.io_binding()
    capacity = (B, config.n_head, T + max_new_tokens, config.head_size)
    buffers = [ort.OrtValue.ortvalue_from_shape_and_type(capacity, np.float32, "cpu", 0) for _ in names[3:]]
    for past, buffer in zip(names[3:], buffers):
        binding.bind_ortvalue_input(past, buffer)
    step, P, tokens, step_logits = prompt, 0, [], []
    for _ in range(max_new_tokens):
        T = step.shape[1]
        mask, positions = np.ones((B, P + T), np.int64), np.tile(np.arange(P, P + T), (B, 1))
        for name, array in zip(names, (step, mask, positions)):
            binding.bind_cpu_input(name, array)
        binding.clear_binding_outputs()  # a bound output keeps the last run's value, and the logits change shape
        binding.bind_output(outputs[0], "cpu")  # first: get_outputs() lists the outputs in binding order
        for present, buffer in zip(outputs[1:], buffers):
            binding.bind_ortvalue_output(present, buffer)
        sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        step_logits.append(logits[:, -1])
        step = logits[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        tokens.append(step)
        P += T
    return np.concatenate(tokens, 1), np.stack(step_logits, 1)


def check_greedy(model: SimpleGPT, path: Path, *, new_tokens: int = GREEDY_TOKENS, atol: float = ATOL) -> dict:
    """Greedy-generate `new_tokens` through the graph and through `edgegpt.train.generate.generate`; they must agree.

    A GroupQueryAttention graph decodes with the shared past/present buffer, as the runtime does.

    Returns:
        {"new_tokens", "prompt", "tokens", "max_abs_logit_diff", "shared_buffer"} (logits of every step,
        teacher-forced in PyTorch; whether the check bound one buffer as past and present).

    Raises:
        ParityError: the first token where the two generations differ.
    """
    cfg = model.config
    prompt_len = max(1, min(8, cfg.block_size - new_tokens))
    new_tokens = min(new_tokens, cfg.block_size - prompt_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1234))
    expected = generate(model, prompt, new_tokens)  # (1, prompt_len + new_tokens)
    with torch.no_grad():
        forced = model(expected[:, :-1])[0][:, prompt_len - 1 :].numpy()  # (1, new, V): logits behind each new token
    shared = graph_attention(path) == "gqa"
    got, got_logits = greedy_onnx(session(path), prompt.numpy(), new_tokens, cfg, shared_buffer=shared)
    want = expected[0, prompt_len:].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(got[0].tolist(), want)) if a != b), new_tokens)
    diff = float(np.abs(got_logits[:, : agree + 1] - forced[:, : agree + 1]).max())
    if agree < new_tokens:
        raise ParityError(
            f"greedy generation through the graph diverges from PyTorch at new token {agree}: onnx {got[0, agree]} vs "
            f"torch {want[agree]} (max abs logit difference {diff:.3g} up to there)",
            output="logits",
            case=f"greedy_{new_tokens}",
            max_abs_diff=diff,
            atol=atol,
        )
    log.info("greedy %d tokens equal to PyTorch's (max abs logit difference %.2e)", new_tokens, diff)
    return {
        "new_tokens": new_tokens,
        "prompt": prompt[0].tolist(),
        "tokens": want,
        "max_abs_logit_diff": diff,
        "shared_buffer": shared,
    }
