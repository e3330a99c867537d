"""ChatTemplate: the documented default, a bundle's own Jinja template (sandboxed), and refusals."""

from __future__ import annotations

import json

import pytest

from edgegpt.errors import BundleError, ConfigError
from edgegpt.runtime.generation.templates import ChatTemplate

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": " hello"},
    {"role": "user", "content": "bye"},
]
# The shape of a Hugging Face template (ChatML-like), with bos/eos and a raise_exception guard.
CHATML = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_default_is_the_plain_transcript_and_round_trips_a_reply():
    t = ChatTemplate()
    assert t.render(MESSAGES) == "System: Be brief.\nUser: hi\nAssistant: hello\nUser: bye\nAssistant:"
    before = t.render(MESSAGES[:2])
    assert t.render(MESSAGES[:3], add_generation_prompt=False) == before + " hello\n"  # the reply as sampled, then \n
    assert t.stop == ("\nUser:",)


def test_a_bundles_jinja_template_renders_like_transformers(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "bos_token": {"content": "<s>"}})
    )
    t = ChatTemplate.from_bundle(tmp_path)
    assert (
        t.render(MESSAGES[:2])
        == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.stop == ()
    with pytest.raises(ConfigError, match="bad role"):
        t.render([{"role": "tool", "content": "x"}])


def test_the_sandbox_and_bad_templates_are_refused(tmp_path):
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ConfigError, match="chat template failed"):
        escape.render(MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(BundleError, match="not valid Jinja"):
        ChatTemplate.from_bundle(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(BundleError, match="must be a Jinja string"):
        ChatTemplate.from_bundle(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    assert ChatTemplate.from_bundle(tmp_path).source is None
