"""The serving wing: requests from many clients onto one model.

`scheduler.py` (continuous batching on slots, prefix reuse, chunked prefill), `settings.py` (`ServeSettings`, the
serve command's fields) and `web.py` (the static server of the browser runtime, `edgegpt web`) need only the base
install. `app.py` (routes, guard, streaming), `protocol.py` (OpenAI's request and response shapes), `metrics.py`
(Prometheus) and `process.py` (a server as a child process) are `edgegpt serve`'s and need the serve extra:
`pip install "edgegpt[serve]"`.
"""
