"""The GroupQueryAttention graph and its KV layout "shared_buffer", end to end.

Export (parity with PyTorch, greedy tokens, manifest and genai config), the refusal of head sizes the
kernel cannot run, and the runtime: generate / batch / stream / sliding window / threads on the "gqa"
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
from edgegpt.train.generate import generate
from edgegpt.runtime import Bundle, Generator
from edgegpt.runtime import binding as binding_module
from edgegpt.runtime.kv_cache import SharedBufferKVCache

PROMPTS = [[11, 42, 7], [5], list(range(100, 130)), [9, 8, 7, 6, 5, 4]]


@pytest.fixture(scope="module")
def gqa_bundle(lively_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(lively_checkpoint[1], tmp_path_factory.mktemp("gqa") / "bundle", attention="gqa")  # validated


@pytest.fixture(scope="module")
def mha_bundle(lively_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(lively_checkpoint[1], tmp_path_factory.mktemp("mha") / "bundle", attention="mha", validate=False)


@pytest.fixture(scope="module")
def gqa(gqa_bundle) -> Generator:
    return Generator.load(gqa_bundle, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def mha(mha_bundle) -> Generator:
    return Generator.load(mha_bundle, provider="cpu", threads=1)


def _torch_greedy(model, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), n)[0, len(ids) :].tolist()


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
        assert {"chunk_b1_t5_p59", "left_padded_prefill_b3_t12", "left_padded_decode_b3_p12", "decode_b3_p32"} <= set(cases)
        assert not any(name.startswith("chunk_b3") for name in cases)  # the kernel's limit (validate.py)
    assert validation["max_abs_diff"] <= validate.ATOL
    assert validation["greedy"]["shared_buffer"] is True and validation["greedy"]["new_tokens"] == 32
    genai = json.loads((gqa_bundle / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True and genai["model"]["type"] == "decoder"


@pytest.mark.parametrize(
    "batch, new, past, pads", [(1, 64, 0, ()), (3, 1, 20, ()), (1, 4, 30, ()), (3, 10, 0, (0, 3, 6)), (3, 1, 10, (0, 3, 6))]
)
def test_gqa_parity_with_pytorch(lively_checkpoint, gqa_bundle, batch, new, past, pads):
    model, sess = lively_checkpoint[0], validate.session(gqa_bundle / "model.onnx")
    case = validate.Case("t", batch, new, past, pads)
    diffs = validate._case_diffs(model, sess, case, seed=batch * 100 + new + past)
    assert max(diffs.values()) <= validate.ATOL, diffs


def test_shared_buffer_greedy_equals_pytorch_and_concat_use(lively_checkpoint, gqa_bundle):
    model = lively_checkpoint[0]
    sess = validate.session(gqa_bundle / "model.onnx")
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = _torch_greedy(model, prompt[0].tolist(), 32)
    assert len(set(expected)) >= 5
    shared, _ = validate.greedy_onnx(sess, prompt.numpy(), 32, model.config, shared_buffer=True)
    grown, _ = validate.greedy_onnx(sess, prompt.numpy(), 32, model.config)  # past of exactly P positions
    assert shared[0].tolist() == grown[0].tolist() == expected


def test_head_size_not_a_multiple_of_8_is_refused_before_export(tiny_tokenizer, tmp_path, monkeypatch):
    from edgegpt.config import GPTConfig
    from edgegpt.train.model import SimpleGPT

    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=4, n_embd=48, block_size=16, vocab_size=tiny_tokenizer.get_vocab_size())
    ckpt = save_checkpoint(tmp_path / "ckpt", SimpleGPT(config), tiny_tokenizer.to_str())
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: pytest.fail("export work started"))
    with pytest.raises(ExportError, match=r"head_size .*= 12\) to be a multiple of 8.*attention='mha'.*n_head in \[1, 2, 3, 6\]"):
        export_bundle(ckpt, tmp_path / "bundle", attention="gqa")
    with pytest.raises(ExportError, match="attention 'flash' is not supported; choose one of mha, gqa"):
        export_bundle(ckpt, tmp_path / "bundle", attention="flash")
    assert not (tmp_path / "bundle").exists()


def test_cli_attention_option(lively_checkpoint, gqa_bundle, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(export_cmd, ["--help"]).output
    assert "--attention [mha|gqa]" in help_text
    assert runner.invoke(export_cmd, [str(lively_checkpoint[1]), "-o", str(tmp_path / "b"), "--attention", "flash"]).exit_code == 2


def test_onnxruntime_genai_runs_the_shared_buffer_graph(lively_checkpoint, gqa_bundle):
    og = pytest.importorskip("onnxruntime_genai")
    model = lively_checkpoint[0]
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))[0].tolist()
    genai_model = og.Model(str(gqa_bundle))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 32)
    gen = og.Generator(genai_model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    tokens = [int(t) for t in gen.get_sequence(0)][len(prompt) :]
    assert tokens == _torch_greedy(model, prompt, 32)[: len(tokens)] and len(tokens) >= 16


# --- runtime ---------------------------------------------------------------------------------------------


def test_bundle_load_reads_the_shared_buffer_layout(gqa):
    assert gqa.bundle.kv.layout == "shared_buffer" and isinstance(gqa._new_kv_cache(), SharedBufferKVCache)


def test_generate_equals_the_mha_bundle_and_pytorch(gqa, mha, lively_checkpoint):
    for ids in PROMPTS:
        tokens = gqa.generate_ids(ids, max_new_tokens=24, ignore_eos=True).tokens
        assert tokens == mha.generate_ids(ids, max_new_tokens=24, ignore_eos=True).tokens == _torch_greedy(lively_checkpoint[0], ids, 24)


def test_left_padded_batch_equals_each_prompt_alone(gqa, mha):
    batch = gqa.generate_batch(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [r.tokens for r in batch] == [r.tokens for r in mha.generate_batch(PROMPTS, max_new_tokens=16, ignore_eos=True)]
    assert [r.tokens for r in batch] == [gqa.generate_ids(p, max_new_tokens=16, ignore_eos=True).tokens for p in PROMPTS]
    knobs = dict(max_new_tokens=12, temperature=0.9, top_k=50, seed=3, ignore_eos=True)
    assert [r.tokens for r in gqa.generate_batch(PROMPTS, **knobs)] == [gqa.generate_ids(p, **knobs).tokens for p in PROMPTS]


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


def test_buffers_and_logits_are_allocated_once_and_written_in_place(gqa, monkeypatch):
    allocations = []
    allocate = binding_module.Binding.allocate

    def counting(self, shape, dtype):
        allocations.append(shape)
        return allocate(self, shape, dtype)

    monkeypatch.setattr(binding_module.Binding, "allocate", counting)
    request = gqa._request([[11, 42, 7], [5, 6]], None, dict(max_new_tokens=10, ignore_eos=True), 0.0)
    pointers, logits_pointers = [], set()
    for _ in request:
        pointers.append([buffer.data_ptr() for buffer in request.cache.buffers])
        logits_pointers.add(request.logits.ctypes.data)
    cfg = gqa.config
    # One (B, H, prompt + new, D) buffer per key/value and layer, allocated at the prefill, never again.
    assert allocations == [(2, cfg.n_head, 3 + 10, cfg.head_size)] * (2 * cfg.n_layer)
    assert len(pointers) == 10 and all(step == pointers[0] for step in pointers)
    assert len(logits_pointers) == 2  # one host array for the prefill's logits, one for every decode step
    assert request.cache.length == 3 + 9  # the prompt and the 9 tokens fed back, in a buffer of 13 positions


def test_shared_buffer_capacity_follows_the_request(gqa):
    block = gqa.config.block_size
    for knobs, capacity in [
        (dict(max_new_tokens=5), 3 + 5),
        (dict(max_new_tokens=None), block),
        (dict(max_new_tokens=5, sliding_window=True), block),
    ]:
        request = gqa._request([[11, 42, 7]], None, dict(ignore_eos=True, **knobs), 0.0)
        next(iter(request))
        assert request.cache.shape == (1, gqa.config.n_head, capacity, gqa.config.head_size), knobs


def test_shared_buffer_cache_contents_match_pytorch(gqa, lively_checkpoint):
    model = lively_checkpoint[0]
    request = gqa._request([[11, 42, 7, 9]], None, dict(max_new_tokens=6, ignore_eos=True), 0.0)
    for _ in request:
        pass
    length = request.cache.length  # 4 prompt + 5 fed back
    ids = torch.tensor([[11, 42, 7, 9] + request.rows[0].tokens[:-1]])
    with torch.no_grad():
        cache = model(ids)[1]
    for layer in range(model.config.n_layer):
        for kv in range(2):
            got = np.asarray(request.cache.buffers[2 * layer + kv].numpy())[:, :, :length]
            assert np.abs(got - cache[layer][kv].numpy()).max() <= validate.ATOL


def test_public_iobinding_api_gives_the_same_tokens(gqa, monkeypatch):
    expected = [gqa.generate_ids(p, max_new_tokens=10, ignore_eos=True).tokens for p in PROMPTS]
    init = binding_module.Binding.__init__

    def public_only(self, *args):
        init(self, *args)
        self._fast = False

    monkeypatch.setattr(binding_module.Binding, "__init__", public_only)
    assert [gqa.generate_ids(p, max_new_tokens=10, ignore_eos=True).tokens for p in PROMPTS] == expected
    assert [r.tokens for r in gqa.generate_batch(PROMPTS, max_new_tokens=10, ignore_eos=True)] == expected


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
    with pytest.raises(BundleError, match=r"'shared_buffer' needs onnxruntime >= 1.22, this is 1.21.1.*attention='mha'"):
        Generator.load(gqa_bundle, provider="cpu")


def test_the_default_attention_is_the_same_everywhere():
    import inspect

    default = inspect.signature(export_bundle).parameters["attention"].default
    cli_default = next(p.default for p in export_cmd.params if p.name == "attention")
    assert default == cli_default == onnx_export.DEFAULT_ATTENTION
    assert onnx_export.kv_layout(default) in ("concat", "shared_buffer")
