import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import edgegpt.train.checkpoint as checkpoint_mod
from edgegpt.train.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from edgegpt.config import GPTConfig
from edgegpt.errors import CheckpointError
from edgegpt.files import aside
from edgegpt.train.model import SimpleGPT
from edgegpt.train.trainer import TrainConfig, train, weights_sha256

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320, dropout=0.1)


@pytest.fixture(autouse=True, scope="module")
def _vocab_matches(tiny_tokenizer):
    assert tiny_tokenizer.get_vocab_size() == CONFIG.vocab_size


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)


def _run(out, ids, tokenizer_json, steps, resume=False, **kw):
    cfg = TrainConfig(
        steps=steps,
        lr_decay_steps=8,
        warmup_steps=2,
        batch_size=4,
        eval_interval=100,
        eval_iters=2,
        save_interval=100,
        log_interval=1,
        seed=3,
        **kw,
    )
    torch.manual_seed(cfg.seed)
    return train(SimpleGPT(CONFIG), ids[:4000], ids[4000:], cfg, out, tokenizer_json, resume=resume, progress=False)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, ids, tiny_tokenizer):
    tok = tiny_tokenizer.to_str()
    straight = _run(tmp_path / "a", ids, tok, steps=8)
    first = _run(tmp_path / "b", ids, tok, steps=4)
    resumed = _run(tmp_path / "b", ids, tok, steps=8, resume=True)
    assert first.weights_sha256 != straight.weights_sha256
    assert resumed.step == straight.step == 8
    assert resumed.weights_sha256 == straight.weights_sha256
    assert resumed.train_loss == straight.train_loss
    assert load_train_state(tmp_path / "b")[1]["step"] == 8


@pytest.mark.slow
def test_training_reduces_loss_and_writes_metrics_and_plot(tmp_path, ids, tiny_tokenizer):
    # A learnable stream: a repeated pattern.
    pattern = np.tile(np.arange(64, dtype=np.uint16), 100)
    cfg = TrainConfig(
        steps=150, warmup_steps=5, batch_size=8, eval_interval=75, eval_iters=2, learning_rate=1e-2, log_interval=5
    )
    result = train(
        SimpleGPT(CONFIG), pattern[:5000], pattern[5000:], cfg, tmp_path, tiny_tokenizer.to_str(), progress=False
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.3 * losses[0]
    assert result.val_loss is not None and result.val_loss < 2.0
    assert all(r["tokens_per_s"] > 0 for r in records if "tokens_per_s" in r)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_checkpoint(tmp_path).config == CONFIG


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, tiny_tokenizer):
    torch.manual_seed(0)
    old = SimpleGPT(CONFIG)
    save_checkpoint(tmp_path / "ckpt", old, tiny_tokenizer.to_str())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", SimpleGPT(CONFIG), tiny_tokenizer.to_str())
    assert weights_sha256(load_checkpoint(tmp_path / "ckpt").model) == weights_sha256(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_kill_between_the_renames_recovers_the_previous_checkpoint(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    old = SimpleGPT(CONFIG)
    save_checkpoint(tmp_path / "ckpt", old, tiny_tokenizer.to_str())
    (tmp_path / "ckpt").rename(aside(tmp_path / "ckpt"))  # the state a SIGKILL mid-save can leave
    assert weights_sha256(load_checkpoint(tmp_path / "ckpt").model) == weights_sha256(old)


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "ckpt", SimpleGPT(CONFIG), tiny_tokenizer.to_str())
    (path / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "n_embd": 64}))
    with pytest.raises(CheckpointError, match="tok_emb.weight has shape .* but config.json implies"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def _cli(*args):
    return [sys.executable, "-m", "edgegpt.cli", *args]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, sample_text):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(sample_text)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])  # Ctrl-C, `kill`
def test_ctrl_c_and_sigterm_save_and_exit_cleanly(tmp_path, corpus_file, signum, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(
            "--quiet",
            "train",
            str(corpus_file),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--steps",
            "100000",
            "--batch-size",
            "2",
            "--log-interval",
            "1",
            "--eval-iters",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == code, stderr
    assert f"{name}: finishing this step, saving the checkpoint" in stderr
    assert "interrupted at step" in stderr and f"by {name}, checkpoint saved" in stderr
    step = load_train_state(out)[1]["step"]
    assert 0 < step < 100000
    assert load_checkpoint(out).model.num_params() > 0


@pytest.mark.slow
def test_two_process_data_parallel_training_ends_with_identical_weights(tmp_path, corpus_file):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "edgegpt.cli",
            "--quiet",
            "train",
            str(corpus_file),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--eval-iters",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = {line.split("weights ")[1].split()[0] for line in proc.stderr.splitlines() if "done at step 6" in line}
    ranks = [line for line in proc.stderr.splitlines() if "done at step 6" in line]
    assert len(ranks) == 2, proc.stderr[-3000:]
    assert len(hashes) == 1
    assert load_train_state(out)[1]["world_size"] == 2
