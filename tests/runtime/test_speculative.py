"""edgegpt.runtime.generation.speculative: prompt lookup and draft models verified by the target, greedy identity, the
speculative-sampling rule's distribution, refusals, stop/eos/max cuts and the CLI flags."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgegpt.errors import SamplingError
from edgegpt.manifest import MANIFEST_NAME, write_manifest
from edgegpt.runtime import Generator, Speculative
from edgegpt.cli.generate import generate_command
from edgegpt.runtime.generation.speculative import accept, lookup_draft

CODE = "def f(x):\n    return x\n"
PROMPTS = [CODE + CODE + "def f(", "import json\nimport json\nimport ", "x = 1\ny = 2\nx = 1\ny = ", "def "]

# The chi-square distribution's upper 0.1 % points for 1..30 degrees of freedom (any statistics table).
CHI2_999 = [
    10.83,
    13.82,
    16.27,
    18.47,
    20.52,
    22.46,
    24.32,
    26.12,
    27.88,
    29.59,
    31.26,
    32.91,
    34.53,
    36.12,
    37.70,
    39.25,
    40.79,
    42.31,
    43.82,
    45.31,
    46.80,
    48.27,
    49.73,
    51.18,
    52.62,
    54.05,
    55.48,
    56.89,
    58.30,
    59.70,
]


def _load(bundle: Path) -> Generator:
    return Generator.load(bundle, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def gqa(lively_gqa_bundle) -> Generator:
    return _load(lively_gqa_bundle)


@pytest.fixture(scope="module")
def mha(lively_mha_bundle) -> Generator:
    return _load(lively_mha_bundle)


@pytest.fixture(scope="module")
def int4(lively_int4_bundle) -> Generator:
    return _load(lively_int4_bundle)


@pytest.fixture(scope="module")
def int8(lively_int8_bundle) -> Generator:
    """Row-local int8: a k + 1-token verify chunk gives each position what single steps give."""
    return _load(lively_int8_bundle)


@pytest.fixture(scope="module", params=["gqa", "mha", "int4", "int8"])
def target(request) -> Generator:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def other_draft(lively_checkpoint, tmp_path_factory) -> Generator:
    """A differently seeded lively model with the same tokenizer: its drafts are often rejected."""
    import torch

    from edgegpt.export import export_bundle
    from edgegpt.train.checkpoint import load_checkpoint, save_checkpoint
    from edgegpt.train.model import SimpleGPT

    ckpt = load_checkpoint(lively_checkpoint[1])
    torch.manual_seed(1)
    model = SimpleGPT(ckpt.model.config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    root = tmp_path_factory.mktemp("draft")
    path = save_checkpoint(root / "checkpoint", model, ckpt.tokenizer.to_str())
    return _load(export_bundle(path, root / "bundle", validate=False))


# --- the pieces ------------------------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_most_recent_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # the later of two 3-token matches
    assert lookup_draft([7, 8, 9, 1, 2, 8, 9], 4) == [1, 2, 8, 9]  # runs on into the text's own end
    assert lookup_draft([5, 1, 6, 1], 3) == [6, 1, 6]  # only a 1-token match; then through its own drafts
    assert lookup_draft([4, 4, 4], 3) == [4, 4, 4] and lookup_draft([3, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert lookup_draft([1, 2, 3, 4], 3) == [] and lookup_draft([1], 3) == [] and lookup_draft([1, 1], 0) == []


def _scan(history: list[int], k: int, ngram: int) -> list[int]:
    """Prompt lookup by a scan of the whole text, the oracle for the incremental index."""
    size = len(history)
    for n in range(min(ngram, size - 1), 0, -1):
        for end in range(size - 2, n - 2, -1):  # the most recent match first
            if history[end - n + 1 : end + 1] == history[size - n :]:
                text = list(history)
                while len(text) < end + 1 + k:  # a continuation past the end runs on through its own drafts
                    text.append(text[len(text) - size + end + 1])
                return text[end + 1 : end + 1 + k]
    return []


def test_the_incremental_index_drafts_what_a_scan_of_the_text_drafts():
    from edgegpt.runtime.generation.speculative import NgramIndex

    rng = np.random.default_rng(0)
    for vocab, ngram in ((3, 3), (8, 2), (50, 4)):
        text, index = [int(t) for t in rng.integers(vocab, size=3)], NgramIndex(ngram)
        for _ in range(120):  # the text grows by one token or by a few (a verified round) between calls
            k = int(rng.integers(0, 6))
            assert index.draft(text, k) == _scan(text, k, ngram), (text, k, ngram)
            text += [int(t) for t in rng.integers(vocab, size=int(rng.integers(1, 4)))]


def test_lookup_watches_first_and_after_failing_then_drafts_once_its_guesses_come_right():
    from edgegpt.runtime.generation.speculative import WATCH_HITS, LookupDrafter

    drafter, text = LookupDrafter(Speculative(lookup=True, draft_tokens=4), None, 0), [1, 2, 3, 1]

    def plain_steps(tokens: list[int]) -> list[list[int]]:
        """Add the tokens one plain step at a time; -> what each step proposed."""
        proposals = []
        for token in tokens:
            text.append(token)
            proposals.append(drafter.propose(list(text), 8, None)[0])
        return proposals

    # watching from the start; guesses: none after 5, 5 after 1 (wrong), 3 after 1 2 (right), 1 after 2 3
    # (right): WATCH_HITS in a row, so it drafts at k = 1 what followed 2 3 1 before
    assert plain_steps([5, 1, 2, 3, 1]) == [[]] * 4 + [[5]] and WATCH_HITS == 2
    drafter.record(1, 1)
    drafter.record(2, 2)
    drafter.record(3, 3)
    assert drafter.k == 4 and drafter.propose(text, 8, None)[0] == [5, 1, 2, 3]  # grown to draft_tokens
    assert drafter.propose(text, 2, None)[0] == [5, 1]  # no more than the room left
    drafter.record(4, 0)
    drafter.record(2, 0)
    assert drafter.k == 1 and drafter.propose(text, 8, None)[0] == [5]  # halved twice, still drafting
    drafter.record(1, 0)  # a failure at k = 1: watch again
    # guesses: none (9..12 are new), 1 after 3 (right), 9 after 3 1 (right): drafts what followed 3 1 9 before
    assert plain_steps([9, 10, 11, 12, 3, 1, 9]) == [[]] * (4 + WATCH_HITS) + [[10]]
    drafter.record(1, 1)
    assert drafter.k == 2 and (drafter.drafted, drafter.accepted) == (1 + 2 + 3 + 4 + 2 + 1 + 1, 1 + 2 + 3 + 1)


def test_a_failing_draft_model_pauses_for_longer_each_time(gqa):
    from edgegpt.runtime.generation.speculative import MAX_PAUSE, ModelDrafter
    from edgegpt.runtime.generation.sampling import SamplingConfig

    spec, history = Speculative(draft=gqa, draft_tokens=4), [1, 2, 3, 1, 2]
    drafter = ModelDrafter(spec, SamplingConfig(), gqa.sampled_vocab_size, gqa, 16)

    def plain_steps_before_a_draft() -> int:
        steps = 0
        while not drafter.propose(history, 8, None)[0]:
            steps += 1
        return steps

    drafter.record(4, 4)
    assert drafter.k == 4 and plain_steps_before_a_draft() == 0  # already at draft_tokens
    drafter.record(4, 0)
    drafter.record(2, 0)
    assert drafter.k == 1 and len(drafter.propose(history, 8, None)[0]) == 1  # halved, no pause yet
    pauses = []
    for _ in range(8):
        drafter.record(1, 0)  # a failure at k = 1: a pause, twice the last one
        pauses.append(plain_steps_before_a_draft())
    assert pauses == [1, 2, 4, 8, 16, 32, 32, 32] and MAX_PAUSE == 32
    drafter.record(1, 1)  # an accepted draft halves the next pause and grows k
    assert drafter.k == 2 and plain_steps_before_a_draft() == 0
    drafter.record(2, 0)
    assert drafter.k == 1 and plain_steps_before_a_draft() == 0  # a failure at k = 2 does not pause
    drafter.record(1, 0)
    assert plain_steps_before_a_draft() == 32  # twice the halved 16
    for _ in range(6):
        drafter.record(1, 1)
    assert drafter.pause == 0 and drafter.k == 4
    for k in (4, 2, 1):
        drafter.record(k, 0)
    assert plain_steps_before_a_draft() == 1  # the doubling starts again from one step
    assert (drafter.drafted, drafter.accepted) == (4 + 4 + 2 + 8 + 1 + 2 + 1 + 6 + 7, 4 + 1 + 6)


def test_accept_follows_the_rule():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2])
    assert accept(p, 0, np.array([0.4, 0.3, 0.3]), rng) == 0  # p(x) >= q(x): always kept
    draws = Counter(accept(p, 1, None, rng) for _ in range(4000))  # a point mass: keep with p(x), else p without x
    assert abs(draws[1] / 4000 - 0.3) < 0.03 and abs(draws[0] / 4000 - 0.5) < 0.03


def test_drafting_from_q_then_accepting_gives_p():
    """The rule's promise: x ~ q, then accept-or-resample, is distributed as p (chi-square goodness of fit)."""
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    n = 20_000
    counts = np.bincount([accept(p, int(rng.choice(6, p=q)), q, rng) for _ in range(n)], minlength=6)
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert stat < CHI2_999[5 - 1], (counts / n, p)


