"""Hostile input to `edgegpt serve` (issue #26): every refusal is a 4xx with OpenAI's error object naming the field,
never a 500, a hang or work nobody waits for. In-process (starlette's TestClient) where a socket is not needed."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from edgegpt.runtime.serve import app as serve_app
from edgegpt.runtime.serve.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def api(lively_gqa_bundle):
    app = create_app({"tiny": lively_gqa_bundle}, "tiny", ServeSettings(slots=2, threads=1))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        for _ in range(600):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        yield client


def _post(client, body: str | bytes, path: str = "/v1/completions", **headers):
    return client.post(path, content=body, headers={"Content-Type": "application/json", **headers})


def _refused(r, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def _nested_schema(levels: int) -> str:
    return '{"type": "array", "items": ' * levels + '{"type": "integer"}' + "}" * levels


def test_a_deeply_nested_body_is_a_400_naming_the_field(api):
    deep = "[" * 50_000 + "]" * 50_000  # 100 KB: json recursed into a RecursionError, a 500
    _refused(_post(api, '{"prompt": "x", "logit_bias": ' + deep + "}"), 400, "logit_bias", "too_deep")
    _refused(_post(api, '{"messages": ' + deep + "}", "/v1/chat/completions"), 400, "messages", "too_deep")
    for levels in (70, 2000):  # past MAX_DEPTH; 2000: past json's own recursion
        schema = _nested_schema(levels)
        body = '{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": ' + schema + "}}}"
        _refused(_post(api, body), 400, "response_format", "too_deep")


def test_lone_surrogates_are_a_400_naming_the_field(api):
    _refused(_post(api, '{"prompt": "a\\ud800b"}'), 400, "prompt")
    _refused(_post(api, '{"prompt": ["ok", "\\udfff"]}'), 400, "prompt[1]")
    chat = '{"messages": [{"role": "user", "content": "hi \\ud800"}]}'
    _refused(_post(api, chat, "/v1/chat/completions"), 400, "messages[0].content")
    _refused(_post(api, '{"prompt": "x", "stop": "\\udc00"}'), 400, "stop")
    error = _refused(_post(api, '{"prompt": "x", "\\ud800": 1}'), 400, "\\ud800")
    assert "surrogate" in error["message"]


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},  # only itself: no JSON value satisfies it
        {"allOf": [{"$ref": "#"}]},
    ],
)
def test_a_response_format_that_admits_no_text_is_refused_up_front(api, schema):
    body = {
        "prompt": "x",
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }
    error = _refused(_post(api, json.dumps(body)), 400, "response_format")
    assert "refused" in error["message"]


def test_only_json_bodies_and_same_origin_browsers_are_served(api, tmp_path):
    ok = {"prompt": "x", "max_tokens": 1}
    r = api.post("/v1/completions", content=json.dumps(ok), headers={"Content-Type": "text/plain"})
    _refused(r, 415, None, "unsupported_media_type")  # a web page's "simple" POST needs no preflight
    _refused(api.post("/v1/completions", content=json.dumps(ok)), 415, None, "unsupported_media_type")
    assert _post(api, json.dumps(ok), **{"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    _refused(_post(api, json.dumps(ok), Origin="http://evil.example"), 403, None, "origin_not_allowed")
    _refused(_post(api, json.dumps(ok), Origin="null"), 403, None, "origin_not_allowed")
    assert _post(api, json.dumps(ok), Origin="http://127.0.0.1").status_code == 200  # the server's own page
    settings = ServeSettings(cors_origins=("http://app.example",))
    with TestClient(create_app({"none": tmp_path}, "none", settings), base_url="http://127.0.0.1") as allowed:
        assert _post(allowed, json.dumps(ok), Origin="http://app.example").status_code != 403
        _refused(_post(allowed, json.dumps(ok), Origin="http://evil.example"), 403, None, "origin_not_allowed")


def test_a_500_is_counted_in_the_metrics(api, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serve_app, "_jobs", broken)
    _refused(_post(api, '{"prompt": "x"}'), 500, None, "internal_error")
    assert re.search(
        r'edgegpt_requests_total\{endpoint="/v1/completions",status="500"\} [1-9]', api.get("/metrics").text
    )


# ---------------------------------------------------------------------- a real server process


def _busy(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(m.group(1)) for m in re.finditer(r"^edgegpt_(?:busy_slots|queue_depth)\{[^}]*\} (\S+)", text, re.M)
    )


# 200 prompts x 2 choices x ~60 tokens on one slot: many seconds of work for a client that leaves at once.
_LONG = {"prompt": ["def f("] * 200, "n": 2, "max_tokens": 56, "temperature": 0, "ignore_eos": True}


@pytest.mark.slow
def test_a_whole_request_whose_client_leaves_is_cancelled(lively_gqa_bundle, start_server):
    with start_server(lively_gqa_bundle, "--slots", "1", "--queue", "512") as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps(_LONG).encode()
        with socket.create_connection((host, int(port))) as s:
            head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 10
            while _busy(base) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _busy(base) > 0
        deadline = time.monotonic() + 5  # the whole request takes far longer on one slot
        while _busy(base) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _busy(base) == 0, "the abandoned request still holds the slot and the queue"


@pytest.mark.slow
def test_a_stream_cut_at_the_end_of_grace_ends_with_an_error_event(lively_gqa_bundle, start_server):
    process = []
    with start_server(lively_gqa_bundle, "--slots", "1", "--queue", "512", "--grace", "3", process=process) as base:
        with httpx.stream("POST", f"{base}/v1/completions", json={**_LONG, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            process[0].send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
    events = [json.loads(line) for line in rest if line != "[DONE]"]
    errors = [e["error"] for e in events if "error" in e]
    assert errors and errors[0]["code"] == "shutting_down", rest[-3:]
    assert not any(
        c.get("finish_reason") for e in events[events.index({"error": errors[0]}) :] for c in e.get("choices", [])
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", ["not a bundle", "tampered", "ctx-size"])
def test_serve_exits_1_with_the_reason_when_no_model_loads(lively_gqa_bundle, tmp_path, case):
    import shutil

    bundle, flags = tmp_path / "bundle", []
    if case == "not a bundle":
        bundle.mkdir()
    else:
        shutil.copytree(lively_gqa_bundle, bundle)
        if case == "tampered":
            with open(bundle / "model.onnx", "r+b") as f:
                f.seek(-8, 2)
                f.write(b"tampered")
        else:
            flags = ["--ctx-size", "100000"]
    edgegpt = str(Path(sys.executable).parent / "edgegpt")
    args = [edgegpt, "serve", str(bundle), "--port", "0", "--provider", "cpu", "--threads", "1", *flags]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)  # before: a banner, then 503 forever
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: no model loaded: ") and len(done.stderr.strip().splitlines()) <= 3, done.stderr


def test_edgegpt_web_answers_only_a_loopback_host(lively_gqa_bundle, tmp_path):
    from edgegpt.runtime.serve.web import NPM_FILES, WebServer

    for package, _ in NPM_FILES.values():
        (tmp_path / package).mkdir(parents=True)
    server = WebServer(lively_gqa_bundle, port=0, node_modules=tmp_path).start()
    try:
        url = f"{server.url}bundle/manifest.json"
        assert httpx.get(url, timeout=10).status_code == 200
        assert httpx.get(url, headers={"Host": "localhost:1234"}, timeout=10).status_code == 200
        for host in ("rebind.attacker.example", "rebind.attacker.example:8000", "127.0.0.1.evil.example"):
            r = httpx.get(url, headers={"Host": host}, timeout=10)  # DNS rebinding: a page's own name, our address
            assert r.status_code == 403 and "manifest" not in r.text, host
    finally:
        server.close()
