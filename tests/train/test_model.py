import pytest
import torch

from edgegpt.config import GPTConfig
from edgegpt.errors import ContextLengthError
from edgegpt.train.generate import generate
from edgegpt.train.model import MultiHeadSelfAttention, SelfAttentionHead, SimpleGPT


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SimpleGPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)).eval()


def test_tiny_preset_is_well_under_a_million_parameters():
    assert SimpleGPT(GPTConfig.preset("tiny", vocab_size=4096)).num_params() < 500_000


def test_gpt2_preset_has_gpt2_parameter_count():
    with torch.device("meta"):
        assert SimpleGPT(GPTConfig.preset("gpt2", vocab_size=50257)).num_params() == 124_439_808


def test_lm_head_is_tied_to_token_embedding(model):
    assert model.lm_head.weight is model.tok_emb.weight


def test_multi_head_equals_independent_single_heads_concatenated_and_projected():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=16, vocab_size=64)
    mha, head = MultiHeadSelfAttention(config).eval(), SelfAttentionHead(config)
    x = torch.randn(2, 7, 32)
    C, hs = 32, 8
    W, b = mha.qkv.weight, mha.qkv.bias  # (3C, C), (3C,)
    outs = []
    for h in range(4):
        rows = [slice(part * C + h * hs, part * C + (h + 1) * hs) for part in range(3)]
        q, k, v = (torch.nn.functional.linear(x, W[r], b[r]).unsqueeze(1) for r in rows)  # (B, 1, T, hs)
        outs.append(head(q, k, v).squeeze(1))  # (B, T, hs)
    expected = mha.proj(torch.cat(outs, dim=-1))
    actual, _ = mha(x)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_attention_is_causal(model):
    ids = torch.randint(0, 64, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 64
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_incremental_decoding_equals_full_forward(model):
    ids = torch.randint(0, 64, (3, 12))
    full, _ = model(ids)
    logits, cache = model(ids[:, :5])
    pieces = [logits]
    for t in range(5, 12):
        logits, cache = model(ids[:, t : t + 1], cache)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    assert cache[0][0].shape == (3, 2, 12, 16)


def test_left_padded_batch_with_cache_equals_each_row_alone(model):
    torch.manual_seed(1)
    a, b = torch.randint(0, 64, (1, 9)), torch.randint(0, 64, (1, 5))
    pad = 4
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])  # (2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = model(ids, attention_mask=mask, position_ids=pos)
    next_ids = torch.randint(0, 64, (2, 1))
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step, _ = model(next_ids, cache, attention_mask=mask2, position_ids=pos[:, -1:] + 1)
    alone_a, _ = model(torch.cat([a, next_ids[:1]], 1))
    alone_b, _ = model(torch.cat([b, next_ids[1:]], 1))
    torch.testing.assert_close(logits[0], alone_a[0, :9], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, pad:], alone_b[0, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0, 0], alone_a[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1, 0], alone_b[0, -1], atol=1e-5, rtol=0)
    assert torch.isfinite(logits).all()  # fully masked padding rows stay finite


def test_context_beyond_block_size_raises(model):
    with pytest.raises(ContextLengthError, match="exceed block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ContextLengthError):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 7)


def test_greedy_generation_with_cache_equals_recomputing_from_scratch(model):
    prompt = torch.randint(0, 64, (2, 3))
    out = generate(model, prompt, 10)
    ids = prompt
    for _ in range(10):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = generate(model, prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    b = generate(model, prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    c = generate(model, prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy(model):
    prompt = torch.randint(0, 64, (1, 4))
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_k=1, seed=0), generate(model, prompt, 8))


# The Llama family: the same five classes with other config data (edgegpt.config.FAMILY_FIELDS).
TINY_LLAMA = dict(
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    block_size=16,
    vocab_size=64,
    n_inner=48,
    norm="rmsnorm",
    position="rope",
    mlp="swiglu",
    bias=False,
)


def test_llama_presets_have_their_models_parameter_counts():
    with torch.device("meta"):
        assert SimpleGPT(GPTConfig.preset("smollm2-135m")).num_params() == 134_515_008  # HuggingFaceTB/SmolLM2-135M
        small = SimpleGPT(GPTConfig.preset("small", vocab_size=4096)).num_params(non_embedding=True)
        llama = SimpleGPT(GPTConfig.preset("small-llama", vocab_size=4096)).num_params(non_embedding=True)
    assert 0.8 < llama / small < 1.0  # as costly as `small`, less its grouped key/value heads


def test_llama_model_has_no_position_table_and_a_kv_head_wide_cache():
    torch.manual_seed(0)
    model = SimpleGPT(GPTConfig(**TINY_LLAMA)).eval()
    assert model.pos_emb is None and not any("pos_emb" in k or "inv_freq" in k for k in model.state_dict())
    logits, cache = model(torch.zeros(3, 5, dtype=torch.long))
    assert tuple(logits.shape) == (3, 5, 64) and tuple(cache[0][0].shape) == (3, 2, 5, 8)


def test_llama_left_padding_with_positions_matches_the_unpadded_row():
    torch.manual_seed(0)
    model = SimpleGPT(GPTConfig(**TINY_LLAMA)).eval()
    ids = torch.randint(0, 64, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want, _ = model(ids)
        got, _ = model(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    torch.testing.assert_close(got[:, 3:], want, atol=1e-5, rtol=0)


def test_llama_trains_loss_decreases():
    torch.manual_seed(0)
    model = SimpleGPT(GPTConfig(**{**TINY_LLAMA, "qk_norm": True, "tied_head": False}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(30):
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_train_resume_and_sample_with_the_small_llama_preset(tmp_path, sample_text):
    from click.testing import CliRunner

    from edgegpt.cli import main
    from edgegpt.train.checkpoint import load_checkpoint

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(sample_text[:20000])
    shape = ["--preset", "small-llama", "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--block-size", "32"]
    small = [
        "--batch-size",
        "2",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--warmup-steps",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    run = str(tmp_path / "run")
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(tmp_path / "corpus"),
            "--glob",
            "*.txt",
            "--vocab-size",
            "300",
            *shape,
            *small,
            "--steps",
            "2",
            "--out",
            run,
        ],
    )
    assert result.exit_code == 0, result.output
    config = load_checkpoint(run).config
    assert (config.position, config.kv_heads, config.n_layer) == ("rope", 2, 1)
    result = CliRunner().invoke(
        main, ["train", str(tmp_path / "corpus"), "--glob", "*.txt", "--resume", *small, "--steps", "3", "--out", run]
    )
    assert result.exit_code == 0 and "done at step 3" in result.output, result.output
    result = CliRunner().invoke(main, ["sample", run, "def ", "-n", "5"])
    assert result.exit_code == 0, result.output
