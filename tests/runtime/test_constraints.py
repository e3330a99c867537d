"""Constrained generation (JSON schema, regex, grammar) on a random-weight model that knows nothing of JSON,
and the other steps of the logits path: logprobs, logit_bias and the logits-processor hook."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgegpt.errors import ConstraintError, ExtraMissingError, SamplingError
from edgegpt.runtime import Generator, Speculative
from edgegpt.runtime.generation.constraints import Constraint, ConstraintCompiler

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "vip": {"type": "boolean"}},
            "required": ["id"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "owner"],
    "additionalProperties": False,
}
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-[0-9]{2}( [a-z]{1,6})?"


@pytest.fixture(scope="module")
def gen(lively_gqa_bundle) -> Generator:
    return Generator.load(lively_gqa_bundle, provider="cpu", threads=1)


def valid_prefix(gen: Generator, constraint: Constraint, tokens: list[int]) -> bool:
    """The library's own check: a fresh matcher consumes every token."""
    mask = gen.constraint_compiler().mask(constraint)
    try:
        for token in tokens:
            mask.consume(token)
    except ConstraintError:
        return False
    return True


def test_fifty_seeds_of_a_nested_schema_validate_or_are_valid_prefixes(gen):
    finished = 0
    for seed in range(50):
        result = gen.generate("", json_schema=SCHEMA, temperature=1.0, seed=seed, max_new_tokens=63)
        if result.finish_reason == "eos":
            jsonschema.validate(json.loads(result.text), SCHEMA)
            finished += 1
        else:
            assert result.finish_reason == "length"
            assert valid_prefix(gen, Constraint(json_schema=SCHEMA), result.tokens), result.text
    assert finished >= 8, f"only {finished} of 50 outputs finished: the test would check too little"


def test_every_sampler_sees_the_mask(gen):
    knobs = [
        dict(),
        dict(temperature=0.9, top_k=5),
        dict(temperature=1.2, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
    ]
    for kw in knobs:
        result = gen.generate("", json_schema=SCHEMA, seed=3, max_new_tokens=60, **kw)
        assert valid_prefix(gen, Constraint(json_schema=SCHEMA), result.tokens), (kw, result.text)
        if result.finish_reason == "eos":
            jsonschema.validate(json.loads(result.text), SCHEMA)


def test_finished_regex_outputs_match_in_full(gen):
    finished = 0
    for seed in range(20):
        result = gen.generate("when: ", regex=DATE, temperature=1.0, seed=seed, max_new_tokens=20)
        if result.finish_reason == "eos":
            assert re.fullmatch(DATE, result.text), result.text
            finished += 1
        else:
            assert valid_prefix(gen, Constraint(regex=DATE), result.tokens)
    assert finished >= 10


def test_a_grammar_constrains_the_text(gen):
    lark = 'start: answer ("," answer)*\nanswer: "yes" | "no" | "maybe"'
    result = gen.generate("", grammar=lark, temperature=1.0, seed=0, max_new_tokens=30)
    assert re.fullmatch(r"(yes|no|maybe)(,(yes|no|maybe))*", result.text), result.text
    gbnf = 'root ::= "on" | "off"'
    assert gen.generate("", grammar=gbnf, max_new_tokens=5).text in ("on", "off")


def test_a_batch_mixing_a_schema_row_a_regex_row_and_a_free_row_equals_each_alone(gen):
    prompts = ["", "when: ", "def "]
    batch = gen.generate_batch(prompts, json_schema=[SCHEMA, None, None], regex=[None, DATE, None], max_new_tokens=40)
    alone = [
        gen.generate(prompts[0], json_schema=SCHEMA, max_new_tokens=40),
        gen.generate(prompts[1], regex=DATE, max_new_tokens=40),
        gen.generate(prompts[2], max_new_tokens=40),
    ]
    assert [r.tokens for r in batch] == [r.tokens for r in alone]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone]
    assert batch[2].tokens == gen.generate_batch(prompts, max_new_tokens=40)[2].tokens  # the free row is untouched


def test_a_loop_over_the_engine_gets_the_constraint_from_new_completion(gen):
    """What a server's slot runs: DecodeState + Generator.new_completion, the same tokens as generate."""
    from edgegpt.runtime import SamplingConfig

    config = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=5)
    row = gen.new_completion([gen.eot_id], config, constraint=Constraint(json_schema={"type": "object"}))
    state = gen.new_state()
    logits = state.feed([gen.eot_id])
    while row.finish_reason is None:
        row.sample(logits[0])
        if row.finish_reason is None:
            logits = state.feed([row.tokens[-1]])
    expected = gen.generate("", json_schema={"type": "object"}, max_new_tokens=40, temperature=1.0, seed=5)
    assert row.tokens == expected.tokens and row.text == expected.text and row.finish_reason == expected.finish_reason
    if row.finish_reason == "eos":  # {"type": "object"} is OpenAI's json_object: any JSON object
        assert isinstance(json.loads(row.text), dict)