def test_speculative_validates_its_fields(gqa):
    for bad in (
        dict(),
        dict(lookup=True, draft=gqa),
        dict(lookup=True, draft_tokens=0),
        dict(lookup="yes"),
        dict(draft="b/"),
    ):
        with pytest.raises(SamplingError):
            Speculative(**bad)
    with pytest.raises(SamplingError, match="must be a Speculative"):
        gqa.generate("def ", speculative=True)


# --- greedy: token for token ------------------------------------------------------------------------------


def test_greedy_lookup_equals_plain_greedy(target):
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain = target.generate(prompt, max_new_tokens=24, ignore_eos=True)
        fast = target.generate(prompt, max_new_tokens=24, ignore_eos=True, speculative=Speculative(lookup=True))
        assert fast.tokens == plain.tokens and fast.text == plain.text, prompt
        assert fast.timings.steps <= plain.timings.steps
        drafted, accepted = drafted + fast.drafted_tokens, accepted + fast.accepted_tokens
    assert drafted > 0 and 0 < accepted <= drafted


@pytest.mark.parametrize("target_name", ["gqa", "mha"])
@pytest.mark.parametrize("draft_name", ["other_draft", "same_model"])
def test_greedy_draft_model_equals_plain_greedy(request, target_name, draft_name):
    target = request.getfixturevalue(target_name)
    # the same checkpoint with the other attention: drafts almost always kept; another model: often rejected
    draft = (
        request.getfixturevalue(draft_name)
        if draft_name == "other_draft"
        else request.getfixturevalue("mha" if target_name == "gqa" else "gqa")
    )
    spec = Speculative(draft=draft, draft_tokens=3)
    for prompt in PROMPTS:
        plain = target.generate(prompt, max_new_tokens=20, ignore_eos=True)
        fast = target.generate(prompt, max_new_tokens=20, ignore_eos=True, speculative=spec)
        assert fast.tokens == plain.tokens, prompt
        assert fast.drafted_tokens > 0 and fast.timings.draft_steps > 0
        if draft_name == "same_model":
            assert fast.acceptance_rate > 0.9 and fast.timings.steps < plain.timings.steps


