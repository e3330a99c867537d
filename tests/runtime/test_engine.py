"""edgegpt.runtime.engine.state: feed / rewind / fork on both KV layouts give the logits of a fresh full run.

The reference for every case is one prefill of the whole sequence on a new state, itself checked
against PyTorch in tests/export/test_shared_kv.py and tests/runtime/test_generator.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgegpt.errors import ContextLengthError
from edgegpt.runtime import DecodeState, Generator, PromptError, SamplingConfig
from edgegpt.runtime.generation.chat import Conversation

ATOL = 1e-4
SEQUENCE = [11, 42, 7, 9, 100, 5, 77, 3, 64, 8]


@pytest.fixture(scope="module", params=["gqa", "mha"])
def gen(request, lively_checkpoint, tmp_path_factory) -> Generator:
    """A Generator on each KV layout: "gqa" ("shared_buffer") and "mha" ("concat")."""
    from edgegpt.export import export_bundle

    out = tmp_path_factory.mktemp(request.param) / "bundle"
    bundle = export_bundle(lively_checkpoint[1], out, attention=request.param, validate=False)
    return Generator.load(Path(bundle), provider="cpu", threads=1)


def full_logits(gen: Generator, ids: list[int]) -> np.ndarray:
    """The last position's logits of `ids` fed at once to a fresh state, (V,)."""
    return gen.new_state().feed(ids)[0].copy()


def test_token_by_token_equals_one_prefill(gen):
    state = gen.new_state()
    state.feed(SEQUENCE[:1])
    for i in range(1, len(SEQUENCE)):
        logits = state.feed([SEQUENCE[i]])
    assert state.length == len(SEQUENCE) and state.tokens == [SEQUENCE]
    np.testing.assert_allclose(logits[0], full_logits(gen, SEQUENCE), atol=ATOL)


def test_a_chunk_after_a_prefix_equals_one_prefill_at_every_position(gen):
    state = gen.new_state()
    state.feed(SEQUENCE[:4])
    state.feed(SEQUENCE[4:])
    chunk = state.logits[0]  # (6, V): every position of the last feed
    whole = gen.new_state()
    whole.feed(SEQUENCE)
    np.testing.assert_allclose(chunk, whole.logits[0, 4:], atol=ATOL)


def test_rewind_then_a_new_continuation_equals_a_fresh_state(gen):
    state = gen.new_state()
    state.feed(SEQUENCE)
    state.rewind(5)
    assert state.length == 5 and state.tokens == [SEQUENCE[:5]]
    other = [200, 201, 202]
    logits = state.feed(other)
    np.testing.assert_allclose(logits[0], full_logits(gen, SEQUENCE[:5] + other), atol=ATOL)
    state.rewind(0)
    np.testing.assert_allclose(state.feed([5, 6])[0], full_logits(gen, [5, 6]), atol=ATOL)


def test_fork_goes_on_independently(gen):
    state = gen.new_state()
    state.feed(SEQUENCE[:6])
    twin = state.fork()
    a = state.feed([1, 2])[0].copy()
    b = twin.feed([3])[0].copy()
    np.testing.assert_allclose(a, full_logits(gen, SEQUENCE[:6] + [1, 2]), atol=ATOL)
    np.testing.assert_allclose(b, full_logits(gen, SEQUENCE[:6] + [3]), atol=ATOL)
    assert state.tokens == [SEQUENCE[:6] + [1, 2]] and twin.tokens == [SEQUENCE[:6] + [3]]


def test_batch_rows_equal_each_row_alone(gen):
    rows = [[11, 42, 7], [5]]
    state = gen.new_state(batch=2)
    state.feed(rows)  # left-padded
    logits = state.feed([[9, 8], [4, 3]])  # several tokens after a prefix ("shared_buffer": one column per call)
    assert state.logits.shape == (2, 2, gen.config.vocab_size)
    for b, row in enumerate(rows):
        expected = gen.new_state()
        expected.feed(row + [[9, 8], [4, 3]][b])
        np.testing.assert_allclose(logits[b], expected.logits[0, -1], atol=ATOL)
        np.testing.assert_allclose(state.logits[b], expected.logits[0, -2:], atol=ATOL)


def test_greedy_generate_equals_a_loop_over_the_engine(gen):
    expected = gen.generate_ids(SEQUENCE[:3], max_new_tokens=8, ignore_eos=True).tokens
    state, tokens = gen.new_state(), []
    logits = state.feed(SEQUENCE[:3])
    for _ in range(8):
        tokens.append(int(logits[0].argmax()))
        logits = state.feed(tokens[-1:])
    assert tokens == expected


def test_generate_on_a_state_reuses_the_common_prefix(gen):
    state = gen.new_state()
    first = gen.generate_ids(SEQUENCE[:6], max_new_tokens=4, ignore_eos=True, state=state)
    assert first.cached_tokens == 0 and state.tokens[0] == SEQUENCE[:6] + first.tokens[:-1]
    follow = SEQUENCE[:6] + first.tokens + [50, 51]
    again = gen.generate_ids(follow, max_new_tokens=5, ignore_eos=True, state=state)
    assert again.cached_tokens == 6 + len(first.tokens) - 1  # all the state held
    assert again.tokens == gen.generate_ids(follow, max_new_tokens=5, ignore_eos=True).tokens
    diverged = gen.generate_ids(SEQUENCE[:2] + [99], max_new_tokens=3, ignore_eos=True, state=state)
    assert diverged.cached_tokens == 2
    assert diverged.tokens == gen.generate_ids(SEQUENCE[:2] + [99], max_new_tokens=3, ignore_eos=True).tokens


def test_conversation_feeds_only_new_tokens_and_replies_as_a_fresh_run(gen):
    chat = Conversation(gen, SamplingConfig(max_new_tokens=6, ignore_eos=True))
    "".join(chat.say("hello"))
    ids = list(chat.ids)  # the first turn as the model saw it: prompt, the 6 sampled tokens, "\n"
    second = "".join(chat.say("again"))
    # The cache holds all but the first reply's last token (sampled, never fed) and the "\n" after it.
    assert chat.last_result.cached_tokens == len(ids) - 2
    assert second == gen.generate_ids(ids + gen.encode("User: again\nAssistant:"), chat.sampling).text
    assert chat.history.startswith("User: hello\nAssistant:") and chat.history.endswith(second + "\n")
    chat.reset()
    assert chat.history == "" and chat.ids == [] and chat.state.length == 0


def test_bad_input_is_refused_and_the_state_survives(gen):
    state = gen.new_state(capacity=8)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        state.feed([gen.config.vocab_size])
    with pytest.raises(PromptError, match="encode text first"):
        state.feed("def")
    with pytest.raises(PromptError, match="at least one token"):
        state.feed([])
    state.feed([1, 2, 3])
    with pytest.raises(ContextLengthError, match="capacity of 8"):
        state.feed(list(range(6)))
    with pytest.raises(PromptError, match="rewind takes a length in 0..3"):
        state.rewind(4)
    assert state.length == 3
    np.testing.assert_allclose(state.feed([4])[0], full_logits(gen, [1, 2, 3, 4]), atol=ATOL)
    with pytest.raises(ContextLengthError, match="capacity must be in"):
        gen.new_state(capacity=gen.config.block_size + 1)
    batch = gen.new_state(batch=2)
    batch.feed([[1, 2], [3]])
    with pytest.raises(PromptError, match="same number of tokens"):
        batch.feed([[1, 2], [3]])
    assert isinstance(batch, DecodeState)
