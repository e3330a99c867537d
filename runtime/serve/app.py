"""The ASGI application of `edgegpt serve`: OpenAI's endpoints over one `Scheduler` per model.

Starlette routes the requests (uvicorn runs them, `cli.py`); sse-starlette sends the Server-Sent Events of
a streamed response; prometheus_client renders /metrics. The models load on a background thread when the
app starts, so /health answers 503 until they are ready, then 200.

- POST /v1/completions, /v1/chat/completions: OpenAI's request and response shapes (`protocol.py`). Each
  prompt x choice becomes one scheduler `Job`; the handler awaits its events on the event loop (the
  scheduler's thread hands them over with `call_soon_threadsafe`). A client that disconnects cancels its
  jobs, which free their slots at the next step.
- GET /v1/models, /health, /metrics.

`Guard` runs before any route: a request whose Host header is not a loopback name is refused (403) while
the server listens on loopback (DNS rebinding: a web page must not reach it through a name it controls),
and with an API key every route but /health needs `Authorization: Bearer KEY` (401; compared in constant
time). The body is read up to `max_body_bytes` (413). Any other failure is answered with OpenAI's error
object, never by crashing the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgegpt.errors import (
    ConstraintError,
    ContextLengthError,
    EdgeGPTError,
    ExtraMissingError,
    PromptError,
    QueueFullError,
    SamplingError,
)
from edgegpt.runtime.engine.state import check_ids
from edgegpt.runtime.generation.generator import Generator
from edgegpt.runtime.serve.scheduler import Job, Scheduler
from edgegpt.runtime.serve import protocol
from edgegpt.runtime.serve.metrics import Metrics
from edgegpt.runtime.serve.protocol import APIError, ParsedRequest

__all__ = ["LOOPBACK", "ServeSettings", "create_app"]

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})  # hosts served without an API key


@dataclass(frozen=True)
class ServeSettings:
    """How `edgegpt serve` runs (each field is a flag of the command; see `edgegpt serve --help`)."""

    host: str = "127.0.0.1"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    slots: int = 4
    ctx_size: int | None = None
    chunk: int = 128
    queue_limit: int = 64
    timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    grace_s: float = 10.0
    spinning: bool = False  # idle onnxruntime threads busy-wait: off, the event loop shares the cores
    threads: int | None = None
    provider: str = "cpu"


@dataclass
class _Model:
    name: str
    path: Path
    gen: Generator | None = None
    scheduler: Scheduler | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class _Models:
    """The served models by name, loaded on a background thread; `error` says why loading failed."""

    def __init__(self, paths: dict[str, Path], default: str, settings: ServeSettings):
        self.by_name = {name: _Model(name, Path(path)) for name, path in paths.items()}
        self.default, self.settings = default, settings
        self.ready, self.error = threading.Event(), None

    def load(self) -> None:
        s = self.settings
        try:
            for model in self.by_name.values():
                model.gen = Generator.load(model.path, provider=s.provider, threads=s.threads, spinning=s.spinning)
                model.gen.chat_template  # read now: a broken template fails the load, not every request
                model.scheduler = Scheduler(
                    model.gen, slots=s.slots, capacity=s.ctx_size, chunk=s.chunk, queue_limit=s.queue_limit
                )
                model.scheduler.start()
            self.ready.set()
        except Exception as exc:  # reported by /health and every request; the process stays up to say so
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        for model in self.by_name.values():
            if model.scheduler is not None:
                model.scheduler.stop(timeout=10)

    def pick(self, name: str | None) -> _Model:
        if not self.ready.is_set():
            if self.error:
                raise APIError(
                    503, f"the model failed to load: {self.error}", kind="server_error", code="model_load_failed"
                )
            raise APIError(
                503,
                "the model is loading; retry shortly",
                kind="server_error",
                code="loading",
                headers={"Retry-After": "1"},
            )
        model = self.by_name.get(self.default if name is None else name)
        if model is None:
            known = ", ".join(sorted(self.by_name))
            raise APIError(404, f"The model '{name}' does not exist (served: {known})", "model", "model_not_found")
        return model


def create_app(paths: dict[str, Path], default: str, settings: ServeSettings = ServeSettings()) -> Starlette:
    """The app serving `paths` ({name: bundle directory}); requests without a model field get `default`."""
    models, metrics = _Models(paths, default, settings), Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=models.load, name="edgegpt-load", daemon=True).start()
        yield
        await asyncio.to_thread(models.stop)

    async def health(request: Request) -> Response:
        if models.ready.is_set():
            return JSONResponse({"status": "ok"})
        status = {"status": "error", "error": models.error} if models.error else {"status": "loading"}
        return JSONResponse(status, 503, headers={"Retry-After": "1"})

    async def list_models(request: Request) -> Response:
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "edgegpt"}
            for m in models.by_name.values()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def metrics_text(request: Request) -> Response:
        metrics.observe_schedulers({m.name: m.scheduler for m in models.by_name.values() if m.scheduler})
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def endpoint(parse, path: str):
        async def handle(request: Request) -> Response:
            try:
                req = parse(await _read_json(request, settings.max_body_bytes))
                model = models.pick(req.model)
                jobs = await asyncio.to_thread(_jobs, req, model, settings)  # tokenizing, compiling a schema
                response = await (
                    _stream(request, req, model, jobs, metrics, path, settings.grace_s)
                    if req.stream
                    else _whole(request, req, model, jobs, metrics)
                )
                if not req.stream:
                    metrics.request(path, response.status_code)
                return response
            except APIError as exc:
                metrics.request(path, exc.status)
                return JSONResponse(exc.body(), exc.status, headers=exc.headers)

        return handle

    routes = [
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/metrics", metrics_text),
        Route("/v1/completions", endpoint(protocol.parse_completion, "/v1/completions"), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(protocol.parse_chat, "/v1/chat/completions"), methods=["POST"]),
    ]
    middleware = [Middleware(Guard, settings=settings)]
    if settings.cors_origins:  # outermost: a browser's preflight is answered before the key is asked for
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            ),
        )
    handlers = {404: _not_found, 405: _not_allowed, Exception: _server_error}
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=handlers)
    app.state.models = models
    return app


class Guard:
    """ASGI middleware: the Host check on loopback and the API key (see the module docstring)."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.loopback = settings.host in LOOPBACK
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await JSONResponse(error.body(), error.status, headers=error.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.loopback:
            host = headers.get("host", b"").decode("latin-1")
            name = (
                host[1:].split("]")[0]
                if host.startswith("[")
                else host.rsplit(":", 1)[0]
                if host.count(":") == 1
                else host
            )
            if name.lower() not in LOOPBACK:
                return APIError(
                    403,
                    f"Host {host!r} is not a loopback name; this server answers only 127.0.0.1, "
                    "localhost and ::1 (run it with --host to serve other names)",
                    code="host_not_allowed",
                )
        if self.key is not None and scope.get("path") != "/health":
            given = headers.get("authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                message = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer KEY'"
                return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None


# ---------------------------------------------------------------------- requests


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None


def _jobs(req: ParsedRequest, model: _Model, settings: ServeSettings) -> list[Job]:
    """One job per prompt x choice, in choice-index order; APIError for a prompt that does not fit."""
    gen, jobs = model.gen, []
    count = len(req.prompts) * len(req.configs)
    if count > settings.queue_limit + settings.slots:
        raise APIError(
            400,
            f"{len(req.prompts)} prompts x n={len(req.configs)} is {count} generations; this server queues at "
            f"most {settings.queue_limit + settings.slots} at once: send fewer per request",
            "prompt",
        )
    for p, prompt in enumerate(req.prompts):
        try:
            if req.chat:
                ids = gen.encode(gen.chat_template.render(prompt))
            else:
                ids = gen.encode(prompt) if isinstance(prompt, str) else check_ids(prompt, gen.config.vocab_size)
            ids = ids or [gen.eot_id]  # an empty prompt starts from end-of-text, as in Generator
            max_new = model.scheduler.check_fits(len(ids), req.max_tokens)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), "messages" if req.chat else "prompt", "context_length_exceeded") from None
        except PromptError as exc:
            raise APIError(400, str(exc), "prompt", "invalid_prompt") from None
        except EdgeGPTError as exc:  # a chat template that refuses the messages
            raise APIError(400, str(exc), "messages") from None
        for config in req.configs:
            if req.chat and gen.chat_template.stop:
                config = config.replace(stop=(*config.stop, *gen.chat_template.stop))
            try:  # compiles the constraint: a schema llguidance refuses is the client's error
                completion = gen.new_completion(ids, config, max_new=max_new, constraint=req.constraint)
            except (ConstraintError, ExtraMissingError) as exc:
                status = 501 if isinstance(exc, ExtraMissingError) else 400
                raise APIError(status, str(exc), "response_format", "invalid_response_format") from None
            except SamplingError as exc:  # e.g. a logit_bias id outside the vocabulary
                raise APIError(400, str(exc), str(exc).split(" ", 1)[0]) from None
            jobs.append(Job(completion, timeout_s=settings.timeout_s))
    return jobs


