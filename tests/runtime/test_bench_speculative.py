"""edgegpt.runtime.bench_speculative: `edgegpt bench BUNDLE --lookup/--draft --text ...` times speculative
decoding against plain decoding on real text, reports its figures and refuses what it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgegpt.errors import ConfigError, SamplingError
from edgegpt.runtime.bench import DeviceBenchConfig, bench_bundle, markdown
from edgegpt.runtime.bench_speculative import chunk_costs, text_prompts

SHORT = dict(prompts=2, runs=2, threads=1, prompt_tokens=16, new_tokens=12)


@pytest.fixture(scope="module")
def texts(sample_text, tmp_path_factory) -> dict[str, Path]:
    """A directory of three code files (one too short for a prompt) and one long text file."""
    root = tmp_path_factory.mktemp("texts")
    code = root / "code"
    code.mkdir()
    parts = sample_text.split("\ndef ")
    for i in range(2):
        (code / f"m{i}.py").write_text("def " + "\ndef ".join(parts[1 + 4 * i : 5 + 4 * i]))
    (code / "short.py").write_text("x = 1\n")
    (code / "data.bin").write_bytes(b"\xff\xfe\x00binary")
    prose = root / "prose.txt"
    prose.write_text(sample_text[:20_000])
    return {"code": code, "prose": prose}


def test_prompts_start_at_each_file_start_or_at_spread_line_starts(tiny_tokenizer, texts):
    encode = lambda text: tiny_tokenizer.encode(text).ids  # noqa: E731
    files = sorted(texts["code"].glob("m*.py"))
    code = text_prompts(encode, texts["code"], 2, 16)
    assert code == [encode(f.read_text())[:16] for f in files]  # the short and the binary file are skipped
    prose = text_prompts(encode, texts["prose"], 3, 16)
    text = texts["prose"].read_text()
    assert prose[0] == encode(text)[:16] and len({tuple(p) for p in prose}) == 3 and all(len(p) == 16 for p in prose)
    later = text[text.index("\n", len(text) // 3) + 1 :]  # the second window opens the line after a third of the text
    assert prose[1] == encode(later)[:16]
    with pytest.raises(ConfigError, match=r"4 window\(s\) of 16 tokens in 3 text file\(s\), 5 wanted; lower --prompts"):
        text_prompts(encode, texts["code"], 5, 16)
    with pytest.raises(ConfigError, match="no such file or directory"):
        text_prompts(encode, texts["code"] / "missing", 1, 16)


def test_bench_reports_plain_lookup_and_draft_per_source(lively_gqa_bundle, texts):
    config = DeviceBenchConfig(lookup=True, draft=lively_gqa_bundle, text=(texts["code"], texts["prose"]), **SHORT)
    result = json.loads(json.dumps(bench_bundle(lively_gqa_bundle, config)))  # JSON-serialisable as it is
    assert [s["text"] for s in result["sources"]] == [str(texts["code"]), str(texts["prose"])]
    for source in result["sources"]:
        plain, lookup, draft = (source["modes"][m] for m in ("plain", "lookup", "draft"))
        assert all(len(f["round_tok_s"]) == 2 and f["decode_tok_s"] > 0 for f in (plain, lookup, draft))
        assert plain["tokens_per_call"] == 1 and plain["acceptance_rate"] is None and plain["drafted"] == 0
        # Greedy speculation keeps plain decoding's tokens; the target drafting for itself has every draft accepted.
        assert lookup["identical"] == draft["identical"] == 2 and lookup["diverges_at"] == [None, None]
        assert draft["acceptance_rate"] == 1 and draft["tokens_per_call"] > 2 and draft["draft_calls"] > 0
        assert 0 <= lookup["accepted"] <= lookup["drafted"]
    assert sorted(result["chunk_ms"], key=int) == ["1", "2", "3", "4", "5"] and min(result["chunk_ms"].values()) > 0
    assert result["draft"]["bundle"] == str(lively_gqa_bundle) and result["config"]["text"] == [
        str(texts["code"]),
        str(texts["prose"]),
    ]
    table = markdown(result)
    assert "| text | mode | decode tok/s | vs plain | acceptance | tokens per call | same tokens as plain |" in table
    assert (
        table.count("| code |") == 3
        and str(texts["prose"]) in table
        and "| draft |" in table
        and "100% |" in table
        and "one call: 1 token" in table
    )


def test_sampling_runs_every_mode_and_claims_no_identity(lively_gqa_bundle, texts):
    config = DeviceBenchConfig(lookup=True, text=(texts["prose"],), temperature=1.5, **{**SHORT, "runs": 1})
    result = bench_bundle(lively_gqa_bundle, config)
    lookup = result["sources"][0]["modes"]["lookup"]
    assert lookup["decode_tok_s"] > 0 and lookup["tokens_per_call"] >= 1 and result["config"]["temperature"] == 1.5
    assert "(temperature 1.5)" in markdown(result) and "| prose.txt | lookup |" in markdown(result)
    assert markdown(result).split("| prose.txt | lookup |")[1].split("\n")[0].endswith("|  |")  # no identity claimed


def test_a_prompt_that_nearly_fills_the_context_still_gets_its_chunk_costs(lively_gqa_bundle, texts):
    config = DeviceBenchConfig(
        lookup=True,
        text=(texts["prose"],),
        prompts=1,
        runs=1,
        threads=1,
        prompt_tokens=58,
        new_tokens=6,
        draft_tokens=8,
    )
    result = bench_bundle(lively_gqa_bundle, config)  # context 64: the chunks of up to 9 tokens follow a shorter prompt
    assert sorted(result["chunk_ms"], key=int) == [str(n) for n in range(1, 10)]


def test_chunk_costs_time_each_size(lively_gqa_bundle):
    from edgegpt.runtime import Generator

    gen = Generator.load(lively_gqa_bundle, provider="cpu", threads=1)
    costs = chunk_costs(gen, list(range(5, 21)), [1, 3], repeats=2)
    assert sorted(costs) == [1, 3] and all(s > 0 for s in costs.values())
    assert sorted(chunk_costs(gen, [5, 6], [1, 2, 7], repeats=1)) == [1, 2, 7]  # a prompt shorter than a chunk


def test_config_refuses_what_the_speculative_bench_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="give --text FILE_OR_DIR"):
        DeviceBenchConfig(lookup=True)
    with pytest.raises(ConfigError, match="--text goes with --lookup or --draft"):
        DeviceBenchConfig(text=(str(tmp_path),))
    with pytest.raises(ConfigError, match="one prompt at a time: drop --batch 1,2"):
        DeviceBenchConfig(lookup=True, text=(str(tmp_path),), batch=(1, 2))
    with pytest.raises(ConfigError, match="text must be a tuple of file or directory paths"):
        DeviceBenchConfig(lookup=True, text=str(tmp_path))
    with pytest.raises(ConfigError, match="draft_tokens must be an integer in 1..64"):
        DeviceBenchConfig(lookup=True, text=(str(tmp_path),), draft_tokens=0)
    with pytest.raises(ConfigError, match="--temperature goes with --lookup or --draft"):
        DeviceBenchConfig(temperature=0.8)
    assert DeviceBenchConfig(draft=tmp_path, text=(tmp_path,)).text == (str(tmp_path),)


def test_a_draft_with_another_tokenizer_is_refused(lively_gqa_bundle, texts, tmp_path):
    import shutil

    from edgegpt.manifest import MANIFEST_NAME, write_manifest

    other = tmp_path / "other"
    shutil.copytree(lively_gqa_bundle, other)
    tokenizer = other / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))  # the same tokens, other bytes
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    write_manifest(other, {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")})
    with pytest.raises(SamplingError, match="has another tokenizer than"):
        bench_bundle(lively_gqa_bundle, DeviceBenchConfig(draft=other, text=(texts["prose"],), **SHORT))


def test_cli_runs_the_speculative_bench_and_keeps_its_flags_to_a_bundle(lively_gqa_bundle, texts, tmp_path):
    from edgegpt.cli import main

    out = tmp_path / "spec.json"
    args = [
        "bench",
        str(lively_gqa_bundle),
        "--lookup",
        "--text",
        str(texts["prose"]),
        "--prompts",
        "1",
        "--runs",
        "1",
        "--threads",
        "1",
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "8",
        "--draft-tokens",
        "2",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| prose.txt | lookup |" in result.output and "one call: 1 token" in result.output
    written = json.loads(out.read_text())
    assert written["config"]["draft_tokens"] == 2 and sorted(written["chunk_ms"], key=int) == ["1", "2", "3"]
    refused = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--lookup", "--text", str(texts["prose"])])
    assert refused.exit_code == 2 and "--lookup, --text time one bundle" in refused.output
    missing = CliRunner().invoke(main, ["bench", str(lively_gqa_bundle), "--lookup"])
    assert missing.exit_code != 0 and "give --text FILE_OR_DIR" in missing.output
