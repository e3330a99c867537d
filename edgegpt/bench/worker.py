"""One benchmark measurement in a fresh process: `python -m edgegpt.bench.worker` (JSON spec on stdin).

`edgegpt.bench.compare` starts one such process per backend per round, so that each figure (peak resident memory
above all) belongs to that backend alone, and so that the runtime's process never imports torch (its
footprint is what a device would see). Kinds:

- "torch": PyTorch eager with the KV cache, the same loop as `edgegpt.train.generate.generate` (greedy),
  timed per step; the reference.
- "edgegpt": `edgegpt.runtime.Generator` on a bundle, greedy with `ignore_eos`, timed per model step by
  `edgegpt.runtime.bench.time_generation` (what `edgegpt bench BUNDLE` reports on a device).
- "genai": onnxruntime-genai's greedy search on the same bundle (its genai_config.json, with the thread
  count and thread spinning set as edgegpt's, and the end-of-text stop turned off so that every backend
  generates the same number of tokens).
- "cli": `edgegpt generate` run as a user runs it, for its peak resident memory.
- "bandwidth": the memory-read probe (see `bandwidth_probe`).

Each generation kind runs a short warm-up, then for every batch size one timed generation of
`new_tokens` tokens after a prompt of `len(prompt)` tokens. The result (one JSON object on stdout) holds
time to first token, prefill and decode tokens/s, per-token latency percentiles, the generated ids and
the peak resident set size (`ru_maxrss`) after the batch-1 run and at the end.
Module-level imports are the standard library and `edgegpt.runtime.bench` (numpy, no onnxruntime).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from edgegpt.runtime.bench import figures, peak_rss_mb

# A timed generation: (prompts, new_tokens) -> (step timestamps incl. the start, tokens per row, extras)
RunFn = Callable[[list, int], tuple]


def _measure(run: RunFn, spec: dict) -> dict[str, Any]:
    """Warm up, then time one generation per batch size (batch 1 first); collect figures and memory."""
    out: dict[str, Any] = {"batches": {}}
    for batch in spec["batches"]:
        prompts = spec["prompts"][:batch]
        run([p[: min(len(p), 16)] for p in prompts], min(4, spec["new_tokens"]))  # allocations, lazy init
        stamps, tokens, extra = run(prompts, spec["new_tokens"])
        result = figures(stamps, len(prompts[0]), batch)
        result.update(extra)
        result["tokens"] = tokens[0]
        result["peak_rss_mb"] = peak_rss_mb()
        out["batches"][str(batch)] = result
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _torch(spec: dict) -> dict[str, Any]:
    import torch

    from edgegpt.train.checkpoint import load_checkpoint

    torch.set_num_threads(spec["threads"])
    device = "cuda" if spec["provider"] == "cuda" else "cpu"
    started = time.perf_counter()
    ckpt = load_checkpoint(spec["path"], map_location=device)
    model = ckpt.model.eval()
    sampled = ckpt.config.sampled_ids(ckpt.tokenizer.get_vocab_size())  # never a padded id, as edgegpt's Sampler
    load_s = time.perf_counter() - started
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    @torch.inference_mode()
    def run(prompts, new_tokens):
        stamps = [time.perf_counter()]
        step, cache, generated = torch.tensor(prompts, device=device), None, []
        for _ in range(new_tokens):
            logits, cache = model(step, cache)
            step = logits[:, -1, :sampled].argmax(-1, keepdim=True)  # (B, 1); greedy, as edgegpt.train.generate
            generated.append(step)
            sync()
            stamps.append(time.perf_counter())
        return stamps, torch.cat(generated, dim=1).tolist(), {}

    result = _measure(run, spec)
    result.update(load_s=load_s, versions={"torch": torch.__version__}, threads=torch.get_num_threads())
    return result


def _edgegpt(spec: dict) -> dict[str, Any]:
    import onnxruntime as ort

    from edgegpt.runtime import Generator
    from edgegpt.runtime.bench import time_generation

    started = time.perf_counter()
    gen = Generator.load(
        spec["path"],
        provider=spec["provider"],
        threads=spec["threads"],
        spinning=spec["spinning"],
        huge_pages=spec["huge_pages"],
    )
    load_s = time.perf_counter() - started

    def run(prompts, new_tokens):
        stamps, tokens, session_s = time_generation(gen, prompts, new_tokens)  # the loop generate_ids runs
        total = stamps[-1] - stamps[0]
        return stamps, tokens, {"session_s": session_s, "python_share": 1.0 - session_s / total if total else 0.0}

    result = _measure(run, spec)
    result.update(
        load_s=load_s,
        versions={"onnxruntime": ort.__version__},
        providers=gen.providers,
        torch_imported="torch" in sys.modules,
    )
    return result


def _genai(spec: dict) -> dict[str, Any]:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(spec["path"])
    spin = "1" if spec["spinning"] else "0"  # as edgegpt's session
    session = {
        "intra_op_num_threads": spec["threads"],
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": spin,
        "session.inter_op.allow_spinning": spin,
    }
    # eos_token_id [] turns off the end-of-text stop: every backend generates exactly new_tokens tokens.
    config.overlay(json.dumps({"model": {"eos_token_id": [], "decoder": {"session_options": session}}}))
    config.clear_providers()  # genai's default: the CPU
    if spec["provider"] == "cuda":
        config.append_provider("cuda")
    started = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - started

    def run(prompts, new_tokens):
        ids = np.asarray(prompts, dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=ids.shape[1] + new_tokens, batch_size=ids.shape[0])
        stamps = [time.perf_counter()]
        generator = og.Generator(model, params)
        generator.append_tokens(ids)  # runs the prompt
        while not generator.is_done():
            generator.generate_next_token()  # picks a token, then (from the second call on) runs the model
            stamps.append(time.perf_counter())
        tokens = [[int(t) for t in generator.get_sequence(b)[ids.shape[1] :]] for b in range(ids.shape[0])]
        return stamps, tokens, {}

    result = _measure(run, spec)
    result.update(load_s=load_s, versions={"onnxruntime-genai": getattr(og, "__version__", "?")})
    return result


def bandwidth_probe(threads: int, mib: int = 256, repeats: int = 5) -> dict[str, Any]:
    """Memory read bandwidth in GB/s with `threads` threads, by two methods; the larger one is the bound's.

    - "numpy_max": np.max over disjoint slices of a `mib` MiB float32 array, one slice per thread (numpy
      releases the GIL in the reduction); a vectorised read-only stream, far larger than the L3 cache.
    - "ort_gemv": onnxruntime's fp32 MatMul of a (1, K) vector by a (K, N) matrix of `mib` MiB, the access
      pattern of decoding one token, with `threads` intra-op threads.
    Each is the best of `repeats`: noise only ever slows a stream down, so the best read is the
    closest to what the memory system sustains. Both understate the peak slightly (a fp32 decode was
    seen streaming faster than a numpy probe), so a bound from them is a little optimistic.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = mib * 2**20 // 4
    array = np.ones(n, dtype=np.float32)
    parts = np.array_split(array, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, array.nbytes / (time.perf_counter() - start) / 1e9)
    del parts, array
    result = {"numpy_max_gbs": best, "mib": mib, "threads": threads}
    try:
        result["ort_gemv_gbs"] = _ort_gemv(threads, n, repeats)
    except ImportError as exc:  # onnx is a workstation dependency; the numpy figure still stands
        result["ort_gemv_error"] = str(exc)
    result["gbs"] = max(result["numpy_max_gbs"], result.get("ort_gemv_gbs", 0.0))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _ort_gemv(threads: int, n: int, repeats: int) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k = 4096
    cols = n // k
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, cols]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    w = np.ones((k, cols), dtype=np.float32)
    binding = session.io_binding()
    binding.bind_cpu_input("w", w)
    binding.bind_cpu_input("x", np.ones((1, k), dtype=np.float32))
    binding.bind_output("y")
    best = 0.0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        best = max(best, w.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def _cli(spec: dict) -> dict[str, Any]:
    """`edgegpt generate BUNDLE PROMPT` as a user runs it (in this process, output discarded): its peak memory."""
    import contextlib

    from edgegpt.cli import main as cli

    args = [
        "generate",
        "-n",
        str(spec["new_tokens"]),
        "--ignore-eos",
        "--temperature",
        "0",
        "--threads",
        str(spec["threads"]),
        "--provider",
        spec["provider"],
        "--",
        spec["path"],
        spec["text"],
    ]
    started = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            cli.main(args, prog_name="edgegpt", standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise RuntimeError(f"edgegpt generate exited {exc.code}") from None
    return {
        "peak_rss_mb": peak_rss_mb(),
        "wall_s": time.perf_counter() - started,
        "torch_imported": "torch" in sys.modules,
    }


KINDS = {"torch": _torch, "edgegpt": _edgegpt, "genai": _genai, "cli": _cli}


def run_spec(spec: dict) -> dict[str, Any]:
    """Run one measurement described by `spec` (see edgegpt.bench.compare) in this process."""
    if spec["kind"] == "bandwidth":
        return bandwidth_probe(spec["threads"])
    return KINDS[spec["kind"]](spec)


def main() -> int:
    spec = json.loads(sys.stdin.read())
    threads = str(spec.get("threads", 1))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    try:
        result = {"ok": True, **run_spec(spec)}
    except Exception as exc:  # reported to the parent, which notes it and skips the backend
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
