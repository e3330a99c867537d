"""The GroupQueryAttention graph and its KV layout "shared_buffer", end to end.

Export (the validation recorded in the manifest, greedy tokens, genai config; the parity cases of both graphs
are in test_export.py), the refusal of head sizes the kernel cannot run, and the runtime: generate / batch / stream / sliding window / threads on the "gqa"
bundle give the "mha" bundle's tokens, and the cache buffers and logits are allocated once per request.
The models have larger random weights than the seeded tiny checkpoint so that greedy tokens vary.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgegpt.train.checkpoint import save_checkpoint
from edgegpt.errors import ExportError
from edgegpt.export import export_bundle, onnx_export, validate
from edgegpt.export.cli import export as export_cmd
from edgegpt.runtime import Bundle, Generator
from edgegpt.runtime.engine import binding as binding_module

PROMPTS = [[11, 42, 7], [5], list(range(100, 130)), [9, 8, 7, 6, 5, 4]]


@pytest.fixture(scope="module")
def gqa_bundle(lively_gqa_bundle) -> Path:
    return lively_gqa_bundle  # validated on export (tests/conftest.py)


@pytest.fixture(scope="module")
def mha_bundle(lively_mha_bundle) -> Path:
    return lively_mha_bundle


@pytest.fixture(scope="module")
def gqa(gqa_bundle) -> Generator:
    return Generator.load(gqa_bundle, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def mha(mha_bundle) -> Generator:
    return Generator.load(mha_bundle, provider="cpu", threads=1)


# --- export ----------------------------------------------------------------------------------------------


def test_gqa_bundle_manifest_graph_and_genai_config(gqa_bundle, lively_checkpoint):
    cfg = lively_checkpoint[0].config
    manifest = Bundle.load(gqa_bundle).manifest
    graph = manifest["graph"]
    assert graph["kv_cache"]["layout"] == "shared_buffer" and graph["attention"] == "com.microsoft.GroupQueryAttention"
    assert [i["name"] for i in graph["inputs"]] == onnx_export.input_names(cfg.n_layer)  # the same contract
    assert [o["name"] for o in graph["outputs"]] == onnx_export.output_names(cfg.n_layer)
    after = manifest["optimization"]["op_counts_after"]
    assert after["GroupQueryAttention"] == cfg.n_layer and "MultiHeadAttention" not in after
    assert after["SkipLayerNormalization"] == 2 * cfg.n_layer + 1 and after["FastGelu"] == cfg.n_layer
    validation = manifest["validation"]
    for stage in ("exported", "optimized"):
        cases = validation["parity"][stage]
        assert {"chunk_b1_t5_p59", "left_padded_prefill_b3_t12", "left_padded_decode_b3_p12", "decode_b3_p32"} <= set(
            cases
        )
        assert not any(name.startswith("chunk_b3") for name in cases)  # the kernel's limit (validate.py)
    assert validation["max_abs_diff"] <= validate.ATOL
    assert validation["greedy"]["shared_buffer"] is True and validation["greedy"]["new_tokens"] == 32
    genai = json.loads((gqa_bundle / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True and genai["model"]["type"] == "decoder"


def test_the_gqa_graph_also_decodes_with_a_growing_past(lively_checkpoint, gqa_bundle, torch_greedy):
    """Each present fed back as the next past of exactly P positions, the "concat" use; the shared buffer's
    greedy tokens are checked in test_export.py (test_greedy_32_tokens_equal_pytorch_generate)."""
    model = lively_checkpoint[0]
    sess = validate.session(gqa_bundle / "model.onnx")
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = torch_greedy(model, prompt[0].tolist(), 32)
    assert len(set(expected)) >= 5
    grown, _ = validate.greedy_onnx(sess, prompt.numpy(), 32, model.config)
    assert grown[0].tolist() == expected


def test_head_size_not_a_multiple_of_8_is_refused_before_export(tiny_tokenizer, tmp_path, monkeypatch):
    from edgegpt.config import GPTConfig
    from edgegpt.train.model import SimpleGPT

    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=4, n_embd=48, block_size=16, vocab_size=tiny_tokenizer.get_vocab_size())
    ckpt = save_checkpoint(tmp_path / "ckpt", SimpleGPT(config), tiny_tokenizer.to_str())
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: pytest.fail("export work started"))
    with pytest.raises(
        ExportError, match=r"head_size .*= 12\) to be a multiple of 8.*attention='mha'.*n_head in \[1, 2, 3, 6\]"
    ):
        export_bundle(ckpt, tmp_path / "bundle", attention="gqa")
    with pytest.raises(ExportError, match="attention 'flash' is not supported; choose one of mha, gqa"):
        export_bundle(ckpt, tmp_path / "bundle", attention="flash")
    assert not (tmp_path / "bundle").exists()


def test_cli_attention_option(lively_checkpoint, gqa_bundle, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(export_cmd, ["--help"]).output
    assert "--attention [mha|gqa]" in help_text
    assert (
        runner.invoke(
            export_cmd, [str(lively_checkpoint[1]), "-o", str(tmp_path / "b"), "--attention", "flash"]
        ).exit_code
        == 2
    )


def test_onnxruntime_genai_runs_the_shared_buffer_graph(lively_checkpoint, gqa_bundle, torch_greedy, genai_greedy):
    model = lively_checkpoint[0]
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))[0].tolist()
    tokens = genai_greedy(gqa_bundle, prompt, 32)
    assert tokens == torch_greedy(model, prompt, 32)[: len(tokens)] and len(tokens) >= 16


# --- runtime ---------------------------------------------------------------------------------------------


def test_bundle_load_reads_the_shared_buffer_layout(gqa, mha):
    assert gqa.bundle.kv.layout == "shared_buffer" and mha.bundle.kv.layout == "concat"


def test_generate_equals_the_mha_bundle_and_pytorch(gqa, mha, lively_checkpoint, torch_greedy):
    for ids in PROMPTS:
        tokens = gqa.generate_ids(ids, max_new_tokens=24, ignore_eos=True).tokens
        assert (
            tokens
            == mha.generate_ids(ids, max_new_tokens=24, ignore_eos=True).tokens
            == torch_greedy(lively_checkpoint[0], ids, 24)
        )


def test_left_padded_batch_equals_each_prompt_alone(gqa, mha):
    batch = gqa.generate_batch(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [r.tokens for r in batch] == [
        r.tokens for r in mha.generate_batch(PROMPTS, max_new_tokens=16, ignore_eos=True)
    ]
    assert [r.tokens for r in batch] == [
        gqa.generate_ids(p, max_new_tokens=16, ignore_eos=True).tokens for p in PROMPTS
    ]
    knobs = dict(max_new_tokens=12, temperature=0.9, top_k=50, seed=3, ignore_eos=True)
    assert [r.tokens for r in gqa.generate_batch(PROMPTS, **knobs)] == [
        gqa.generate_ids(p, **knobs).tokens for p in PROMPTS
    ]


def test_stream_and_sliding_window_equal_the_mha_bundle(gqa, mha):
    knobs = dict(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    assert list(gqa.stream("def parse(", **knobs)) == list(mha.stream("def parse(", **knobs))
    block = gqa.config.block_size
    window = dict(max_new_tokens=block + 10, ignore_eos=True, sliding_window=True)
    shifted = gqa.generate_ids([1, 2, 3], **window)
    assert shifted.context_shifts >= 1 and shifted.tokens == mha.generate_ids([1, 2, 3], **window).tokens
    long_prompt = list(range(1, 2 * block))
    clipped = dict(max_new_tokens=5, ignore_eos=True, sliding_window=True)
    assert gqa.generate_ids(long_prompt, **clipped).tokens == mha.generate_ids(long_prompt, **clipped).tokens
    full = gqa.generate_ids([1, 2, 3], max_new_tokens=None, ignore_eos=True)  # the buffer filled to block_size
    assert len(full.tokens) == block - 3
    assert full.tokens == mha.generate_ids([1, 2, 3], max_new_tokens=None, ignore_eos=True).tokens


@pytest.fixture
def allocations(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the device buffers allocated from now on (each "shared_buffer" key or value buffer)."""
    shapes = []
    allocate = binding_module.Binding.allocate

    def counting(self, shape, dtype):
        shapes.append(tuple(shape))
        return allocate(self, shape, dtype)

    monkeypatch.setattr(binding_module.Binding, "allocate", counting)
    return shapes


