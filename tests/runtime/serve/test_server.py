"""`edgegpt serve` through the official `openai` client: the same text as Generator, OpenAI's shapes and errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from edgegpt.runtime import Generator
from edgegpt.runtime.generation.templates import ChatTemplate

pytestmark = pytest.mark.slow

PROMPTS = [
    "def main(",
    "import os\n",
    "class Foo:\n    def ",
    "x = [",
    "for i in range(10):",
    "return self.",
    "if x:",
    "# a",
]


@pytest.fixture(scope="module")
def gen(lively_gqa_bundle):
    return Generator.load(lively_gqa_bundle, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_completions_and_chat_give_generators_text(client, gen, lively_gqa_bundle):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    want = gen.generate(PROMPTS[0], max_new_tokens=12)
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(want.prompt_tokens), len(want.tokens))
    again = client.completions.create(
        model="tiny", prompt=PROMPTS[0] + out.choices[0].text, max_tokens=2, temperature=0
    )
    # The slot still holds the first request's prompt and all its tokens but the last (sampled, never fed).
    assert again.usage.prompt_tokens_details.cached_tokens >= len(want.prompt_tokens)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    template = ChatTemplate.from_bundle(lively_gqa_bundle)
    want = gen.generate(template.render(messages), max_new_tokens=10, stop=template.stop)
    assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_equals_the_whole_response_and_reports_usage(client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPTS[2],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    deltas = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True
        )
    )
    assert deltas[0].choices[0].delta.role == "assistant" and deltas[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_seed_and_n(client, gen):
    free = gen.generate(PROMPTS[4], max_new_tokens=20).text
    stop = free[3:6]
    out = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == free[: free.index(stop)] and out.choices[0].finish_reason == "stop"
    a = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=7, n=2)
    b = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].text == gen.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=7).text
    assert a.choices[1].text == gen.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=8).text
    assert a.usage.prompt_tokens == len(gen.encode(PROMPTS[1]))  # the prompt counts once for n choices
    batch = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0)
    assert [c.text for c in batch.choices] == [gen.generate_ids(p, max_new_tokens=4).text for p in ([5, 6, 7], [8, 9])]


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
        (json.dumps({"prompt": "x", "temperature": 5}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n"),
        (json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "x", "topk": 3}).encode(), 400, "topk"),
        (json.dumps({"prompt": [1, -4]}).encode(), 400, "prompt"),
        (json.dumps({"prompt": "x" * 400}).encode(), 400, "prompt"),  # longer than the tiny model's context
        (json.dumps({"prompt": "x" * 30000}).encode(), 413, None),  # over --max-body 20000
        (
            json.dumps({"prompt": ["x"] * 40, "n": 2}).encode(),
            400,
            "prompt",
        ),  # 80 generations: more than the queue holds
    ],
)
def test_bad_requests_get_openai_error_objects(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_foreign_host_is_refused_on_loopback(server):
    r = httpx.get(f"{server}/v1/models", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{server}/v1/models", headers={"Host": "localhost"}).status_code == 200


def test_api_key_is_required_when_given(lively_gqa_bundle, start_server):
    with start_server(lively_gqa_bundle, "--api-key", "s3cret", "--slots", "1") as base:
        assert httpx.get(f"{base}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{base}/v1/models").status_code == 401
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0) as c:
            assert c.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def test_load_many_clients_some_streaming_some_leaving(server, gen):
    """64 requests from 16 concurrent clients: every one answered (or refused with 429), none mixed up."""
    want = {p: gen.generate(p, max_new_tokens=16).text for p in PROMPTS}

    def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        with httpx.Client(base_url=server, timeout=60) as http:
            if i % 8 == 3:  # leaves after the first chunk: its slot must be freed
                with http.stream("POST", "/v1/completions", json={**body, "stream": True, "max_tokens": 40}) as r:
                    next(r.iter_lines())
                return "left", None
            if i % 4 == 1:
                text = []
                with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    if r.status_code == 429:
                        return "refused", None
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text.append(json.loads(line[6:])["choices"][0]["text"])
                return prompt, "".join(text)
            r = http.post("/v1/completions", json=body)
            if r.status_code == 429:
                return "refused", None
            assert r.status_code == 200, r.text
            return prompt, r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    answered = [(p, text) for p, text in results if p not in ("left", "refused")]
    assert len(answered) >= 40
    assert all(text == want[p] for p, text in answered)
    assert httpx.get(f"{server}/health").status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    assert 'edgegpt_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "edgegpt_time_to_first_token_seconds_bucket" in metrics
    assert 'edgegpt_busy_slots{model="tiny"}' in metrics


def test_sigterm_lets_a_running_stream_finish_and_exits_cleanly(lively_gqa_bundle, start_server):
    process = []
    with start_server(lively_gqa_bundle, "--slots", "1", "--grace", "20", process=process) as base:
        body = {
            "model": "tiny",
            "prompt": "def f(",
            "max_tokens": 56,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            process[0].send_signal(signal.SIGTERM)  # mid-stream: the request still finishes
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert process[0].wait(timeout=30) == 0


def test_the_base_install_with_the_serve_extra_serves_without_torch(
    lively_gqa_bundle, start_server, base_venv_bin, gen
):
    python = str(base_venv_bin / "python")
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('uvicorn') is not None)"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split() == ["None", "True"]
    with start_server(lively_gqa_bundle, "--slots", "1", python=python) as base:
        out = httpx.post(
            f"{base}/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0}
        ).json()
    assert out["choices"][0]["text"] == gen.generate(PROMPTS[3], max_new_tokens=8).text


def test_logit_bias_logprobs_and_response_format(client, gen):
    banned = gen.generate(PROMPTS[0], max_new_tokens=8).tokens[0]  # the greedy first token
    out = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, logit_bias={str(banned): -100}
    )
    want = gen.generate(PROMPTS[0], max_new_tokens=8, logit_bias={banned: -100})
    assert banned not in want.tokens and out.choices[0].text == want.text

    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-6
    text = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2)
    assert (
        len(text.choices[0].logprobs.token_logprobs)
        == len(text.choices[0].logprobs.tokens)
        == text.usage.completion_tokens
    )

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    # Compact JSON (llguidance's default): finished, the object itself; cut by max_tokens, a prefix of it.
    finished = shaped.choices[0].finish_reason == "stop"
    assert re.fullmatch(r'\{"n":-?\d+\}' if finished else r'\{"n":-?\d*', shaped.choices[0].message.content)
    r = httpx.post(
        f"{client.base_url}chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