def test_stream_ids_and_a_kept_state_match_plain(gqa):
    ids = gqa.encode(PROMPTS[0])
    spec = Speculative(lookup=True)
    plain_state, fast_state = gqa.new_state(), gqa.new_state()
    plain = gqa.generate_ids(ids, max_new_tokens=16, ignore_eos=True, state=plain_state)
    stream = gqa.stream_ids(ids, max_new_tokens=16, ignore_eos=True, state=fast_state, speculative=spec)
    assert "".join(stream) == plain.text and stream.result.tokens == plain.tokens
    assert fast_state.tokens == plain_state.tokens  # the prompt and every generated token but the last
    again = gqa.generate_ids(ids, max_new_tokens=16, ignore_eos=True, state=fast_state, speculative=spec)
    assert again.tokens == plain.tokens and again.cached_tokens == len(ids) - 1


# --- sampling: the same distribution ----------------------------------------------------------------------


def _chi_square(a: Counter, b: Counter) -> tuple[float, int]:
    """Two-sample chi-square homogeneity statistic and its degrees of freedom; rare categories pooled."""
    total = a + b
    common = [k for k, n in total.most_common(30) if n >= 20]
    keys = [[k] for k in common] + [[k for k in total if k not in common]]
    keys = [ks for ks in keys if sum(total[k] for k in ks)]
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for ks in keys:
        oa, ob = sum(a[k] for k in ks), sum(b[k] for k in ks)
        ea, eb = (oa + ob) * na / (na + nb), (oa + ob) * nb / (na + nb)
        stat += (oa - ea) ** 2 / ea + (ob - eb) ** 2 / eb
    return stat, len(keys) - 1


