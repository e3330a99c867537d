"""`edgegpt bench` on the `tiny` preset with minimal rounds and tokens: it runs, its table, JSON and plot
have the expected structure, every figure is positive, and the runtime's processes never import torch.
The figures themselves are not checked: this is a benchmark's smoke test, not a speed test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgegpt.bench.compare import BenchConfig, decode_weight_bytes, placeholder_tokenizer
from edgegpt.runtime.bench import make_prompts
from edgegpt.bench.cli import bench_command
from edgegpt.errors import ConfigError

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One short bench run on `tiny`: (CliRunner result, JSON dict, plot path, work dir)."""
    out = tmp_path_factory.mktemp("bench")
    args = [
        "--preset",
        "tiny",
        "--runs",
        "2",
        "--threads",
        "1",
        "--prompt-tokens",
        "16",
        "--new-tokens",
        str(NEW_TOKENS),
        "--batch",
        "1,2",
        "--formats",
        "fp32,int8",
        "--work-dir",
        str(out / "work"),
        "--json",
        str(out / "bench.json"),
        "--plot",
        str(out / "bench.png"),
    ]
    result = CliRunner().invoke(bench_command, args, catch_exceptions=False)
    data = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else None
    return result, data, out / "bench.png", out / "work"


def _expected_rows() -> list[str]:
    import importlib.util

    backends = ["edgegpt"] + (["genai"] if importlib.util.find_spec("onnxruntime_genai") else [])
    return ["torch eager"] + [f"{b} {f}" for f in ("fp32", "int8") for b in backends]


@pytest.mark.slow
def test_bench_prints_both_tables_with_a_row_per_backend(bench):
    result, _, _, _ = bench
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "| backend | load s | first token ms | prefill tok/s | decode tok/s b1 |" in table
    assert "decode tok/s b2" in table and "Memory read bandwidth" in table
    for name in _expected_rows():
        assert sum(line.startswith(f"| {name} |") for line in table.splitlines()) == 2, name  # speed + memory tables


@pytest.mark.slow
def test_bench_json_has_every_figure_positive(bench):
    _, data, _, _ = bench
    assert data is not None
    assert data["config"]["runs"] == 2 and data["config"]["batch"] == [1, 2]
    env = data["environment"]
    assert env["cpu"] and env["logical_cpus"] >= 1 and "onnxruntime" in env["versions"]
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert data["bandwidth"]["gbs"] > 0 and len(data["bandwidth"]["probes"]) == 2
    rows = {row["name"]: row for row in data["summary"]}
    assert sorted(rows) == sorted(_expected_rows())
    for name, row in rows.items():
        assert row["runs"] == 2, name
        for batch in ("batch_1", "batch_2"):
            for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "step_p50_ms", "step_p95_ms", "peak_rss_mb"):
                stat = row[batch][key]
                assert 0 < stat["min"] <= stat["median"] <= stat["max"], (name, batch, key)
        assert row["size_bytes"] > 0 and row["load_s"]["min"] > 0
        if row["backend"] != "torch":
            assert row["x_torch"]["median"] > 0 and row["bound_tok_s"] > 0 and row["weights_read_bytes"] > 0
        if row["backend"] == "edgegpt":  # `edgegpt generate` itself ran, for its memory
            assert row["generate_peak_rss_mb"]["min"] > 0 and row["batch_1"]["python_share"]["median"] > 0
    assert not data["notes"], data["notes"]  # no backend failed, no format missing
    for name, runs in data["runs"].items():
        assert [r["batches"]["1"]["new_tokens"] for r in runs] == [NEW_TOKENS] * 2, name
        if name.startswith("edgegpt"):
            for r in runs:
                assert r["torch_imported"] is False and r["cli"]["torch_imported"] is False, f"{name}: torch imported"


@pytest.mark.slow
def test_bench_fp32_tokens_equal_pytorch_and_genai(bench):
    _, data, _, _ = bench
    rows = {row["name"]: row for row in data["summary"]}
    assert rows["edgegpt fp32"]["agreement"] == {"equal_prefix": NEW_TOKENS, "of": NEW_TOKENS}
    if "genai fp32" in rows:
        assert rows["genai fp32"]["agreement"] == {"equal_prefix": NEW_TOKENS, "of": NEW_TOKENS}
    assert all(row["deterministic"] for row in rows.values())


