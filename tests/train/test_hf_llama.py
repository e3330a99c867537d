"""edgegpt.train.hf for the Llama family: transformers' own classes with random weights are the oracle (no network).

Each case is a real model's config scaled down to 2 layers and 64 wide: SmolLM2-135M (Llama, GQA), Qwen2.5-0.5B
(q/k/v biases), Qwen3-0.6B (q/k norm, head_dim != hidden / heads), Llama-3.2-1B (llama3 rope scaling, one KV
head) and a Llama with every bias, linear rope scaling and an untied head.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from edgegpt.errors import CheckpointError
from edgegpt.train.checkpoint import load_checkpoint
from edgegpt.train.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
BOS, EOS, EOT_CHAT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
)
# name -> (transformers config class, its fields beyond SHAPE, the tokenizer adds a BOS)
CASES = {
    "smollm2": ("LlamaConfig", dict(rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True), False),
    "qwen2.5": ("Qwen2Config", dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True), False),
    "qwen3": (
        "Qwen3Config",
        dict(head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        False,
    ),
    "llama3.2": (
        "LlamaConfig",
        dict(
            num_key_value_heads=1,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        True,
    ),
    "llama-biased-untied": (
        "LlamaConfig",
        dict(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        True,
    ),
}


@pytest.fixture(scope="module")
def llama_tok(bpe):
    """The `bpe` fixture with Llama 3's three special tokens; a second copy adds BOS in its post-processor."""
    from tokenizers import Tokenizer, processors

    plain = Tokenizer.from_str(bpe.to_str())
    plain.add_special_tokens([BOS, EOS, EOT_CHAT])
    with_bos = Tokenizer.from_str(plain.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, plain.token_to_id(BOS))]
    )
    return {False: plain, True: with_bos}


