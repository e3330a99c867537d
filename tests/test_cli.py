import pytest
from click.testing import CliRunner

from edgegpt.cli import main


@pytest.mark.parametrize(
    "command", ["train", "sample", "import-hf", "export-hf", "info", "export", "quantize", "eval", "generate", "chat", "bench"]
)
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output and f"edgegpt {command}" in result.output


def test_info_lists_providers():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    assert "CPUExecutionProvider" in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["sample", str(tmp_path)])
    assert result.exit_code == 1
    assert "CheckpointError" in result.output and "no config.json" in result.output
    assert "Traceback" not in result.output


def test_bad_config_values_exit_2_naming_the_field(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--n-embd", "100", "--n-head", "3", "--steps", "1"])
    assert result.exit_code == 2
    assert "n_embd (100) must be divisible by n_head (3)" in result.output


def test_existing_run_is_refused_without_resume_or_force(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(main, ["train", "--out", str(tiny_checkpoint.parent), "--steps", "1"])
    assert result.exit_code == 2
    assert "--resume" in result.output and "--force" in result.output
