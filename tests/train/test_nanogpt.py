"""edgegpt.train.nanogpt: nanoGPT checkpoints -> checkpoint -> bundle, checked against `transformers` (no network).

The oracle is a Hugging Face `GPT2LMHeadModel` with `activation_function="gelu"` (the exact erf GELU, as
nanoGPT's `nn.GELU()`), its weights written under nanoGPT's names: its Conv1D matrices transposed into
`nn.Linear`'s (out, in), lm_head stored tied to wte, and the causal-mask buffer `attn.bias` that nanoGPT
versions without flash attention save. A bias=False nanoGPT is the oracle with every bias zeroed and left
out of the file. A nanoGPT run's `ckpt.pt` also carries optimizer state, iter_num, best_val_loss and config.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.errors import CheckpointError
from edgegpt.export import export_bundle, quantize_bundle
from edgegpt.runtime import Generator
from edgegpt.tokenizer import EOT
from edgegpt.train.checkpoint import load_checkpoint
from edgegpt.train.nanogpt import import_nanogpt, read_meta

transformers = pytest.importorskip("transformers")

V, PADDED = 300, 320  # the `bpe` fixture's size and the model's, padded as nanoGPT pads 50257 to 50304
ATOL = 1e-4
LAYERS, HEADS, EMBD, BLOCK = 2, 2, 32, 64
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Characters of a character-level vocabulary (nanoGPT's shakespeare_char has 65, all ASCII): a few beyond ASCII.
CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak! Été, naïve 中文 😀?"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, bpe):
    """tokenizer.json, and GPT-2's hub files vocab.json + merges.txt, of the same tokenizer."""
    path = tmp_path_factory.mktemp("gpt2-tokenizer")
    bpe.save(str(path / "tokenizer.json"))
    bpe.model.save(str(path))
    return path


def _oracle(vocab_size: int, *, bias: bool = True, seed: int = 0):
    """A seeded GPT2LMHeadModel with the exact GELU; every parameter random (so a swapped name shows)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=EMBD,
        n_positions=BLOCK,
        vocab_size=vocab_size,
        activation_function="gelu",
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)  # lively: greedy tokens vary from step to step
            else:
                p.add_(0.05 * torch.randn_like(p))
            if not bias and name.endswith(".bias"):
                p.zero_()  # every Linear and LayerNorm bias 0: nanoGPT's bias=False
    return model


def _nanogpt_state(model, *, bias: bool = True, prefix: str = "", mask_buffer: bool = True) -> dict[str, torch.Tensor]:
    """The oracle's weights under nanoGPT's names (Conv1D -> Linear), lm_head tied, mask buffers included."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (not bias and name.endswith(".bias")):
            continue
        if name.endswith(".weight") and any(f".{part}." in name for part in CONV1D):
            tensor = tensor.t()
        state[name] = tensor.detach().clone().contiguous()
    state["lm_head.weight"] = state["transformer.wte.weight"]  # nanoGPT's state_dict lists the tied pair twice
    if mask_buffer:
        for i in range(LAYERS):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
    return {prefix + k: v for k, v in state.items()}