def test_the_stream_equals_generate_under_a_constraint(gen):
    stream = gen.stream("", json_schema=SCHEMA, temperature=1.0, seed=4, max_new_tokens=60)
    text = "".join(stream)
    assert (
        text
        == stream.result.text
        == gen.generate("", json_schema=SCHEMA, temperature=1.0, seed=4, max_new_tokens=60).text
    )


@pytest.mark.parametrize(
    "kw, reason",
    [
        (dict(json_schema={"type": "foo"}), "Invalid type: foo"),
        (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(json_schema={"enum": {1, 2}}), "must be JSON data"),
        (dict(regex="(a"), "unclosed group"),
        (dict(grammar="start: x"), 'unknown name: "x"'),
        (dict(regex="a+", grammar="start: 'a'"), "one of json_schema, regex or grammar"),
    ],
)
def test_bad_constraints_are_refused_before_any_model_call(gen, monkeypatch, kw, reason):
    monkeypatch.setattr(Generator, "new_state", lambda *a, **k: pytest.fail("the model was called"))
    with pytest.raises(ConstraintError) as info:
        gen.generate("x", max_new_tokens=4, **kw)
    assert reason in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConstraintError):
        gen.generate_batch(["x", "y"], max_new_tokens=4, **{k: [None, v] for k, v in kw.items()})