def _save(case: str, path, tok, *, shard: bool = False):
    cls, fields, adds_bos = CASES[case]
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS, EOT_CHAT)}
    config = getattr(transformers, cls)(
        **{**SHAPE, **fields}, vocab_size=tok.get_vocab_size(), bos_token_id=ids[BOS], eos_token_id=ids[EOS]
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: perturb them so a swapped name shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOT_CHAT if adds_bos else EOS,
                "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
            }
        )
    )
    # Llama 3.1's generation_config.json: several stop ids
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT_CHAT]]})
    )
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, llama_tok):
    """(name, HF directory, the transformers model, the imported checkpoint directory)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = _save(name, root / "hf", llama_tok[CASES[name][2]])
    return name, root / "hf", model, import_hf(root / "hf", root / "ckpt")


@pytest.fixture(scope="module")
def ids(llama_tok):
    return torch.randint(0, llama_tok[False].get_vocab_size(), (3, 64), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_import_matches_transformers_logits(case, ids):
    name, _, hf_model, ckpt_dir = case
    model = load_checkpoint(ckpt_dir).model
    diff = (model(ids)[0] - hf_model(ids).logits).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs logit diff {diff:.3g} > {ATOL}"


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(case, ids):
    name, _, _, ckpt_dir = case
    model = load_checkpoint(ckpt_dir).model
    full = model(ids)[0]
    logits, cache = model(ids[:, :40])
    steps = [logits]
    for t in range(40, ids.size(1)):
        logits, cache = model(ids[:, t : t + 1], cache)
        steps.append(logits)
    assert cache[0][0].shape[1] == model.config.kv_heads  # the cache holds the KV heads only
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= ATOL


def test_config_and_special_tokens_are_kept(case, llama_tok):
    name, _, _, ckpt_dir = case
    ckpt = load_checkpoint(ckpt_dir)
    config, adds_bos = ckpt.config, CASES[name][2]
    assert (config.norm, config.position, config.mlp, config.bias) == ("rmsnorm", "rope", "swiglu", False)
    assert config.kv_heads == CASES[name][1].get("num_key_value_heads", 2)
    assert config.head_size == CASES[name][1].get("head_dim", 16)
    assert config.qk_norm == (name == "qwen3") and config.tied_head == (name != "llama-biased-untied")
    assert config.bias_of("qkv") == (name in ("qwen2.5", "llama-biased-untied"))
    assert config.bias_of("attn_proj") == config.bias_of("mlp") == (name == "llama-biased-untied")
    tokenizer_config, generation_config = ckpt.special_tokens()
    tok = llama_tok[False]
    assert tokenizer_config["add_bos_token"] is adds_bos and tokenizer_config["bos_token"] == BOS
    assert generation_config["eos_token_id"] == [tok.token_to_id(EOS), tok.token_to_id(EOT_CHAT)]
    assert generation_config["bos_token_id"] == tok.token_to_id(BOS)
    assert ckpt.chat_template.startswith("{% for m in messages %}")


@torch.no_grad()
def test_export_round_trip_loads_in_transformers(case, ids, tmp_path):
    name, _, hf_model, ckpt_dir = case
    out = export_hf(ckpt_dir, tmp_path / "export")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert type(model) is type(hf_model)
    assert (model.eval()(ids).logits - hf_model(ids).logits).abs().max().item() <= 1e-6
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) == (name == "llama-biased-untied")
    # transformers 5 picks the tokenizer class by model_type (Qwen2Tokenizer splits digits whatever tokenizer.json
    # says), so the oracle is the source directory's tokenizer, BOS included
    text = "x = 1, y = 22"
    want = transformers.AutoTokenizer.from_pretrained(case[1])(text)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == want
    assert (want[0] == load_checkpoint(ckpt_dir).tokenizer.token_to_id(BOS)) == CASES[name][2]
    stops = json.loads((case[1] / "generation_config.json").read_text())["eos_token_id"]
    assert model.generation_config.eos_token_id == stops  # every stop id of the source's generation_config.json
    again = import_hf(out, tmp_path / "again")  # edgegpt -> HF -> edgegpt is bit-exact
    first, second = load_file(ckpt_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert load_checkpoint(again).config == load_checkpoint(ckpt_dir).config


def test_sharded_safetensors_and_chat_template_file(llama_tok, tmp_path, ids):
    """A sharded save (model.safetensors.index.json) imports; transformers 5's chat_template.jinja is read."""
    hf_model = _save("smollm2", tmp_path / "hf", llama_tok[False], shard=True)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() and not (
        tmp_path / "hf" / "model.safetensors"
    ).exists()
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    with torch.no_grad():
        assert (ckpt.model(ids)[0] - hf_model(ids).logits).abs().max().item() <= ATOL
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize(
    "case_name, changes, match",
    [
        ("qwen2.5", {"use_sliding_window": True}, "use_sliding_window is true"),
        (
            "qwen3",
            {"layer_types": ["full_attention", "sliding_attention"]},
            "layer_types has 'sliding_attention' layers",
        ),
        ("smollm2", {"num_experts": 8}, "num_experts is 8"),
        ("smollm2", {"num_local_experts": 4}, "num_local_experts is 4"),
        (
            "smollm2",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters.rope_type is 'yarn'",
        ),
        (
            "smollm2",
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling.rope_type is 'dynamic'",
        ),
        ("smollm2", {"architectures": ["MistralForCausalLM"]}, r"architectures is \['MistralForCausalLM'\]"),
        ("smollm2", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ],
)
def test_import_refuses_in_one_line_naming_the_field(case_name, changes, match, llama_tok, tmp_path):
    src = tmp_path / "hf"
    _save(case_name, src, llama_tok[False])
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(CheckpointError, match=rf"config.json: {match}") as info:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ckpt").exists()


def test_transformers_4_rope_fields_import(llama_tok, tmp_path, ids):
    """transformers 4 wrote rope_theta and rope_scaling ("type" or "rope_type") instead of rope_parameters."""
    hf_model = _save("llama3.2", tmp_path / "hf", llama_tok[True])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    params = config.pop("rope_parameters")
    config.update(rope_theta=params.pop("rope_theta"), rope_scaling=params)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    ckpt = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    assert (ckpt.config.rope_scaling, ckpt.config.rope_factor, ckpt.config.rope_theta) == ("llama3", 32.0, 500000.0)
    with torch.no_grad():
        assert (ckpt.model(ids)[0] - hf_model(ids).logits).abs().max().item() <= ATOL


def test_import_without_architectures_goes_by_model_type(tmp_path, llama_tok):
    """A config.json without `architectures` is read by its model_type (qwen3 here)."""
    src = tmp_path / "hf"
    _save("qwen3", src, llama_tok[False])
    config = json.loads((src / "config.json").read_text())
    del config["architectures"]
    (src / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(import_hf(src, tmp_path / "ckpt")).config.qk_norm
