"""`bench_server`: what `edgegpt serve` delivers to concurrent clients, measured from the outside.

`edgegpt bench BUNDLE --serve-clients 1,4,8,16` runs it. It starts the real server (`edgegpt serve` in its
own process, `process.running_server`, on a free 127.0.0.1 port, `slots` = the largest client count) and
measures, per client count c: c threads, each sending `requests` streamed completions one after another
(seeded random prompt ids of `prompt_tokens`, `new_tokens` greedy tokens, end-of-text ignored, so every
request produces exactly that many):

- aggregate generated tokens/s: all tokens / wall time of the round;
- time to first token p50 / p95: request sent -> first streamed token;
- per-token latency p50 / p95 over the requests: a request's decode time per token, (last token - first
  token) / (tokens - 1). Single gaps between chunks would mislead: when the event loop falls behind a fast
  model, several tokens leave in one write and arrive together.

Two references for the targets in docs/benchmarks.md:
- `Generator` in this process, server stopped: decode tokens/s for the same prompts and lengths (one
  client through the server against the runtime alone: the HTTP, JSON and SSE cost per token);
- a chat's second turn: a first turn whose history holds about `history_tokens` tokens (fewer when the
  context is small: the history, its reply and the next turn must fit; none below 16) and a 16-token
  reply, then the next turn; its time to first token, against the same second-turn messages with the first character of the
  history changed, which no slot holds (a cold prefill of the same length). Medians of `runs`.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgegpt.checks import check_int
from edgegpt.errors import ConfigError
from edgegpt.runtime.serve.process import running_server

__all__ = ["ServeBenchConfig", "bench_server", "markdown"]

_REPLY_TOKENS = 16  # the first chat turn's reply: the second turn's new part is that reply and one short message


@dataclass(frozen=True)
class ServeBenchConfig:
    """What `bench_server` measures (see the module docstring)."""

    clients: tuple[int, ...] = (1, 4, 8, 16)
    requests: int = 3
    prompt_tokens: int = 64
    new_tokens: int = 64
    history_tokens: int = 400
    runs: int = 3
    threads: int | None = None
    spinning: bool = False
    seed: int = 0

    def __post_init__(self):
        if not self.clients or not all(isinstance(c, int) and c >= 1 for c in self.clients):
            raise ConfigError(f"clients must be positive integers, got {self.clients!r}")
        for name in ("requests", "prompt_tokens", "new_tokens", "history_tokens", "runs"):
            check_int(name, getattr(self, name), low=1)
        check_int("new_tokens", self.new_tokens, low=2)
        check_int("threads", self.threads, low=1, optional=True)


def bench_server(bundle: str | Path, config: ServeBenchConfig = ServeBenchConfig()) -> dict[str, Any]:
    """Run the benchmark on one bundle; -> {"config", "bundle", "generator_tokens_per_s", "rows", "chat"}."""
    from edgegpt.runtime import Generator
    from edgegpt.runtime.bench import make_prompts

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the table
    gen = Generator.load(bundle, provider="cpu", threads=config.threads, spinning=config.spinning)
    block = gen.config.block_size
    if config.prompt_tokens + config.new_tokens > block:
        raise ConfigError(
            f"prompt_tokens + new_tokens = {config.prompt_tokens + config.new_tokens} exceed the context of {block}"
        )
    prompts = make_prompts(
        gen.config.vocab_size, gen.eot_id, max(config.clients) * config.requests, config.prompt_tokens, config.seed
    )
    alone = [
        gen.generate_ids(p, max_new_tokens=config.new_tokens, ignore_eos=True).timings.tokens_per_s
        for p in prompts[: config.runs]
    ]
    room = min(config.history_tokens, block - 4 * _REPLY_TOKENS - 32)  # the history, its reply (re-encoded) and a turn
    history = _history_text(gen, room) if room >= 16 else None
    history_tokens = len(gen.encode(history)) if history else 0
    del gen  # the server process gets the cores and the memory
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "config": asdict(config),
        "generator_tokens_per_s": statistics.median(alone),
        "rows": [],
    }
    args = [
        str(bundle),
        "--slots",
        str(max(config.clients)),
        "--provider",
        "cpu",
        "--queue",
        "1024",
        "--spinning" if config.spinning else "--no-spinning",
        *(["--threads", str(config.threads)] if config.threads else []),
    ]
    with running_server(args) as (base, _):
        with httpx.Client(base_url=base, timeout=600) as http:
            _stream(http, prompts[0], config.new_tokens)  # warm-up
            for clients in config.clients:
                result["rows"].append(_round(base, prompts, clients, config))
            result["chat"] = (
                {"history_tokens": history_tokens, **_chat_turns(http, history, config)} if history else None
            )
    return result


def _round(base: str, prompts: list[list[int]], clients: int, config: ServeBenchConfig) -> dict[str, Any]:
    """`clients` threads, `requests` streamed completions each, one after another."""
    records: list[tuple[float, list[float]]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=600) as http:
            for r in range(config.requests):
                record = _stream(http, prompts[k * config.requests + r], config.new_tokens)
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [first for first, _ in records]
    per_token = [(stamps[-1] - stamps[0]) / (len(stamps) - 1) for _, stamps in records if len(stamps) > 1]
    tokens = sum(len(stamps) for _, stamps in records)
    return {
        "clients": clients,
        "requests": len(records),
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3,
        "ttft_p95_ms": float(np.percentile(ttft, 95)) * 1e3,
        "token_p50_ms": float(np.percentile(per_token, 50)) * 1e3,
        "token_p95_ms": float(np.percentile(per_token, 95)) * 1e3,
    }


def _stream(http: httpx.Client, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """One streamed greedy completion; -> (time to first token, the arrival time of each token's chunk)."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    stamps, start = [], time.perf_counter()
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the server streamed no text")
    return stamps[0] - start, stamps


def _history_text(gen, tokens: int) -> str:
    """A first user message of at most `tokens` tokens: standard-library source (present on every machine)."""
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    ids = gen.encode(text)[:tokens]
    return gen.decode(ids)


def _chat_turns(http: httpx.Client, history: str, config: ServeBenchConfig) -> dict[str, float]:
    """Second-turn time to first token, with its history cached in a slot and cold (medians of `runs`)."""
    warm, cold = [], []
    for run in range(config.runs):
        first = [{"role": "user", "content": f"{run} {history}"}]
        reply = _chat(http, first, _REPLY_TOKENS)[1]
        second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        warm.append(_chat(http, second, 2))
        changed = [{"role": "user", "content": f"#{run} {history}"}, *second[1:]]
        cold.append(_chat(http, changed, 2))
    return {
        "prompt_tokens": warm[0][3],
        "warm_ttft_ms": statistics.median(w[0] for w in warm) * 1e3,
        "warm_cached_tokens": statistics.median(w[2] for w in warm),
        "cold_ttft_ms": statistics.median(c[0] for c in cold) * 1e3,
        "cold_cached_tokens": statistics.median(c[2] for c in cold),
    }


def _chat(http: httpx.Client, messages: list[dict], new_tokens: int) -> tuple[float, str, int, int]:
    """One streamed chat turn; -> (time to first token, reply, cached prompt tokens, prompt tokens)."""
    body = {
        "messages": messages,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, text, usage = time.perf_counter(), None, [], {}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk["choices"] and "content" in chunk["choices"][0]["delta"]:
                    first = first or time.perf_counter()
                    text.append(chunk["choices"][0]["delta"]["content"])
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return (first or time.perf_counter()) - start, "".join(text), cached, usage.get("prompt_tokens", 0)


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table plus the two reference lines."""
    c, lines = result["config"], []
    lines.append(
        f"`{result['bundle']}`: prompt {c['prompt_tokens']} tokens, {c['new_tokens']} new, "
        f"{c['requests']} streamed requests per client"
    )
    lines.append("")
    lines.append("| clients | tokens/s | vs 1 client | TTFT p50 / p95 ms | per token p50 / p95 ms |")
    lines.append("|---:|---:|---:|---:|---:|")
    one = result["rows"][0]["tokens_per_s"]
    for row in result["rows"]:
        lines.append(
            f"| {row['clients']} | {row['tokens_per_s']:,.1f} | {row['tokens_per_s'] / one:.2f}x | "
            f"{row['ttft_p50_ms']:.1f} / {row['ttft_p95_ms']:.1f} | {row['token_p50_ms']:.2f} / {row['token_p95_ms']:.2f} |"
        )
    lines.append("")
    first = next((r for r in result["rows"] if r["clients"] == 1), None)
    if first is not None:
        per_token = 1e3 / first["token_p50_ms"]
        lines.append(
            f"Generator alone: {result['generator_tokens_per_s']:,.1f} decode tokens/s; one client through the "
            f"server: {per_token:,.1f} ({per_token / result['generator_tokens_per_s']:.2f}x, from its per-token p50)."
        )
    chat = result["chat"]
    if chat is None:
        lines.append("Chat second turn: not measured (the context has no room for a history beside the new tokens).")
        return "\n".join(lines)
    lines.append(
        f"Chat second turn ({chat['prompt_tokens']} prompt tokens, a {chat['history_tokens']}-token history): first "
        f"token in {chat['warm_ttft_ms']:.1f} ms with {chat['warm_cached_tokens']:.0f} tokens cached vs "
        f"{chat['cold_ttft_ms']:.1f} ms cold ({chat['cold_cached_tokens']:.0f} cached): "
        f"{chat['warm_ttft_ms'] / chat['cold_ttft_ms']:.2f}x."
    )
    return "\n".join(lines)
