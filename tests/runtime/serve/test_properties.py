"""Property-based tests (Hypothesis) of `edgegpt serve`'s request bodies and of the constraint inputs (#26).

Random JSON for every field of /v1/completions and /v1/chat/completions (wrong types, nesting, numbers out of
range, unicode with lone surrogates), random JSON schemas as response_format, random regexes: the server never
answers 500 or a traceback, and every refusal is a 4xx carrying OpenAI's error object; a constraint is taken
or refused with a ConstraintError, nothing else. In-process (starlette's TestClient) on the tiny lively bundle,
bounded: a few hundred examples, each with a deadline, well under a minute in all.
"""

from __future__ import annotations

import json
import time

import pytest

from edgegpt.errors import ConstraintError
from edgegpt.runtime import Generator

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from edgegpt.runtime.serve.app import ServeSettings, create_app  # noqa: E402

BOUNDED = settings(
    max_examples=120,
    deadline=5000,  # ms per example: a generation on the tiny model takes a few
    derandomize=True,  # the same examples every run: a failure is reproducible, the time predictable
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

_ODD = st.sampled_from(["\ud800", "\udfff", "\x00", "é", "😀", "<|endoftext|>"])  # lone surrogates: not text
_PLAIN = st.text(max_size=8)
_TEXT = st.one_of(_PLAIN, st.builds(lambda a, odd, b: a + odd + b, _PLAIN, _ODD, _PLAIN))
_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _TEXT
_JSON = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4), max_leaves=12
)


def _nested(depth: int) -> st.SearchStrategy:
    return st.just(json.loads("[" * depth + "]" * depth))


_DEEP = st.integers(1, 200).flatmap(_nested)  # json.loads itself recurses past ~1000: deeper ones are raw text below
_SCHEMA = st.recursive(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "foo"]),
            "enum": st.lists(_SCALARS, max_size=3),
            "pattern": st.sampled_from(["[a-z]+", "(", "a{3}", "[^\\s\\S]"]),
            "minLength": st.integers(-1, 5),
            "maxItems": st.integers(-1, 3),
            "$ref": st.sampled_from(["#", "#/nope", "http://x"]),
        },
    ),
    lambda inner: st.fixed_dictionaries(
        {},
        optional={
            "items": inner,
            "properties": st.dictionaries(st.text(max_size=4), inner, max_size=3),
            "anyOf": st.lists(inner, max_size=3),
        },
    ),
    max_leaves=8,
)
_RESPONSE_FORMAT = st.one_of(
    _JSON,
    st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    _SCHEMA.map(lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
)


_VALID = {  # plausible values: a body of these gets past the field checks, to tokenizing and generating
    "model": st.sampled_from(["tiny", "nope"]),
    "max_tokens": st.integers(-2, 80),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(-0.1, 1.1),
    "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=5)),
    "seed": st.integers(-(2**65), 2**65),
    "n": st.integers(-1, 17),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "5", "99999", "-1", "x"]), st.floats(-200, 200)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "response_format": _RESPONSE_FORMAT,
    "user": _TEXT,
}
_PROMPT = st.one_of(_TEXT, st.lists(_TEXT, max_size=3), st.lists(st.integers(-5, 600), max_size=8))
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": st.one_of(_TEXT, _TEXT, _JSON)}
)
_MESSAGES = st.lists(_MESSAGE, min_size=1, max_size=3)
_VALID_COMPLETION = {**_VALID, "logprobs": st.integers(-1, 6), "echo": st.booleans()}
_VALID_CHAT = {**_VALID, "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 21)}


def _hostile(fields: dict) -> dict:
    """Each field's plausible values, any JSON, or deep nesting; and an unknown field."""
    return {**{k: st.one_of(v, _JSON, _DEEP) for k, v in fields.items()}, "bogus": _JSON}


def _bodies(required: str, value: st.SearchStrategy, fields: dict) -> st.SearchStrategy:
    """Half plausible bodies (few fields, each plausible), half hostile ones (any field may be anything)."""
    plausible = st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({required: value, **{k: fields[k] for k in keys}})
    )
    hostile = st.fixed_dictionaries({required: st.one_of(value, _JSON, _DEEP)}, optional=_hostile(fields))
    return st.one_of(plausible, hostile)


_COMPLETION = _bodies("prompt", _PROMPT, _VALID_COMPLETION)
_CHAT = _bodies("messages", _MESSAGES, _VALID_CHAT)


@pytest.fixture(scope="module")
def api(lively_gqa_bundle):
    app = create_app({"tiny": lively_gqa_bundle}, "tiny", ServeSettings(slots=4, threads=1, queue_limit=8))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for _ in range(600):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        yield client


def _check(response) -> None:
    """200 with a well-formed body (or stream), else a 4xx with OpenAI's error object; never a 5xx."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code != 200:
        assert 400 <= response.status_code < 500, response.status_code
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert "Traceback" not in error["message"] and "\n" not in error["message"]
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", events[-3:]
        for event in map(json.loads, events[:-1]):
            assert "error" not in event or event["error"]["code"] not in ("internal_error", "model_error"), event
        return
    assert response.json()["choices"], response.text[:500]


def _send(api, path: str, body) -> None:
    _check(api.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}))


@BOUNDED
@given(body=_COMPLETION)
def test_random_completion_bodies_never_give_a_500(api, body):
    _send(api, "/v1/completions", body)


@BOUNDED
@given(body=_CHAT)
def test_random_chat_bodies_never_give_a_500(api, body):
    _send(api, "/v1/chat/completions", body)


@settings(BOUNDED, max_examples=40)
@given(
    depth=st.integers(50, 3000),
    field=st.sampled_from(["prompt", "messages", "stop", "logit_bias"]),
    raw=st.sampled_from(["not json", "{", "[1]", '"\\ud800"', "\xff\xfe", "{}"]),
)
def test_raw_bodies_deep_nesting_and_other_media_types_are_4xx(api, depth, field, raw):
    deep = "[" * depth + "]" * depth
    body = '{"' + field + '": ' + deep + "}"
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = api.post(path, content=body, headers={"Content-Type": "application/json"})
        _check(r)
        assert r.status_code == 400
        _check(
            api.post(path, content=raw.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"})
        )
        _check(api.post(path, content=body, headers={"Content-Type": "text/plain"}))


@pytest.fixture(scope="module")
def gen(lively_gqa_bundle) -> Generator:
    return Generator.load(lively_gqa_bundle, provider="cpu", threads=1)


@settings(BOUNDED, max_examples=100)
@given(regex=st.text(alphabet="ab()[]{}|*+?^$\\.,0123456789sSdw-", max_size=10))
def test_random_regexes_are_taken_or_refused_with_a_constraint_error(gen, regex):
    try:
        out = gen.generate("x", max_new_tokens=3, regex=regex)
    except ConstraintError as exc:
        assert "\n" not in str(exc)
        return
    assert out.finish_reason in ("eos", "length", "stop"), out.finish_reason
