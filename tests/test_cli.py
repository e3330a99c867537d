import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from edgegpt.cli import main
from edgegpt.cli_support import Command, Group, field_options, given
from edgegpt.errors import BundleError, ConfigError, ContextLengthError, SamplingError


@pytest.mark.parametrize(
    "command",
    ["train", "sample", "import-hf", "export-hf", "info", "export", "quantize", "eval", "generate", "chat", "bench"],
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
    result = CliRunner().invoke(
        main, ["train", "--out", str(tmp_path / "r"), "--n-embd", "100", "--n-head", "3", "--steps", "1"]
    )
    assert result.exit_code == 2
    assert "n_embd (100) must be divisible by n_head (3)" in result.output


def test_existing_run_is_refused_without_resume_or_force(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(main, ["train", "--out", str(tiny_checkpoint.parent), "--steps", "1"])
    assert result.exit_code == 2
    assert "--resume" in result.output and "--force" in result.output


def _failing_command(exc):
    @click.command("fail", cls=Command)
    @click.option("--top-p", type=float)
    @click.option("--sliding-window", is_flag=True)
    def fail(top_p, sliding_window):
        """Raise `exc`."""
        raise exc

    return fail


def test_an_error_names_the_commands_flags_not_the_api_keywords():
    exc = ContextLengthError("lower top_p to 0.5 or pass sliding_window=True")
    result = CliRunner().invoke(_failing_command(exc), [])
    assert result.exit_code == 1 and "lower --top-p to 0.5 or pass --sliding-window" in result.output


@pytest.mark.parametrize(
    "exc, code, expected",
    [
        (ConfigError("n_layer must be a positive integer, got 0"), 2, "Usage: fail"),
        (
            SamplingError("top_p must be in (0, 1], got 0"),
            2,
            "Invalid value for --top-p: top_p must be in (0, 1], got 0",
        ),
        (SamplingError("stop must be non-empty strings, got ['']"), 2, "Invalid value: stop must be"),
        (BundleError("b/manifest.json: format_version 2"), 1, "Error: BundleError: b/manifest.json: format_version 2"),
        (
            ModuleNotFoundError("No module named 'torch'", name="torch"),
            1,
            "pip install 'torch==2.13.0' 'edgegpt[train]'",
        ),
        (
            ModuleNotFoundError("No module named 'onnxruntime_genai'", name="onnxruntime_genai"),
            1,
            "pip install 'edgegpt[genai]'",
        ),
    ],
)
def test_errors_map_to_click_in_one_place(exc, code, expected):
    result = CliRunner().invoke(_failing_command(exc), [])
    assert result.exit_code == code and expected in result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_original_error():
    @click.group(cls=Group)
    @click.option("--debug", is_flag=True)
    @click.pass_context
    def root(ctx, debug):
        ctx.obj = {"debug": debug}

    root.add_command(_failing_command(ConfigError("bad")))
    assert CliRunner().invoke(root, ["fail"]).exit_code == 2
    result = CliRunner().invoke(root, ["--debug", "fail"])
    assert isinstance(result.exception, ConfigError)


@dataclasses.dataclass(frozen=True)
class _Knobs:
    limit: int | None = 5
    ratio: float = 0.5
    fast: bool = False
    ids: tuple[int, ...] = ()


def test_field_options_make_one_flag_per_field_and_collect_the_given_ones():
    @click.command()
    @field_options(
        {
            "limit": {"flags": ("-l", "--limit")},
            "ratio": {"help": "A ratio. [default: {default}]"},
            "fast": {},
            "ids": {},
        },
        of=_Knobs,
    )
    def cmd(**flags):
        click.echo(json.dumps(given(flags)))

    runner = CliRunner()
    assert json.loads(runner.invoke(cmd, []).output) == {}
    result = runner.invoke(cmd, ["-l", "3", "--ratio", "0.25", "--fast", "--ids", "1", "--ids", "2"])
    assert json.loads(result.output) == {"limit": 3, "ratio": 0.25, "fast": True, "ids": [1, 2]}
    help_text = runner.invoke(cmd, ["--help"]).output
    assert "A ratio. [default: 0.5]" in help_text and "[default: 5]" in help_text
    assert (
        help_text.index("--limit") < help_text.index("--ratio") < help_text.index("--fast") < help_text.index("--ids")
    )


def test_every_config_field_has_its_flag():
    from edgegpt.runtime.cli import chat_command, generate_command
    from edgegpt.runtime.generation.sampling import SamplingConfig
    from edgegpt.runtime.generation.speculative import Speculative
    from edgegpt.train.config import TrainConfig

    sampling = {f.name for f in dataclasses.fields(SamplingConfig)}
    session = {"provider", "threads", "spinning", "huge_pages"}
    speculative = {f.name for f in dataclasses.fields(Speculative)}
    constraint = {"json_schema", "regex", "grammar"}
    assert {p.name for p in generate_command.params} == (
        sampling | session | speculative | constraint | {"bundle", "prompt", "prompt_file", "as_json"}
    )
    # chat always slides, and prints text only (logprobs go to generate's --json)
    assert {p.name for p in chat_command.params} >= sampling - {"sliding_window", "logprobs", "top_logprobs"}
    train = {p.name for p in main.commands["train"].params}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= train
    assert {"n_layer", "n_head", "n_embd", "block_size", "dropout"} <= train


def test_sample_and_generate_agree_by_default(tiny_checkpoint, tmp_path):
    """Both greedy, both print the continuation only, both fit -n to the context: the same text."""
    from edgegpt.export import export_bundle

    bundle = export_bundle(tiny_checkpoint, tmp_path / "bundle", validate=False)
    sampled = CliRunner().invoke(main, ["sample", str(tiny_checkpoint), "def main("])
    generated = CliRunner().invoke(main, ["--quiet", "generate", str(bundle), "def main(", "--provider", "cpu"])
    assert sampled.exit_code == 0 and generated.exit_code == 0, sampled.output + generated.output
    assert sampled.output == generated.output and not sampled.output.startswith("def main(")


def test_generate_stop_understands_escapes(tiny_checkpoint, tmp_path):
    from edgegpt.runtime.cli import unescape

    assert unescape(r"\n\n") == "\n\n"
    from edgegpt.export import export_bundle

    bundle = export_bundle(tiny_checkpoint, tmp_path / "bundle", validate=False)
    free = CliRunner().invoke(
        main, ["--quiet", "generate", str(bundle), "def", "-n", "40", "--provider", "cpu", "--json"]
    )
    text = json.loads(free.output)["text"]
    stop = text[5:7]  # two characters the greedy text contains
    escaped = "".join(f"\\u{ord(c):04x}" for c in stop)
    cut = CliRunner().invoke(
        main, ["--quiet", "generate", str(bundle), "def", "-n", "40", "--provider", "cpu", "--json", "--stop", escaped]
    )
    result = json.loads(cut.output)
    assert result["finish_reason"] == "stop" and result["text"] == text[: text.index(stop)]


@pytest.mark.parametrize(
    "setup, args, expected",
    [
        (None, ["--learning-rate", "nan"], "learning_rate must be a finite number, got nan"),
        (("c.json", '{"batch_size": "2"}'), ["--config", "c.json"], "batch_size must be a positive integer, got '2'"),
        (("c.json", "[1, 2]"), ["--config", "c.json"], "a training config is a JSON object of TrainConfig fields"),
        (("c.json", "{bad"), ["--config", "c.json"], "c.json: cannot read training config"),
    ],
)
def test_train_refuses_bad_settings_in_one_line(tmp_path, monkeypatch, setup, args, expected):
    monkeypatch.chdir(tmp_path)
    if setup:
        (tmp_path / setup[0]).write_text(setup[1])
    result = CliRunner().invoke(main, ["train", "--out", "r", "--steps", "1", *args])
    assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_train_refuses_an_out_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("mine")
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "afile"), "--steps", "1"])
    assert result.exit_code == 2 and "is a file" in result.output and (tmp_path / "afile").read_text() == "mine"
