"""The runtime's click commands, `generate`, `chat` and `eval`, for the `edgegpt` group (edgegpt/cli.py adds them).

Module-level imports stay light (click, the standard library, edgegpt.cli_support): onnxruntime and numpy
load inside the commands. Every sampling flag maps 1:1 to a `SamplingConfig` field (`--top-k` -> `top_k`);
an unset flag keeps the dataclass default, so the defaults live in one place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from pathlib import Path

import click

from edgegpt.cli_support import Command, field_options, given

__all__ = ["chat_command", "eval_command", "generate_command"]

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\(n|t|r|\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


def unescape(text: str) -> str:
    r"""The usual backslash escapes of a flag's text (a shell passes "\n" as two characters).

    >>> unescape(r"\n\nUser:"), unescape(r"a\\nb"), unescape(r"\x41\u00e9"), unescape("plain \\d")
    ('\n\nUser:', 'a\\nb', 'Aé', 'plain \\d')
    """
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), text)


# SamplingConfig field -> its flag (default --field-name), click type and help. The defaults stay in
# SamplingConfig (an unset flag is None); the help repeats them, as importing SamplingConfig loads numpy.
_SAMPLING_FLAGS = {
    "max_new_tokens": {
        "flags": ("-n", "--max-new-tokens"),
        "type": click.IntRange(min=0),
        "help": "Tokens to generate at most. [default: 64, or what the context has room for]",
    },
    "temperature": {"flags": ("-t", "--temperature"), "type": float, "help": "0 is greedy. [default: 0]"},
    "top_k": {"type": int, "help": "Keep the k most likely tokens; 0 keeps all. [default: 0]"},
    "top_p": {"type": float, "help": "Nucleus sampling mass in (0, 1]. [default: 1]"},
    "min_p": {"type": float, "help": "Drop tokens below min_p x the top probability. [default: 0]"},
    "repetition_penalty": {"type": float, "help": "> 1 discourages repeats. [default: 1]"},
    "presence_penalty": {"type": float, "help": "[default: 0]"},
    "frequency_penalty": {"type": float, "help": "[default: 0]"},
    "seed": {"type": int, "help": "Same seed, same text."},
    "stop": {
        "multiple": True,
        "callback": lambda ctx, param, values: tuple(map(unescape, values)),
        "help": "Stop at this string (not printed); repeatable. Understands \\n, \\t, \\r, \\\\, \\xHH and \\uHHHH.",
    },
    "stop_token_ids": {
        "flags": ("--stop-token-id",),
        "type": int,
        "multiple": True,
        "help": "Stop at this token id; repeatable.",
    },
    "ignore_eos": {"is_flag": True, "help": "Keep going after the end-of-text token."},
    "logit_bias": {
        "flags": ("--logit-bias",),
        "multiple": True,
        "metavar": "ID=BIAS",
        "callback": lambda ctx, param, values: tuple(_bias(value) for value in values),
        "help": "Add BIAS to token ID's logit; -100 (or -inf) bans it. Repeatable.",
    },
}


def _bias(value: str) -> tuple[int, float]:
    """ "ID=BIAS" -> (id, bias); click.BadParameter for anything else."""
    token, sep, bias = value.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise click.BadParameter(
            f"expected ID=BIAS (e.g. 50256=-100), got {value!r}", param_hint="--logit-bias"
        ) from None


def _read_text(path: str, hint: str) -> str:
    try:
        return _utf8(Path(path).read_bytes(), path)
    except UnicodeError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _constraint(json_schema: str | None, regex: str | None, grammar: str | None) -> dict:
    """The generate keywords of --json-schema FILE, --regex R and --grammar FILE (at most one)."""
    given_flags = [
        flag for flag, value in (("--json-schema", json_schema), ("--regex", regex), ("--grammar", grammar)) if value
    ]
    if len(given_flags) > 1:
        raise click.UsageError(f"give one of --json-schema, --regex and --grammar, got {' and '.join(given_flags)}")
    if json_schema is not None:
        text = _read_text(json_schema, "--json-schema")
        try:
            return {"json_schema": json.loads(text)}
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{json_schema} is not JSON: {exc}", param_hint="--json-schema") from None
    if regex is not None:
        return {"regex": regex}
    if grammar is not None:
        return {"grammar": _read_text(grammar, "--grammar")}
    return {}


def _sampling_options(func):
    """The sampling flags, then the session flags, of `generate` and `chat`."""
    options = [
        click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option(
            "--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: one per core]."
        ),
        click.option(
            "--spinning/--no-spinning",
            default=True,
            show_default=True,
            help="Idle onnxruntime threads busy-wait: faster on a quiet machine; turn off when the cores are shared.",
        ),
        click.option(
            "--huge-pages/--no-huge-pages",
            default=True,
            show_default=True,
            help="CPU: move the weights to 2 MiB pages after loading (Linux): faster decoding, slower loading.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return field_options(_SAMPLING_FLAGS)(func)


def _quiet(ctx: click.Context) -> bool:
    root = ctx.find_root().obj
    return bool(root and isinstance(root, dict) and root.get("quiet"))


def _utf8(data: bytes, what: str, fix: str = "convert it, e.g. iconv -t UTF-8") -> str:
    """`data` as text; UnicodeError naming `what`, the first bad byte and its offset, and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise UnicodeError(f"{what} is not UTF-8 text (byte 0x{bad} at offset {exc.start}); {fix}") from None


