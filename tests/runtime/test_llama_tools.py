"""The tools on Llama-family bundles (`llama_bundles`: a tied 2-KV-head and an untied multi-query tiny Llama, and
an int4 bundle of the first): eval with a reference, the device bench, the mobile ORT format, speculative decoding
(prompt lookup and a draft model of the same tokenizer), a regex constraint, the serving scheduler (continuous
batching and prefix reuse over SlotBatch) and generate_batch's left padding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.runtime import Generator, Speculative
from edgegpt.runtime.generation.sampling import SamplingConfig

pytestmark = pytest.mark.slow  # builds on two trained models

PROMPTS = ["def parse(self", "import os\n", "class A:\n    ", "x = [", "return ", "for i in", "# a", "while"]
CODE = "def f(x):\n    return x\n"


def _load(bundle: Path) -> Generator:
    return Generator.load(bundle, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def int4(llama_bundles, tmp_path_factory) -> Path:
    from edgegpt.export import quantize_bundle

    return quantize_bundle(llama_bundles["tied"], tmp_path_factory.mktemp("llama_tools") / "int4", to="int4")


@pytest.fixture(scope="module", params=["tied", "untied"])
def gen(request, llama_bundles) -> Generator:
    return _load(llama_bundles[request.param])


def test_eval_measures_perplexity_and_the_kld_against_the_fp32_bundle(int4, llama_bundles, llama_texts):
    args = [
        "eval",
        str(int4),
        "--text",
        str(llama_texts[1]),
        "--reference",
        str(llama_bundles["tied"]),
        "--max-tokens",
        "600",
        "--prompts",
        "2",
        "--new-tokens",
        "8",
        "--threads",
        "1",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert 1 < measured["perplexity"] < 320 and 1 < measured["reference"]["perplexity"] < 320
    assert 0 <= measured["kld"]["mean"] < 0.1 and measured["top1_agreement"] > 0.8


def test_the_device_bench_times_a_llama_bundle(int4):
    args = [
        "bench",
        str(int4),
        "--short",
        "--runs",
        "1",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "6",
        "--batch",
        "1,2",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| batch | prefill tok/s | decode tok/s |" in result.output


@pytest.mark.parametrize("source", ["fp32", "int4"])
def test_the_ort_format_decodes_like_the_onnx_graph(source, llama_bundles, int4, tmp_path):
    bundle = llama_bundles["tied"] if source == "fp32" else int4
    result = CliRunner().invoke(main, ["-q", "convert-ort", str(bundle), "-o", str(tmp_path / "mobile")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "mobile" / "manifest.json").read_text())
    assert manifest["ort"]["greedy_check"] == {"tokens": 8, "equal": True}  # convert-ort's own check
    greedy = [
        Generator.load(tmp_path / "mobile", provider="cpu", threads=1, model_format=f)
        .generate("def main(", max_new_tokens=24, ignore_eos=True)
        .tokens
        for f in ("ort", "onnx")
    ]
    assert greedy[0] == greedy[1]


def test_greedy_lookup_and_a_draft_model_equal_plain_greedy(gen, llama_bundles):
    # the other model of the same tokenizer drafts: its tokens are often rejected, the result must not change
    other = _load(llama_bundles["untied" if gen.bundle.config.kv_heads == 2 else "tied"])
    drafted = 0
    for prompt in (CODE + CODE + "def f(", "import json\nimport json\nimport ", "def "):
        plain = gen.generate(prompt, max_new_tokens=20, ignore_eos=True)
        for spec in (Speculative(lookup=True), Speculative(draft=other, draft_tokens=3)):
            fast = gen.generate(prompt, max_new_tokens=20, ignore_eos=True, speculative=spec)
            assert fast.tokens == plain.tokens, (prompt, spec)
            drafted += fast.drafted_tokens
    assert drafted > 0


def test_a_regex_constrains_the_text(gen):
    pytest.importorskip("llguidance")
    pattern = r"[a-z_]{1,8}\(([a-z]{1,4}(, [a-z]{1,4})?)?\):"  # at most 21 characters: it ends within 32 tokens
    result = gen.generate("def ", max_new_tokens=32, regex=pattern)
    assert result.finish_reason == "eos" and re.fullmatch(pattern, result.text), result  # the regex's end: eos


def test_generate_batch_rows_equal_each_prompt_alone(gen):
    """Left padding: onnxruntime's GroupQueryAttention rotates a padded row's keys at positions shifted by its
    padding (the prompt kernel ignores position_ids); rotary attention depends only on position differences,
    so each row's greedy tokens still equal its run alone (fp32)."""
    alone = [gen.generate(p, max_new_tokens=24, ignore_eos=True).tokens for p in PROMPTS]
    assert [r.tokens for r in gen.generate_batch(PROMPTS, max_new_tokens=24, ignore_eos=True)] == alone


def test_the_scheduler_batches_jobs_and_reuses_a_slots_prefix(gen):
    import threading

    from edgegpt.runtime.serve.scheduler import Job, Scheduler

    config = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    alone = [gen.generate(p, config).text for p in PROMPTS[:5]]
    done = threading.Semaphore(0)

    def sink(kind: str, job: Job) -> None:
        if kind == "done":
            done.release()

    def run(jobs: list[Job]) -> None:
        for job in jobs:
            scheduler.submit(job)
        for _ in jobs:
            assert done.acquire(timeout=60)

    scheduler = Scheduler(gen, slots=3, capacity=gen.bundle.config.block_size, chunk=4)  # 5 jobs on 3 slots
    scheduler.start()
    try:
        jobs = [Job(gen.new_completion(gen.encode(p), config, max_new=8), sink=sink) for p in PROMPTS[:5]]
        run(jobs)
        first = jobs[-1]
        history = first.prompt + first.completion.tokens + gen.encode(" x")
        again = Job(gen.new_completion(history, config, max_new=8), sink=sink)
        run([again])
    finally:
        scheduler.stop()
    assert [job.completion.text for job in jobs] == alone
    assert again.slot == first.slot and again.cached_tokens == len(first.prompt) + len(first.completion.tokens) - 1
    assert again.completion.text == gen.generate_ids(history, config).text