@pytest.mark.parametrize("source", ["lookup", "lookup, watching", "draft"])
def test_sampling_matches_plain_sampling_in_distribution(mha, other_draft, source, monkeypatch):
    from edgegpt.runtime.generation import speculative

    by_draft = source == "draft"
    spec = Speculative(lookup=not by_draft, draft=other_draft if by_draft else None, draft_tokens=2)
    ids, n = mha.encode("x = 1\ny = 2\nx = "), 1500
    ids += mha.generate_ids(ids, max_new_tokens=8, ignore_eos=True).tokens  # lookup then drafts likely tokens
    # The first token is the prompt's own draw; drafts are verified from the second on, except that prompt
    # lookup watches two plain steps first (it then drafts only where its guesses were right, so the rule
    # itself is checked with watching off: it drafts at every step).
    positions = (3, 4) if source == "lookup, watching" else (1, 2)
    if source == "lookup":
        monkeypatch.setattr(speculative, "WATCH_HITS", 0)
    knobs = dict(max_new_tokens=positions[-1] + 1, temperature=0.3, ignore_eos=True)  # the random model is flat
    plain = [mha.generate_ids(ids, seed=s, **knobs).tokens for s in range(n)]
    fast = [mha.generate_ids(ids, seed=n + s, speculative=spec, **knobs) for s in range(n)]
    drafted, accepted = sum(r.drafted_tokens for r in fast), sum(r.accepted_tokens for r in fast)
    assert 0 < accepted < drafted  # both branches of the rule ran
    for position in positions:  # tokens that went through the rule
        stat, df = _chi_square(Counter(t[position] for t in plain), Counter(r.tokens[position] for r in fast))
        assert 1 <= df <= 30 and stat < CHI2_999[df - 1], (position, stat, df)


# --- refusals ---------------------------------------------------------------------------------------------


def test_a_draft_with_another_tokenizer_is_refused(gqa, lively_gqa_bundle, tmp_path):
    bundle = Path(shutil.copytree(lively_gqa_bundle, tmp_path / "draft"))
    tokenizer = bundle / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))  # the same tokens, other bytes
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    write_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    with pytest.raises(SamplingError, match="another tokenizer.*sha256"):
        gqa.generate("def ", max_new_tokens=4, speculative=Speculative(draft=_load(bundle)))


