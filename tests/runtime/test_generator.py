"""edgegpt.runtime: bundle verification, the onnxruntime decoding loop, parity with PyTorch, the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgegpt.errors import BundleError, ConfigError, ContextLengthError, ProviderError, SamplingError
from edgegpt.manifest import MANIFEST_NAME, write_manifest
from edgegpt.runtime import Bundle, Generator, PromptError, UnknownParameterError
from edgegpt.runtime.generation import generator as generator_module
from edgegpt.runtime.model import providers
from edgegpt.runtime.cli import chat_command, generate_command

PROMPTS = ["def ", "import json\n", "class Foo(object):\n    return ", ""]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    from edgegpt.export import export_bundle

    return Path(export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny"))


@pytest.fixture(scope="session")
def gen(tiny_bundle) -> Generator:
    return Generator.load(tiny_bundle, provider="cpu", threads=1)


@pytest.fixture(scope="session")
def mha_gen(tmp_path_factory, tiny_checkpoint) -> Generator:
    """The "mha" (KV layout "concat") bundle of the same checkpoint; its export validation is tested elsewhere."""
    from edgegpt.export import export_bundle

    bundle = export_bundle(
        tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny_mha", attention="mha", validate=False
    )
    return Generator.load(bundle, provider="cpu", threads=1)


@pytest.fixture(scope="session", params=["default", "mha"])
def any_gen(request) -> Generator:
    """A Generator on each KV layout: the default export's ("gqa", "shared_buffer") and "mha" ("concat")."""
    return request.getfixturevalue("gen" if request.param == "default" else "mha_gen")


@pytest.fixture(scope="session")
def torch_model(tiny_checkpoint):
    from edgegpt.train.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint).model


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _rewrite_manifest(bundle: Path, **changes) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    write_manifest(bundle, {**body, **changes})


# --- the import rule -------------------------------------------------------------------------------------


