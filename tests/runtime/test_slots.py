"""SlotBatch: slots that join and leave compute what each would compute alone (greedy, token for token)."""

from __future__ import annotations

import pytest

from edgegpt.errors import BundleError, ContextLengthError
from edgegpt.runtime import Generator
from edgegpt.runtime.engine.state import PromptError

PROMPTS = ["def main(", "import os\n", "class Foo:\n    def ", "x = [", "for i in range(10):"]


@pytest.fixture(scope="module")
def gen(lively_gqa_bundle):
    return Generator.load(lively_gqa_bundle, provider="cpu", threads=2)


def test_staggered_slots_with_riders_equal_generating_alone(gen):
    alone = [gen.generate(p, max_new_tokens=12, ignore_eos=True).tokens for p in PROMPTS]
    batch = gen.new_slots(4, capacity=48)
    plan = {0: 0, 2: 1, 3: 2}  # slot -> prompt; slot 1 stays empty and rides along in every step
    out = {slot: [] for slot in plan}
    for slot in (0, 2):
        out[slot].append(int(batch.prefill(slot, gen.encode(PROMPTS[plan[slot]])).argmax()))
    for step in range(20):
        if step == 4:  # joins while the others decode
            out[3].append(int(batch.prefill(3, gen.encode(PROMPTS[plan[3]])).argmax()))
        live = {s: out[s][-1] for s in out if out[s] and len(out[s]) < 12}
        if not live:
            break
        logits = batch.step(live)
        for s in live:
            out[s].append(int(logits[s].argmax()))
    assert {s: out[s] for s in out} == {s: alone[p] for s, p in plan.items()}
    assert batch.lengths[1] == 0


def test_a_freed_slot_keeps_its_prefix_and_a_rider_does_not_disturb_it(gen):
    batch = gen.new_slots(2, capacity=48)
    ids = gen.encode(PROMPTS[2])
    first = batch.prefill(0, ids).copy()
    batch.prefill(1, gen.encode(PROMPTS[0]))
    for _ in range(5):  # slot 0 rides along (its mask moves to the scratch column) while slot 1 decodes
        batch.step({1: 7})
    batch.rewind(0, len(ids) - 1)
    again = batch.prefill(0, ids[-1:])
    assert int(again.argmax()) == int(first.argmax())
    assert abs(again - first).max() < 1e-4


def test_prefill_in_chunks_equals_one_call(gen):
    ids = gen.encode("".join(PROMPTS))
    batch = gen.new_slots(2, capacity=64)
    whole = batch.prefill(0, ids).copy()
    for start in range(0, len(ids), 5):
        chunked = batch.prefill(1, ids[start : start + 5])
    assert abs(chunked - whole).max() < 1e-4


def test_bad_input_is_refused(gen, lively_mha_bundle):
    batch = gen.new_slots(2, capacity=8)
    with pytest.raises(PromptError, match="slot must be in 0..1"):
        batch.prefill(2, [1])
    with pytest.raises(PromptError, match="outside the vocabulary"):
        batch.prefill(0, [gen.config.vocab_size])
    with pytest.raises(PromptError, match="slot 1 is empty"):
        batch.step({1: 3})
    with pytest.raises(ContextLengthError, match="capacity of 8"):
        batch.prefill(0, list(range(9)))
    with pytest.raises(ContextLengthError, match="capacity must be in"):
        gen.new_slots(2, capacity=gen.config.block_size + 1)
    with pytest.raises(BundleError, match="re-export it with the default attention"):
        Generator.load(lively_mha_bundle, provider="cpu").new_slots(2)
