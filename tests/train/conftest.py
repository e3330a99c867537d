"""Fixtures of the training-side tests: a GPT-2-style tokenizer for the Hugging Face and nanoGPT imports."""

from __future__ import annotations

import pytest

GPT2_STYLE_VOCAB = 300


@pytest.fixture(scope="module")
def bpe(sample_text):
    """A GPT-2-style byte-level BPE of exactly GPT2_STYLE_VOCAB tokens, "<|endoftext|>" included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgegpt.tokenizer import EOT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=GPT2_STYLE_VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sample_text[:8000]], trainer)
    assert tok.get_vocab_size() == GPT2_STYLE_VOCAB
    return tok