def test_what_speculation_cannot_run_is_refused(gqa):
    spec = Speculative(lookup=True)
    with pytest.raises(SamplingError, match="one prompt at a time"):
        gqa.generate_batch(["def ", "import "], max_new_tokens=4, speculative=spec)
    with pytest.raises(SamplingError, match="sliding_window"):
        gqa.generate("def ", sliding_window=True, speculative=spec)
    with pytest.raises(SamplingError, match="top_p=0.9"):
        gqa.generate("def ", max_new_tokens=4, temperature=0.8, top_p=0.9, speculative=spec)
    assert (
        gqa.generate_batch(["def "], max_new_tokens=4, speculative=spec)[0].tokens
        == gqa.generate("def ", max_new_tokens=4).tokens
    )
    greedy = gqa.generate("def ", max_new_tokens=12, repetition_penalty=1.3, speculative=spec)  # greedy takes penalties
    assert greedy.tokens == gqa.generate("def ", max_new_tokens=12, repetition_penalty=1.3).tokens


# --- stop strings, stop ids, end-of-text and max_new_tokens cut an accepted run -----------------------------


def _same(a, b) -> None:
    assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)


@pytest.mark.parametrize("draft_tokens", [2, 8])
def test_stop_eos_and_max_cut_where_plain_decoding_does(gqa, draft_tokens):
    spec = Speculative(lookup=True, draft_tokens=draft_tokens)
    prompt = PROMPTS[0]
    full = gqa.generate(prompt, max_new_tokens=30, ignore_eos=True)
    for n in (1, 2, 5, 9):
        _same(
            gqa.generate(prompt, max_new_tokens=n, ignore_eos=True, speculative=spec),
            gqa.generate(prompt, max_new_tokens=n, ignore_eos=True),
        )
    stop_id = full.tokens[6]
    by_id = gqa.generate(prompt, max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop_id], speculative=spec)
    _same(by_id, gqa.generate(prompt, max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop_id]))
    assert by_id.finish_reason == "stop"
    stop = full.text[len(full.text) // 2 :][:3]
    by_text = gqa.generate(prompt, max_new_tokens=30, ignore_eos=True, stop=[stop], speculative=spec)
    _same(by_text, gqa.generate(prompt, max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert by_text.finish_reason == "stop"
    # end-of-text: the random model never picks id 0, so a copy names the stop id its end-of-text token
    ending = copy.copy(gqa)
    ending.stop_ids = (stop_id,)
    by_eos = ending.generate(prompt, max_new_tokens=30, speculative=spec)
    _same(by_eos, ending.generate(prompt, max_new_tokens=30))
    assert by_eos.finish_reason == "eos" and by_eos.tokens == by_id.tokens


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_lookup_json_and_summary(lively_gqa_bundle, gqa):
    runner = CliRunner()
    args = [str(lively_gqa_bundle), PROMPTS[0], "-n", "16", "--ignore-eos", "--provider", "cpu"]
    as_json = runner.invoke(generate_command, [*args, "--lookup", "--draft-tokens", "3", "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["tokens"] == gqa.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True).tokens
    assert payload["drafted_tokens"] > 0 and payload["acceptance_rate"] == pytest.approx(
        payload["accepted_tokens"] / payload["drafted_tokens"], abs=1e-6
    )
    streamed = runner.invoke(generate_command, [*args, "--draft", str(lively_gqa_bundle)])
    assert streamed.exit_code == 0 and "accepted" in streamed.stderr and "tokens per model call" in streamed.stderr
    both = runner.invoke(generate_command, [*args, "--lookup", "--draft", str(lively_gqa_bundle)])
    assert both.exit_code == 2 and "not both" in both.output