def test_buffers_and_logits_are_allocated_once_and_written_in_place(gqa, allocations):
    state = gqa.new_state(batch=2, capacity=3 + 10)
    logits = state.feed([[11, 42, 7], [5, 6]])
    logits_pointers = {logits.ctypes.data}
    for _ in range(9):
        logits = state.feed(logits.argmax(axis=1)[:, None])
        logits_pointers.add(logits.ctypes.data)
    cfg = gqa.config
    # One (B, H, capacity, D) buffer per key/value and layer, allocated with the state, never again.
    assert allocations == [(2, cfg.n_head, 3 + 10, cfg.head_size)] * (2 * cfg.n_layer)
    assert len(logits_pointers) == 2  # one host array for the prefill's logits, one for every decode step
    assert state.length == 3 + 9  # the prompt and 9 tokens fed back, in a buffer of 13 positions


def test_shared_buffer_capacity_follows_the_request(gqa, allocations):
    block, cfg = gqa.config.block_size, gqa.config
    for knobs, capacity in [
        (dict(max_new_tokens=5), 3 + 5),
        (dict(max_new_tokens=None), block),
        (dict(max_new_tokens=5, sliding_window=True), block),
    ]:
        allocations.clear()
        gqa.generate_ids([11, 42, 7], ignore_eos=True, **knobs)
        assert set(allocations) == {(1, cfg.n_head, capacity, cfg.head_size)}, knobs