def _save_ckpt(
    path: Path, state: dict, *, vocab_size: int, bias: bool = True, dataset: str = "openwebtext", **extra
) -> Path:
    """A checkpoint as nanoGPT's train.py writes it, optimizer state and run config included."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.sum().backward()
    optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "model_args": dict(
                n_layer=LAYERS,
                n_head=HEADS,
                n_embd=EMBD,
                block_size=BLOCK,
                bias=bias,
                vocab_size=vocab_size,
                dropout=0.0,
            ),
            "iter_num": 5000,
            "best_val_loss": torch.tensor(1.4697),
            "config": {
                "dataset": dataset,
                "batch_size": 12,
                "learning_rate": 6e-4,
                "compile": True,
                "dtype": "bfloat16",
            },
            **extra,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """(oracle, ckpt.pt): a padded vocabulary whose padded rows would win the argmax if they were not masked."""
    model = _oracle(PADDED, seed=1)
    with torch.no_grad():
        model.transformer.wte.weight[V:] = 2.0 * model.transformer.wte.weight[: PADDED - V]
    root = tmp_path_factory.mktemp("nanogpt")
    return model, _save_ckpt(root / "out" / "ckpt.pt", _nanogpt_state(model, prefix="_orig_mod."), vocab_size=PADDED)


@pytest.fixture(scope="module")
def padded_ckpt(padded, tok_dir, tmp_path_factory):
    return import_nanogpt(
        padded[1], tmp_path_factory.mktemp("imported") / "checkpoint", tokenizer=tok_dir / "tokenizer.json"
    )


@pytest.fixture(scope="module")
def padded_bundle(padded_ckpt, tmp_path_factory):
    return export_bundle(padded_ckpt, tmp_path_factory.mktemp("bundle") / "padded")


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int, sampled: int) -> tuple[list[int], bool]:
    """(n greedy tokens with ids >= `sampled` at -inf, whether an unmasked argmax would have picked one)."""
    ids, padded_won = list(ids), False
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        padded_won |= int(logits.argmax()) >= sampled
        ids.append(int(logits[:sampled].argmax()))
    return ids[-n:], padded_won


def test_padded_checkpoint_imports_with_and_without_the_compile_prefix(padded, padded_ckpt, tok_dir, tmp_path):
    model, path = padded
    ckpt = load_checkpoint(padded_ckpt)
    assert ckpt.config.to_dict() == dict(
        vocab_size=PADDED,
        block_size=BLOCK,
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=EMBD,
        dropout=0.0,
        bias=True,
        gelu="erf",
        sampled_vocab_size=V,
    )
    ids = torch.randint(0, V, (3, BLOCK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ckpt.model(ids)[0] - model(ids).logits).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference vs transformers {diff:.3g}"
    plain = _save_ckpt(tmp_path / "plain" / "ckpt.pt", _nanogpt_state(model, mask_buffer=False), vocab_size=PADDED)
    again = load_checkpoint(
        import_nanogpt(plain, tmp_path / "again", tokenizer=[tok_dir / "vocab.json", tok_dir / "merges.txt"])
    )
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), ckpt.model.state_dict().values()))
    text = "def f(x):\n    return x" + EOT
    assert again.tokenizer.encode(text).ids == ckpt.tokenizer.encode(text).ids


def test_padded_bundle_matches_transformers_and_never_samples_padding(padded, padded_bundle, bpe):
    model, _ = padded
    gen = Generator.load(padded_bundle, provider="cpu", threads=2)
    manifest = gen.bundle.manifest
    assert manifest["model"]["vocab_size"] == PADDED and manifest["tokenizer"]["vocab_size"] == V
    assert manifest["tokenizer"]["sampled_vocab_size"] == V == gen.sampled_vocab_size
    ops = manifest["optimization"]["op_counts_after"]
    assert ops["BiasGelu"] == LAYERS and "FastGelu" not in ops  # onnxruntime's fused erf GELU, not the tanh one

    prompt = bpe.encode("def parse(self, text):\n    return").ids
    state = gen.new_state()
    state.feed(prompt)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    diff = float(np.abs(state.logits[0] - expected).max())
    assert diff <= ATOL, f"max abs logit difference bundle vs transformers {diff:.3g}"

    want, padded_won = _hf_greedy(model, prompt, 40, V)
    assert padded_won, "the padded rows should win an unmasked argmax here, or the test proves nothing"
    result = gen.generate_ids(prompt, max_new_tokens=40, ignore_eos=True)
    assert result.tokens == want and max(result.tokens) < V
    for knobs in (
        {"temperature": 1.5},
        {"temperature": 1.0, "top_k": 50, "repetition_penalty": 1.3},
        {"temperature": 2.0, "min_p": 0.01},
    ):
        tokens = gen.generate_ids(prompt, max_new_tokens=40, ignore_eos=True, seed=0, **knobs).tokens
        assert max(tokens) < V, knobs


def test_sample_command_masks_padding_like_the_runtime(padded_ckpt, padded_bundle):
    gen = Generator.load(padded_bundle, provider="cpu", threads=2)
    runner = CliRunner()
    out = runner.invoke(main, ["sample", str(padded_ckpt), "def f(", "-n", "20", "-t", "0"])
    assert out.exit_code == 0, out.output  # an unmasked padded id would fail to decode
    assert out.output.startswith(gen.generate("def f(", max_new_tokens=20, temperature=0).text)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """(oracle, nanoGPT repository root, ckpt.pt): a character-level run, data/<dataset>/meta.pkl beside out/."""
    chars = sorted(set(CHAR_TEXT))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    root = tmp_path_factory.mktemp("nanoGPT")
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    (root / "data" / "shakespeare_char" / "meta.pkl").write_bytes(pickle.dumps(meta))
    model = _oracle(len(chars), seed=2)
    state = _nanogpt_state(model, prefix="_orig_mod.")
    return (
        model,
        root,
        _save_ckpt(root / "out-shakespeare-char" / "ckpt.pt", state, vocab_size=len(chars), dataset="shakespeare_char"),
    )


def test_character_level_checkpoint_finds_its_meta_and_generates_greedy_like_transformers(char_run, tmp_path):
    model, root, path = char_run
    meta = read_meta(root / "data" / "shakespeare_char" / "meta.pkl")
    n = meta["vocab_size"]
    result = CliRunner().invoke(
        main, ["import-nanogpt", str(path), "-o", str(tmp_path / "ckpt")]
    )  # meta.pkl found as nanoGPT does
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "ckpt")
    tok = ckpt.tokenizer
    assert ckpt.config.vocab_size == n + 1 and ckpt.config.sampled_vocab_size == n and tok.token_to_id(EOT) == n
    for text in (CHAR_TEXT, "", "\n\n  a", "中😀中"):  # encode as nanoGPT does, decode back exactly
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == [meta["stoi"][c] for c in text] and tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("a#e", add_special_tokens=False).ids == [meta["stoi"]["a"], n, meta["stoi"]["e"]]  # unknown: EOT

    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "bundle")
    gen = Generator.load(bundle, provider="cpu", threads=2)
    prompt = "First Citizen:\n"
    want, _ = _hf_greedy(model, [meta["stoi"][c] for c in prompt], 48, n)
    result = gen.generate(prompt, max_new_tokens=48)
    assert result.tokens == want and result.text == "".join(meta["itos"][i] for i in want)
    print(f"greedy sample of the imported character-level model: {prompt!r} -> {result.text!r}")
    assert gen.generate("", max_new_tokens=8).finish_reason == "length"  # an empty prompt starts from the appended EOT


def test_bias_false_checkpoint_imports_exports_and_quantizes(tok_dir, tmp_path):
    model = _oracle(V, bias=False, seed=3)
    path = _save_ckpt(tmp_path / "out" / "ckpt.pt", _nanogpt_state(model, bias=False), vocab_size=V, bias=False)
    ckpt = load_checkpoint(import_nanogpt(path, tmp_path / "ckpt", tokenizer=tok_dir))
    assert not ckpt.config.bias and ckpt.config.sampled_vocab_size is None
    assert not any(name.endswith(".bias") for name in ckpt.model.state_dict())
    ids = torch.randint(0, V, (2, BLOCK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ckpt.model(ids)[0] - model(ids).logits).abs().max().item() <= ATOL
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "fp32")
    gen = Generator.load(bundle, provider="cpu", threads=2)
    assert gen.bundle.manifest["optimization"]["op_counts_after"]["Gelu"] == LAYERS  # erf GELU without a bias
    prompt = ids[0, :8].tolist()
    want, _ = _hf_greedy(model, prompt, 24, V)
    assert gen.generate_ids(prompt, max_new_tokens=24, ignore_eos=True).tokens == want
    for fmt in ("int8", "int4"):
        quantized = Generator.load(quantize_bundle(bundle, tmp_path / fmt, to=fmt), provider="cpu", threads=2)
        assert len(quantized.generate_ids(prompt, max_new_tokens=16, ignore_eos=True).tokens) == 16


# --- refusals: one line, exit code 1, no traceback; nothing of a hostile file ever runs -------------------


class _Payload:
    """Unpickling this creates `marker`: proof that a payload ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refused(args: list[str], match: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    assert re.search(match, result.output), result.output
    assert "weights_only=False" not in result.output
    return result.output


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"),
            r"missing \['transformer.h.1.mlp.c_fc.weight'\], unexpected \[\]",
        ),
        (
            lambda s: s.__setitem__("transformer.h.0.attn.rotary.inv_freq", torch.ones(8)),
            r"missing \[\], unexpected \['transformer.h.0.attn.rotary.inv_freq'\]",
        ),
        (lambda s: s.__setitem__("lm_head.weight", s["transformer.wte.weight"] + 1), "lm_head.weight differs"),
        (
            lambda s: s.__setitem__("transformer.wpe.weight", torch.zeros(BLOCK + 1, EMBD)),
            r"wpe.weight has shape \(65, 32\)",
        ),
    ],
    ids=["missing", "extra", "untied", "shape"],
)
def test_mismatched_tensors_are_refused_by_name(padded, tok_dir, tmp_path, change, match):
    state = _nanogpt_state(padded[0])
    change(state)
    path = _save_ckpt(tmp_path / "ckpt.pt", state, vocab_size=PADDED)
    _refused(
        ["import-nanogpt", str(path), "-o", str(tmp_path / "out"), "--tokenizer", str(tok_dir)],
        "CheckpointError: .*" + match,
    )
    with pytest.raises(CheckpointError, match=match):
        import_nanogpt(path, tmp_path / "out", tokenizer=tok_dir)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_needs_full_unpickling_is_refused_and_never_runs(padded, tok_dir, tmp_path):
    marker = tmp_path / "pwned"
    path = _save_ckpt(tmp_path / "ckpt.pt", _nanogpt_state(padded[0]), vocab_size=PADDED, extra=_Payload(marker))
    message = _refused(
        ["import-nanogpt", str(path), "-o", str(tmp_path / "out"), "--tokenizer", str(tok_dir)],
        r"CheckpointError: .*ckpt.pt: refused: .*io.open.*may be hostile",
    )
    assert "may be hostile" in message and not marker.exists() and not (tmp_path / "out").exists()


