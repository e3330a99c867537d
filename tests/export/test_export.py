"""edgegpt.export: the bundle's graph against PyTorch, its manifest, atomic writes and bad input.

One bundle per attention graph ("mha", "gqa") is exported per session from the seeded `tiny_checkpoint`
and shared by the tests; the key parity tests run on both (tests/export/test_shared_kv.py has the rest of "gqa").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgegpt.train.checkpoint import load_checkpoint
from edgegpt.errors import CheckpointError, ExportError, ParityError
from edgegpt.export import export_bundle
from edgegpt.export import onnx_export, validate
from edgegpt.export.cli import export as export_cmd
from edgegpt.manifest import MANIFEST_NAME, sha256_file, verify_bundle

ATOL = 1e-4


@pytest.fixture(scope="session")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("export") / "bundle", attention="mha")


@pytest.fixture(scope="session")
def gqa_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("export_gqa") / "bundle", attention="gqa")


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).model


@pytest.fixture(scope="session")
def sess(bundle):
    return validate.session(bundle / "model.onnx")


@pytest.fixture(scope="session", params=["mha", "gqa"])
def attention(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def any_sess(attention, request):
    """A session on the tiny bundle of each attention graph."""
    return validate.session(request.getfixturevalue("gqa_bundle" if attention == "gqa" else "bundle") / "model.onnx")


@pytest.fixture(scope="session")
def manifest(bundle) -> dict:
    return verify_bundle(bundle)  # format header, and every file's size and sha256


@pytest.fixture(scope="session")
def lively(lively_checkpoint, lively_mha_bundle):
    """(model, "mha" bundle); its own validation greedy-checks 32 tokens too."""
    return lively_checkpoint[0], lively_mha_bundle


@pytest.fixture(scope="session")
def lively_gqa(lively_checkpoint, lively_gqa_bundle):
    """(model, "gqa" bundle); tests/export/test_shared_kv.py checks the validation of this export."""
    return lively_checkpoint[0], lively_gqa_bundle


def test_checker_and_shape_inference(bundle, model):
    path = bundle / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    logits = inferred.graph.output[0]
    dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
    assert (logits.name, dims) == ("logits", ["batch_size", "sequence_length", model.config.vocab_size])


def _case_diffs(model, sess, batch, new, past, pads=()) -> dict[str, float]:
    """Max abs difference per graph output, ORT vs PyTorch, over real positions: the export validation's parity case."""
    case = validate.Case("test", batch, new, past, tuple(pads))
    return validate._case_diffs(model, sess, case, seed=batch * 1000 + new * 10 + past)


@pytest.mark.parametrize(
    "batch, new, past, pads",
    [
        (1, 1, 0, ()),  # prefill of one token, empty past
        (1, 64, 0, ()),  # prefill of the whole context
        (3, 64, 0, ()),
        (1, 1, 63, ()),  # decode at the last position
        (3, 1, 20, ()),  # batched decode
        (1, 4, 30, ()),  # a chunk of tokens after a past
        (3, 4, 30, ()),
        (3, 10, 0, (0, 3, 6)),  # left-padded prefill
        (3, 1, 10, (0, 3, 6)),  # decode on a left-padded cache
    ],
)
def test_parity_with_pytorch(model, any_sess, attention, batch, new, past, pads):
    assert model.config.block_size == 64
    if attention == "gqa" and batch > 1 and new > 1 and past:
        pytest.skip("GroupQueryAttention's CPU kernel takes a multi-token chunk after a past at batch 1 only")
    diffs = _case_diffs(model, any_sess, batch, new, past, pads)
    assert max(diffs.values()) <= ATOL, diffs


