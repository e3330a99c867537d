"""Shared fixtures: a tiny random-weight checkpoint (seeded) that export and runtime tests build on, its
"lively" variant and that variant's bundles, and the reference greedy decoders (PyTorch, onnxruntime-genai).

Long end-to-end tests (training runs, the bench, the quantization gates, CLI and base-venv subprocess
runs) carry `@pytest.mark.slow`. `make test` and CI run everything; to skip them locally:

    .venv/bin/python -m pytest -m "not slow"
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

TINY_VOCAB = 320


def pytest_collection_modifyitems(config, items):
    """CUDA tests skip unless onnxruntime offers the CUDA execution provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    skip = pytest.mark.skip(reason="CUDAExecutionProvider not available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _sample_text(limit: int = 200_000) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text() for name in ("json/decoder.py", "textwrap.py", "string.py", "shlex.py")]
    return "\n".join(parts)[:limit]


@pytest.fixture(scope="session")
def sample_text() -> str:
    """A few stdlib modules' source: real text, present on every machine."""
    return _sample_text()


@pytest.fixture(scope="session")
def tiny_tokenizer(sample_text):
    from edgegpt.tokenizer import train_tokenizer

    return train_tokenizer([sample_text], vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_config(tiny_tokenizer):
    from edgegpt.config import GPTConfig

    return GPTConfig.preset("tiny", vocab_size=tiny_tokenizer.get_vocab_size())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config, tiny_tokenizer) -> Path:
    """A seeded random-weight `tiny` checkpoint directory (not trained: parity does not need training)."""
    import torch

    from edgegpt.train.checkpoint import save_checkpoint
    from edgegpt.train.model import SimpleGPT

    torch.manual_seed(0)
    model = SimpleGPT(tiny_config)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model, tiny_tokenizer.to_str())


@pytest.fixture(scope="session")
def lively_checkpoint(tiny_checkpoint, tmp_path_factory):
    """(model, checkpoint dir): the tiny checkpoint's matrices redrawn with std 0.15, so greedy tokens vary
    (the seeded tiny model repeats one token)."""
    import torch

    from edgegpt.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ckpt.model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    path = save_checkpoint(tmp_path_factory.mktemp("lively") / "checkpoint", ckpt.model, ckpt.tokenizer.to_str())
    return ckpt.model.eval(), path


@pytest.fixture(scope="session")
def lively_mha_bundle(lively_checkpoint, tmp_path_factory) -> Path:
    """The lively checkpoint's "mha" bundle (KV layout "concat"), validated on export."""
    from edgegpt.export import export_bundle

    return export_bundle(lively_checkpoint[1], tmp_path_factory.mktemp("lively_mha") / "bundle", attention="mha")


@pytest.fixture(scope="session")
def lively_gqa_bundle(lively_checkpoint, tmp_path_factory) -> Path:
    """The lively checkpoint's "gqa" bundle (KV layout "shared_buffer"), validated on export."""
    from edgegpt.export import export_bundle

    return export_bundle(lively_checkpoint[1], tmp_path_factory.mktemp("lively_gqa") / "bundle", attention="gqa")


@pytest.fixture(scope="session")
def lively_int8_bundle(lively_gqa_bundle, tmp_path_factory) -> Path:
    """The lively "gqa" bundle quantized to int8 with the default (row-local, batch-invariant) kernel."""
    from edgegpt.export import quantize_bundle

    return quantize_bundle(lively_gqa_bundle, tmp_path_factory.mktemp("lively_int8") / "bundle", to="int8", threads=2)


@pytest.fixture(scope="session")
def lively_int4_bundle(lively_gqa_bundle, tmp_path_factory) -> Path:
    """The lively "gqa" bundle quantized to int4 (MatMulNBits, block 32)."""
    from edgegpt.export import quantize_bundle

    return quantize_bundle(lively_gqa_bundle, tmp_path_factory.mktemp("lively_int4") / "bundle", to="int4", threads=2)


