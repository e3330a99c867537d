"""`edgegpt serve`: an OpenAI-compatible HTTP server over the runtime (the `serve` extra).

`app.py` (routes, guard, streaming), `protocol.py` (OpenAI's request and response shapes), `metrics.py`
(Prometheus), `cli.py` (the command). Importing this package needs starlette, sse-starlette, uvicorn and
prometheus_client: `pip install "edgegpt[serve]"`. The scheduling lives in `edgegpt.runtime.scheduler`.
"""