def _read_prompt_file(path: str) -> str:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return _utf8(data, path)
    except UnicodeError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompt-file") from None


def _check_prompt(text: str) -> str:
    """A command-line PROMPT: bytes that are not UTF-8 arrive as surrogates (PEP 383); refuse them in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            _utf8(text.encode("utf-8", "surrogateescape"), "PROMPT")
        except UnicodeError as exc:
            raise click.BadParameter(str(exc), param_hint="PROMPT") from None
    return text


@contextlib.contextmanager
def _stdout_errors():
    """An unwritable standard output (a full disk, a closed pipe) ends the command in one line, not a traceback."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit, where it would fail again
        if exc.errno == errno.EPIPE:  # the reader went away (`| head`): not an error, as for other tools
            sys.exit(141)
        raise click.ClickException(f"cannot write the text to standard output: {exc.strerror or exc}") from None


@click.command("generate", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt", required=False)
@click.option(
    "--prompt-file",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="Read the prompt from a UTF-8 file ('-': stdin).",
)
@_sampling_options
@click.option(
    "--sliding-window", is_flag=True, default=None, help="Keep the most recent tokens when the context fills up."
)
@click.option(
    "--lookup",
    is_flag=True,
    help="Speculative decoding with prompt lookup: draft the tokens that followed an earlier match.",
)
@click.option(
    "--draft",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Speculative decoding with this draft bundle (a smaller model with the same tokenizer).",
)
@click.option(
    "--draft-tokens",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Tokens drafted per round at most (with --lookup or --draft).",
)
@click.option(
    "--lookup-ngram",
    type=click.IntRange(1, 16),
    default=3,
    show_default=True,
    help="With --lookup: match the last n tokens, n from this down to 1.",
)
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help='The text must be JSON valid under this JSON schema file ({"type": "object"}: any object). Needs edgegpt[constrain].',
)
@click.option(
    "--regex",
    default=None,
    help="The whole text must match this regular expression (Rust regex syntax). Needs edgegpt[constrain].",
)
@click.option(
    "--grammar",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The text must follow this Lark (or GBNF) grammar file. Needs edgegpt[constrain].",
)
@click.option(
    "--logprobs", is_flag=True, default=None, help="With --json: each token's log-probability under the model."
)
@click.option(
    "--top-logprobs",
    type=click.IntRange(min=0),
    default=None,
    help="With --json: the N most likely tokens of each step too.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print text, tokens, finish_reason and timings as one JSON object."
)
@click.pass_context
def generate_command(
    ctx,
    bundle,
    prompt,
    prompt_file,
    provider,
    threads,
    spinning,
    huge_pages,
    lookup,
    draft,
    draft_tokens,
    lookup_ngram,
    json_schema,
    regex,
    grammar,
    as_json,
    **flags,
):
    """Generate text from a bundle with onnxruntime (no torch), streamed to stdout.

    \b
    Examples:
      edgegpt generate bundles/tiny "def main(" -n 50
      edgegpt generate bundles/tiny "import " -t 0.8 --top-p 0.95 --seed 0 --stop "\\n\\n"
      edgegpt generate bundles/tiny --prompt-file prompt.py -n 100 --json
      edgegpt generate bundles/tiny --prompt-file prompt.py --lookup --json
      edgegpt generate bundles/small "def main(" --draft bundles/tiny --draft-tokens 4
      edgegpt generate bundles/tiny "Person: " --json-schema person.schema.json -n 60
      edgegpt generate bundles/tiny "Date: " --regex "[0-9]{4}-[0-9]{2}-[0-9]{2}" --json --top-logprobs 3
    """
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give PROMPT or --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise click.UsageError('give a PROMPT (may be "") or --prompt-file')
    if lookup and draft is not None:
        raise click.UsageError("give --lookup or --draft, not both")
    if (flags.get("logprobs") or flags.get("top_logprobs")) and not as_json:
        raise click.UsageError("--logprobs and --top-logprobs are printed with --json; add it")
    constraint = _constraint(json_schema, regex, grammar)
    text = _read_prompt_file(prompt_file) if prompt_file is not None else _check_prompt(prompt)
    from edgegpt.runtime import Generator, SamplingConfig, Speculative
    from edgegpt.runtime.generation.budget import token_budget

    session = dict(provider=provider, threads=threads, spinning=spinning, huge_pages=huge_pages)
    gen = Generator.load(bundle, **session)
    speculative = None
    if lookup or draft is not None:
        speculative = Speculative(
            lookup=lookup,
            draft=None if draft is None else Generator.load(draft, **session),
            draft_tokens=draft_tokens,
            lookup_ngram=lookup_ngram,
        )
    ids = gen.encode(text)  # once, for the budget and the call
    overrides = given(flags)
    if "max_new_tokens" not in overrides and not overrides.get("sliding_window"):  # the default, lowered to the room
        room = token_budget(len(ids) or 1, None, gen.config.block_size)  # an empty prompt is fed as end-of-text
        overrides["max_new_tokens"] = min(SamplingConfig().max_new_tokens, room)
    sampling = SamplingConfig().replace(**overrides)
    if as_json:
        result = gen.generate_ids(ids, sampling, speculative=speculative, **constraint)
        timings = {k: round(v, 6) for k, v in vars(result.timings).items()}
        payload = {"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason}
        if result.logprobs is not None:
            payload["logprobs"] = [
                {
                    "token": e.token,
                    "logprob": round(e.logprob, 6),
                    "top_logprobs": [{"token": t, "logprob": round(p, 6)} for t, p in e.top],
                }
                for e in result.logprobs
            ]
        payload.update(prompt_tokens=len(result.prompt_tokens), context_shifts=result.context_shifts, timings=timings)
        if speculative is not None:
            payload.update(
                drafted_tokens=result.drafted_tokens,
                accepted_tokens=result.accepted_tokens,
                acceptance_rate=round(result.acceptance_rate, 6),
            )
        with _stdout_errors():
            click.echo(json.dumps(payload, ensure_ascii=False))
        return
    stream = gen.stream_ids(ids, sampling, speculative=speculative, **constraint)
    with _stdout_errors():
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
    result = stream.result
    if not _quiet(ctx):
        t = result.timings
        shifts = f", context shifts {result.context_shifts}" if result.context_shifts else ""
        drafts = ""
        if speculative is not None:
            drafts = (
                f", drafted {result.drafted_tokens}, accepted {result.accepted_tokens} ({result.acceptance_rate:.0%}), "
                f"{len(result.tokens) / max(t.steps, 1):.2f} tokens per model call"
            )
        click.echo(
            f"[{len(result.tokens)} tokens, {t.tokens_per_s:.1f} tokens/s, first token {t.time_to_first_token_s * 1e3:.1f} ms, "
            f"finish_reason {result.finish_reason}{shifts}{drafts}]",
            err=True,
        )


@click.command("chat", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_sampling_options
@click.pass_context
def chat_command(ctx, bundle, provider, threads, spinning, huge_pages, **flags):
    """Chat with a bundle: an interactive loop that keeps the conversation as context.

    The conversation is "User: ..." / "Assistant: ..." turns; each reply stops at the next "User:". The
    model's cache is kept between turns, so a turn feeds only its new tokens. When the conversation
    outgrows the model's context, the oldest tokens are dropped. Type /reset to forget the
    conversation, /exit (or end the input) to quit.

    \b
    Examples:
      edgegpt chat bundles/tiny
      edgegpt chat bundles/tiny -t 0.7 --top-p 0.9 -n 128
    """
    if sys.stdin is None or sys.stdin.closed:
        raise click.UsageError(
            "chat reads the conversation from standard input, which is closed; run it in a terminal or pipe text in"
        )
    from edgegpt.runtime import Generator, SamplingConfig
    from edgegpt.runtime.generation.chat import Conversation

    sampling = SamplingConfig().replace(**given(flags))
    gen = Generator.load(bundle, provider=provider, threads=threads, spinning=spinning, huge_pages=huge_pages)
    chat = Conversation(gen, sampling)
    while True:
        click.echo("> ", nl=False, err=True)
        data = sys.stdin.buffer.readline()
        try:
            line = _utf8(data, "that line", "type it again")
        except UnicodeError as exc:
            click.echo(str(exc), err=True)
            continue
        if not line or line.strip() in ("/exit", "/quit"):
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            chat.reset()
            continue
        if not line.strip():
            continue
        with _stdout_errors():
            for piece in chat.say(line):
                click.echo(piece, nl=False)
            click.echo()


@click.command("eval", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Held-out text to measure on.",
)
@click.option(
    "--reference",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Bundle to compare with (the fp32 one): top-1 and greedy agreement.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option(
    "--tail",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Only the last fraction of the file (0.1: `edgegpt train`'s validation split).",
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score at most this many tokens.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens between windows [default: context/2].")
@click.option(
    "--scoring",
    type=click.Choice(["half", "sliding"]),
    default="half",
    show_default=True,
    help="Windows of the KL-divergence comparison (with --reference): half = llama-perplexity's "
    "(non-overlapping, second halves scored); sliding = the perplexity windows.",
)
@click.option(
    "--prompts", type=click.IntRange(min=0), default=8, show_default=True, help="Greedy prompts (with --reference)."
)
@click.option(
    "--new-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Greedy tokens per prompt."
)
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: one per core]."
)
@click.pass_context
def eval_command(
    ctx,
    bundle,
    text_file,
    reference,
    as_json,
    tail,
    max_tokens,
    stride,
    scoring,
    prompts,
    new_tokens,
    provider,
    threads,
):
    """Measure a bundle: perplexity on a text, agreement and KL-divergence against a reference bundle, size.

    Perplexity uses sliding windows of the model's context over the text; with --reference, the same
    windows give next-token top-1 agreement, greedy continuations of prompts cut from the text give
    greedy-sequence agreement, and llama-perplexity's --kl-divergence statistics compare the two
    distributions: mean KL(reference || bundle) with its percentiles, same top token %, RMS Δp and both
    perplexities with their difference. Runs on onnxruntime only (no torch).

    \b
    Examples:
      edgegpt eval bundles/small --text held_out.txt
      edgegpt eval bundles/small-int8 --text held_out.txt --reference bundles/small
      edgegpt eval bundles/small-int8 --text held_out.txt --reference bundles/small --json
      edgegpt eval bundles/small-int4 --text corpus.txt --tail 0.1 --reference bundles/small --scoring sliding
    """
    from edgegpt.runtime.generation.evaluate import evaluate_bundle, summary_text

    with contextlib.ExitStack() as stack:
        result = evaluate_bundle(
            bundle,
            text_file,
            reference=reference,
            tail=tail,
            max_tokens=max_tokens,
            stride=stride,
            scoring=scoring,
            prompts=prompts,
            new_tokens=new_tokens,
            provider=provider,
            threads=threads,
            progress=None if _quiet(ctx) else _progress_bar(stack),
        )
    click.echo(json.dumps(result, indent=2) if as_json else summary_text(result))


def _progress_bar(stack: contextlib.ExitStack):
    """A progress(done, total) callback drawing a click progress bar on stderr, opened on its first call."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = stack.enter_context(click.progressbar(length=total, label="evaluating", file=sys.stderr))
        bar.update(done - bar.pos)

    return update
