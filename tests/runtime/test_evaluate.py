"""edgegpt.runtime.generation.evaluate: sliding-window perplexity equal to PyTorch's, agreement, sizes, the `eval` CLI, no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgegpt.errors import ConfigError, DataError
from edgegpt.runtime.generation.evaluate import sliding_windows, evaluate_bundle
from edgegpt.cli.generate import eval_command as eval_cmd


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from edgegpt.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("eval") / "fp32", validate=False)


@pytest.fixture(scope="module")
def text_file(sample_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(sample_text[-6000:])
    return path


@pytest.mark.parametrize("n, size, stride", [(10, 4, 2), (100, 16, 8), (100, 16, 16), (17, 16, 5), (2, 16, 8), (50, 8, 3)])
def test_windows_score_every_target_once_with_enough_context(n, size, stride):
    scored = []
    for k, (start, length, offset) in enumerate(sliding_windows(n, size, stride)):
        assert 1 <= length <= size and start + length <= n - 1 and 0 <= offset < length
        targets = [start + j + 1 for j in range(offset, length)]
        scored += targets
        if k:
            assert min(t - start for t in targets) >= size - stride  # context of each scored target
    assert scored == list(range(1, n))


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
    assert result["greedy"] == {"prompts": 2, "prompt_tokens": 32, "new_tokens": 8, "token_agreement": 1.0,
                                "prefix_agreement": 1.0, "identical_sequences": 2}
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


def test_cli_eval_json_text_and_errors(bundle, text_file):
    runner = CliRunner()
    help_text = runner.invoke(eval_cmd, ["--help"]).output
    assert "Measure a bundle" in help_text and "Examples:" in help_text and "--reference" in help_text
    result = runner.invoke(eval_cmd, [str(bundle), "--text", str(text_file), "--reference", str(bundle), "--json",
                                      "--max-tokens", "200", "--prompts", "1", "--new-tokens", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["top1_agreement"] == 1.0 and data["scored_tokens"] == 200
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
