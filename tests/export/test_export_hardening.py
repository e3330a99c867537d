"""Export and quantization under --force, a failed accuracy gate, a full disk and the user's umask.

Each test stands for one item of the hardening issue: bad input gets one clear line that names the value and
the fix (no traceback), a non-zero exit, and loses nothing.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgegpt.runtime.generation.evaluate as evaluate_mod
from edgegpt import files
from edgegpt.cli import main
from edgegpt.errors import ExportError, QuantizationError
from edgegpt.export import export_bundle
from edgegpt.export import quantize as quantize_module
from edgegpt.export.quantize import quantize_bundle
from edgegpt.manifest import MANIFEST_NAME, sha256_file, verify_bundle


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, tmp_path_factory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("fp32") / "bundle", validate=False)


@pytest.fixture(scope="module")
def held_out(sample_text, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(sample_text[-3000:])
    return path


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(*args: str):
    return CliRunner().invoke(main, ["--quiet", *args])


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------ 1. what --force may replace


@pytest.fixture
def app(tmp_path) -> Path:
    """Someone's web app: a manifest.json that is not edgegpt's, and sources beside it."""
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / MANIFEST_NAME).write_text(json.dumps({"manifest_version": 3}))
    (app / "src" / "app.js").write_text("x")
    return app


def test_export_force_refuses_a_directory_that_merely_holds_a_manifest(tiny_checkpoint, app):
    before = _snapshot(app)
    line = _one_line_error(_cli("export", str(tiny_checkpoint.parent), "-o", str(app), "--force", "--no-optimize"))
    assert f"ExportError: {app}: exists and is not an edgegpt bundle that verifies" in line
    assert "not an edgegpt-bundle manifest" in line and "remove it yourself or choose another output" in line
    assert _snapshot(app) == before and sorted(p.name for p in app.parent.iterdir()) == ["app"]


def test_quantize_force_refuses_a_directory_that_merely_holds_a_manifest(fp32, app):
    before = _snapshot(app)
    line = _one_line_error(_cli("quantize", str(fp32), "--to", "int8", "-o", str(app), "--force"))
    assert f"ExportError: {app}: exists and is not an edgegpt bundle that verifies" in line
    assert _snapshot(app) == before


def test_force_refuses_a_bundle_holding_files_its_manifest_does_not_list(fp32, tmp_path):
    out = Path(shutil.copytree(fp32, tmp_path / "bundle"))
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "eval.txt").write_text("mine too")
    before = _snapshot(out)
    for command in (["export", str(fp32.parent), "--no-optimize"], ["quantize", str(fp32), "--to", "int8"]):
        line = _one_line_error(_cli(*command, "-o", str(out), "--force"))
        assert (
            f"{out}: an edgegpt bundle, but it also holds files its manifest does not list (data/, notes.txt)" in line
        )
        assert "move them out" in line
    assert _snapshot(out) == before


def test_force_refuses_a_bundle_altered_since_it_was_written(fp32, tmp_path):
    out = Path(shutil.copytree(fp32, tmp_path / "bundle"))
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + " ")
    with pytest.raises(
        ExportError, match="not an edgegpt bundle that verifies .*tokenizer.json: .* bytes, the manifest"
    ):
        quantize_bundle(fp32, out, to="int8", force=True)


def test_force_replaces_a_bundle_that_verifies_and_nothing_else(fp32, tmp_path):
    out = quantize_bundle(fp32, tmp_path / "int8", to="int8")
    again = quantize_bundle(fp32, out, to="int8", force=True)
    assert verify_bundle(again) and sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify_bundle(quantize_bundle(fp32, empty, to="int8", force=True))  # an empty directory loses nothing


# ------------------------------------------------------------------ 6. overwriting and the accuracy gate are two flags


@pytest.fixture
def failing_gate(monkeypatch):
    """The evaluation as it is, but the quantized bundle measured 50 % worse than the source."""
    real = evaluate_mod.evaluate_bundle

    def worse(*args, **kwargs):
        result = real(*args, **kwargs)
        result["perplexity"] = 1.5 * result["reference"]["perplexity"]
        return result

    monkeypatch.setattr(evaluate_mod, "evaluate_bundle", worse)


def test_force_no_longer_writes_past_a_failed_gate(fp32, held_out, tmp_path, failing_gate):
    out = quantize_bundle(fp32, tmp_path / "int8", to="int8")
    before = _snapshot(out)
    with pytest.raises(
        QuantizationError,
        match=r"\+50.00 %, over the 2 % limit; not written. Raise max_ppl_increase, "
        r"or pass accept_gate_failure=True",
    ):
        quantize_bundle(fp32, out, to="int8", force=True, eval_text=held_out, threads=2)
    assert _snapshot(out) == before
    line = _one_line_error(
        _cli(
            "quantize",
            str(fp32),
            "--to",
            "int8",
            "-o",
            str(out),
            "--force",
            "--eval-text",
            str(held_out),
            "--threads",
            "2",
        )
    )
    assert "Raise --max-ppl-increase, or pass --accept-gate-failure to write it anyway" in line
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_accept_gate_failure_writes_past_the_gate_and_records_it(fp32, held_out, tmp_path, failing_gate):
    assert "accept_gate_failure" in inspect.signature(quantize_bundle).parameters
    out = quantize_bundle(fp32, tmp_path / "int8", to="int8", eval_text=held_out, accept_gate_failure=True, threads=2)
    gate = verify_bundle(out)["quantization"]["gate"]
    assert gate["passed"] is False and gate["accepted_failure"] is True and "forced" not in gate
    result = CliRunner().invoke(
        main,
        [
            "quantize",
            str(fp32),
            "--to",
            "int8",
            "-o",
            str(tmp_path / "cli"),
            "--eval-text",
            str(held_out),
            "--accept-gate-failure",
            "--threads",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "FAILED (written with --accept-gate-failure)" in result.output
    assert "--accept-gate-failure" in CliRunner().invoke(main, ["quantize", "--help"]).output


# ------------------------------------------------------------------ a full disk while quantizing


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_a_full_disk_while_quantizing_is_one_line_and_keeps_the_previous_bundle(fp32, tmp_path, monkeypatch, fmt):
    out = quantize_bundle(fp32, tmp_path / fmt, to=fmt)
    before = _snapshot(out)
    if fmt == "int8":  # inside onnxruntime's quantizer, which edgegpt wraps as QuantizationError
        import onnxruntime.quantization

        monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", _enospc)
    else:
        monkeypatch.setattr(quantize_module, "_save", _enospc)
    line = _one_line_error(_cli("quantize", str(fp32), "--to", fmt, "-o", str(out), "--force"))
    assert f"StorageError: {out}: no space left on device (" in line and " free in " in line
    assert f"the previous {fmt} is unchanged" in line
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == [fmt]


# ------------------------------------------------------------------ 11. modes follow the umask


def test_bundles_with_external_data_follow_the_umask(tiny_checkpoint, fp32, tmp_path):
    old = os.umask(0o027)
    files._umask.cache_clear()
    try:
        bundle = export_bundle(tiny_checkpoint, tmp_path / "ext", external_data=True, optimize=False, validate=False)
        quantized = quantize_bundle(fp32, tmp_path / "fp16", to="fp16")
    finally:
        os.umask(old)
        files._umask.cache_clear()
    assert (bundle / "model.onnx.data").is_file()
    for root in (bundle, quantized):
        for path in (root, *root.rglob("*")):
            assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