def test_a_meta_pkl_with_a_payload_is_refused_and_never_runs(char_run, tmp_path):
    _, root, path = char_run
    marker = tmp_path / "pwned"
    meta = tmp_path / "meta.pkl"
    meta.write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": {"a": 0}, "x": _Payload(marker)}))
    _refused(
        ["import-nanogpt", str(path), "-o", str(tmp_path / "out"), "--tokenizer", str(meta)],
        r"meta.pkl: refused: it names the Python object (io|builtins).open",
    )
    assert not marker.exists() and not (tmp_path / "out").exists()
    meta.write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": {"a": 0}, "x": [1.5]}))
    with pytest.raises(CheckpointError, match="holds a list; a meta.pkl holds only dicts, strings and integers"):
        read_meta(meta)


def test_without_a_tokenizer_the_error_says_what_to_pass(padded, char_run, tmp_path):
    _refused(
        ["import-nanogpt", str(padded[1]), "-o", str(tmp_path / "a")],
        r"no tokenizer \(dataset 'openwebtext', no data/openwebtext/meta.pkl found.*--tokenizer",
    )
    small = _save_ckpt(tmp_path / "small" / "ckpt.pt", _nanogpt_state(_oracle(16)), vocab_size=16)
    _refused(
        [
            "import-nanogpt",
            str(small),
            "-o",
            str(tmp_path / "b"),
            "--tokenizer",
            str(char_run[1] / "data/shakespeare_char"),
        ],
        r"39 characters but the model's vocab_size is 16",
    )
    _refused(
        ["import-nanogpt", str(small), "-o", str(tmp_path / "c"), "--tokenizer", str(padded[1].parent)],
        r"no tokenizer.json, vocab.json \+ merges.txt or meta.pkl in it",
    )


def test_a_tokenizer_larger_than_the_model_is_refused(tok_dir, tiny_checkpoint, sample_text, tmp_path):
    import shutil

    from edgegpt.tokenizer import train_tokenizer

    small = _save_ckpt(tmp_path / "small" / "ckpt.pt", _nanogpt_state(_oracle(16)), vocab_size=16)
    _refused(
        ["import-nanogpt", str(small), "-o", str(tmp_path / "a"), "--tokenizer", str(tok_dir / "tokenizer.json")],
        rf"the tokenizer has {V} tokens but the model's vocab_size is only 16",
    )
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    size = load_checkpoint(ckpt).config.vocab_size
    train_tokenizer([sample_text], vocab_size=size + 8).save(str(ckpt / "tokenizer.json"))
    with pytest.raises(
        CheckpointError, match=f"tokenizer has {size + 8} tokens but config.json vocab_size is only {size}"
    ):
        load_checkpoint(ckpt)
