"""edgegpt.runtime.bench: `edgegpt bench BUNDLE` times a bundle with the runtime alone (no torch)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgegpt.errors import ConfigError
from edgegpt.runtime.bench import DeviceBenchConfig, bench_bundle, figures, markdown, time_generation


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from edgegpt.export import export_bundle

    return Path(export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bench") / "tiny", validate=False))


def test_figures_from_step_timestamps():
    stamps = [0.0, 0.1, 0.11, 0.12, 0.14]  # start, first token after 100 ms, then 3 decode steps
    f = figures(stamps, prompt_tokens=10, batch=2)
    assert f["ttft_s"] == pytest.approx(0.1) and f["prefill_tok_s"] == pytest.approx(200)
    assert f["decode_tok_s"] == pytest.approx(2 * 3 / 0.04) and f["new_tokens"] == 4
    assert f["step_p50_ms"] == pytest.approx(10) and f["step_p95_ms"] == pytest.approx(19)


def test_timed_generation_gives_generate_ids_tokens(bundle):
    from edgegpt.runtime import Generator

    gen = Generator.load(bundle, provider="cpu", threads=1)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    stamps, tokens, session_s = time_generation(gen, prompts, 6)
    assert len(stamps) == 7 and stamps == sorted(stamps) and 0 < session_s < stamps[-1] - stamps[0]
    assert tokens == [gen.generate_ids(p, max_new_tokens=6, ignore_eos=True).tokens for p in prompts]


def test_bench_bundle_reports_prefill_and_decode_per_batch(bundle):
    result = bench_bundle(
        bundle, DeviceBenchConfig.short(runs=2, batch=(1, 2), threads=1, prompt_tokens=8, new_tokens=6)
    )
    assert [row["batch"] for row in result["rows"]] == [1, 2] and all(len(row["runs"]) == 2 for row in result["rows"])
    for row in result["rows"]:
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["new_tokens"] == 6
    table = markdown(json.loads(json.dumps(result)))  # JSON-serialisable as it is
    assert (
        "| batch | prefill tok/s | decode tok/s |" in table and table.count("\n| ") == 3
    )  # the header and one row per batch size


def test_the_default_lengths_fit_a_small_context(bundle):
    result = bench_bundle(bundle, DeviceBenchConfig(runs=1, threads=1))  # the tiny model's context is 64
    assert (result["config"]["prompt_tokens"], result["config"]["new_tokens"]) == (32, 32)


def test_bench_bundle_refuses_what_does_not_fit(bundle):
    with pytest.raises(
        ConfigError, match=r"exceed the model's context of 64 tokens; lower them \(e.g. --prompt-tokens 32"
    ):
        bench_bundle(bundle, DeviceBenchConfig(prompt_tokens=60, new_tokens=10, runs=1, threads=1))
    with pytest.raises(ConfigError, match="new_tokens must be at least 2"):
        DeviceBenchConfig(new_tokens=1)


def test_cli_times_a_bundle_and_keeps_comparison_flags_apart(bundle, tmp_path):
    from edgegpt.cli import main

    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        main, ["bench", str(bundle), "--short", "--runs", "1", "--threads", "1", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.output and json.loads(out.read_text())["rows"][0]["batch"] == 1
    refused = CliRunner().invoke(main, ["bench", str(bundle), "--backends", "torch"])
    assert refused.exit_code == 2 and f"--bundle {bundle}" in refused.output


@pytest.mark.slow
def test_base_install_benches_a_bundle_without_torch(bundle, base_venv_bin):
    bin_dir = base_venv_bin
    proc = subprocess.run(
        [str(bin_dir / "edgegpt"), "bench", str(bundle), "--short", "--runs", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prefill tok/s" in proc.stdout and "decode tok/s" in proc.stdout
