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
