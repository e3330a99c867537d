"""edgegpt.train.hf: GPT-2 weights interchange, checked against `transformers` on a tiny random GPT-2 (no network)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgegpt.train.checkpoint import load_checkpoint
from edgegpt.errors import CheckpointError
from edgegpt.train.hf import EOT, export_hf, import_hf

transformers = pytest.importorskip("transformers")

V = 300  # the size of the `bpe` fixture's tokenizer (tests/train/conftest.py)
ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe):
    """save_pretrained of a seeded GPT2LMHeadModel whose every parameter (biases, LayerNorms too) is random."""
    torch.manual_seed(0)
    eot = bpe.token_to_id(EOT)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=V, bos_token_id=eot, eos_token_id=eot
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # HF zero-initialises biases and LayerNorms; perturb them so a swapped name shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(path, safe_serialization=True)
    bpe.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, V, (3, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    return import_hf(hf_dir, tmp_path_factory.mktemp("ckpt") / "gpt2-tiny")


def _copy(hf_dir, tmp_path):
    return shutil.copytree(hf_dir, tmp_path / "hf")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@torch.no_grad()
def _hf_logits(model, ids):
    return model(ids).logits


@torch.no_grad()
def _our_logits(ckpt_dir, ids):
    return load_checkpoint(ckpt_dir).model(ids)[0]


def test_import_matches_transformers_logits(imported, hf_model, ids, bpe):
    ckpt = load_checkpoint(imported)
    expected = dict(
        vocab_size=V,
        block_size=64,
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        bias=True,
        gelu="tanh",
        sampled_vocab_size=None,
    )
    assert ckpt.config.to_dict() == expected
    diff = (_our_logits(imported, ids) - _hf_logits(hf_model, ids)).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g} > {ATOL}"
    text = "def f(x):\n    return x" + EOT
    assert ckpt.tokenizer.encode(text).ids == bpe.encode(text).ids


def test_export_round_trip_loads_in_transformers(imported, hf_model, ids, bpe, tmp_path):
    out = export_hf(imported, tmp_path / "export")
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert torch.equal(_hf_logits(model.eval(), ids), _hf_logits(hf_model, ids))
    assert model.config.eos_token_id == model.config.bos_token_id == bpe.token_to_id(EOT)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied, as save_pretrained writes it
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("x = 1" + EOT)["input_ids"] == bpe.encode("x = 1" + EOT).ids
    again = import_hf(out, tmp_path / "again")  # edgegpt -> HF -> edgegpt is bit-exact
    first, second = load_file(imported / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_export_refuses_non_empty_dir_unless_forced(imported, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty.*force=True"):
        export_hf(imported, out)
    with pytest.raises(CheckpointError, match=r"holds files edgegpt did not write \(keep.txt\)"):
        export_hf(imported, out, force=True)  # force replaces an earlier export, never what the user put there
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    export_hf(imported, out)
    export_hf(imported, out, force=True)
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind


def test_import_from_vocab_and_merges(hf_dir, bpe, hf_model, ids, tmp_path):
    src = _copy(hf_dir, tmp_path)
    (src / "tokenizer.json").unlink()
    bpe.model.save(str(src))  # vocab.json + merges.txt, as GPT-2's hub repo has them
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ckpt"))
    text = "import os\nprint('héllo')" + EOT + "def"
    assert ckpt.tokenizer.encode(text).ids == bpe.encode(text).ids
    assert bpe.token_to_id(EOT) in ckpt.tokenizer.encode(text).ids  # a special token, never split
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("a  b\n").ids) == "a  b\n"


def test_import_pytorch_bin_without_prefix_with_buffers(hf_model, hf_dir, imported, ids, tmp_path):
    src = _copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # old GPT-2 files carry mask buffers
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" in state  # stored, equal to wte: accepted
    torch.save(state, src / "pytorch_model.bin")
    ckpt = import_hf(src, tmp_path / "ckpt")
    assert torch.equal(_our_logits(ckpt, ids), _our_logits(imported, ids))


@pytest.mark.parametrize(
    "key, value",
    [("activation_function", "relu"), ("model_type", "llama"), ("layer_norm_epsilon", 1e-6), ("n_inner", 64)],
)
def test_import_refuses_unsupported_config(hf_dir, tmp_path, key, value):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config.json: {key} is {value!r}"):
        import_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "name, match",
    [
        ("model.safetensors", "no model.safetensors"),
        ("config.json", "config.json: missing"),
        ("tokenizer.json", "no tokenizer.json"),
    ],
)
def test_import_refuses_missing_file(hf_dir, tmp_path, name, match):
    src = _copy(hf_dir, tmp_path)
    (src / name).unlink()
    with pytest.raises(CheckpointError, match=match):
        import_hf(src, tmp_path / "ckpt")


def test_import_refuses_untied_lm_head(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 0.01
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _edit_config(src, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        import_hf(src, tmp_path / "ckpt")


def test_import_keeps_a_padded_vocab_unsampled_and_refuses_a_shape_mismatch(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    state = load_file(src / "model.safetensors")
    state["transformer.wte.weight"] = torch.cat([state["transformer.wte.weight"], torch.zeros(4, 32)])
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _edit_config(src, vocab_size=V + 4)  # nanoGPT pads 50257 to 50304 the same way
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ckpt"))
    assert (
        ckpt.config.vocab_size == V + 4 and ckpt.config.sampled_vocab_size == V and ckpt.tokenizer.get_vocab_size() == V
    )
    _edit_config(src, vocab_size=V, n_positions=128)
    with pytest.raises(CheckpointError, match=r"wte.weight has shape \(304, 32\) but config.json implies \(300, 32\)"):
        import_hf(src, tmp_path / "other")


def test_exact_gelu_round_trips_and_matches_transformers(hf_dir, ids, tmp_path):
    """activation_function "gelu" (erf) imports as gelu="erf" and exports back as "gelu"."""
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, activation_function="gelu")
    exact = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    ckpt = import_hf(src, tmp_path / "ckpt")
    assert load_checkpoint(ckpt).config.gelu == "erf"
    assert (_our_logits(ckpt, ids) - _hf_logits(exact, ids)).abs().max().item() <= ATOL
    out = export_hf(ckpt, tmp_path / "back")
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"


def test_the_models_chat_template_reaches_the_bundle_and_the_runtime(hf_dir, tmp_path):
    """A tokenizer_config.json chat_template (as transformers' apply_chat_template reads it) is kept by import,
    written into the bundle by export, and rendered by the runtime exactly as transformers renders it."""
    from edgegpt.export import export_bundle
    from edgegpt.runtime import Generator

    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    src = _copy(hf_dir, tmp_path)
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template})
    )
    bundle = export_bundle(import_hf(src, tmp_path / "ckpt"), tmp_path / "bundle")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    want = transformers.AutoTokenizer.from_pretrained(src).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    gen = Generator.load(bundle, provider="cpu")
    assert gen.chat_template.render(messages) == want
    assert import_hf(hf_dir, tmp_path / "plain").joinpath("chat_template.jinja").exists() is False
