"""The Llama family's ONNX graph: GroupQueryAttention with n_kv_head < n_head and the rotary inside the kernel,
RMSNorm fused into (Skip)SimplifiedLayerNormalization, Qwen3's q/k norm before the kernel, validated against
PyTorch by export_bundle itself (parity cases and the greedy check) and then run by the runtime."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from edgegpt.config import GPTConfig
from edgegpt.train.checkpoint import save_checkpoint
from edgegpt.train.model import SimpleGPT

LLAMA = dict(
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=64,
    block_size=32,
    n_inner=96,
    norm="rmsnorm",
    position="rope",
    mlp="swiglu",
    bias=False,
)
CASES = {
    "smollm2-like": dict(rope_theta=100000.0),
    "qwen3-like": dict(qk_norm=True, head_dim=32, rope_theta=1000000.0, norm_eps=1e-6),
    "llama3.2-like": dict(
        rope_scaling="llama3",
        rope_factor=32.0,
        rope_original_max_positions=16,
        tied_head=False,
        qkv_bias=True,
        rope_theta=500000.0,
    ),
    "multi-query": dict(n_kv_head=1),  # one key/value head serves all four query heads
}


@pytest.fixture(scope="module", params=list(CASES))
def bundle(request, tmp_path_factory, tiny_tokenizer):
    from edgegpt.export import export_bundle

    config = GPTConfig(**{**LLAMA, **CASES[request.param]}, vocab_size=tiny_tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = SimpleGPT(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1 and biases at 0: perturb them so a swapped name shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(request.param)
    ckpt = save_checkpoint(root / "ckpt", model, tiny_tokenizer.to_str())
    return model, export_bundle(ckpt, root / "bundle")


def test_the_graph_is_the_fused_gqa_graph(bundle):
    model, path = bundle
    config = model.config
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    gqa = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert len(gqa) == config.n_layer
    assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"], attrs["rotary_interleaved"]) == (
        4,
        config.kv_heads,
        1,
        0,
    )
    caches = {i.name: list(i.dims) for i in graph.graph.initializer if i.name in gqa[0].input[7:9]}
    # one pair for every layer, a row past the context for SlotBatch's scratch column
    assert sorted(caches.values()) == [[config.block_size + 1, config.head_size // 2]] * 2
    past = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert past["past_key_values.0.key"][1] == config.kv_heads and "position_ids" in past
    ops = json.loads((path / "manifest.json").read_text())["optimization"]["op_counts_after"]
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * config.n_layer
    assert ops["SimplifiedLayerNormalization"] == 1 + (2 * config.n_layer if config.qk_norm else 0)
    assert not {"LayerNormalization", "SkipLayerNormalization", "FastGelu"} & set(ops)


def test_multi_query_attention_is_refused_by_mha_only():
    from edgegpt.errors import ExportError
    from edgegpt.export.onnx_export import check_attention

    check_attention(GPTConfig(**{**LLAMA, "n_kv_head": 1}), "gqa")
    with pytest.raises(ExportError, match="attention='gqa'"):
        check_attention(GPTConfig(**{**LLAMA, "n_kv_head": 1}), "mha")


def test_validation_passed_and_the_runtime_decodes_like_pytorch(bundle):
    from edgegpt.runtime import Generator
    from edgegpt.train.generate import generate

    model, path = bundle
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["validation"]["max_abs_diff"] <= 1e-4 and manifest["graph"]["kv_cache"]["layout"] == "shared_buffer"
    assert (
        json.loads((path / "genai_config.json").read_text())["model"]["decoder"]["num_key_value_heads"]
        == model.config.kv_heads
    )
    gen = Generator.load(path, provider="cpu")
    result = gen.generate("def add(a, b):", max_new_tokens=12)
    ids = torch.tensor([result.prompt_tokens])
    with torch.no_grad():
        want = generate(model, ids, max_new_tokens=12, eos_token_id=gen.eot_id)[0, ids.size(1) :].tolist()
    assert result.tokens == want[: len(result.tokens)] and len(result.tokens) >= 1


def test_the_manifest_records_an_imported_models_bos_and_stop_ids():
    from edgegpt.export import _tokenizer_section

    config = GPTConfig(**LLAMA, vocab_size=300)
    section = _tokenizer_section(
        config, "tokenizer.json", 300, 0, ({"add_bos_token": True}, {"bos_token_id": 1, "eos_token_id": [2, 3]})
    )
    assert (section["bos_token_id"], section["add_bos_token"], section["stop_token_ids"]) == (1, True, [2, 3])
    assert set(_tokenizer_section(config, "tokenizer.json", 300, 0)) == {
        "file",
        "vocab_size",
        "eot_token_id",
        "sampled_vocab_size",
    }


@pytest.mark.parametrize("to", ["int8", "int4"])
def test_a_llama_bundle_quantizes_and_generates(bundle, to, tmp_path):
    from edgegpt.export import quantize_bundle
    from edgegpt.runtime import Generator

    model, path = bundle
    if model.config.qk_norm or not model.config.tied_head:
        pytest.skip("one family member is enough here")
    out = quantize_bundle(path, tmp_path / to, to=to)
    assert len(Generator.load(out, provider="cpu").generate("def add(", max_new_tokens=4).tokens) >= 1


def test_a_norm_left_unfused_is_named_by_the_fused_op_check():
    from edgegpt.export.optimize import fused_op_shortfall

    config = GPTConfig(**LLAMA, vocab_size=300)
    fused = {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1}
    assert fused_op_shortfall(fused, config, "GroupQueryAttention") == {}
    # one norm traced but not fused: three of the four norms fused, its mean square and root left behind
    unfused = {**fused, "SkipSimplifiedLayerNormalization": 3, "ReduceMean": 1, "Sqrt": 1, "Reciprocal": 1, "Pow": 1}
    assert fused_op_shortfall(unfused, config, "GroupQueryAttention") == {
        "SkipSimplifiedLayerNormalization": (3, 4),
        "ReduceMean": (1, 0),
        "Pow": (1, 0),
        "Sqrt": (1, 0),
        "Reciprocal": (1, 0),
    }
