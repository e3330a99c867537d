import json

import pytest

from edgegpt.checks import check_bool, check_int, check_real
from edgegpt.config import GPTConfig
from edgegpt.errors import ConfigError, SamplingError
from edgegpt.train.config import TrainConfig


def test_round_trips_through_json(tmp_path):
    config = GPTConfig.preset("small", vocab_size=1000, dropout=0.1)
    config.to_json(tmp_path / "c.json")
    assert GPTConfig.from_json(tmp_path / "c.json") == config
    assert json.loads((tmp_path / "c.json").read_text())["n_embd"] == 384


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_embd": 100, "n_head": 3}, "n_embd (100) must be divisible by n_head (3)"),
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"block_size": 2.5}, "block_size must be a positive integer"),
        ({"dropout": 1.5}, "dropout must be in [0, 1)"),
    ],
)
def test_rejects_impossible_values_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        GPTConfig(**fields)


def test_rejects_unknown_keys_by_name():
    with pytest.raises(ConfigError, match="unknown model config key.*n_embed"):
        GPTConfig.from_dict({"n_embed": 64})


def test_presets():
    assert GPTConfig.preset("gpt2").n_layer == 12 and GPTConfig.preset("gpt2").block_size == 1024
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        GPTConfig.preset("huge")


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr=1e-4)
    lrs = [cfg.lr_at(s) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="unknown training config key.*stpes"):
        TrainConfig.from_dict({"stpes": 3})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
        ({"grad_clip": float("nan")}, "grad_clip must be a finite number, got nan"),
    ],
)
def test_train_config_names_the_bad_field(fields, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**fields)
    assert str(info.value) == message


def test_checks_take_numpy_scalars_but_not_bools():
    import numpy as np

    check_int("top_k", np.int64(3))
    check_real("top_p", np.float32(0.5), low=0.0, high=1.0)
    check_bool("ignore_eos", np.bool_(True))
    for bad in (True, np.bool_(True)):
        with pytest.raises(ConfigError, match="must be an integer >= 0"):
            check_int("top_k", bad)
        with pytest.raises(ConfigError, match="must be a finite number"):
            check_real("top_p", bad)
    with pytest.raises(ConfigError, match="fast must be true or false, got 'yes'"):
        check_bool("fast", "yes")


def test_checks_raise_the_error_they_are_given():
    with pytest.raises(SamplingError, match=r"^seed must be an integer >= 0 or None, got -3$"):
        check_int("seed", -3, optional=True, error=SamplingError)
    with pytest.raises(SamplingError, match=r"^temperature must be >= 0, got -1$"):
        check_real("temperature", -1, low=0.0, error=SamplingError)
    with pytest.raises(ConfigError, match=r"^log_severity must be an integer in 0..4, got 5$"):
        check_int("log_severity", 5, high=4)


def test_a_gpt2_config_dict_is_unchanged_by_the_family_fields():
    """Checkpoints and manifests store to_dict(): a GPT-2 config's keys are the ones older releases read."""
    assert set(GPTConfig.preset("small").to_dict()) == {
        "vocab_size",
        "block_size",
        "n_layer",
        "n_head",
        "n_embd",
        "dropout",
        "bias",
        "gelu",
        "sampled_vocab_size",
    }


def test_a_llama_config_round_trips_and_derives_its_widths(tmp_path):
    config = GPTConfig.preset("smollm2-135m", rope_scaling="llama3", rope_factor=32.0, qk_norm=True, head_dim=80)
    config.to_json(tmp_path / "c.json")
    assert GPTConfig.from_json(tmp_path / "c.json") == config
    assert (config.head_size, config.kv_heads, config.mlp_width) == (80, 3, 1536)
    assert GPTConfig.preset("small").kv_heads == 6 and GPTConfig.preset("small").mlp_width == 4 * 384
    assert GPTConfig(qkv_bias=True, bias=False).bias_of("qkv") and not GPTConfig(bias=False).bias_of("mlp")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_head": 6, "n_kv_head": 4}, r"n_head \(6\) must be a multiple of n_kv_head \(4\)"),
        ({"position": "rope", "n_embd": 30, "n_head": 2}, r"head_size \(15\) must be even"),
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"rope_scaling": "yarn"}, "rope_scaling must be one of"),
        ({"mlp": "relu"}, "mlp must be one of"),
        (
            {"rope_scaling": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 1.0},
            "rope_high_freq_factor",
        ),
    ],
)
def test_family_fields_are_validated_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**fields)
