"""Training and checkpoints under kills, signals, a full disk, a second writer, bad flags and hostile files.

Each test stands for one item of the hardening issue: bad input gets one clear line that names the value and
the fix (no traceback), a non-zero exit, and loses nothing.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

import edgegpt.train.checkpoint as checkpoint_mod
import edgegpt.train.corpus as corpus_mod
import edgegpt.train.hf as hf_mod
import edgegpt.train.trainer as trainer_mod
from edgegpt import files
from edgegpt.cli import main
from edgegpt.errors import CheckpointError
from edgegpt.files import aside
from edgegpt.train.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from edgegpt.train.hf import export_hf, import_hf
from edgegpt.train.model import SimpleGPT
from edgegpt.train.trainer import TrainConfig, TrainResult, train, weights_sha256

TRAIN = ["--vocab-size", "300", "--batch-size", "2", "--eval-iters", "1", "--log-interval", "1"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, sample_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(sample_text[:40_000])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cli(*args: str):
    result = CliRunner().invoke(main, ["--quiet", *args])
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file, cache) -> Path:
    """A run directory at step 3, saved at every step."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = _cli(
        "train",
        str(corpus_file),
        "--out",
        str(out),
        "--steps",
        "3",
        "--save-interval",
        "1",
        "--cache-dir",
        str(cache),
        *TRAIN,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _staging_left(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or p.name.endswith(".previous"))


# ------------------------------------------------------------------ 2. a kill mid-save, then the next commands


def test_a_half_deleted_aside_does_not_break_later_saves(run, cache):
    stray = aside(run / "checkpoint")  # a SIGKILL while a save deleted the previous checkpoint
    (stray / "left").mkdir(parents=True)
    (stray / "left" / "model.safetensors").write_bytes(b"half")
    result = _cli(
        "train", "--out", str(run), "--resume", "--steps", "5", "--save-interval", "1", "--cache-dir", str(cache)
    )
    assert result.exit_code == 0, result.output
    assert "done at step 5" in result.output
    assert load_train_state(run)[1]["step"] == 5 and _staging_left(run) == []


@pytest.mark.parametrize("command", ["resume", "sample", "export", "sample-checkpoint", "export-checkpoint"])
def test_a_kill_between_the_two_renames_is_recovered_by_every_command(run, cache, tmp_path, command):
    before = weights_sha256(load_checkpoint(run).model)
    new = run / ".checkpoint.tmp-999999-0123abcd"  # the complete new copy, staged by a process now gone
    shutil.copytree(run / "checkpoint", new)
    (run / "checkpoint").rename(aside(run / "checkpoint"))  # the kill came between the two renames
    if command == "resume":
        result = _cli("train", "--out", str(run), "--resume", "--steps", "4", "--cache-dir", str(cache))
    elif command.startswith("sample"):  # RUN, or RUN/checkpoint, which is missing until recovered
        result = _cli("sample", str(run if command == "sample" else run / "checkpoint"), "def ", "-n", "4")
    else:
        result = _cli("export", str(run if command == "export" else run / "checkpoint"), "-o", str(tmp_path / "bundle"))
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint").is_dir() and not aside(run / "checkpoint").exists()
    if command == "resume":
        assert load_train_state(run)[1]["step"] == 4 and not new.exists()  # the dead writer's staging is gone too
    else:
        assert weights_sha256(load_checkpoint(run).model) == before


# ------------------------------------------------------------------ 4. SIGTERM saves like Ctrl-C


