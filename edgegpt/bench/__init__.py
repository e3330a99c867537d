"""edgegpt.bench: PyTorch, the edgegpt runtime and onnxruntime-genai side by side on the same weights.

The comparison needs the training extra (it builds bundles from a checkpoint and runs PyTorch) and, for
the genai rows, `edgegpt[genai]`. Timing one bundle on a device needs neither: that is
`edgegpt.runtime.bench` (`edgegpt bench BUNDLE`), which this package's edgegpt rows also use.

Modules: compare.py (`run_bench`: sources, interleaved rounds, one process per measurement), worker.py
(one measurement in a fresh process), report.py (summary, Markdown, JSON, plot), targets.json (the
project's speed targets, read by the report), cli.py (the `edgegpt bench` command).
"""
