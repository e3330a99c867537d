"""Every run path on Llama-family bundles (issue #24), with transformers as the oracle (no network).

Each family is a real model's config scaled down (2 layers, 64 wide, random weights) with a byte-level BPE that has
the model's own special tokens and chat template: SmolLM2-like (Llama, GQA; ChatML template in tokenizer_config.json),
Qwen2.5-like (q/k/v biases; template in chat_template.jinja, two stop ids), Qwen3-like (q/k norm, head_dim 32 !=
64 / 4) and Llama-3.2-like (llama3 rope scaling; a Llama 3 tokenizer without "<|endoftext|>" that adds
<|begin_of_text|>, and two stop ids; 2 KV heads here, where Llama 3.2 has one: tests/export/test_export_llama.py
covers multi-query attention).

Each is imported (import-hf), exported (fp32) and run: its greedy tokens equal transformers' `generate`; a BOS
reaches every path once (generate, the CLI, chat, the server, the browser), every stop id ends the text, and
onnxruntime-genai generates the same tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgegpt.runtime import Generator, SamplingConfig, Speculative
from edgegpt.runtime.generation.chat import Conversation
from edgegpt.runtime.generation.templates import ChatTemplate

transformers = pytest.importorskip("transformers")

WEB = Path(__file__).resolve().parents[2] / "web"
PROMPT = "the quick brown fox jumps over the lazy dog and the"  # words only: every family's pre-tokenizer agrees
STEPS = 40
SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
)
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]

# SmolLM2-Instruct's template, as its tokenizer_config.json has it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's, without its tools branch (kept as a condition on the undefined `tools`)
QWEN_TEMPLATE = """{%- if tools %}
    {{- raise_exception('no tools here') }}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Llama 3's shape: the template renders the BOS itself
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# name -> the transformers config class and fields, the special tokens (tokenizer_config.json's, and
# generation_config.json's by name; a list of eos is several stop ids), the template and the file it is saved in
FAMILIES = {
    "smollm2": dict(
        cls="LlamaConfig",
        fields=dict(rope_theta=100000.0, tie_word_embeddings=True),
        vocab=CHATML,
        tokens=dict(bos_token="<|im_start|>", eos_token="<|im_end|>"),
        generation=dict(bos_token_id="<|im_start|>", eos_token_id="<|im_end|>"),
        template=SMOLLM2_TEMPLATE,
        template_file="tokenizer_config.json",
    ),
    "qwen2.5": dict(
        cls="Qwen2Config",
        fields=dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        vocab=CHATML,
        tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        generation=dict(
            bos_token_id="<|endoftext|>", eos_token_id=["<|im_end|>", "<|endoftext|>"], pad_token_id="<|endoftext|>"
        ),
        template=QWEN_TEMPLATE,
        template_file="chat_template.jinja",
    ),
    "qwen3": dict(
        cls="Qwen3Config",
        fields=dict(head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
        vocab=CHATML,
        tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        generation=dict(bos_token_id="<|endoftext|>", eos_token_id=["<|im_end|>", "<|endoftext|>"]),
        template=QWEN_TEMPLATE,
        template_file="chat_template.jinja",
    ),
    "llama3.2": dict(
        cls="LlamaConfig",
        fields=dict(
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        vocab=LLAMA3,
        adds_bos=True,
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        generation=dict(bos_token_id="<|begin_of_text|>", eos_token_id=["<|end_of_text|>", "<|eot_id|>"]),
        template=LLAMA3_TEMPLATE,
        template_file="tokenizer_config.json",
    ),
}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Add one and two"},
]
_BUILT: dict[str, SimpleNamespace] = {}


def _tokenizer(spec: dict, text: str):
    """A byte-level BPE of 300 tokens with the family's special tokens first; a Llama 3 one adds its BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=spec["vocab"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[:8000]], trainer)
    if spec.get("adds_bos"):
        bos = spec["tokens"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def built(name: str, root: Path, text: str) -> SimpleNamespace:
    """The family's HF directory, transformers model, imported checkpoint, fp32 bundle and Generator (built once)."""
    if name in _BUILT:
        return _BUILT[name]
    from edgegpt.export import export_bundle
    from edgegpt.train.hf import import_hf

    spec = FAMILIES[name]
    tok = _tokenizer(spec, text)
    ids = {
        key: [tok.token_to_id(t) for t in v] if isinstance(v, list) else tok.token_to_id(v)
        for key, v in spec["generation"].items()
    }
    hf = root / "hf"
    config = getattr(transformers, spec["cls"])(**{**SHAPE, **spec["fields"]}, vocab_size=tok.get_vocab_size(), **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises norms to 1, biases to 0 and matrices small: with a tied head such a
        for part, p in model.named_parameters():  # model repeats its input token; larger output projections do not
            p.add_(
                (0.5 if part.endswith(("o_proj.weight", "down_proj.weight")) else 0.1 if p.dim() == 2 else 0.05)
                * torch.randn_like(p)
            )
    model.save_pretrained(hf)
    tok.save(str(hf / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **spec["tokens"]}
    if spec["template_file"] == "tokenizer_config.json":
        tokenizer_config["chat_template"] = spec["template"]
    else:
        (hf / spec["template_file"]).write_text(spec["template"])
    (hf / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (hf / "generation_config.json").write_text(json.dumps(ids))
    bundle = export_bundle(import_hf(hf, root / "ckpt"), root / "bundle")
    gen = Generator.load(bundle, provider="cpu", threads=1)
    _BUILT[name] = SimpleNamespace(
        name=name,
        hf=hf,
        model=model,
        bundle=bundle,
        gen=gen,
        tok=tok,
        ids=ids,
        hf_tok=transformers.AutoTokenizer.from_pretrained(hf),
    )
    return _BUILT[name]


@pytest.fixture(scope="module")
def family(tmp_path_factory, sample_text):
    """`family(name)`: the built family (see `built`)."""
    return lambda name: built(name, tmp_path_factory.mktemp(name), sample_text)


@pytest.fixture(scope="module")
def llama3(family):
    return family("llama3.2")


def _hf_greedy(fam, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy `generate`, its stop ids switched off so that it makes all n tokens (its
    min_new_tokens would mask them instead: another argmax than ignore_eos's)."""
    fam.model.generation_config.eos_token_id = None  # the model's defaults fill what the config below leaves unset
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=ids[0])
    with torch.no_grad():
        out = fam.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), generation_config=config
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_tokens_equal_transformers_generate(name, family):
    fam = family(name)
    ids = fam.gen.encode(PROMPT)
    assert ids == fam.hf_tok(PROMPT)["input_ids"]  # the BOS where the tokenizer adds one, as transformers
    assert (ids[0] == fam.ids["bos_token_id"]) == bool(FAMILIES[name].get("adds_bos"))
    result = fam.gen.generate(PROMPT, max_new_tokens=STEPS, ignore_eos=True)
    want = _hf_greedy(fam, ids, STEPS)
    assert result.prompt_tokens == ids and len(want) == STEPS and len(set(want)) > 3
    assert result.tokens == want
    manifest = json.loads((fam.bundle / "manifest.json").read_text())["tokenizer"]
    stops = fam.ids["eos_token_id"] if isinstance(fam.ids["eos_token_id"], list) else [fam.ids["eos_token_id"]]
    assert manifest["stop_token_ids"] == stops and manifest["eot_token_id"] == stops[0]
    assert fam.gen.stop_ids == tuple(stops) and fam.gen.eot_id == stops[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_chat_template_renders_and_tokenizes_as_transformers(name, family):
    """The model's template, from tokenizer_config.json or chat_template.jinja, renders transformers' text; its
    tokens are apply_chat_template's (the template's own BOS, never a second one)."""
    fam = family(name)
    for messages in (MESSAGES, MESSAGES[1:2]):  # with and without a system message (a default one is rendered)
        want = fam.hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert fam.gen.chat_template.render(messages) == want
    ids = fam.hf_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert fam.gen.encode_chat(fam.gen.chat_template.render(MESSAGES)) == ids
    if FAMILIES[name].get("adds_bos"):  # (SmolLM2's "BOS" is <|im_start|>, which every turn of its template opens)
        assert ids[0] == fam.ids["bos_token_id"] and ids.count(fam.ids["bos_token_id"]) == 1


def test_a_bundles_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    """transformers 5 saves chat_template.jinja; where both are there, the file is the template (as transformers)."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config", "bos_token": "<s>"}))
    assert ChatTemplate.from_bundle(tmp_path).render(MESSAGES) == "config"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    assert ChatTemplate.from_bundle(tmp_path).render(MESSAGES) == "<s>Add one and two"


def test_the_bos_reaches_generate_batch_and_the_cli_once(llama3):
    from click.testing import CliRunner

    from edgegpt.cli.generate import generate_command

    gen, bos = llama3.gen, llama3.ids["bos_token_id"]
    ids = gen.encode(PROMPT)
    assert ids[0] == bos and ids.count(bos) == 1 and ids[1:] == gen.encode(PROMPT, add_special_tokens=False)
    plain = gen.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert plain.prompt_tokens == ids
    stream = gen.stream(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert "".join(stream) == plain.text and stream.result.prompt_tokens == ids
    rows = gen.generate_batch([PROMPT, ids[1:]], max_new_tokens=8, ignore_eos=True)
    assert rows[0].prompt_tokens == ids and rows[0].tokens == plain.tokens
    assert rows[1].prompt_tokens == ids[1:]  # token ids are fed as given: no BOS added
    assert gen.generate_ids(ids[1:], max_new_tokens=1).prompt_tokens == ids[1:]
    assert gen.generate("", max_new_tokens=2, ignore_eos=True).prompt_tokens == [bos]  # an empty prompt: the BOS
    assert gen.generate_ids([], max_new_tokens=2, ignore_eos=True).prompt_tokens == [bos]
    out = CliRunner().invoke(
        generate_command, [str(llama3.bundle), PROMPT, "-n", "8", "--ignore-eos", "--json", "--provider", "cpu"]
    )
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["prompt_tokens"] == len(ids) and payload["tokens"] == plain.tokens


def test_chat_gets_the_templates_bos_once_and_keeps_it_across_turns(llama3):
    from click.testing import CliRunner

    from edgegpt.cli.generate import chat_command

    gen, bos = llama3.gen, llama3.ids["bos_token_id"]
    chat = Conversation(gen, SamplingConfig(max_new_tokens=6, ignore_eos=True))
    reply = "".join(chat.say("Hi there"))
    first = chat.last_result.prompt_tokens
    cli = CliRunner().invoke(
        chat_command, [str(llama3.bundle), "-n", "6", "--ignore-eos", "--provider", "cpu"], input="Hi there\n/exit\n"
    )  # `edgegpt chat` runs the same Conversation
    assert cli.exit_code == 0 and cli.stdout == reply + "\n", cli.output
    want = llama3.hf_tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=True, add_generation_prompt=True
    )
    assert first == (want["input_ids"] if not isinstance(want, list) else want) and first.count(bos) == 1
    "".join(chat.say("Add one and two"))
    second = chat.last_result.prompt_tokens
    assert second[: len(first)] == first and second.count(bos) == 1 and chat.last_result.cached_tokens >= len(first)


def _with_stop_ids(bundle: Path, stops: list[int], out: Path) -> Path:
    """A copy of `bundle` whose manifest lists `stops` as its stop ids (the manifest is not itself hashed)."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["stop_token_ids"] = stops
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _first_new(tokens: list[int], after: int) -> int:
    """The first position from `after` on whose token has not appeared before it."""
    return next(k for k in range(after, len(tokens)) if tokens[k] not in tokens[:k])


@pytest.fixture(scope="module")
def stop_cases(llama3, tmp_path_factory):
    """[(bundle, the greedy tokens it gives before it stops)]: the Llama bundle with a token the model emits at
    step k listed among its stop ids, at index 1 of [<|end_of_text|>, t, <|eot_id|>] and then alone before them."""
    full = llama3.gen.generate(PROMPT, max_new_tokens=STEPS, ignore_eos=True).tokens
    eos = llama3.ids["eos_token_id"]
    k1 = _first_new(full, 3)
    k2 = _first_new(full, k1 + 1)
    root = tmp_path_factory.mktemp("stops")
    return [
        (_with_stop_ids(llama3.bundle, [eos[0], full[k1], eos[1]], root / "a"), full[:k1]),
        (_with_stop_ids(llama3.bundle, [full[k2], *eos], root / "b"), full[:k2]),
    ]


def test_every_stop_id_ends_the_text_in_every_python_path(llama3, stop_cases):
    gen = llama3.gen
    for stop in gen.stop_ids:  # each of the model's own: forced at the first step
        for result in (
            gen.generate(PROMPT, max_new_tokens=8, logit_bias={stop: 100}),
            gen.generate_batch([PROMPT], max_new_tokens=8, logit_bias={stop: 100})[0],
        ):
            assert (result.finish_reason, result.tokens) == ("eos", [])
        chat = Conversation(gen, SamplingConfig(max_new_tokens=8, logit_bias={stop: 100}))
        assert "".join(chat.say("Hi there")) == "" and chat.last_result.finish_reason == "eos"
    for bundle, before in stop_cases:  # one emitted mid-text, listed second, then first
        other = Generator(Generator.load(bundle, provider="cpu", threads=1).bundle, gen.session, gen.session_config)
        for result in (
            other.generate(PROMPT, max_new_tokens=STEPS),
            other.generate_batch([PROMPT, "and the"], max_new_tokens=STEPS)[0],
            other.generate(PROMPT, max_new_tokens=STEPS, speculative=Speculative(lookup=True)),
        ):
            assert (result.finish_reason, result.tokens) == ("eos", before)
        stream = other.stream(PROMPT, max_new_tokens=STEPS)
        assert "".join(stream) == other.decode(before) and stream.result.finish_reason == "eos"


@pytest.fixture(scope="module")
def serve(llama3, stop_cases):
    """An in-process `edgegpt serve` app (its scheduler, continuous batching) over the Llama bundle and its copies."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from edgegpt.runtime.serve.app import create_app
    from edgegpt.runtime.serve.settings import ServeSettings

    paths = {"llama": llama3.bundle, **{f"stop{i}": bundle for i, (bundle, _) in enumerate(stop_cases)}}
    app = create_app(paths, "llama", ServeSettings(slots=2, threads=1))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield client


def test_the_server_adds_the_bos_to_text_prompts_and_stops_on_every_stop_id(llama3, serve, stop_cases):
    gen = llama3.gen
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    out = serve.post("/v1/completions", json=body).json()
    want = gen.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert out["choices"][0]["text"] == want.text and out["usage"]["prompt_tokens"] == len(gen.encode(PROMPT))
    ids = gen.encode(PROMPT, add_special_tokens=False)
    out = serve.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert out["usage"]["prompt_tokens"] == len(ids)  # ids as given
    chat = serve.post(
        "/v1/chat/completions",
        json={"model": "llama", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
    ).json()
    chat_ids = gen.encode_chat(gen.chat_template.render(MESSAGES))
    assert chat["usage"]["prompt_tokens"] == len(chat_ids) and chat_ids.count(llama3.ids["bos_token_id"]) == 1
    want = gen.generate_ids(chat_ids, max_new_tokens=8, ignore_eos=True)
    assert chat["choices"][0]["message"]["content"] == want.text
    for stop in gen.stop_ids:
        forced = serve.post("/v1/completions", json={**body, "ignore_eos": False, "logit_bias": {str(stop): 100}})
        forced = forced.json()
        assert forced["choices"][0]["finish_reason"] == "stop" and forced["usage"]["completion_tokens"] == 0
    for i, (_, before) in enumerate(stop_cases):
        out = serve.post(
            "/v1/completions", json={**body, "model": f"stop{i}", "max_tokens": STEPS, "ignore_eos": False}
        ).json()
        assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == len(before)
        assert out["choices"][0]["text"] == gen.decode(before)


def test_onnxruntime_genai_generates_the_same_greedy_tokens(llama3, family):
    """genai runs the bundle as its own "llama"/"qwen3" type: the same greedy tokens as edgegpt and transformers."""
    og = pytest.importorskip("onnxruntime_genai")
    for fam in (llama3, family("qwen3")):
        config = json.loads((fam.bundle / "genai_config.json").read_text())["model"]
        assert config["type"] == {"llama3.2": "llama", "qwen3": "qwen3"}[fam.name]
        assert config["eos_token_id"] == fam.ids["eos_token_id"]
        assert config["decoder"]["head_size"] == fam.gen.config.head_size
        ids = fam.gen.encode(PROMPT)
        model = og.Model(str(fam.bundle))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + STEPS, min_length=len(ids) + STEPS)
        runner = og.Generator(model, params)
        runner.append_tokens(ids)
        while not runner.is_done():
            runner.generate_next_token()
        tokens = [int(t) for t in runner.get_sequence(0)][len(ids) :]
        ours = fam.gen.generate(PROMPT, max_new_tokens=STEPS, ignore_eos=True).tokens
        assert tokens == ours == _hf_greedy(fam, ids, STEPS)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the browser runtime's tests need Node.js")
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        pytest.fail("web/node_modules is missing: run `make web` (npm ci in web/)")
    return node


@pytest.fixture(scope="module")
def head_dim_bundle(tmp_path_factory, tiny_tokenizer):
    """A Llama-family bundle with head_dim 32 != n_embd / n_head = 16 (and 2 KV heads of 4), made by edgegpt."""
    from edgegpt.config import GPTConfig
    from edgegpt.export import export_bundle
    from edgegpt.train.checkpoint import save_checkpoint
    from edgegpt.train.model import SimpleGPT

    config = GPTConfig(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        head_dim=32,
        n_embd=64,
        block_size=128,
        n_inner=96,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        bias=False,
        vocab_size=tiny_tokenizer.get_vocab_size(),
    )
    torch.manual_seed(0)
    model = SimpleGPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("head_dim")
    return export_bundle(save_checkpoint(root / "ckpt", model, tiny_tokenizer.to_str()), root / "bundle")


def _web_case(name: str, bundle: Path, stop_cases=()) -> dict:
    """What web/test/generator.test.js checks against the Python runtime (see tests/web/test_web.py `case`)."""
    gen = Generator.load(bundle, provider="cpu", threads=1)
    result = gen.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
    stop = result.text[len(result.text) // 2 :][:2]
    stopped = gen.generate(PROMPT, max_new_tokens=32, ignore_eos=True, stop=[stop])
    return {
        "name": name,
        "bundle": str(bundle),
        "prompt": PROMPT,
        "steps": 32,
        "tokens": result.tokens,
        "text": result.text,
        "stop": stop,
        "stopText": stopped.text,
        "promptTokens": result.prompt_tokens,
        "encodings": [[s, gen.encode(s)] for s in (PROMPT, "", "x <|eot_id|> y")],
        "stopCases": [{"bundle": str(b), "tokens": before} for b, before in stop_cases],
    }


def test_the_browser_runtime_generates_the_python_runtimes_tokens(
    llama3, family, stop_cases, head_dim_bundle, tmp_path
):
    """web/test/generator.test.js on the Llama bundle (2 KV heads of 4, a BOS, two stop ids, and copies that list an
    emitted token) and on one with head_dim 32, not 64 / 4: greedy tokens and text, the BOS, every stop id. The Qwen3
    bundle (q/k norm) is refused in one line: onnxruntime-web 1.30 cannot create its session."""
    node = _node()
    cases = [_web_case("llama3.2", llama3.bundle, stop_cases), _web_case("head_dim", head_dim_bundle)]
    assert len(set(cases[0]["tokens"])) > 3 and cases[0]["promptTokens"][0] == llama3.ids["bos_token_id"]
    cases[0]["refusals"] = [{"bundle": str(family("qwen3").bundle), "reason": "q/k-norm model (qk_norm, Qwen3)"}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "EDGEGPT_WEB_CASES": str(tmp_path / "cases.json")}
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", "test/generator.test.js"],
        cwd=WEB,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "# skipped 0" in run.stdout and "# fail 0" in run.stdout, run.stdout[-2000:]


def test_what_cannot_work_is_refused_in_one_line(llama3, tmp_path):
    """A full-context slot runs on a rotary graph; a manifest's bad special ids and an export with no end-of-text are
    refused in one line."""
    from edgegpt.config import GPTConfig
    from edgegpt.errors import BundleError, CheckpointError
    from edgegpt.export import export_bundle
    from edgegpt.train.checkpoint import save_checkpoint
    from edgegpt.train.model import SimpleGPT

    gen, block = llama3.gen, llama3.gen.config.block_size
    slots = gen.new_slots(2)  # the rotary tables hold a row for the slots' scratch column: the whole context fits
    assert slots.capacity == block
    slots.prefill(1, [5] * (block - 1))
    slots.step({1: 6})  # slot 0 rides along in the scratch column, slot 1 fills the last position
    for i, (key, value, match) in enumerate(
        [
            ("stop_token_ids", [5, 10_000], "stop_token_ids 10000 is not a token id"),
            ("bos_token_id", None, "bos_token_id None is not a token id"),
            ("stop_token_ids", 7, "must be a list of token ids"),
        ]
    ):
        bad = shutil.copytree(llama3.bundle, tmp_path / f"bad{i}")
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["tokenizer"][key] = value
        (bad / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=match) as info:
            Generator.load(bad, provider="cpu")
        assert "\n" not in str(info.value) and "re-export" in str(info.value)
    config = GPTConfig(
        n_layer=1,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        block_size=16,
        n_inner=96,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        bias=False,
        vocab_size=llama3.tok.get_vocab_size(),
    )
    ckpt = save_checkpoint(tmp_path / "ckpt", SimpleGPT(config), llama3.tok.to_str())  # no generation_config.json
    with pytest.raises(CheckpointError, match="no '<\\|endoftext\\|>' token.*eos_token_id") as info:
        export_bundle(ckpt, tmp_path / "bundle")
    assert "\n" not in str(info.value) and not (tmp_path / "bundle").exists()