def test_sigterm_during_training_saves_and_reports_it(tmp_path, tiny_tokenizer, monkeypatch):
    from edgegpt.config import GPTConfig
    from edgegpt.train import data

    calls = {"n": 0}
    real = data.get_batch

    def batch_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler's pre-emption would
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "get_batch", batch_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    ids = torch.randint(0, 64, (3000,)).numpy().astype("uint16")
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tiny_tokenizer.get_vocab_size())
    cfg = TrainConfig(steps=1000, batch_size=2, eval_interval=1000, eval_iters=1, save_interval=1000, log_interval=1)
    result = train(SimpleGPT(config), ids[:2500], ids[2500:], cfg, tmp_path, tiny_tokenizer.to_str(), progress=False)
    assert result.interrupted and result.signal == signal.SIGTERM and result.step == 2
    assert load_train_state(tmp_path)[1]["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_the_cli_exits_143_after_sigterm_and_130_after_ctrl_c(tmp_path, monkeypatch):
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        stopped = TrainResult(7, 1.5, None, 10.0, True, "ab" * 32, signal=signum)
        monkeypatch.setattr(corpus_mod, "train_on_corpus", lambda *args, **kwargs: stopped)
        result = _cli("train", "--out", str(tmp_path / "r"))
        assert result.exit_code == code, result.output
        assert f"interrupted at step 7 by {signal.Signals(signum).name}, checkpoint saved" in result.output


# The signal sent to the `train` command itself: tests/train/test_trainer.py::test_ctrl_c_and_sigterm_save_and_exit_cleanly


# ------------------------------------------------------------------ 5. two trainers, one run directory


_HOLD = """
    import sys, time
    from edgegpt.files import run_lock
    with run_lock(sys.argv[1]):
        print("training", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("flags", [["--force"], ["--resume", "--steps", "5"]])
def test_a_second_train_into_a_running_run_is_refused_naming_the_first(run, cache, corpus_file, flags):
    before = weights_sha256(load_checkpoint(run).model)
    first = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLD), str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "training"
        result = _cli("train", str(corpus_file), "--out", str(run), "--cache-dir", str(cache), *flags)
        line = _one_line_error(result)
        assert f"LockError: {run}: another edgegpt train (pid {first.pid}) is writing to it" in line
    finally:
        first.kill()
        first.wait()
    assert weights_sha256(load_checkpoint(run).model) == before and load_train_state(run)[1]["step"] == 3


def test_a_second_train_into_a_new_run_is_refused_too(tmp_path, cache, corpus_file):
    out = tmp_path / "new"
    first = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLD), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "training"
        result = _cli("train", str(corpus_file), "--out", str(out), "--cache-dir", str(cache), "--steps", "2", *TRAIN)
        assert f"(pid {first.pid})" in _one_line_error(result)
    finally:
        first.kill()
        first.wait()
    assert not (out / "checkpoint").exists()


# ------------------------------------------------------------------ 8. --resume and the checkpoint's model


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--preset", "small"],
            "--preset small (n_layer 6, n_head 6, n_embd 384, block_size 256; the checkpoint has "
            "n_layer 2, n_head 2, n_embd 64, block_size 64)",
        ),
        (["--n-layer", "4"], "--n-layer 4 (the checkpoint has 2)"),
        (["--vocab-size", "8192"], "--vocab-size 8192 (the checkpoint has 300)"),
        (["--dropout", "0.2"], "--dropout 0.2 (the checkpoint has 0.0)"),
    ],
)
def test_resume_refuses_model_flags_that_contradict_the_checkpoint(run, cache, flags, expected):
    result = _cli("train", "--out", str(run), "--resume", "--steps", "5", "--cache-dir", str(cache), *flags)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Drop them to resume" in result.output
    assert load_train_state(run)[1]["step"] == 3


def test_resume_accepts_model_flags_that_agree_with_the_checkpoint(run, cache):
    result = _cli(
        "train",
        "--out",
        str(run),
        "--resume",
        "--steps",
        "4",
        "--cache-dir",
        str(cache),
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--n-layer",
        "2",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("steps, where", [("2", "past"), ("3", "at")])
def test_resume_says_when_the_run_is_already_past_the_requested_step(run, cache, steps, where):
    result = _cli("train", "--out", str(run), "--resume", "--steps", steps, "--cache-dir", str(cache))
    assert result.exit_code == 2, result.output
    assert f"the run is already at step 3, {where} the requested --steps {steps}" in result.output
    assert "pass --steps above 3" in result.output and "nan" not in result.output


# ------------------------------------------------------------------ 10. pickles that want to run code


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _refused(message: str) -> None:
    assert "refused" in message and "hostile" in message and ("os.system" in message or "posix.system" in message)
    assert "weights_only" not in message and "likely succeed" not in message and "safe_globals" not in message


def test_a_training_state_that_needs_full_pickle_is_refused_as_possibly_hostile(run, cache):
    torch.save({"optimizer": _Hostile(), "torch_rng": torch.get_rng_state()}, run / "checkpoint" / "train_state.pt")
    with pytest.raises(CheckpointError) as info:
        load_train_state(run)
    _refused(str(info.value))
    assert info.value.__cause__ is None and info.value.__context__ is None  # torch's advice is not in the chain
    result = _cli("--debug", "train", "--out", str(run), "--resume", "--steps", "5", "--cache-dir", str(cache))
    _refused(str(result.exception))
    _refused(_one_line_error(_cli("train", "--out", str(run), "--resume", "--steps", "5", "--cache-dir", str(cache))))


def test_a_hugging_face_pickle_that_needs_full_pickle_is_refused(tiny_checkpoint, tmp_path):
    src = export_hf(tiny_checkpoint, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Hostile()}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        import_hf(src, tmp_path / "ckpt")
    _refused(str(info.value))


# ------------------------------------------------------------------ 11. modes follow the umask


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    files._umask.cache_clear()
    yield request.param
    os.umask(old)
    files._umask.cache_clear()


def _modes(directory: Path) -> set[tuple[str, int]]:
    paths = [directory, *directory.rglob("*")]
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in paths}


def test_checkpoints_and_hf_exports_follow_the_umask(tiny_checkpoint, tiny_config, tiny_tokenizer, tmp_path, umask):
    torch.manual_seed(0)
    state = {"optimizer": {"state": {}, "param_groups": []}, "torch_rng": torch.get_rng_state()}
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        SimpleGPT(tiny_config),
        tiny_tokenizer.to_str(),
        optimizer_state=state,
        train_state={"step": 1},
    )
    hf = export_hf(tiny_checkpoint, tmp_path / "hf")
    expected = {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
    assert _modes(ckpt) == expected and _modes(hf) == expected


# ------------------------------------------------------------------ disk full: one line, the previous kept


def _disk_full_on(module, name: str, after: int = 0):
    """A replacement for module.name that fails like safetensors on a full disk, after `after` good calls."""
    real, calls = getattr(module, name), {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    return write


def _full_disk_line(line: str, path: Path, kept: str) -> None:
    assert f"StorageError: {path}: no space left on device (" in line and " free in " in line, line
    assert kept in line, line


def test_a_full_disk_while_training_saves_is_one_line_and_keeps_the_last_checkpoint(run, cache, monkeypatch):
    monkeypatch.setattr(checkpoint_mod, "save_file", _disk_full_on(checkpoint_mod, "save_file", after=1))
    result = _cli(
        "train", "--out", str(run), "--resume", "--steps", "8", "--save-interval", "1", "--cache-dir", str(cache)
    )
    _full_disk_line(_one_line_error(result), run / "checkpoint", "the previous checkpoint is unchanged")
    assert load_train_state(run)[1]["step"] == 4 and _staging_left(run) == []


def test_a_full_disk_while_caching_tokens_is_one_line(tmp_path, corpus_file, monkeypatch):
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if "tokens-" in os.fspath(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", replace)
    result = _cli(
        "train",
        str(corpus_file),
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--steps",
        "1",
        *TRAIN,
    )
    line = _one_line_error(result)
    assert "StorageError: " in line and ".uint16.bin: no space left on device (" in line and "--cache-dir" in line
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_full_disk_in_export_hf_and_import_hf_is_one_line_and_keeps_the_previous(
    tiny_checkpoint, tmp_path, monkeypatch
):
    hf = export_hf(tiny_checkpoint, tmp_path / "hf")
    ckpt = import_hf(hf, tmp_path / "ckpt")
    snapshot = lambda: {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()
    monkeypatch.setattr(hf_mod, "save_file", _disk_full_on(hf_mod, "save_file"))
    monkeypatch.setattr(checkpoint_mod, "save_file", _disk_full_on(checkpoint_mod, "save_file"))
    line = _one_line_error(_cli("export-hf", str(tiny_checkpoint), "-o", str(hf), "--force"))
    _full_disk_line(line, hf, "the previous hf is unchanged")
    line = _one_line_error(_cli("import-hf", str(hf), "-o", str(ckpt), "--force"))
    _full_disk_line(line, ckpt, "the previous ckpt is unchanged")
    assert snapshot() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
