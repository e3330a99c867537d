"""edgegpt.runtime.generation.sampling: SamplingConfig validation and the numpy Sampler (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgegpt.errors import SamplingError
from edgegpt.runtime.generation.sampling import Sampler, SamplingConfig, UnknownParameterError


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("max_new_tokens", -1),
        ("max_new_tokens", True),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", math.nan),
        ("seed", -3),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_values_name_the_parameter(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingConfig(**{field: value})


def test_unknown_keyword_is_a_typed_error_and_a_type_error():
    with pytest.raises(UnknownParameterError, match="'topk'.*top_k") as info:
        SamplingConfig().replace(topk=3)
    assert isinstance(info.value, TypeError) and isinstance(info.value, SamplingError)


def test_config_normalises_stop_and_replace_is_a_copy():
    config = SamplingConfig(stop="\n\n", stop_token_ids=[3, 4])
    assert config.stop == ("\n\n",) and config.stop_token_ids == (3, 4)
    assert config.replace(top_k=5).top_k == 5 and config.top_k == 0
    assert config.replace() is config


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = np.array([0.5, 3.0, -1.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingConfig(), vocab_size=4)(logits) == 1


@pytest.mark.parametrize("knob", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_leave_one_token_equal_greedy(knob):
    rng = np.random.default_rng(0)
    for seed in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        sampler = Sampler(SamplingConfig(temperature=1.0, seed=seed, **knob), vocab_size=50)
        assert sampler(logits) == int(np.argmax(logits))


def test_top_k_and_top_p_keep_the_right_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    seen_k = {Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=s), 4)(logits) for s in range(200)}
    assert seen_k == {0, 1}
    seen_p = {Sampler(SamplingConfig(temperature=1.0, top_p=0.85, seed=s), 4)(logits) for s in range(300)}
    assert seen_p == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the third token is needed to reach the mass
    seen_min_p = {Sampler(SamplingConfig(temperature=1.0, min_p=0.5, seed=s), 4)(logits) for s in range(200)}
    assert seen_min_p == {0, 1}


def test_sampling_follows_the_softmax():
    probs = np.array([0.6, 0.3, 0.1])
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0), vocab_size=3)
    draws = np.bincount([sampler(np.log(probs).astype(np.float32)) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, probs, atol=0.03)


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4], dtype=np.float32))
    sampler = Sampler(SamplingConfig(temperature=0.1, seed=0), vocab_size=2)
    assert sum(sampler(logits) for _ in range(2000)) < 60  # token 1 has 1.7 % at T = 0.1, 40 % at T = 1


def test_same_seed_same_tokens():
    logits = np.random.default_rng(1).normal(size=(30, 64)).astype(np.float32)
    runs = [[Sampler(SamplingConfig(temperature=1.0, seed=7), 64)(row) for row in logits] for _ in range(2)]
    assert runs[0] == runs[1]


def test_penalties():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    repeat = Sampler(SamplingConfig(repetition_penalty=2.0), vocab_size=3, prompt_ids=[0])
    assert repeat(logits) == 1  # 2.0 / 2 < 1.9
    negative = Sampler(SamplingConfig(repetition_penalty=2.0), vocab_size=3, prompt_ids=[2])
    below_zero = np.array([-1.5, -1.9, -1.0], dtype=np.float32)
    assert negative(below_zero) == 0  # a negative logit is multiplied: -1.0 * 2 < -1.5 (divided, it would win)
    presence = Sampler(SamplingConfig(presence_penalty=0.5), vocab_size=3)
    assert [presence(logits) for _ in range(2)] == [0, 1]
    frequency = Sampler(SamplingConfig(frequency_penalty=0.06), vocab_size=3)
    assert [frequency(logits) for _ in range(3)] == [0, 0, 1]  # 2.0 - 0.12 < 1.9
