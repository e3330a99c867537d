"""edgegpt.runtime.generation.evaluate: sliding-window perplexity equal to PyTorch's, agreement, llama-perplexity's
KL-divergence statistics against a numpy oracle, sizes, the `eval` CLI, no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgegpt.errors import ConfigError, DataError
from edgegpt.runtime.generation.evaluate import half_windows, sliding_windows, evaluate_bundle
from edgegpt.runtime.cli import eval_command as eval_cmd


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from edgegpt.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("eval") / "fp32", validate=False)


@pytest.fixture(scope="module")
def int8_bundle(bundle, tmp_path_factory) -> Path:
    """The fp32 bundle quantized to int8: the same model, different logits."""
    from edgegpt.export.quantize import quantize_bundle

    return quantize_bundle(bundle, tmp_path_factory.mktemp("eval") / "int8", to="int8", threads=2)


@pytest.fixture(scope="module")
def text_file(sample_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(sample_text[-6000:])
    return path


@pytest.mark.parametrize(
    "n, size, stride", [(10, 4, 2), (100, 16, 8), (100, 16, 16), (17, 16, 5), (2, 16, 8), (50, 8, 3)]
)
def test_windows_score_every_target_once_with_enough_context(n, size, stride):
    scored = []
    for k, (start, length, offset) in enumerate(sliding_windows(n, size, stride)):
        assert 1 <= length <= size and start + length <= n - 1 and 0 <= offset < length
        targets = [start + j + 1 for j in range(offset, length)]
        scored += targets
        if k:
            assert min(t - start for t in targets) >= size - stride  # context of each scored target
    assert scored == list(range(1, n))


def test_half_windows_are_llama_perplexity_chunks():
    # llama-perplexity --kl-divergence: chunk i holds tokens [i n, (i + 1) n); the logits of its positions
    # n/2 .. n-2 predict its tokens n/2 + 1 .. n-1
    for n, size in [(10, 4), (100, 16), (64, 64), (130, 64), (5, 8), (2, 16)]:
        windows = half_windows(n, size)
        assert all(start + length <= n and length == min(n, size) for start, length, _, _ in windows)
        scored = [start + j + 1 for start, _, first, stop in windows for j in range(first, stop)]
        if n >= size:
            assert scored == [i * size + j for i in range(n // size) for j in range(size // 2 + 1, size)]
        else:
            assert scored == list(range((n - 1) // 2 + 1, n)) and scored


def _kld_oracle(bundle: Path, reference: Path, ids: list[int], size: int) -> dict:
    """llama.cpp's statistics computed here, independently: each chunk of `size` tokens fed whole, alone, through
    the engine; log-softmax in float64; the positions size/2 .. size-2 of every chunk scored."""
    from edgegpt.runtime import Generator

    logp = {}
    for name, path in (("q", bundle), ("p", reference)):
        gen = Generator.load(path, provider="cpu", threads=2)
        rows = []
        for i in range(len(ids) // size):
            state = gen.new_state(batch=1, capacity=size)
            state.feed(np.asarray([ids[i * size : (i + 1) * size]], np.int64))
            z = state.logits[0, size // 2 : size - 1].astype(np.float64)  # (size - 1 - size/2, V)
            z = z - z.max(-1, keepdims=True)
            rows.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))  # log-softmax
        logp[name] = np.concatenate(rows)
    target = np.asarray([ids[i * size + j + 1] for i in range(len(ids) // size) for j in range(size // 2, size - 1)])
    p, q = logp["p"], logp["q"]
    kld = (np.exp(p) * (p - q)).sum(-1)
    nll_q, nll_p = -q[np.arange(len(q)), target], -p[np.arange(len(p)), target]
    dp = np.exp(-nll_q) - np.exp(-nll_p)
    n = len(kld)
    se = lambda x: np.sqrt(((x**2).mean() - x.mean() ** 2) / (n - 1))  # noqa: E731
    cov = ((nll_q * nll_p).mean() - nll_q.mean() * nll_p.mean()) / (n - 1)
    ppl_q, ppl_p = np.exp(nll_q.mean()), np.exp(nll_p.mean())
    rms = np.sqrt((dp**2).mean())
    same = (q.argmax(-1) == p.argmax(-1)).mean()
    return {
        "scored_tokens": n,
        "mean": kld.mean(),
        "mean_uncertainty": se(kld),
        "median": np.median(kld),
        "p90": np.percentile(kld, 90),
        "p99": np.percentile(kld, 99),
        "p99_9": np.percentile(kld, 99.9),
        "max": kld.max(),
        "same_top_percent": 100 * same,
        "same_top_uncertainty_percent": 100 * np.sqrt(same * (1 - same) / (n - 1)),
        "rms_dp_percent": 100 * rms,
        "rms_dp_uncertainty_percent": 100 * 0.5 / rms * se(dp**2),
        "ppl": ppl_q,
        "ppl_uncertainty": ppl_q * se(nll_q),
        "reference_ppl": ppl_p,
        "reference_ppl_uncertainty": ppl_p * se(nll_p),
        "ln_ppl_ratio": nll_q.mean() - nll_p.mean(),
        "ln_ppl_ratio_uncertainty": np.sqrt(se(nll_q) ** 2 + se(nll_p) ** 2 - 2 * cov),
        "ppl_difference": ppl_q - ppl_p,
        "ppl_difference_uncertainty": np.sqrt(
            (ppl_q * se(nll_q)) ** 2 + (ppl_p * se(nll_p)) ** 2 - 2 * ppl_q * ppl_p * cov
        ),
    }


def test_kld_statistics_equal_a_numpy_oracle_over_full_logits(int8_bundle, bundle, text_file):
    from edgegpt.tokenizer import encode
    from edgegpt.runtime.model.bundle import Bundle

    result = evaluate_bundle(int8_bundle, text_file, reference=bundle, max_tokens=700, prompts=0)
    ids = encode(Bundle.load(bundle).tokenizer, text_file.read_text())[:701]
    expected = _kld_oracle(int8_bundle, bundle, ids, 64)
    kld = result["kld"]
    assert kld["scoring"] == "half" and kld["windows"] == {"size": 64, "stride": 64, "count": 10, "scored_from": 32}
    assert kld["scored_tokens"] == expected["scored_tokens"] == 10 * 31
    for name, value in expected.items():
        assert kld[name] == pytest.approx(float(value), rel=1e-6, abs=1e-12), name
    assert 0 < kld["mean"] < kld["p99"] <= kld["max"] and kld["same_top_percent"] < 100  # int8 differs, a little
    # the perplexity fields keep their sliding windows: every token scored once
    assert result["scored_tokens"] == 700 and result["windows"]["stride"] == 32


def test_sliding_scoring_compares_on_the_perplexity_windows(int8_bundle, bundle, text_file):
    result = evaluate_bundle(int8_bundle, text_file, reference=bundle, max_tokens=300, prompts=0, scoring="sliding")
    kld = result["kld"]
    assert kld["scoring"] == "sliding" and kld["windows"] == result["windows"]
    assert kld["scored_tokens"] == result["scored_tokens"] == 300
    assert kld["ppl"] == pytest.approx(result["perplexity"], rel=1e-9)
    assert kld["reference_ppl"] == pytest.approx(result["reference"]["perplexity"], rel=1e-9)
    assert kld["same_top_percent"] == pytest.approx(100 * result["top1_agreement"])
    with pytest.raises(ConfigError, match="scoring must be one of half, sliding"):
        evaluate_bundle(int8_bundle, text_file, reference=bundle, scoring="chunks")


def test_perplexity_equals_pytorch_on_the_same_windows(bundle, text_file, tiny_checkpoint):
    import torch

    from edgegpt.train.checkpoint import load_checkpoint
    from edgegpt.tokenizer import encode

    ckpt = load_checkpoint(tiny_checkpoint)
    result = evaluate_bundle(bundle, text_file, stride=24, max_tokens=700)
    ids = encode(ckpt.tokenizer, text_file.read_text())[:701]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, length, offset in sliding_windows(len(ids), ckpt.config.block_size, 24):
            x = torch.tensor([ids[start : start + length]])
            y = torch.tensor(ids[start + 1 : start + length + 1])
            logp = torch.log_softmax(ckpt.model(x)[0][0].double(), -1)
            nll -= float(logp[torch.arange(length), y][offset:].sum())
            count += length - offset
    assert result["scored_tokens"] == count == 700
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["windows"] == {"size": 64, "stride": 24, "count": len(sliding_windows(701, 64, 24))}


def test_a_bundle_agrees_with_itself(bundle, text_file):
    result = evaluate_bundle(bundle, text_file, reference=bundle, max_tokens=300, prompts=2, new_tokens=8)
    assert result["top1_agreement"] == 1.0 and result["ppl_increase_percent"] == 0.0
    assert result["perplexity"] == result["reference"]["perplexity"]
    assert result["greedy"] == {
        "prompts": 2,
        "prompt_tokens": 32,
        "new_tokens": 8,
        "token_agreement": 1.0,
        "prefix_agreement": 1.0,
        "identical_sequences": 2,
    }
    kld = result["kld"]
    assert kld["mean"] == kld["max"] == kld["rms_dp_percent"] == kld["ppl_difference"] == 0.0
    assert kld["same_top_percent"] == 100.0 and kld["mean_uncertainty"] == 0.0
    assert result["model_bytes"] == (bundle / "model.onnx").stat().st_size < result["bundle_bytes"]
    assert result["format"] == "fp32" and result["text"]["tokens"] == 301
    json.dumps(result)  # JSON-ready


def test_tail_and_bad_arguments(bundle, text_file, tmp_path):
    full = evaluate_bundle(bundle, text_file, max_tokens=50)
    tail = evaluate_bundle(bundle, text_file, tail=0.1)
    assert tail["text"]["characters"] == 600 and tail["text"]["tokens"] < full["text"]["characters"] / 5
    with pytest.raises(ConfigError, match="tail"):
        evaluate_bundle(bundle, text_file, tail=1.5)
    with pytest.raises(ConfigError, match="stride"):
        evaluate_bundle(bundle, text_file, stride=65)
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(DataError, match="at least 2"):
        evaluate_bundle(bundle, tmp_path / "one.txt")


def test_reference_of_another_model_is_refused(bundle, text_file, tiny_checkpoint, tmp_path):
    import torch

    from edgegpt.train.checkpoint import load_checkpoint, save_checkpoint
    from edgegpt.config import GPTConfig
    from edgegpt.export import export_bundle
    from edgegpt.train.model import SimpleGPT

    ckpt = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(1)
    other = SimpleGPT(GPTConfig(**{**ckpt.config.to_dict(), "n_layer": 1}))
    path = save_checkpoint(tmp_path / "ckpt", other, ckpt.tokenizer.to_str())
    with pytest.raises(ConfigError, match="not the same model"):
        evaluate_bundle(bundle, text_file, reference=export_bundle(path, tmp_path / "other", validate=False))


def test_cli_eval_json_text_and_errors(bundle, int8_bundle, text_file):
    runner = CliRunner()
    help_text = runner.invoke(eval_cmd, ["--help"]).output
    assert "Measure a bundle" in help_text and "Examples:" in help_text and "--reference" in help_text
    assert "--scoring [half|sliding]" in help_text and "KL-divergence" in help_text
    result = runner.invoke(
        eval_cmd,
        [
            str(bundle),
            "--text",
            str(text_file),
            "--reference",
            str(bundle),
            "--json",
            "--max-tokens",
            "200",
            "--prompts",
            "1",
            "--new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["top1_agreement"] == 1.0 and data["scored_tokens"] == 200
    assert data["kld"]["mean"] == 0.0 and data["kld"]["scoring"] == "half"
    assert "evaluating" in result.stderr  # the progress bar (click draws only its label when stderr is no terminal)
    human = runner.invoke(
        eval_cmd,
        [
            str(int8_bundle),
            "--text",
            str(text_file),
            "--reference",
            str(bundle),
            "--max-tokens",
            "300",
            "--prompts",
            "0",
            "--scoring",
            "sliding",
        ],
    )
    assert human.exit_code == 0, human.output
    assert "KL divergence vs reference (the 9 sliding windows, 300 tokens): mean " in human.stdout
    assert "same top " in human.stdout and "RMS Δp " in human.stdout and "PPL(Q)-PPL(base) " in human.stdout
    assert runner.invoke(eval_cmd, [str(bundle), "--text", str(text_file), "--scoring", "chunks"]).exit_code == 2
    from edgegpt.cli import main

    quiet = runner.invoke(
        main,
        [
            "--quiet",
            "eval",
            str(bundle),
            "--text",
            str(text_file),
            "--reference",
            str(bundle),
            "--max-tokens",
            "100",
            "--prompts",
            "0",
        ],
    )
    assert quiet.exit_code == 0 and quiet.stderr == "" and "KL divergence" in quiet.stdout
    human = runner.invoke(eval_cmd, [str(bundle), "--text", str(text_file), "--max-tokens", "100"])
    assert human.exit_code == 0 and "perplexity" in human.output and "(fp32)" in human.output
    assert runner.invoke(eval_cmd, [str(bundle), "--text", str(text_file), "--tail", "2"]).exit_code == 2


def test_evaluation_runs_without_torch(bundle, text_file):
    code = (
        "import sys; from edgegpt.runtime.generation.evaluate import evaluate_bundle; "
        f"r = evaluate_bundle({str(bundle)!r}, {str(text_file)!r}, reference={str(bundle)!r}, max_tokens=100, prompts=1); "
        "assert r['top1_agreement'] == 1.0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