def test_shared_buffer_decode_steps_match_pytorch(gqa, lively_checkpoint):
    """Each step's logits, read from the cache the kernel wrote in place, equal PyTorch's on the whole sequence."""
    model = lively_checkpoint[0]
    state = gqa.new_state()
    ids = [11, 42, 7, 9]
    logits = state.feed(ids)
    for _ in range(6):
        with torch.no_grad():
            expected = model(torch.tensor([ids]))[0][0, -1].numpy()
        assert np.abs(logits[0] - expected).max() <= validate.ATOL
        ids.append(int(logits[0].argmax()))
        logits = state.feed(ids[-1:])


def test_concurrent_requests_have_their_own_buffers(gqa):
    knobs = [dict(max_new_tokens=12, temperature=0.8 * (i % 2), seed=i, ignore_eos=True) for i in range(8)]
    jobs = [(PROMPTS[i % len(PROMPTS)], k) for i, k in enumerate(knobs)]
    serial = [gqa.generate_ids(p, **k).tokens for p, k in jobs]
    barrier = threading.Barrier(8)

    def run(job):
        barrier.wait()
        return gqa.generate_ids(job[0], **job[1]).tokens

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, jobs)) == serial


def test_old_onnxruntime_is_refused_with_the_fix(gqa_bundle, monkeypatch):
    import onnxruntime as ort

    from edgegpt.errors import BundleError

    monkeypatch.setattr(ort, "__version__", "1.21.1")  # 1.20 and 1.21 reject the graph's attention_bias input
    with pytest.raises(
        BundleError, match=r"'shared_buffer' needs onnxruntime >= 1.22, this is 1.21.1.*attention='mha'"
    ):
        Generator.load(gqa_bundle, provider="cpu")


def test_the_default_attention_is_the_same_everywhere():
    import inspect

    default = inspect.signature(export_bundle).parameters["attention"].default
    cli_default = next(p.default for p in export_cmd.params if p.name == "attention")
    assert default == cli_default == onnx_export.DEFAULT_ATTENTION
    assert onnx_export.kv_layout(default) in ("concat", "shared_buffer")
