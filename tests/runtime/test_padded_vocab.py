"""A model vocabulary larger than the tokenizer's (nanoGPT's 50304 for GPT-2's 50257): the padded ids are never
sampled, by any sampler, greedy included, and a bundle says so in its manifest and is checked on load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgegpt.errors import BundleError, SamplingError
from edgegpt.manifest import MANIFEST_NAME, write_manifest
from edgegpt.runtime import Bundle, Sampler, SamplingConfig

V, N = 64, 50  # the row's width, and the ids that may be sampled
CHAINS = [
    {},
    {"temperature": 1.0},
    {"temperature": 2.0, "top_k": 60},
    {"temperature": 1.5, "top_p": 0.99},
    {"temperature": 1.0, "min_p": 0.001},
    {"temperature": 1.0, "repetition_penalty": 0.5, "presence_penalty": -5.0, "frequency_penalty": -1.0},
]


def _logits(seed: int) -> np.ndarray:
    """Random logits whose padded ids are the most likely by far."""
    row = np.random.default_rng(seed).normal(size=V).astype(np.float32)
    row[N:] += 10.0
    return row


@pytest.mark.parametrize("knobs", CHAINS, ids=lambda k: ",".join(k) or "greedy")
def test_padded_ids_are_never_sampled_and_the_rest_is_the_truncated_row(knobs):
    config = SamplingConfig(seed=0, **knobs)
    masked = Sampler(config, V, prompt_ids=[1, 2, 55], sampled_vocab_size=N)
    truncated = Sampler(config, N, prompt_ids=[1, 2])
    picks = [masked(_logits(i)) for i in range(300)]
    assert max(picks) < N
    assert picks == [truncated(_logits(i)[:N]) for i in range(300)]  # -inf past N: the same draws
    assert Sampler(config, V, sampled_vocab_size=V)(_logits(0)) >= N  # no padding: nothing is cut


def test_sampled_vocab_size_is_checked():
    with pytest.raises(SamplingError, match="sampled_vocab_size must be an integer in 1..64"):
        Sampler(SamplingConfig(), V, sampled_vocab_size=V + 1)


def _rewrite(bundle, **changes):
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    write_manifest(bundle, {**body, **changes})


def test_bundle_refuses_a_tokenizer_larger_than_the_model_and_a_wrong_sampled_vocab(
    lively_gqa_bundle, sample_text, tmp_path
):
    from edgegpt.tokenizer import train_tokenizer

    bundle = Bundle.load(lively_gqa_bundle)
    size = bundle.tokenizer.get_vocab_size()
    assert bundle.manifest["tokenizer"]["sampled_vocab_size"] == size == bundle.config.vocab_size
    copy = shutil.copytree(lively_gqa_bundle, tmp_path / "b")
    _rewrite(copy, tokenizer={**bundle.manifest["tokenizer"], "sampled_vocab_size": size - 1})
    with pytest.raises(
        BundleError,
        match=f"tokenizer.sampled_vocab_size {size - 1} but the model and tokenizer sample ids 0..{size - 1}",
    ):
        Bundle.load(copy)
    bigger = train_tokenizer([sample_text], vocab_size=size + 20)
    bigger.save(str(copy / "tokenizer.json"))
    _rewrite(copy, tokenizer={**bundle.manifest["tokenizer"], "vocab_size": size + 20})
    with pytest.raises(
        BundleError, match=f"the tokenizer has {size + 20} tokens but the model's vocab_size is only {size}"
    ):
        Bundle.load(copy)