def _submit(jobs: list[Job], scheduler: Scheduler) -> asyncio.Queue:
    """Queue every job; their events arrive on the returned asyncio queue as (kind, job, piece)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(kind: str, job: Job) -> None:  # on the scheduler thread
        loop.call_soon_threadsafe(events.put_nowait, (kind, job, job.last_piece))

    try:
        for job in jobs:
            job.sink = sink
            scheduler.submit(job)
    except QueueFullError as exc:
        for job in jobs:
            job.cancel()
        raise APIError(
            429, str(exc), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    return events


def _logprobs(req: ParsedRequest, model: _Model, job: Job, start: int) -> dict | None:
    """The job's logprobs from entry `start` on in OpenAI's shape; None when not asked for (or none new)."""
    entries = job.completion.logprobs
    if req.logprobs is None or not entries or start >= len(entries):
        return None
    return protocol.logprobs_body(entries[start:], lambda token: model.gen.decode([token]), req.chat)


def _error_of(job: Job) -> APIError | None:
    reason = job.completion.finish_reason
    if reason == "timeout":
        return APIError(504, "the request ran past the server's --timeout", kind="server_error", code="timeout")
    if reason == "cancelled":
        return APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    if reason.startswith("error"):
        return APIError(500, f"generation failed ({reason})", kind="server_error", code="model_error")
    return None


def _usage(req: ParsedRequest, jobs: list[Job]) -> dict[str, int]:
    n = len(req.configs)
    firsts = [jobs[p * n] for p in range(len(req.prompts))]  # each prompt once, as OpenAI counts
    return protocol.usage(
        sum(len(job.prompt) for job in firsts),
        sum(len(job.completion.tokens) for job in jobs),
        sum(job.cached_tokens for job in firsts),
    )


async def _whole(request: Request, req: ParsedRequest, model: _Model, jobs: list[Job], metrics: Metrics) -> Response:
    events, pending = _submit(jobs, model.scheduler), len(jobs)
    try:
        while pending:
            try:
                kind, job, _ = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
                continue
            if kind == "done":
                pending -= 1
                metrics.job_done(model.name, job)
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished jobs; frees the slots of a client that went away
    errors = [e for e in map(_error_of, jobs) if e is not None]
    if errors:
        raise errors[0]
    choices = [
        {
            "index": i,
            "text": job.completion.text,
            "finish_reason": protocol.finish_reason(job.completion.finish_reason),
            "logprobs": _logprobs(req, model, job, 0),
        }
        for i, job in enumerate(jobs)
    ]
    return JSONResponse(protocol.completion_body(req, model.name, choices, _usage(req, jobs)))


async def _stream(
    request: Request, req: ParsedRequest, model: _Model, jobs: list[Job], metrics: Metrics, path: str, grace_s: float
) -> Response:
    events = _submit(jobs, model.scheduler)
    rid, created = protocol.new_id(req.chat)
    index = {id(job): i for i, job in enumerate(jobs)}
    sent = [0] * len(jobs)  # logprobs already streamed, per choice

    async def send():
        pending, started, status = len(jobs), set(), 200
        try:
            while pending:
                kind, job, piece = await events.get()
                i = index[id(job)]
                if kind == "done":
                    pending -= 1
                    metrics.job_done(model.name, job)
                    error = _error_of(job)
                    if error is not None:  # mid-stream: OpenAI's error object as an event, then the end
                        status = error.status
                        yield {"data": _json(error.body())}
                        break
                first = i not in started
                started.add(i)
                logprobs = _logprobs(req, model, job, sent[i])
                if piece or first or logprobs:
                    sent[i] = len(job.completion.logprobs or ())
                    yield {
                        "data": _json(
                            protocol.chunk(req, rid, created, model.name, i, piece, first=first, logprobs=logprobs)
                        )
                    }
                if kind == "done":
                    finish = protocol.finish_reason(job.completion.finish_reason)
                    yield {"data": _json(protocol.chunk(req, rid, created, model.name, i, finish=finish))}
            else:
                if req.include_usage:
                    yield {"data": _json(protocol.chunk(req, rid, created, model.name, None, usage=_usage(req, jobs)))}
            yield {"data": "[DONE]"}
        finally:  # also when the client disconnects: sse-starlette cancels this generator
            for job in jobs:
                job.cancel()
            metrics.request(path, status)

    # On SIGTERM sse-starlette would cancel every stream at once; with a grace period it lets them run that long
    # (a little less than uvicorn's, which then closes what is left).
    return EventSourceResponse(
        send(), sep="\n", ping=15, shutdown_event=anyio.Event(), shutdown_grace_period=0.9 * grace_s
    )


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def _not_found(request: Request, exc) -> Response:
    error = APIError(404, f"no route {request.url.path}", code="not_found")
    return JSONResponse(error.body(), 404)


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug, not bad input: OpenAI's error object (the traceback goes to uvicorn's log), and the server stays up."""
    error = APIError(500, f"internal error: {type(exc).__name__}", kind="server_error", code="internal_error")
    return JSONResponse(error.body(), 500)


async def _not_allowed(request: Request, exc) -> Response:
    error = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(error.body(), 405)