def test_runtime_imports_without_torch_or_onnx():
    code = (
        "import sys, edgegpt.runtime as rt\n"
        "from edgegpt.runtime import cli\nfrom edgegpt.runtime.engine import binding, cache\nfrom edgegpt.runtime.generation import generator, sampling\nfrom edgegpt.runtime.model import bundle, onnx_paths, providers\n"
        "[getattr(rt, name) for name in rt.__all__]\n"
        "bad = [m for m in ('torch', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_module_import_is_light():
    code = (
        "import sys, edgegpt.runtime.cli; heavy = {'onnxruntime', 'numpy'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_generate_runs_with_torch_and_onnx_blocked(tiny_bundle):
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgegpt.runtime.cli import generate_command\n"
        "generate_command.main(sys.argv[1:], standalone_mode=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_bundle), "def", "-n", "4", "--json", "--ignore-eos"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 4


# --- parity with the PyTorch reference -------------------------------------------------------------------


def test_greedy_tokens_equal_pytorch(any_gen, torch_model, torch_greedy):
    gen = any_gen
    for prompt in PROMPTS:
        ids = gen.encode(prompt) or [gen.eot_id]
        result = gen.generate_ids(ids, max_new_tokens=24, ignore_eos=True)
        assert result.tokens == torch_greedy(torch_model, ids, 24), prompt
        assert result.finish_reason == "length"


def test_batch_equals_each_prompt_alone_and_pytorch(any_gen, torch_model, torch_greedy):
    gen = any_gen
    results = gen.generate_batch(PROMPTS, max_new_tokens=16, ignore_eos=True)
    for prompt, result in zip(PROMPTS, results):
        alone = gen.generate(prompt, max_new_tokens=16, ignore_eos=True)
        assert result.tokens == alone.tokens and result.text == alone.text, prompt
        assert result.tokens == torch_greedy(torch_model, alone.prompt_tokens, 16), prompt


def test_batch_sampling_per_row_equals_alone(any_gen):
    gen = any_gen
    knobs = dict(max_new_tokens=12, temperature=0.9, top_k=50, seed=3, ignore_eos=True)
    results = gen.generate_batch(PROMPTS[:3], **knobs)
    assert [r.tokens for r in results] == [gen.generate(p, **knobs).tokens for p in PROMPTS[:3]]


def test_batch_rows_that_stop_early_equal_alone(gen):
    free = gen.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=9, ignore_eos=True)
    knobs = dict(max_new_tokens=12, temperature=1.0, seed=9, ignore_eos=True, stop_token_ids=[free.tokens[2]])
    batch = gen.generate_batch(PROMPTS, **knobs)
    alone = [gen.generate(p, **knobs) for p in PROMPTS]
    assert [(r.tokens, r.text, r.finish_reason) for r in batch] == [(r.tokens, r.text, r.finish_reason) for r in alone]
    assert batch[1].finish_reason == "stop" and len(batch[1].tokens) <= 2


def test_batch_sliding_window_runs_to_the_end(any_gen):
    gen = any_gen
    block = gen.config.block_size
    results = gen.generate_batch(
        [[1, 2, 3], list(range(1, 20))], max_new_tokens=block, ignore_eos=True, sliding_window=True
    )
    assert [len(r.tokens) for r in results] == [block, block] and all(r.context_shifts >= 1 for r in results)


# --- the generation API ----------------------------------------------------------------------------------


def test_result_fields_and_timings(gen):
    result = gen.generate("def ", max_new_tokens=8, ignore_eos=True)
    assert len(result.tokens) == 8 and result.finish_reason == "length"
    assert result.text == gen.decode(result.tokens)
    t = result.timings
    assert 0 < t.time_to_first_token_s <= t.total_s and t.tokens_per_s > 0 and t.steps == 8
    assert 0 < t.session_s <= t.total_s


def test_stream_pieces_join_to_generate_text(gen):
    knobs = dict(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    stream = gen.stream("def ", **knobs)
    pieces = list(stream)
    assert all(pieces) and "".join(pieces) == gen.generate("def ", **knobs).text == stream.result.text
    assert stream.result.tokens == gen.generate("def ", **knobs).tokens


def test_same_seed_same_text_other_seed_other_text(gen):
    knobs = dict(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    first, again, other = (gen.generate("import ", seed=s, **knobs).tokens for s in (5, 5, 6))
    assert first == again and first != other


def test_stream_never_splits_a_multibyte_character(gen, monkeypatch):
    from edgegpt.tokenizer import encode

    script = encode(gen.tokenizer, "a😀é€")

    class Scripted:
        def __init__(self, *args, **kwargs):
            self.tokens = iter(script)

        def __call__(self, logits):
            return next(self.tokens)

    monkeypatch.setattr(generator_module, "Sampler", Scripted)
    pieces = list(gen.stream("x", max_new_tokens=len(script)))
    assert pieces == ["a", "😀", "é", "€"]  # held back until each character is complete
    cut = gen.generate("x", max_new_tokens=len(script) - 1)  # ends inside "€": its bytes flush as U+FFFD
    assert cut.text == "a😀é\ufffd" == gen.decode(cut.tokens)


def test_stop_string_is_cut_and_not_emitted(gen):
    free = gen.generate("import ", max_new_tokens=30, temperature=1.0, seed=2, ignore_eos=True)
    stop = free.text[5:8]
    assert len(stop) == 3
    knobs = dict(max_new_tokens=30, temperature=1.0, seed=2, ignore_eos=True, stop=[stop, "\x00never"])
    result = gen.generate("import ", **knobs)
    assert result.finish_reason == "stop" and result.text == free.text[: free.text.find(stop)]
    assert "".join(gen.stream("import ", **knobs)) == result.text


def test_stop_token_ids_and_eos(gen):
    free = gen.generate("def ", max_new_tokens=20, temperature=1.0, seed=4, ignore_eos=True)
    token = free.tokens[3]
    cut = free.tokens.index(token)
    stopped = gen.generate("def ", max_new_tokens=20, temperature=1.0, seed=4, ignore_eos=True, stop_token_ids=[token])
    assert stopped.finish_reason == "stop" and stopped.tokens == free.tokens[:cut]
    eos_gen = Generator(gen.bundle, gen.session, gen.session_config)
    eos_gen.eot_id = token  # pretend the model's end-of-text is that token
    ended = eos_gen.generate("def ", max_new_tokens=20, temperature=1.0, seed=4)
    assert ended.finish_reason == "eos" and ended.tokens == free.tokens[:cut]


def test_zero_new_tokens_and_context_edge_cases(gen):
    nothing = gen.generate("def ", max_new_tokens=0)
    assert (nothing.text, nothing.tokens, nothing.finish_reason) == ("", [], "length")
    block = gen.config.block_size
    with pytest.raises(ContextLengthError, match=f"{block + 1} tokens exceeds"):
        gen.generate_ids([1] * (block + 1), max_new_tokens=None)
    with pytest.raises(SamplingError, match="max_new_tokens=None"):
        gen.generate("def ", max_new_tokens=None, sliding_window=True)


def test_empty_prompt_starts_from_end_of_text(gen):
    result = gen.generate("", max_new_tokens=4, ignore_eos=True)
    assert result.prompt_tokens == [gen.eot_id] and len(result.tokens) == 4


def test_invalid_sampling_values_raise_typed_errors(gen):
    for knobs, name in [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ]:
        with pytest.raises(SamplingError, match=name):
            gen.generate("def ", **knobs)
    with pytest.raises(UnknownParameterError, match="temprature.*temperature"):
        gen.generate("def ", temprature=0.5)
    with pytest.raises(TypeError):
        gen.stream("def ", top_n=3)


def test_token_api_refuses_ids_outside_the_vocabulary(gen):
    vocab = gen.config.vocab_size
    assert len(gen.generate_ids([1, 2, 3], max_new_tokens=3, ignore_eos=True).tokens) == 3
    for ids in ([1, vocab], [-1], [1, 2.5], "abc"):
        with pytest.raises(PromptError, match="vocabulary|integer|sequence"):
            gen.generate_ids(ids, max_new_tokens=3)
    with pytest.raises(PromptError, match=str(vocab + 5)):
        gen.generate_batch([[1, 2], [vocab + 5]], max_new_tokens=2)


# --- the context -----------------------------------------------------------------------------------------


def test_context_overflow_raises_with_the_numbers(gen):
    block = gen.config.block_size
    with pytest.raises(ContextLengthError, match=rf"2 tokens \+ max_new_tokens {block} = {block + 2} .* {block}"):
        gen.generate_ids([1, 2], max_new_tokens=block)


def test_max_new_tokens_none_fills_the_context_and_ends_with_length(gen):
    block = gen.config.block_size
    result = gen.generate_ids([1, 2, 3], max_new_tokens=None, ignore_eos=True)
    assert result.finish_reason == "length" and len(result.tokens) == block - 3


def test_sliding_window_keeps_going_and_says_so(any_gen, torch_model, torch_greedy):
    gen = any_gen
    block = gen.config.block_size
    result = gen.generate_ids([1, 2, 3], max_new_tokens=block + 10, ignore_eos=True, sliding_window=True)
    assert result.finish_reason == "length" and len(result.tokens) == block + 10
    assert result.context_shifts >= 1
    # Up to the first shift the window changes nothing.
    assert result.tokens[: block - 3] == gen.generate_ids([1, 2, 3], max_new_tokens=block - 3, ignore_eos=True).tokens
    long_prompt = list(range(1, 2 * block))
    clipped = gen.generate_ids(long_prompt, max_new_tokens=5, ignore_eos=True, sliding_window=True)
    assert len(clipped.tokens) == 5 and clipped.context_shifts == 1
    # The window kept the last block - 5 prompt tokens: the same as feeding those alone.
    assert clipped.tokens == torch_greedy(torch_model, long_prompt[-(block - 5) :], 5)


@pytest.mark.parametrize("attention", ["mha", "gqa"])  # KV layouts "concat" and "shared_buffer"
def test_public_iobinding_api_gives_the_same_tokens(attention, request, monkeypatch):
    """On the lively checkpoint's bundles, whose greedy tokens vary (the seeded tiny model repeats one)."""
    from edgegpt.runtime.engine import binding

    gen = Generator.load(request.getfixturevalue(f"lively_{attention}_bundle"), provider="cpu", threads=1)
    expected = [gen.generate(p, max_new_tokens=10, ignore_eos=True).tokens for p in PROMPTS]
    assert binding.Binding(gen.session, ("cpu", 0)).fast
    monkeypatch.setenv(binding.PUBLIC_API_VARIABLE, "1")
    assert not binding.Binding(gen.session, ("cpu", 0)).fast
    assert [gen.generate(p, max_new_tokens=10, ignore_eos=True).tokens for p in PROMPTS] == expected
    assert [r.tokens for r in gen.generate_batch(PROMPTS, max_new_tokens=10, ignore_eos=True)] == expected


# --- threads ---------------------------------------------------------------------------------------------


def test_concurrent_generate_calls_equal_serial_runs(any_gen):
    gen = any_gen
    jobs = [
        (PROMPTS[i % len(PROMPTS)], dict(max_new_tokens=12, temperature=0.8 * (i % 2), seed=i, ignore_eos=True))
        for i in range(8)
    ]
    serial = [gen.generate(p, **k).tokens for p, k in jobs]
    barrier = threading.Barrier(8)

    def run(job):
        barrier.wait()
        return gen.generate(job[0], **job[1]).tokens

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, jobs)) == serial


# --- loading and bad bundles -----------------------------------------------------------------------------


def test_bundle_load_reads_the_contract(tiny_bundle, tiny_config):
    bundle = Bundle.load(tiny_bundle)
    assert bundle.config == tiny_config and bundle.kv.layout == "shared_buffer"  # the default export, "gqa"
    assert bundle.tokenizer.get_vocab_size() == tiny_config.vocab_size


def test_tampered_model_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx.*sha256"):
        Generator.load(bundle_copy, provider="cpu")


def test_truncated_model_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="model.onnx.*truncated"):
        Generator.load(bundle_copy, provider="cpu")