@pytest.fixture(scope="session")
def torch_greedy():
    """`torch_greedy(model, ids, n)`: the n token ids PyTorch's greedy `generate` appends to the prompt `ids`."""
    import torch

    from edgegpt.train.generate import generate

    def run(model, ids: list[int], n: int) -> list[int]:
        return generate(model, torch.tensor([ids]), n)[0, len(ids) :].tolist()

    return run


@pytest.fixture(scope="session")
def genai_greedy():
    """`genai_greedy(bundle, ids, n)`: the token ids onnxruntime-genai's greedy search appends to the prompt `ids`,
    at most n (it stops early at end of text). Skips the test when onnxruntime-genai is not installed."""

    def run(bundle: Path, ids: list[int], n: int) -> list[int]:
        og = pytest.importorskip("onnxruntime_genai")
        model = og.Model(str(bundle))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)][len(ids) :]

    return run


@pytest.fixture(scope="session")
def base_venv_bin() -> Path:
    """The bin/ folder of the base (device) install without torch, which `make test` builds and names in
    EDGEGPT_BASE_VENV; the test skips without it (fails in CI, where it must be there)."""
    venv = os.environ.get("EDGEGPT_BASE_VENV")
    if not venv:
        if os.environ.get("CI") == "true":
            pytest.fail("EDGEGPT_BASE_VENV is unset in CI; run the suite with `make test`")
        pytest.skip("EDGEGPT_BASE_VENV is unset (`make test` sets it)")
    return Path(venv) / ("Scripts" if sys.platform == "win32" else "bin")


# The Llama family's test shape (tests/export/test_export_llama.py's LLAMA, with a longer context for evaluation).
TINY_LLAMA = dict(
    n_layer=2, n_head=4, n_embd=64, block_size=64, n_inner=96, norm="rmsnorm", position="rope", mlp="swiglu", bias=False
)


@pytest.fixture(scope="session")
def llama_texts(sample_text, tmp_path_factory) -> tuple[Path, Path]:
    """(training text, held-out text): the sample text split 90 / 10."""
    root = tmp_path_factory.mktemp("llama_text")
    cut = int(len(sample_text) * 0.9)
    (root / "train.txt").write_text(sample_text[:cut])
    (root / "held_out.txt").write_text(sample_text[cut:])
    return root / "train.txt", root / "held_out.txt"


@pytest.fixture(scope="session")
def llama_bundles(tiny_tokenizer, llama_texts, tmp_path_factory) -> dict[str, Path]:
    """Two briefly trained tiny Llama-family fp32 bundles of the same tokenizer (150 steps, ~20 s each on one
    thread): "tied" (2 KV heads, lm_head tied to the embedding) and "untied" (1 KV head: multi-query attention,
    its own lm_head). Trained, so that quantization gates and agreement are measured on real preferences."""
    import numpy as np
    import torch

    from edgegpt.config import GPTConfig
    from edgegpt.export import export_bundle
    from edgegpt.tokenizer import encode
    from edgegpt.train import TrainConfig, train
    from edgegpt.train.model import SimpleGPT

    ids = np.asarray(encode(tiny_tokenizer, llama_texts[0].read_text()), np.uint16)
    cut = int(len(ids) * 0.95)
    cfg = TrainConfig(
        steps=150,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=10,
        eval_interval=150,
        eval_iters=2,
        save_interval=10_000,
        log_interval=50,
        seed=0,
    )
    shapes = {"tied": dict(n_kv_head=2), "untied": dict(n_kv_head=1, tied_head=False)}
    root, bundles, threads = tmp_path_factory.mktemp("llama"), {}, torch.get_num_threads()
    torch.set_num_threads(1)  # two threads spin against each other when the 2 cores are busy: 30x slower
    try:
        for name, shape in shapes.items():
            config = GPTConfig(**TINY_LLAMA, **shape, vocab_size=tiny_tokenizer.get_vocab_size())
            torch.manual_seed(0)
            train(SimpleGPT(config), ids[:cut], ids[cut:], cfg, root / name, tiny_tokenizer.to_str(), progress=False)
            bundles[name] = export_bundle(root / name / "checkpoint", root / f"{name}-fp32")
    finally:
        torch.set_num_threads(threads)
    return bundles
