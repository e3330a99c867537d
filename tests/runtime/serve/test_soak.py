"""A bounded soak of a real `edgegpt serve` process over 127.0.0.1 (#26): a few hundred requests from 8 clients,
with clients that leave mid-stream or before a whole response, cancelled streams and bad bodies mixed in.

Afterwards every slot is free and the queue empty, /metrics counts every request (by status, no 500), the
server's resident memory has grown by less than RSS_GROWTH_MIB, and a greedy request gives the text it gave
before. Seeded: the same mix every run; bounded: REQUESTS requests, each with a client timeout.
"""

from __future__ import annotations

import collections
import json
import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REQUESTS = 400
CLIENTS = 8
RSS_GROWTH_MIB = 64  # allocator noise and caches; a leak of a slot, a job or a body per request would pass it
GREEDY = {"prompt": "def main(", "max_tokens": 24, "temperature": 0}
BAD_BODIES = [
    b"{not json",
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "x", "temperature": "hot"}',
    b'{"messages": []}',
    json.dumps(
        {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}}
    ).encode(),
]


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def _metrics(base: str) -> tuple[float, dict[str, float]]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    busy = sum(float(v) for v in re.findall(r"^edgegpt_(?:busy_slots|queue_depth)\{[^}]*\} (\S+)", text, re.M))
    by_status: dict[str, float] = collections.Counter()
    for status, value in re.findall(r'^edgegpt_requests_total\{[^}]*status="(\d+)"\} (\S+)', text, re.M):
        by_status[status] += float(value)
    return busy, by_status


def _raw_post_and_leave(base: str, body: bytes, after_s: float) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(after_s)


def _one(base: str, client: httpx.Client, i: int) -> str | None:
    """Request i of the mix; the status the client saw, or None where it left before an answer."""
    rng = random.Random(i)
    kind = rng.choice(["whole", "whole", "chat", "stream", "stream-leave", "leave", "bad", "bad"])
    prompt = rng.choice(["def main(", "import os\n", "class A:\n    def ", "x = ["])
    body = {"prompt": prompt, "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]), "seed": i}
    if kind == "whole":
        return str(client.post(f"{base}/v1/completions", json=body).status_code)
    if kind == "chat":
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": body["max_tokens"]}
        return str(client.post(f"{base}/v1/chat/completions", json=chat).status_code)
    if kind == "bad":
        r = client.post(
            f"{base}/v1/completions", content=rng.choice(BAD_BODIES), headers={"Content-Type": "application/json"}
        )
        assert 400 <= r.status_code < 500, r.text
        return str(r.status_code)
    if kind == "leave":  # a whole request whose client goes away after a moment
        _raw_post_and_leave(base, json.dumps({**body, "n": 4, "ignore_eos": True}).encode(), rng.random() * 0.05)
        return None
    with client.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for n, line in enumerate(r.iter_lines()):
            if kind == "stream-leave" and n >= rng.randint(0, 6):
                return None  # closing the response mid-stream cancels it
    return "200"


def test_a_soak_with_disconnects_and_bad_bodies_leaves_the_server_as_it_was(lively_gqa_bundle, start_server):
    process = []
    flags = ("--slots", "4", "--queue", "256", "--chunk", "16")
    with start_server(lively_gqa_bundle, *flags, process=process) as base:
        pid = process[0].pid
        with httpx.Client(timeout=30) as client:
            before = client.post(f"{base}/v1/completions", json=GREEDY).json()["choices"][0]["text"]
            for i in range(20):  # warm-up: the allocator's and onnxruntime's first growth is not a leak
                _one(base, client, REQUESTS + i)
            rss_before = _rss_mib(pid)
            _, counted_before = _metrics(base)
            started = time.monotonic()
            with ThreadPoolExecutor(CLIENTS) as pool:
                seen = list(pool.map(lambda i: _one(base, client, i), range(REQUESTS)))
            elapsed = time.monotonic() - started
            deadline = time.monotonic() + 15
            while True:
                busy, counted = _metrics(base)
                total = sum(counted.values()) - sum(counted_before.values())
                if (busy == 0 and total >= REQUESTS) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert busy == 0, "a slot or the queue still holds work after every client finished or left"
            assert total == REQUESTS, (total, counted)  # every request counted once, whatever became of it
            assert counted.get("500", 0) == 0, counted
            for status, n in collections.Counter(s for s in seen if s is not None).items():
                assert counted[status] - counted_before.get(status, 0) >= n, (status, n, counted)
            rss_after = _rss_mib(pid)
            assert rss_after - rss_before < RSS_GROWTH_MIB, (rss_before, rss_after)
            after = client.post(f"{base}/v1/completions", json=GREEDY).json()["choices"][0]["text"]
            assert after == before
    print(f"soak: {REQUESTS} requests in {elapsed:.1f} s, RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