def test_missing_tokenizer_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json.*missing"):
        Generator.load(bundle_copy, provider="cpu")


def test_unknown_format_version_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99"):
        Generator.load(bundle_copy, provider="cpu")


def test_unknown_kv_layout_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    _rewrite_manifest(
        bundle_copy, graph={**manifest["graph"], "kv_cache": {**manifest["graph"]["kv_cache"], "layout": "paged"}}
    )
    with pytest.raises(BundleError, match="'paged' is not supported"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize(
    "change, said",
    [
        (dict(block_size=4096), "block_size 4096 (the graph: 64)"),
        (dict(n_layer=1), "n_layer 1 (the graph: 2)"),
        (dict(n_head=4), "n_head 4 (the graph: 2)"),
        (dict(gelu="erf"), "gelu erf (the graph: tanh)"),
    ],
)
def test_manifest_model_settings_must_match_the_graph(bundle_copy, change, said):
    """The manifest cannot hash itself: an edited shape is refused at load, not met mid-generation."""
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    _rewrite_manifest(bundle_copy, model={**manifest["model"], **change})
    with pytest.raises(BundleError, match=rf"'model' disagrees with the graph: {re.escape(said)}.*re-export"):
        Bundle.load(bundle_copy)


def test_the_graph_check_reads_every_format(tiny_checkpoint, tmp_path):
    """The position table is found through int8 / int4 / fp16 graphs too: their real settings pass."""
    from edgegpt.export import export_bundle, quantize_bundle
    from edgegpt.runtime.model.bundle import check_model_settings
    from edgegpt.runtime.model.onnx_paths import read_graph_summary

    fp32 = export_bundle(tiny_checkpoint, tmp_path / "fp32", validate=False)
    for fmt in ("int8", "int4", "fp16"):
        bundle = Bundle.load(quantize_bundle(fp32, tmp_path / fmt, to=fmt))
        summary = read_graph_summary(bundle.model_path)
        check_model_settings(summary, bundle.config, bundle.kv, bundle.path)
        wrong = dataclasses.replace(bundle.config, block_size=32)
        with pytest.raises(BundleError, match="block_size 32 .the graph: 64."):
            check_model_settings(summary, wrong, bundle.kv, bundle.path)


def test_tokenizer_of_another_vocabulary_is_refused(bundle_copy, tiny_config):
    from edgegpt.tokenizer import train_tokenizer

    train_tokenizer(["some other text entirely"], vocab_size=300).save(str(bundle_copy / "tokenizer.json"))
    _rewrite_manifest(bundle_copy)
    with pytest.raises(BundleError, match=f"vocab_size is {tiny_config.vocab_size}"):
        Bundle.load(bundle_copy)


def _externalise(bundle: Path) -> Path:
    """Re-save model.onnx with its weights in one external file, weights.bin; returns that file's path."""
    import onnx

    model = onnx.load(str(bundle / "model.onnx"))
    for name in [
        p.name
        for p in bundle.iterdir()
        if p.name not in ("model.onnx", "tokenizer.json", "genai_config.json", MANIFEST_NAME)
    ]:
        (bundle / name).unlink()  # the exporter's own external data, if any
    onnx.save_model(
        model, str(bundle / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    return bundle / "weights.bin"


def _relocate(bundle: Path, location: str) -> None:
    """Point every external-data location of model.onnx at `location`."""
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(bundle / "model.onnx"))


def test_graph_reader_refuses_malformed_files(tmp_path):
    from edgegpt.runtime.model.onnx_paths import read_graph_summary

    for i, data in enumerate([b"\x3a\xff\xff\x7f", b"\x3a\x05\x2a\x03", b"\x0f"]):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(data)
        with pytest.raises(BundleError, match="not a valid ONNX model"):
            read_graph_summary(path)


def test_external_data_inside_the_bundle_loads(bundle_copy):
    _externalise(bundle_copy)
    _rewrite_manifest(bundle_copy)
    assert Generator.load(bundle_copy, provider="cpu").generate("def ", max_new_tokens=2).finish_reason in (
        "length",
        "eos",
    )


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_dir", "hardlink", "unlisted", "missing"])
def test_external_data_leaving_the_bundle_is_refused(bundle_copy, tmp_path, how):
    """Refused before any session on every supported onnxruntime: below 1.24, onnxruntime itself loads the
    dotdot, absolute and symlink cases, and no version knows the manifest (see runtime/model/onnx_paths.py)."""
    outside = tmp_path / "outside.bin"
    weights = _externalise(bundle_copy)
    if how == "dotdot":
        weights.rename(outside)
        _relocate(bundle_copy, "../outside.bin")
        match = "outside.bin"
    elif how == "absolute":
        weights.rename(outside)
        _relocate(bundle_copy, str(outside))
        match = "relative path"
    elif how == "symlink":
        weights.rename(outside)
        weights.symlink_to(outside)
        match = "symbolic link"
    elif how == "symlinked_dir":  # the file is not a link, a directory on its path is
        (tmp_path / "far").mkdir()
        weights.rename(tmp_path / "far" / "outside.bin")
        (bundle_copy / "sub").symlink_to(tmp_path / "far", target_is_directory=True)
        _relocate(bundle_copy, "sub/outside.bin")
        match = "outside the bundle"
    elif how == "hardlink":
        os.link(weights, outside)
        match = "hard link"
    elif how == "missing":
        weights.unlink()
        match = "external data 'weights.bin' is missing"
    _rewrite_manifest(bundle_copy)
    if how == "unlisted":  # present in the bundle, but not hashed by the manifest
        manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
        del manifest["files"]["weights.bin"]
        (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
        match = "not listed"
    with pytest.raises(BundleError, match=match):
        Generator.load(bundle_copy, provider="cpu")


# --- providers -------------------------------------------------------------------------------------------


def test_cpu_session_really_runs_on_cpu(gen):
    assert gen.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("flags, expected", [([], "1"), (["--no-spinning"], "0"), (["--spinning"], "1")])
def test_spinning_flag_reaches_the_session(tiny_bundle, monkeypatch, flags, expected):
    seen = []
    real = providers.SessionConfig.session_options

    def spy(self):
        options = real(self)
        seen.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        return options

    monkeypatch.setattr(providers.SessionConfig, "session_options", spy)
    result = CliRunner().invoke(generate_command, [str(tiny_bundle), "def", "-n", "2", "--provider", "cpu", *flags])
    assert result.exit_code == 0, result.output
    assert seen == [expected]


@pytest.mark.parametrize("flags, expected", [([], [True]), (["--no-huge-pages"], [False])])
def test_huge_pages_flag_reaches_the_session(tiny_bundle, monkeypatch, flags, expected):
    seen = []
    real = providers.huge_pages_for_new_memory

    def spy(enabled=True):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(providers, "huge_pages_for_new_memory", spy)
    result = CliRunner().invoke(generate_command, [str(tiny_bundle), "def", "-n", "2", "--provider", "cpu", *flags])
    assert result.exit_code == 0, result.output
    assert seen == expected


def test_bad_provider_and_options_are_config_errors(tiny_bundle):
    with pytest.raises(ConfigError, match="provider"):
        Generator.load(tiny_bundle, provider="gpu")
    with pytest.raises(ConfigError, match="threads"):
        Generator.load(tiny_bundle, provider="cpu", threads=0)


def test_cuda_unavailable_says_why(tiny_bundle, monkeypatch, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ProviderError, match="onnxruntime-gpu is not installed"):
        Generator.load(tiny_bundle, provider="cuda")
    # CUDA offered but unusable (no driver): "auto" falls back to CPU with one warning line.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(providers.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: not found")))
    with pytest.raises(ProviderError, match="no NVIDIA driver"):
        Generator.load(tiny_bundle, provider="cuda")
    with caplog.at_level(logging.WARNING, logger="edgegpt.runtime.model.providers"):
        assert Generator.load(tiny_bundle, provider="auto").providers == ["CPUExecutionProvider"]
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "using CPU" in caplog.records[0].getMessage()


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_silent_cuda_fallback_is_caught(tiny_bundle, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setattr(providers, "cuda_problem", lambda: None)  # pretend CUDA looks fine
    with pytest.raises(ProviderError, match="fell back"):
        Generator.load(tiny_bundle, provider="cuda", log_severity=4)


@pytest.mark.cuda
def test_cuda_greedy_equals_cpu(tiny_bundle, gen):
    cuda = Generator.load(tiny_bundle, provider="cuda")
    assert cuda.providers[0] == "CUDAExecutionProvider"
    for prompt in PROMPTS:
        knobs = dict(max_new_tokens=16, ignore_eos=True)
        assert cuda.generate(prompt, **knobs).tokens == gen.generate(prompt, **knobs).tokens
    assert [r.tokens for r in cuda.generate_batch(PROMPTS, max_new_tokens=8, ignore_eos=True)] == [
        r.tokens for r in gen.generate_batch(PROMPTS, max_new_tokens=8, ignore_eos=True)
    ]


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_generate_streams_and_prints_json(tiny_bundle, gen):
    runner = CliRunner()
    streamed = runner.invoke(
        generate_command, [str(tiny_bundle), "def ", "-n", "8", "--provider", "cpu", "--ignore-eos"]
    )
    expected = gen.generate("def ", max_new_tokens=8, ignore_eos=True)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.startswith(expected.text)
    as_json = runner.invoke(generate_command, [str(tiny_bundle), "def ", "-n", "8", "--ignore-eos", "--json"])
    payload = json.loads(as_json.stdout)
    assert payload["tokens"] == expected.tokens and payload["text"] == expected.text
    assert payload["finish_reason"] == "length"


def test_cli_generate_prompt_file_and_errors(tiny_bundle, tmp_path):
    runner = CliRunner()
    good = tmp_path / "prompt.txt"
    good.write_text("def é(", encoding="utf-8")
    assert runner.invoke(generate_command, [str(tiny_bundle), "--prompt-file", str(good), "-n", "2"]).exit_code == 0
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    result = runner.invoke(generate_command, [str(tiny_bundle), "--prompt-file", str(bad)])
    assert result.exit_code == 2 and "not UTF-8" in result.output and "0xe9" in result.output
    result = runner.invoke(generate_command, [str(tiny_bundle), "def", "--top-p", "0"])
    assert result.exit_code == 2 and "--top-p" in result.output
    result = runner.invoke(generate_command, [str(tiny_bundle), "def", "-n", "1000"])
    assert result.exit_code == 1 and "ContextLengthError" in result.output
    assert runner.invoke(generate_command, [str(tiny_bundle)]).exit_code == 2


def test_cli_help_has_examples():
    for command in (generate_command, chat_command):
        result = CliRunner().invoke(command, ["--help"])
        assert result.exit_code == 0 and "Examples:" in result.output


def test_cli_chat_keeps_the_conversation(tiny_bundle, monkeypatch):
    prompts = []
    real = Generator.stream_ids

    def spy(self, ids, sampling=None, **overrides):
        prompts.append(self.decode(ids))
        return real(self, ids, sampling, **overrides)

    monkeypatch.setattr(Generator, "stream_ids", spy)
    result = CliRunner().invoke(
        chat_command, [str(tiny_bundle), "-n", "4", "--provider", "cpu"], input="hello\nagain\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert prompts[0] == "User: hello\nAssistant:"
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith("User: again\nAssistant:")


@pytest.mark.slow
def test_base_install_generate_without_torch(tiny_bundle, base_venv_bin):
    bin_dir = base_venv_bin
    no_torch = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
        capture_output=True,
        text=True,
    )
    assert no_torch.stdout.strip() == "None", "the base venv must not have torch"
    proc = subprocess.run(
        [str(bin_dir / "edgegpt"), "generate", str(tiny_bundle), "def", "-n", "8", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["finish_reason"] in ("length", "eos") and 0 < len(payload["tokens"]) <= 8
    assert isinstance(payload["text"], str)


# --- bad input at the command line: one line, no traceback ------------------------------------------------


def test_cli_refuses_a_prompt_that_is_not_utf8(tiny_bundle):
    result = CliRunner().invoke(generate_command, [str(tiny_bundle), "abc\udcff", "--provider", "cpu"])  # bytes abc\xff
    assert result.exit_code == 2 and "PROMPT is not UTF-8 text (byte 0xff at offset 3)" in result.output
    assert "Traceback" not in result.output


def test_cli_chat_asks_again_for_a_line_that_is_not_utf8(tiny_bundle):
    result = CliRunner().invoke(
        chat_command, [str(tiny_bundle), "-n", "2", "--provider", "cpu"], input=b"hi\xff\nhello\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert "that line is not UTF-8 text (byte 0xff at offset 2); type it again" in result.output


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgegpt.cli", *args], text=True, stderr=subprocess.PIPE, timeout=120, **kwargs
    )


def test_cli_chat_with_stdin_closed_says_so(tiny_bundle):
    proc = _cli(
        ["chat", str(tiny_bundle), "--provider", "cpu"], stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(0)
    )
    assert proc.returncode == 2 and "standard input, which is closed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_cli_generate_to_a_full_stdout_says_so(tiny_bundle):
    with open("/dev/full", "w") as full:
        proc = _cli(["generate", str(tiny_bundle), "def", "-n", "4", "--provider", "cpu"], stdout=full)
    assert proc.returncode == 1 and "cannot write the text to standard output: No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