def test_left_padding_matches_the_unpadded_row(any_sess, model):
    sess = any_sess
    """A left-padded row's logits equal those of the same tokens alone (the padding is really ignored)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    n = model.config.n_layer
    empty = {
        f"past_key_values.{i}.{kv}": np.zeros((1, model.config.n_head, 0, model.config.head_size), np.float32)
        for i in range(n)
        for kv in ("key", "value")
    }
    alone = sess.run(
        ["logits"],
        dict(input_ids=ids.numpy(), attention_mask=np.ones((1, 6), np.int64), position_ids=np.arange(6)[None], **empty),
    )[0]
    padded_ids = np.concatenate([np.zeros((1, 3), np.int64), ids.numpy()], 1)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    padded = sess.run(
        ["logits"],
        dict(input_ids=padded_ids, attention_mask=mask, position_ids=np.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]]), **empty),
    )[0]
    assert np.abs(padded[:, 3:] - alone).max() <= ATOL


@pytest.mark.parametrize("seed", [1, 3])
def test_greedy_32_tokens_equal_pytorch_generate(attention, request, seed, torch_greedy):
    model, bundle = request.getfixturevalue("lively_gqa" if attention == "gqa" else "lively")
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    expected = torch_greedy(model, prompt[0].tolist(), 32)
    assert len(set(expected)) >= 5  # a varied sequence, so that agreement means something
    sess = validate.session(bundle / "model.onnx")
    tokens, _ = validate.greedy_onnx(sess, prompt.numpy(), 32, model.config, shared_buffer=attention == "gqa")
    assert tokens[0].tolist() == expected


def test_manifest_records_graph_sources_and_checks(bundle, manifest, model, tiny_checkpoint):
    cfg = model.config
    assert manifest["model"] == cfg.to_dict()
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json", "tokenizer_config.json", "genai_config.json"}
    assert manifest["files"]["model.onnx"]["sha256"] == sha256_file(bundle / "model.onnx")
    assert manifest["tokenizer"] == {
        "file": "tokenizer.json",
        "vocab_size": cfg.vocab_size,
        "eot_token_id": 0,
        "sampled_vocab_size": cfg.vocab_size,
    }
    assert manifest["source"]["fingerprint"] == sha256_file(tiny_checkpoint / "model.safetensors")
    assert manifest["quantization"] is None
    assert {"edgegpt", "torch", "onnx", "onnxruntime"} <= set(manifest["producer"])
    graph = manifest["graph"]
    assert graph["file"] == "model.onnx" and graph["opset"] == onnx_export.DEFAULT_OPSET
    assert [i["name"] for i in graph["inputs"]] == onnx_export.input_names(cfg.n_layer)
    assert [o["name"] for o in graph["outputs"]] == onnx_export.output_names(cfg.n_layer)
    inputs = {i["name"]: i for i in graph["inputs"]}
    assert inputs["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    assert inputs["past_key_values.1.value"]["shape"] == [
        "batch_size",
        cfg.n_head,
        "past_sequence_length",
        cfg.head_size,
    ]
    assert graph["outputs"][0]["dtype"] == "float32"
    assert graph["kv_cache"]["layout"] == "concat" and graph["kv_cache"]["past_key"] == "past_key_values.{}.key"


def test_manifest_op_counts_show_the_fusions(manifest, model):
    n = model.config.n_layer
    before, after = manifest["optimization"]["op_counts_before"], manifest["optimization"]["op_counts_after"]
    assert before["LayerNormalization"] == 2 * n + 1 and before["Tanh"] == n
    assert after["MultiHeadAttention"] == n
    assert after["SkipLayerNormalization"] == 2 * n + 1
    assert after["FastGelu"] == n
    assert not {"LayerNormalization", "Tanh", "Softmax", "Add", "Identity"} & set(after)
    assert sum(after.values()) < sum(before.values()) / 2


def test_manifest_parity_figures(manifest):
    validation = manifest["validation"]
    assert 0 < validation["max_abs_diff"] <= ATOL
    for stage in ("exported", "optimized"):
        cases = validation["parity"][stage]
        assert {"prefill_b1_t1", "prefill_b3_t64", "decode_b1_p63", "left_padded_decode_b3_p12"} <= set(cases)
        assert all(0 <= d <= ATOL for case in cases.values() for d in case.values())
    assert validation["greedy"]["new_tokens"] == 32 and len(validation["greedy"]["tokens"]) == 32


def test_genai_config_describes_the_graph(bundle, model):
    cfg = model.config
    genai = json.loads((bundle / "genai_config.json").read_text())["model"]
    assert genai["type"] == "decoder" and genai["context_length"] == cfg.block_size
    assert genai["eos_token_id"] == 0 and genai["vocab_size"] == cfg.vocab_size
    decoder = genai["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["head_size"]) == (
        cfg.n_layer,
        cfg.n_head,
        cfg.head_size,
    )
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 1 == "present.1.value"
    assert json.loads((bundle / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"


def test_onnxruntime_genai_generates_edgegpt_tokens(lively, torch_greedy, genai_greedy):
    og = pytest.importorskip("onnxruntime_genai")
    model, bundle = lively
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))[0].tolist()
    tokens = genai_greedy(bundle, prompt, 32)
    assert (
        tokens == torch_greedy(model, prompt, 32)[: len(tokens)] and len(tokens) >= 16
    )  # genai stops early only on EOT (id 0)
    tokenizer = og.Tokenizer(og.Model(str(bundle)))
    text = "def parse(self, s):\n    return s.strip()"
    assert list(tokenizer.encode(text)) == load_tokenizer_ids(bundle, text)


def load_tokenizer_ids(bundle: Path, text: str) -> list[int]:
    from edgegpt.tokenizer import encode, load_tokenizer

    return encode(load_tokenizer(bundle), text)


def test_tied_embedding_is_stored_once(any_sess, attention, request, model):
    import onnx
    from onnx import numpy_helper

    path = request.getfixturevalue("gqa_bundle" if attention == "gqa" else "bundle") / "model.onnx"
    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    table = model.tok_emb.weight.detach().numpy()
    assert sum(np.array_equal(w, table) or np.array_equal(w, table.T) for w in weights.values()) == 1
    (transpose,) = [n for n in graph.node if n.op_type == "Transpose"]
    assert np.array_equal(weights[transpose.input[0]], table)
    (head,) = [n for n in graph.node if n.output[0] == "logits"]
    assert head.op_type == "MatMul" and head.input[1] == transpose.output[0]


def test_external_data_bundle_runs_and_is_hashed(tiny_checkpoint, model, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle", external_data=True, validate=False)
    manifest = verify_bundle(out)
    assert manifest["graph"]["external_data"] == "model.onnx.data"
    assert manifest["files"]["model.onnx.data"]["size"] > 0.95 * 4 * model.num_params()  # the weights live there
    assert manifest["files"]["model.onnx.data"]["size"] < 4 * model.num_params()  # once: the tied matrix is not copied
    assert (out / "model.onnx").stat().st_size < 100_000
    assert max(_case_diffs(model, validate.session(out / "model.onnx"), 3, 1, 20).values()) <= ATOL


def test_no_optimize_keeps_the_plain_graph(tiny_checkpoint, model, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle", optimize=False, validate=False)
    optimization = verify_bundle(out)["optimization"]
    assert optimization["optimizer"] is None
    assert optimization["op_counts_after"] == optimization["op_counts_before"]
    assert "SkipLayerNormalization" not in optimization["op_counts_after"]
    assert max(_case_diffs(model, validate.session(out / "model.onnx"), 1, 5, 7).values()) <= ATOL


def test_parity_error_names_output_case_and_difference(model, bundle):
    altered = type(model)(model.config)
    altered.load_state_dict(model.state_dict())
    with torch.no_grad():
        altered.ln_f.bias += 1e-2  # the graph no longer matches this model
    with pytest.raises(ParityError) as info:
        validate.check_parity(altered.eval(), bundle / "model.onnx", stage="test")
    err = info.value
    assert err.output == "logits" and err.case == "prefill_b1_t1" and err.max_abs_diff > ATOL and err.atol == ATOL
    assert "logits" in str(err) and "prefill_b1_t1" in str(err)


def test_existing_output_is_refused_and_replaced_with_force(tiny_checkpoint, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "bundle", optimize=False, validate=False)
    before = sha256_file(out / MANIFEST_NAME)
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(tiny_checkpoint, out, validate=False)
    assert sha256_file(out / MANIFEST_NAME) == before
    export_bundle(tiny_checkpoint, out, force=True, validate=False)
    assert verify_bundle(out)["validation"]["parity"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary or moved-aside directory left


def test_force_refuses_a_directory_that_is_not_a_bundle(tiny_checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an edgegpt bundle"):
        export_bundle(tiny_checkpoint, tmp_path, force=True, validate=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_failed_export_leaves_no_bundle_and_no_temporary_dir(tiny_checkpoint, tmp_path, monkeypatch):
    def fail(*args, **kwargs):  # the last check: every file of the bundle is written by then
        raise ParityError("injected", output="logits", case="greedy_32", max_abs_diff=1.0, atol=ATOL)

    monkeypatch.setattr(validate, "check_parity", lambda *args, **kwargs: {})
    monkeypatch.setattr(validate, "check_greedy", fail)
    with pytest.raises(ParityError, match="injected"):
        export_bundle(tiny_checkpoint, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []
    # over an existing bundle with force, the old bundle survives a failed export untouched
    old = export_bundle(tiny_checkpoint, tmp_path / "bundle", validate=False)
    before = sha256_file(old / MANIFEST_NAME)
    with pytest.raises(ParityError):
        export_bundle(tiny_checkpoint, old, force=True)
    assert sha256_file(old / MANIFEST_NAME) == before and verify_bundle(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def _no_export_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("export work started on a bad checkpoint")

    monkeypatch.setattr(onnx_export, "export_onnx", forbidden)


def test_missing_weights_raise_before_export(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    (ckpt / "model.safetensors").unlink()
    _no_export_work(monkeypatch)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        export_bundle(ckpt, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_config_not_matching_weights_raises_before_export(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "n_embd": 96, "n_head": 3}))
    _no_export_work(monkeypatch)
    with pytest.raises(CheckpointError, match="shape"):
        export_bundle(ckpt, tmp_path / "bundle")


def test_tokenizer_larger_than_the_model_raises_before_export(tiny_checkpoint, tmp_path, monkeypatch, sample_text):
    """(A smaller one is a padded vocabulary, as nanoGPT's: tests/train/test_nanogpt.py exports one.)"""
    from edgegpt.tokenizer import train_tokenizer

    ckpt = _copy(tiny_checkpoint, tmp_path)
    train_tokenizer([sample_text], vocab_size=340).save(str(ckpt / "tokenizer.json"))
    _no_export_work(monkeypatch)
    with pytest.raises(CheckpointError, match="340 tokens but config.json vocab_size is only 320"):
        export_bundle(ckpt, tmp_path / "bundle")


def test_unsupported_opset_raises_before_export(tiny_checkpoint, tmp_path, monkeypatch):
    _no_export_work(monkeypatch)
    with pytest.raises(ExportError, match="opset 13"):
        export_bundle(tiny_checkpoint, tmp_path / "bundle", opset=13)


def test_cli_help_and_refusal(tiny_checkpoint, bundle):
    runner = CliRunner()
    help_text = runner.invoke(export_cmd, ["--help"]).output
    assert "Export a checkpoint" in help_text and "Examples:" in help_text and "--no-optimize" in help_text
    result = runner.invoke(export_cmd, [str(tiny_checkpoint), "-o", str(bundle)])
    assert result.exit_code == 1 and "already exists" in result.output


def test_cli_module_imports_no_torch():
    code = "import sys, edgegpt.export.cli; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
