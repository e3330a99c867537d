"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions, in plain dicts.

`parse_completion` and `parse_chat` check a decoded JSON body field by field and turn it into a
`ParsedRequest` (prompts as text or token ids, one `SamplingConfig`, n, streaming options); any bad field
raises `APIError` naming it, answered with OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`). Unknown fields are refused, as OpenAI does, so a
misspelt knob never passes silently. edgegpt's extra samplers (top_k, min_p, repetition_penalty,
ignore_eos) are accepted as extension fields, as llama.cpp's server does.

Defaults follow OpenAI's API reference: temperature 1, top_p 1, n 1; max_tokens 16 for completions and
"until the context is full" for chat. `seed` with n > 1 seeds choice i with seed + i, so the choices
differ and the request is still reproducible.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edgegpt.errors import SamplingError
from edgegpt.runtime.generation.constraints import Constraint
from edgegpt.runtime.generation.sampling import SamplingConfig

__all__ = [
    "APIError",
    "ParsedRequest",
    "chunk",
    "completion_body",
    "finish_reason",
    "logprobs_body",
    "new_id",
    "parse_chat",
    "parse_completion",
    "usage",
]

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
}
_COMPLETION = _COMMON | {"prompt", "echo", "best_of", "logprobs", "suffix", "response_format"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}


class APIError(Exception):
    """An HTTP error in OpenAI's shape; `body()` is the JSON object to send with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """A checked request: `prompts` (texts, token-id lists, or chat message lists), one config per choice."""

    model: str | None
    prompts: list[Any]
    configs: list[SamplingConfig]  # one per choice (n of them): seeds differ
    max_tokens: int | None
    stream: bool
    include_usage: bool
    chat: bool
    constraint: Constraint | None = None  # from response_format
    logprobs: int | None = None  # None: no logprobs; else the top_logprobs count (0: the picked token's only)


def parse_completion(body: Any) -> ParsedRequest:
    """A /v1/completions body -> ParsedRequest; APIError (400) naming the first bad field."""
    body = _object(body, _COMPLETION)
    if "prompt" not in body:
        raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    for name, allowed in (("echo", (False, None)), ("best_of", (1, None)), ("suffix", (None, ""))):
        if body.get(name) not in allowed:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    prompts = _prompts(body["prompt"])
    max_tokens = _int(body, "max_tokens", 16, low=1)
    return _request(body, prompts, max_tokens, chat=False, logprobs=_int(body, "logprobs", None, low=0, high=5))


def parse_chat(body: Any) -> ParsedRequest:
    """A /v1/chat/completions body -> ParsedRequest; APIError (400) naming the first bad field."""
    body = _object(body, _CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where} needs a role of system, developer, user or assistant", where)
        checked.append({"role": message["role"], "content": _content(message.get("content"), f"{where}.content")})
    top = _int(body, "top_logprobs", None, low=0, high=20)
    if top is not None and not body.get("logprobs"):
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if _bool(body, "logprobs", False) else None
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _request(body, [checked], _int(body, name, None, low=1), chat=True, logprobs=logprobs)


def _request(body: dict, prompts: list, max_tokens: int | None, chat: bool, logprobs: int | None) -> ParsedRequest:
    n = _int(body, "n", 1, low=1, high=16)
    seed = _int(body, "seed", None)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(
            400, "stream_options takes {'include_usage': bool}, and only with stream: true", "stream_options"
        )
    include_usage = bool(options and _bool(options, "include_usage", False))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)
    ):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    knobs = {
        "temperature": _real(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _real(body, "top_p", 1.0, 0.0, 1.0),
        "presence_penalty": _real(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _real(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "top_k": _int(body, "top_k", 0, low=0),
        "min_p": _real(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": _real(body, "repetition_penalty", 1.0, 0.0, None),
        "ignore_eos": _bool(body, "ignore_eos", False),
        "stop": tuple(stop or ()),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "logprobs": logprobs is not None,
        "top_logprobs": logprobs or 0,
    }
    try:
        configs = [
            SamplingConfig(max_new_tokens=max_tokens, seed=None if seed is None else seed + i, **knobs)
            for i in range(n)
        ]
    except SamplingError as exc:  # a value in range for OpenAI that SamplingConfig still refuses (top_p = 0)
        field = next((k for k in knobs if k in str(exc)), None)
        raise APIError(400, str(exc), field) from None
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    constraint = _response_format(body.get("response_format"))
    if constraint is not None and knobs["ignore_eos"]:
        raise APIError(
            400, "ignore_eos cannot be used with response_format: the text must end where the format says", "ignore_eos"
        )
    return ParsedRequest(model, prompts, configs, max_tokens, stream, include_usage, chat, constraint, logprobs)


def completion_body(req: ParsedRequest, model: str, choices: list[dict], usage: dict) -> dict[str, Any]:
    """A whole (non-streamed) response; `choices` hold index, text, finish_reason and logprobs (or None)."""
    rid, created = new_id(req.chat)
    if req.chat:
        out = [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "logprobs": c["logprobs"],
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": out,
            "usage": usage,
        }
    out = [
        {"index": c["index"], "text": c["text"], "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
        for c in choices
    ]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": out, "usage": usage}


def chunk(
    req: ParsedRequest,
    rid: str,
    created: int,
    model: str,
    index: int | None,
    text: str | None = None,
    finish: str | None = None,
    first: bool = False,
    usage: dict | None = None,
    logprobs: dict | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a text piece or a finish for choice `index`; `index` None: the final usage chunk."""
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
    if index is None:
        out["choices"] = []
    elif req.chat:
        delta = {"role": "assistant", "content": text or ""} if first else {"content": text} if text else {}
        out["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    else:
        out["choices"] = [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]
    if req.include_usage:
        out["usage"] = usage
    return out


def logprobs_body(entries: list, token_text, chat: bool) -> dict[str, Any]:
    """`TokenLogprob`s in OpenAI's shape; `token_text(id)` spells a token.

    Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}. Completions: {"tokens",
    "token_logprobs", "top_logprobs" ({token: logprob} per step, or None without a top count), "text_offset"
    (each token's offset in the generated text)}.
    """

    def spelled(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    if chat:
        return {
            "content": [
                {**spelled(e.token, e.logprob), "top_logprobs": [spelled(t, p) for t, p in e.top]} for e in entries
            ]
        }
    texts = [token_text(e.token) for e in entries]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    top = [{token_text(t): p for t, p in e.top} for e in entries] if any(e.top for e in entries) else None
    return {
        "tokens": texts,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def finish_reason(reason: str) -> str:
    """edgegpt's finish reason -> OpenAI's ("eos" and "stop" are both "stop")."""
    return "stop" if reason in ("eos", "stop") else reason


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens a slot already held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# ---------------------------------------------------------------------- field checks


def new_id(chat: bool) -> tuple[str, int]:
    """(id, created) for a new response."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())


def _object(body: Any, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None)
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    return body


def _logit_bias(bias: Any) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise APIError(
            400, "'logit_bias' must map token ids to biases in [-100, 100], e.g. {\"50256\": -100}", "logit_bias"
        )
    out = {}
    for key, value in bias.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100
        if not (isinstance(key, str) and key.isdigit() and ok):
            raise APIError(
                400, f"'logit_bias' must map token ids to biases in [-100, 100], got {key!r}: {value!r}", "logit_bias"
            )
        out[int(key)] = float(value)
    return out


def _response_format(fmt: Any) -> Constraint | None:
    """OpenAI's response_format: text (None), json_object (any JSON object), or json_schema (that schema)."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object" and set(fmt) == {"type"}:
        return Constraint(json_schema={"type": "object"})
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"} and isinstance(fmt["json_schema"], dict):
        schema = fmt["json_schema"].get("schema")
        if not isinstance(schema, dict):
            raise APIError(
                400, "response_format.json_schema needs a 'schema' object", "response_format.json_schema.schema"
            )
        return Constraint(json_schema=schema)
    raise APIError(
        400,
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
        "response_format",
    )


def _prompts(prompt: Any) -> list:
    """A text, a list of texts, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(
        400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt"
    )


def _content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or a list of text parts (this model reads text only)", where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in {low}..{high}" if high is not None else f" >= {low}" if low is not None else ""
        raise APIError(400, f"'{name}' must be an integer{bounds}, got {value!r}", name)
    return value


def _real(body: dict, name: str, default: float, low: float, high: float | None) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise APIError(400, f"'{name}' must be a number{bounds}, got {value!r}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {value!r}", name)
    return value
