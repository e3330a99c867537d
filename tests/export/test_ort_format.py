"""The mobile ORT format: `convert_to_ort` / `edgegpt convert-ort` / `export_bundle(ort=True)` add `model.ort` and
`required_operators.config`; the runtime runs the `.ort` file with the `.onnx` graph's greedy tokens and checks it
as it checks the `.onnx` graph."""

from __future__ import annotations

import json
import shutil

import pytest

from edgegpt.errors import BundleError
from edgegpt.manifest import ORT_FILE, ORT_OPERATORS, verify_bundle

STEPS = 32


@pytest.fixture(scope="module")
def fp32_ort(lively_gqa_bundle, tmp_path_factory):
    from edgegpt.export import convert_to_ort

    return convert_to_ort(lively_gqa_bundle, tmp_path_factory.mktemp("ort") / "fp32")


@pytest.fixture(scope="module")
def int4_ort(fp32_ort, tmp_path_factory):
    """An int4 bundle quantized from a bundle that has an .ort file (which quantization must not carry over)."""
    from edgegpt.export import convert_to_ort, quantize_bundle

    int4 = quantize_bundle(fp32_ort, tmp_path_factory.mktemp("ort") / "int4", to="int4")
    manifest = json.loads((int4 / "manifest.json").read_text())
    assert "ort" not in manifest and not (int4 / ORT_FILE).exists(), "the fp32 .ort was carried into the int4 bundle"
    return convert_to_ort(int4)  # in place


def greedy(bundle, model_format: str) -> list[int]:
    from edgegpt.runtime import Generator

    gen = Generator.load(bundle, provider="cpu", threads=1, model_format=model_format)
    return gen.generate("def main(", max_new_tokens=STEPS, ignore_eos=True).tokens


@pytest.mark.parametrize("name", ["fp32_ort", "int4_ort"])
def test_ort_greedy_equals_onnx(name, request):
    bundle = request.getfixturevalue(name)
    manifest = verify_bundle(bundle)
    assert {ORT_FILE, ORT_OPERATORS} <= set(manifest["files"])  # listed and hashed
    assert manifest["ort"]["greedy_check"] == {"tokens": 8, "equal": True}
    ops = (bundle / ORT_OPERATORS).read_text()
    assert "com.microsoft;1;" in ops and "GroupQueryAttention" in ops
    assert ("MatMulNBits" in ops) == (name == "int4_ort")
    tokens = greedy(bundle, "ort")
    assert len(set(tokens)) > 1, "the lively model should not repeat one token"
    assert tokens == greedy(bundle, "onnx")


def test_ort_only_bundle_runs_the_ort_file_automatically(int4_ort, tmp_path):
    from edgegpt.export import convert_to_ort
    from edgegpt.runtime import Generator

    mobile = convert_to_ort(int4_ort, tmp_path / "mobile", keep_onnx=False)
    assert not (mobile / "model.onnx").exists()
    manifest = verify_bundle(mobile)
    assert manifest["graph"]["file"] is None and "model.onnx" not in manifest["files"]
    assert greedy(mobile, "auto") == greedy(int4_ort, "onnx")
    with pytest.raises(BundleError, match="no ONNX graph"):
        Generator.load(mobile, provider="cpu", model_format="onnx")


def test_a_tampered_ort_file_is_refused(fp32_ort, tmp_path):
    from edgegpt.runtime import Generator

    copy = shutil.copytree(fp32_ort, tmp_path / "b")
    data = bytearray((copy / ORT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / ORT_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.ort: sha256 differs"):
        Generator.load(copy, provider="cpu", model_format="ort")


def test_the_ort_graph_is_cross_checked_against_the_manifest(fp32_ort, tmp_path):
    """An .ort-only bundle whose manifest claims another vocabulary is refused from the .ort file's own shapes."""
    from edgegpt.export import convert_to_ort
    from edgegpt.runtime.model.bundle import Bundle

    mobile = convert_to_ort(fp32_ort, tmp_path / "mobile", keep_onnx=False)
    path = mobile / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["vocab_size"] += 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"vocab_size \d+ \(the graph: \d+\)"):
        Bundle.load(mobile)


def test_an_ort_file_from_a_newer_onnxruntime_is_refused(fp32_ort):
    from edgegpt.runtime.model.bundle import Bundle, select_graph

    bundle = Bundle.load(fp32_ort)
    assert select_graph(bundle, "ort", "99.0.0") == bundle.ort_path
    with pytest.raises(BundleError, match=r"needs onnxruntime >= 1\.\d+ to read it; this is 1.16.0"):
        select_graph(bundle, "ort", "1.16.0")


def test_convert_ort_cli(lively_gqa_bundle, tmp_path):
    from click.testing import CliRunner

    from edgegpt.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["convert-ort", "--help"]).output
    assert "required_operators.config" in help_text and "Examples:" in help_text
    result = runner.invoke(main, ["-q", "convert-ort", str(lively_gqa_bundle), "-o", str(tmp_path / "m"), "--ort-only"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "m")  # the converter's chatter stays off stdout
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        ["genai_config.json", "manifest.json", ORT_FILE, ORT_OPERATORS, "tokenizer.json", "tokenizer_config.json"]
    )
    again = runner.invoke(main, ["convert-ort", str(tmp_path / "m")])
    assert again.exit_code == 1 and "no .onnx graph to convert" in again.output


@pytest.mark.slow
def test_export_with_ort_writes_both_formats_in_one_bundle(lively_checkpoint, tmp_path):
    from edgegpt.export import export_bundle

    out = export_bundle(lively_checkpoint[1], tmp_path / "b", ort=True, validate=False)
    manifest = verify_bundle(out)
    assert {"model.onnx", ORT_FILE, ORT_OPERATORS} <= set(manifest["files"])
    assert greedy(out, "ort") == greedy(out, "onnx")


def test_a_file_that_is_no_ort_model_is_refused_with_its_name(tmp_path):
    from edgegpt.runtime.model.ort_format import read_ort_model

    (tmp_path / "text.ort").write_text("not flatbuffers at all")
    with pytest.raises(BundleError, match="text.ort: not an ORT-format model"):
        read_ort_model(tmp_path / "text.ort")
    (tmp_path / "cut.ort").write_bytes(b"\x08\x00\x00\x00ORTM" + b"\xff" * 40)
    with pytest.raises(BundleError, match="cut.ort: malformed ORT-format model"):
        read_ort_model(tmp_path / "cut.ort")
