"""`edgegpt serve` refuses unsafe or incomplete command lines; /health says 503 while no model is ready."""

from __future__ import annotations

import json
import time

import pytest

from click.testing import CliRunner
from starlette.testclient import TestClient

from edgegpt.cli import main
from edgegpt.runtime.serve.app import ServeSettings, create_app


def test_a_public_address_needs_a_key_or_no_auth(lively_gqa_bundle):
    result = CliRunner().invoke(main, ["serve", str(lively_gqa_bundle), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output and "--no-auth" in result.output
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "give a BUNDLE" in result.output
    result = CliRunner().invoke(main, ["serve", "--model", "noequals"])
    assert result.exit_code == 2 and "NAME=PATH" in result.output


def test_health_is_503_until_a_model_loads(tmp_path):
    app = create_app({"broken": tmp_path}, "broken", ServeSettings())  # not a bundle: loading fails
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(100):
            health = client.get("/health")
            if health.json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert client.get("/v1/completions").json()["error"]["code"] == "method_not_allowed"
        assert client.get("/v2/nothing").json()["error"]["code"] == "not_found"


@pytest.mark.slow
def test_bench_serve_clients_measures_the_server(lively_gqa_bundle, tmp_path):
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(
        main,
        ["bench", str(lively_gqa_bundle), "--serve-clients", "1,2", "--short", "--threads", "1", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [row["clients"] for row in data["rows"]] == [1, 2] and data["rows"][1]["requests"] == 2
    assert all(row["tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0 for row in data["rows"])
    assert "| clients | tokens/s |" in result.output and "Generator alone" in result.output
    refused = CliRunner().invoke(main, ["bench", str(lively_gqa_bundle), "--serve-clients", "1", "--batch", "2"])
    assert refused.exit_code == 2 and "--batch cannot be used with --serve-clients" in refused.output