@pytest.mark.slow
def test_bench_rounds_rotate_the_order(bench):
    _, data, _, _ = bench
    first, second = data["order"]
    assert sorted(first) == sorted(second) and first != second and first[1:] + first[:1] == second


@pytest.mark.slow
def test_bench_writes_a_png(bench):
    _, _, png, _ = bench
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_a_usage_error(bench):
    _, _, _, work = bench  # reuses the exported bundles
    args = [
        "--preset",
        "tiny",
        "--runs",
        "1",
        "--prompt-tokens",
        "60",
        "--new-tokens",
        "8",
        "--formats",
        "fp32",
        "--work-dir",
        str(work),
    ]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 2 and "block_size 64" in result.output


def test_exactly_one_source_is_required():
    result = CliRunner().invoke(bench_command, ["--runs", "1"])
    assert result.exit_code == 2 and "exactly one source" in result.output


@pytest.mark.parametrize(
    "flags", [{"runs": 0}, {"formats": ("fp8",)}, {"backends": ()}, {"batch": (0,)}, {"new_tokens": 1}]
)
def test_bench_config_rejects_bad_values(flags):
    with pytest.raises(ConfigError):
        BenchConfig(**flags)


def test_placeholder_tokenizer_and_prompts():
    tok = placeholder_tokenizer(1000)
    assert tok.get_vocab_size() == 1000 and tok.token_to_id("<|endoftext|>") == 0
    prompts = make_prompts(1000, eot_id=0, count=8, length=128, seed=1)
    assert len(prompts) == 8 and all(len(p) == 128 and 0 not in p and max(p) < 1000 for p in prompts)
    assert prompts == make_prompts(1000, eot_id=0, count=8, length=128, seed=1)


def test_decode_weight_bytes_skip_embedding_tables(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "emb")  # gathered only: not read per token
    w = numpy_helper.from_array(np.zeros((8, 100), np.float32), "w")  # lm_head: read
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        initializer=[emb, w],
    )
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert decode_weight_bytes(tmp_path / "m.onnx") == {"read": 3200, "gathered": 3200, "total": 6400}


def test_cli_module_imports_nothing_heavy():
    code = "import edgegpt.bench.cli, sys; heavy = {'torch', 'onnx', 'numpy', 'onnxruntime'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_noise_notes_use_the_cpu_time_before_the_run_and_the_probe_spread():
    from edgegpt.bench.report import _noise_notes

    quiet = {"usable_cpus": 2, "cpu_busy_start": {"busy": 0.03, "steal": 0.0}, "loadavg_start": [1.5]}
    steady = [{"gbs": 29.0}, {"gbs": 28.0}, {"gbs": 29.3}]
    assert _noise_notes(quiet, steady) == []  # a high load average from the last minute's own work is not noise
    busy = _noise_notes({**quiet, "cpu_busy_start": {"busy": 0.6, "steal": 0.0}}, steady)
    assert len(busy) == 1 and "60% of the CPU time taken by other work" in busy[0]
    stolen = _noise_notes({**quiet, "cpu_busy_start": {"busy": 0.0, "steal": 0.2}}, steady)
    assert len(stolen) == 1 and "20% of this VM's CPU time" in stolen[0]
    no_proc_stat = _noise_notes({"usable_cpus": 2, "loadavg_start": [1.2]}, steady)
    assert len(no_proc_stat) == 1 and "load average 1.2 on 2 CPUs" in no_proc_stat[0]
    shared = _noise_notes(quiet, [{"gbs": 22.3}, {"gbs": 29.3}])
    assert len(shared) == 1 and "22.3-29.3 GB/s" in shared[0]


def test_cpu_busy_sees_other_work():
    import threading

    from edgegpt.bench.report import cpu_busy

    if cpu_busy(0.05) is None:
        pytest.skip("no /proc/stat here")
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        busy = cpu_busy(0.3)
    finally:
        stop.set()
        spinner.join()
    assert busy["busy"] >= 0.7 / os.cpu_count()  # /proc/stat sums all CPUs; one spinning thread fills one


def test_ratio_text_shows_which_side_of_the_threshold():
    from edgegpt.bench.report import _ratio_text

    assert _ratio_text(3.26, 3.5) == "3.26"
    assert _ratio_text(3.4999, 3.5) == "3.4999"  # not "3.50", which reads as met
    assert _ratio_text(3.5, 3.5) == "3.50"
