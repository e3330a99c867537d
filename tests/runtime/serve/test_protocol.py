"""OpenAI request parsing: defaults, per-choice seeds, and a 400 naming the field for each bad value."""

from __future__ import annotations

import pytest

from edgegpt.runtime.serve.protocol import APIError, parse_chat, parse_completion


def test_defaults_follow_openai_and_seeds_differ_per_choice():
    req = parse_completion({"prompt": "x", "n": 3, "seed": 5, "stop": "\n"})
    assert req.max_tokens == 16 and req.prompts == ["x"] and not req.stream
    assert [c.seed for c in req.configs] == [5, 6, 7]
    assert req.configs[0].temperature == 1.0 and req.configs[0].stop == ("\n",)
    chat = parse_chat(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 4,
            "top_k": 5,
        }
    )
    assert chat.prompts == [[{"role": "user", "content": "ab"}]] and chat.max_tokens == 4 and chat.configs[0].top_k == 5
    assert parse_chat({"messages": [{"role": "user", "content": "a"}]}).max_tokens is None  # until the context is full
    assert parse_completion({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    shaped = parse_chat(
        {
            "messages": [{"role": "user", "content": "a"}],
            "logprobs": True,
            "top_logprobs": 2,
            "logit_bias": {"7": -100},
            "response_format": {"type": "json_object"},
        }
    )
    assert (
        shaped.logprobs == 2 and shaped.configs[0].top_logprobs == 2 and shaped.configs[0].logit_bias == ((7, -100.0),)
    )
    assert shaped.constraint.json_schema == {"type": "object"}


@pytest.mark.parametrize(
    "parse, body, param",
    [
        (parse_completion, [], None),
        (parse_completion, {}, "prompt"),
        (parse_completion, {"prompt": 3}, "prompt"),
        (parse_completion, {"prompt": "x", "top_p": 0}, "top_p"),  # in OpenAI's range, refused by SamplingConfig
        (parse_completion, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        (parse_completion, {"prompt": "x", "echo": True}, "echo"),
        (parse_completion, {"prompt": "x", "seed": 1.5}, "seed"),
        (parse_completion, {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        (parse_completion, {"prompt": "x", "stream": "yes"}, "stream"),
        (parse_chat, {"messages": []}, "messages"),
        (parse_chat, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        (parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        (
            parse_chat,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2},
            "max_completion_tokens",
        ),
        (parse_completion, {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        (parse_completion, {"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
        (parse_completion, {"prompt": "x", "logprobs": 9}, "logprobs"),
        (parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            parse_chat,
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
            "response_format",
        ),
        (
            parse_chat,
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
                "ignore_eos": True,
            },
            "ignore_eos",
        ),
    ],
)
def test_bad_fields_are_named(parse, body, param):
    with pytest.raises(APIError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"
