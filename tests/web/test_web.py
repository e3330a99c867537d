"""The browser runtime (web/) against the Python runtime: its Node unit tests, and headless Chromium driving the
page that `edgegpt web` serves (Debian's chromium, driven by playwright-core; `make test` installs both)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[2] / "web"

STEPS = 32
PROMPT = "def main("
ENCODINGS = ["def main(", "  x = é😀\n\tif a<b: return 'ok'", "<|endoftext|>import os", ""]


def python_greedy(bundle, **options):
    from edgegpt.runtime import Generator

    return Generator.load(bundle, provider="cpu", threads=1).generate(PROMPT, max_new_tokens=STEPS, **options)


def case(name, bundle) -> dict:
    from edgegpt.runtime import Generator
    from edgegpt.tokenizer import encode

    result = python_greedy(bundle, ignore_eos=True)
    text = result.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = python_greedy(bundle, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop"
    tok = Generator.load(bundle, provider="cpu").bundle.tokenizer
    return {
        "name": name,
        "bundle": str(bundle),
        "prompt": PROMPT,
        "steps": STEPS,
        "tokens": result.tokens,
        "text": text,
        "stop": stop,
        "stopText": stopped.text,
        "encodings": [[s, encode(tok, s)] for s in ENCODINGS],
    }


def test_node_unit_tests(node, lively_gqa_bundle, web_int4_bundle, tmp_path):
    """web/test under Node's test runner: sampling, text, hashing, and greedy/tokenizer/stop parity on both bundles."""
    cases = [case("fp32", lively_gqa_bundle), case("int4", web_int4_bundle)]
    assert len(set(cases[0]["tokens"])) > 1
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "EDGEGPT_WEB_CASES": str(tmp_path / "cases.json")}
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", "test/"], cwd=WEB, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "# skipped 0" in run.stdout and "# pass 0" not in run.stdout, run.stdout[-2000:]  # the cases ran


def browser(node, bundle, *args: str, query: str = "") -> dict:
    """Serve `bundle` with `edgegpt web`'s server and run web/scripts/browser.mjs on the page; its JSON result."""
    from edgegpt.runtime.serve.web import WebServer

    if shutil.which("chromium") is None and not os.environ.get("CHROMIUM"):
        pytest.fail("chromium is missing: `make test` installs it (apt-get install -y chromium)")
    server = WebServer(bundle, port=0).start()
    try:
        run = subprocess.run(
            [node, "scripts/browser.mjs", server.url + query, *args],
            cwd=WEB,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.close()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_the_page_generates_the_python_runtimes_greedy_tokens(name, node, lively_gqa_bundle, web_int4_bundle):
    bundle = lively_gqa_bundle if name == "fp32" else web_int4_bundle
    expected = python_greedy(bundle)
    result = browser(node, bundle, "--prompt", PROMPT, "--max-new-tokens", str(STEPS))
    assert result["error"] is None, result
    assert result["isolated"] is True and result["threads"] == 2, result["status"]  # COOP/COEP: wasm threads
    run = result["runs"][0]
    assert len(expected.tokens) >= 16
    assert run["tokens"] == expected.tokens
    assert run["text"] == expected.text
    assert "tokens/s" in run["stats"] and run["tokensPerS"] > 0


@pytest.mark.slow
def test_the_webgpu_path_generates_the_same_tokens(node, lively_gqa_bundle, web_int4_bundle):
    """WebGPU on SwiftShader (the CPU): the cache stays in GPU buffers between steps; tokens as in Python. An int4
    bundle with a quantized embedding is refused there (onnxruntime-web's WebGPU misreads it: generator.js)."""
    expected = python_greedy(lively_gqa_bundle).tokens[:8]  # 8 steps: SwiftShader is slow
    result = browser(node, lively_gqa_bundle, "--max-new-tokens", "8", "--swiftshader", query="?provider=webgpu")
    assert result["error"] is None and "webgpu" in result["status"], result
    assert result["runs"][0]["tokens"] == expected
    refused = browser(node, web_int4_bundle, "--swiftshader", query="?provider=webgpu")
    assert "misreads an int4 embedding table" in (refused["error"] or ""), refused


@pytest.mark.slow
def test_the_page_refuses_a_tampered_bundle_file(node, lively_gqa_bundle, tmp_path):
    bundle = shutil.copytree(lively_gqa_bundle, tmp_path / "b")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    result = browser(node, bundle)
    assert "model.onnx: sha256 differs from the manifest" in (result["error"] or ""), result
    assert result["status"].startswith("Refused: ") and "refusing to load it" in result["status"]
    assert result["runs"] == []


def test_the_server_serves_only_the_page_the_npm_builds_and_listed_files(node, lively_gqa_bundle, tmp_path):
    from edgegpt.runtime.serve.web import WebServer

    bundle = shutil.copytree(lively_gqa_bundle, tmp_path / "b")
    (bundle / "secret.txt").write_text("not listed")
    server = WebServer(bundle, port=0)
    assert server.resolve("/") == WEB / "index.html"
    assert server.resolve("/src/generator.js") == WEB / "src" / "generator.js"
    assert server.resolve("/bundle/manifest.json") == bundle / "manifest.json"
    assert server.resolve("/bundle/model.onnx") == bundle / "model.onnx"
    assert server.resolve("/ort/ort-wasm-simd-threaded.jsep.wasm") is not None
    for refused in (
        "/bundle/secret.txt",
        "/bundle/../b/model.onnx",
        "/ort/../package.json",
        "/package.json",
        "/node_modules/onnxruntime-web/package.json",
        "/src/../app.js",
        "/ort/ort.min.mjs.map",
    ):
        assert server.resolve(refused) is None, refused
    server.start()
    try:
        with urllib.request.urlopen(server.url) as response:
            headers = response.headers
            assert b"importmap" in response.read()
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.url + "bundle/secret.txt")
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.close()


def test_web_command_help_and_errors(tmp_path):
    from click.testing import CliRunner

    from edgegpt.cli import main

    runner = CliRunner()
    assert "Examples:" in runner.invoke(main, ["web", "--help"]).output
    result = runner.invoke(main, ["web", str(tmp_path)])
    assert result.exit_code == 1 and "manifest.json: missing" in result.output


@pytest.mark.slow
def test_web_runs_from_the_base_install_without_torch(base_venv_bin, lively_gqa_bundle):
    """The installed package (no torch) carries the page as package data; the npm files come from --node-modules."""
    process = subprocess.Popen(
        [
            str(base_venv_bin / "edgegpt"),
            "web",
            str(lively_gqa_bundle),
            "--port",
            "0",
            "--node-modules",
            str(WEB / "node_modules"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        with urllib.request.urlopen(url + "src/generator.js") as response:
            assert b"class Generator" in response.read()
        with urllib.request.urlopen(url + "bundle/manifest.json") as response:
            assert json.loads(response.read())["format"] == "edgegpt-bundle"
    finally:
        process.terminate()
        process.wait(timeout=30)