def test_constraints_need_the_extra_and_say_which(gen, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llguidance", None)  # as if not installed
    with pytest.raises(ExtraMissingError, match=r"edgegpt\[constrain\]") as info:
        ConstraintCompiler(gen.tokenizer.to_str(), gen.config.vocab_size, gen.eot_id)
    assert isinstance(info.value, ImportError)
    fresh = Generator(gen.bundle, gen.session, gen.session_config)
    with pytest.raises(ExtraMissingError):
        fresh.generate("x", regex="a+", max_new_tokens=4)
    assert fresh.generate("x", max_new_tokens=2).tokens  # unconstrained generation does not need it


def test_what_cannot_take_a_constraint_refuses_it(gen):
    with pytest.raises(SamplingError, match="speculative decoding does not support a constraint"):
        gen.generate("x", regex="a+", speculative=Speculative(lookup=True))
    with pytest.raises(SamplingError, match="ignore_eos"):
        gen.generate("x", regex="a+", ignore_eos=True, max_new_tokens=4)
    with pytest.raises(ConstraintError, match="3 entries for 2 prompts"):
        gen.generate_batch(["x", "y"], regex=["a", "b", "c"], max_new_tokens=4)


def reference_logprobs(gen: Generator, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """(n, V) log-softmax of the logits the model gives at each generated position, step by step."""
    state, rows = gen.new_state(), []
    logits = state.feed(prompt)
    for token in tokens:
        x = logits[0].astype(np.float64)
        rows.append(x - (x.max() + np.log(np.exp(x - x.max()).sum())))
        logits = state.feed([token])
    return np.array(rows)


@pytest.mark.parametrize(
    "kw", [dict(), dict(temperature=1.0, top_k=5, seed=1), dict(json_schema=SCHEMA, temperature=1.0, seed=2)]
)
def test_logprobs_agree_with_a_log_softmax_of_the_models_logits(gen, kw):
    result = gen.generate("def ", logprobs=True, top_logprobs=5, max_new_tokens=20, **kw)
    assert len(result.logprobs) == len(result.tokens) > 0
    expected = reference_logprobs(gen, result.prompt_tokens, result.tokens)
    got = np.array([entry.logprob for entry in result.logprobs])
    np.testing.assert_allclose(got, expected[np.arange(len(result.tokens)), result.tokens], atol=1e-4)
    for entry, row in zip(result.logprobs, expected):
        values = [p for _, p in entry.top]
        assert len(entry.top) == 5 and values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, np.sort(row)[::-1][:5], atol=1e-4)
        np.testing.assert_allclose(values, row[[i for i, _ in entry.top]], atol=1e-4)
        if "json_schema" not in kw:  # greedy and top-k 5 pick among the 5 most likely
            assert entry.token in [i for i, _ in entry.top]
    assert gen.generate("def ", max_new_tokens=4).logprobs is None


def test_logit_bias_bans_and_forces_tokens(gen):
    free = gen.generate("def ", temperature=1.0, seed=0, max_new_tokens=30).tokens
    banned = {free[0]: float("-inf"), max(set(free), key=free.count): -100}
    for seed in range(10):
        tokens = gen.generate("def ", temperature=1.0, seed=seed, max_new_tokens=30, logit_bias=banned).tokens
        assert not set(tokens) & set(banned)
    assert gen.generate("def ", max_new_tokens=5, logit_bias={"7": 100}).tokens == [7] * 5  # JSON keys are strings
    with pytest.raises(SamplingError, match="logit_bias"):
        gen.generate("def ", logit_bias={5: float("nan")}, max_new_tokens=4)
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        gen.generate("def ", logit_bias={10**6: 1.0}, max_new_tokens=4)


def test_a_logits_processor_sees_the_ids_and_may_change_the_logits(gen):
    seen = []

    def ban_and_record(ids, logits):
        seen.append(list(ids))
        logits[9] = -np.inf  # in place

    result = gen.generate("def ", temperature=1.0, seed=0, max_new_tokens=12, logits_processor=ban_and_record)
    assert 9 not in result.tokens
    assert seen == [result.prompt_tokens + result.tokens[:i] for i in range(len(seen))] and len(seen) == 12
    force = lambda ids, logits: np.where(np.arange(logits.size) == 11, 0.0, -np.inf)  # noqa: E731 (returns new logits)
    assert gen.generate("def ", max_new_tokens=4, logits_processor=[ban_and_record, force]).tokens == [11] * 4
    # a processor cannot undo the constraint (the mask comes after it); banning all it allows is an error
    odd = [gen.encode(d)[0] for d in "13579"]

    def no_odd_digits(ids, logits):
        logits[odd] = -np.inf

    result = gen.generate("", regex="[0-9]+", temperature=1.0, seed=0, max_new_tokens=6, logits_processor=no_odd_digits)
    assert re.fullmatch("[02468]+", result.text), result.text
    only_x = lambda ids, logits: np.where(np.arange(logits.size) == gen.encode("x")[0], 0.0, -np.inf)  # noqa: E731
    with pytest.raises(ConstraintError, match="-inf"):
        gen.generate("", regex="[0-9]+", max_new_tokens=6, logits_processor=only_x)


def test_the_cli_constrains_biases_and_prints_logprobs(lively_gqa_bundle, tmp_path):
    from click.testing import CliRunner

    from edgegpt.runtime.cli import generate_command

    run = lambda *args: CliRunner().invoke(generate_command, [str(lively_gqa_bundle), *args, "--provider", "cpu"])  # noqa: E731
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    out = run("", "--json-schema", str(schema), "-n", "63", "-t", "1", "--seed", "1", "--json")
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    if payload["finish_reason"] == "eos":
        jsonschema.validate(json.loads(payload["text"]), SCHEMA)
    out = run("when: ", "--regex", DATE, "-n", "20", "--json", "--top-logprobs", "2")
    payload = json.loads(out.output)
    assert re.fullmatch(DATE, payload["text"]) and len(payload["logprobs"]) == len(payload["tokens"])
    assert all(len(e["top_logprobs"]) == 2 for e in payload["logprobs"])
    grammar = tmp_path / "yn.lark"
    grammar.write_text('start: "yes" | "no"')
    assert run("", "--grammar", str(grammar), "-n", "5").output.splitlines()[0] in ("yes", "no")
    assert json.loads(run("def ", "-n", "3", "--logit-bias", "7=100", "--json").output)["tokens"] == [7, 7, 7]
    bad = run("x", "--regex", "(a", "-n", "3")
    assert bad.exit_code == 2 and "unclosed group" in bad.output and "--regex" in bad.output
    assert run("x", "--logprobs", "-n", "3").exit_code == 2
    assert run("x", "--regex", "a", "--grammar", str(grammar)).exit_code == 2
    assert run("x", "--logit-bias", "7", "-n", "3").exit_code == 2


def test_the_mask_cost_bench_times_every_step(gen):
    from edgegpt.runtime.constraint_bench import mask_cost

    cost = mask_cost(gen, tokens=12, runs=2)
    assert cost.tokens == 24 and cost.vocab_size == gen.config.vocab_size
    assert (
        min(
            cost.model_us,
            cost.compute_us,
            cost.apply_us,
            cost.consume_us,
            cost.step_us,
            cost.control_step_us,
            cost.overlapped_step_us,
        )
        > 0
    )
    assert cost.share == pytest.approx(cost.mask_us / min(cost.model_us, cost.control_model_us))
