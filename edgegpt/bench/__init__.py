"""edgegpt.bench: every benchmark of edgegpt, in two layers (tests/test_layout.py checks them).

Device side, the base install (no torch, no onnx; what `edgegpt bench BUNDLE` runs on a device, as
llama-bench for llama.cpp): timing.py (seeded prompts, a timed generation, its figures, peak memory),
device.py (`bench_bundle`: prefill and decode speed of one bundle), speculative.py (plain against
speculative decoding on real text), constraints.py (a constraint mask's cost per token, `python -m
edgegpt.bench.constraints`) and serve.py (`edgegpt serve` under concurrent clients; the serve extra).

Workstation side, the training extra (and `edgegpt[genai]` for the genai rows): PyTorch, the edgegpt
runtime and onnxruntime-genai side by side on the same weights. compare.py (`run_bench`: sources,
interleaved rounds, one process per measurement), worker.py (one measurement in a fresh process), report.py
(summary, Markdown, JSON, plot) and targets.json (the project's speed targets, read by the report).

The `edgegpt bench` command is edgegpt/cli/bench.py; no module here imports the CLI.
"""
