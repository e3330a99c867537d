"""What every `edgegpt` click command shares: edgegpt's errors as click's, and dataclass fields as flags.

Errors (STYLE.md section 6). A `Command` (and the `Group` of edgegpt/cli.py, for any command made without
it) reports an error in one line, in one place, `click_error`:

    ConfigError          -> click.UsageError, exit 2
    SamplingError        -> click.BadParameter naming the flag of the field it rejects, exit 2
    other EdgeGPTError   -> click.ClickException "Type: message", exit 1
    ImportError          -> click.ClickException naming the extra to install, exit 1

With `edgegpt --debug` the original exception propagates, traceback and all.

Flags (STYLE.md section 3). `field_options` makes one `--field-name` option per dataclass field with the
default None, so that an unset flag keeps the dataclass default; `given` collects the flags that were set,
as overrides for `dataclasses.replace` or `from_dict`.

Module-level imports: the standard library, click and edgegpt.errors, as every CLI module may import this.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import click

from edgegpt.errors import ConfigError, EdgeGPTError, SamplingError

__all__ = ["Command", "Group", "click_error", "field_options", "given", "root_flag"]

# A missing optional module -> the command that installs it; the others come with the training extra, whose
# torch is pinned to the CPU build as in the README (an unpinned torch pulls a multi-GB CUDA build).
_SERVE_INSTALL = "pip install 'edgegpt[serve]'"
_INSTALL = {
    "onnxruntime_genai": "pip install 'edgegpt[genai]'",
    "uvicorn": _SERVE_INSTALL,
    "starlette": _SERVE_INSTALL,
    "sse_starlette": _SERVE_INSTALL,
    "prometheus_client": _SERVE_INSTALL,
    "jinja2": _SERVE_INSTALL,
}
TRAIN_INSTALL = "pip install 'torch==2.13.0' 'edgegpt[train]'"


def root_flag(ctx: click.Context, name: str) -> bool:
    """An `edgegpt` group flag ("debug", "quiet"); False for a command run on its own (as tests do)."""
    obj = ctx.find_root().obj
    return bool(isinstance(obj, dict) and obj.get(name))


def click_error(exc: Exception, ctx: click.Context) -> click.ClickException:
    """The click error that reports `exc`, an `EdgeGPTError` or an `ImportError`, to the user."""
    if isinstance(exc, ConfigError):
        return click.UsageError(str(exc), ctx)
    if isinstance(exc, SamplingError):  # its message starts with the SamplingConfig field it rejects
        return click.BadParameter(str(exc), ctx, param_hint=_flag_of(ctx.command, str(exc).split(" ", 1)[0]))
    if isinstance(exc, ImportError) and not isinstance(exc, EdgeGPTError):  # ExtraMissingError names its extra
        return click.ClickException(f"{exc}; install it: {_INSTALL.get((exc.name or '').split('.')[0], TRAIN_INSTALL)}")
    return click.ClickException(f"{type(exc).__name__}: {_as_flags(str(exc), ctx.command)}")


def _as_flags(message: str, command: click.Command) -> str:
    """The API keywords a message names (`sliding_window=True`, `max_new_tokens`) as this command's flags."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name and "_" in param.name:
            flag = max(param.opts, key=len)
            message = re.sub(rf"\b{param.name}=True\b", flag, message)
            message = re.sub(rf"\b{param.name}\b", flag, message)
    return message


def _flag_of(command: click.Command, name: str) -> str | None:
    """The long flag that sets the parameter `name` ("--top-p" for top_p), or None."""
    for param in command.params:
        if param.name == name and isinstance(param, click.Option):
            return max(param.opts, key=len)
    return None


class _ReportsErrors:
    """Mixed into a click command or group: its `invoke` maps the errors through `click_error`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EdgeGPTError, ImportError) as exc:
            if root_flag(ctx, "debug"):
                raise
            raise click_error(exc, ctx) from None


class Command(_ReportsErrors, click.Command):
    """A click command whose edgegpt errors exit through `click_error`: `@click.command(cls=Command)`."""


class Group(_ReportsErrors, click.Group):
    """The `edgegpt` group: its own commands are `Command`s, and it reports the errors of added ones too."""

    command_class = Command


def field_options(fields: Mapping[str, Mapping[str, Any]] | None = None, *, of: type | None = None) -> Callable:
    """A decorator adding one click option per dataclass field, in order; each defaults to None.

    Args:
        fields: field name -> how its option differs from the plain one: "flags" (the declarations, by
            default `("--field-name",)`; give a short alias or another name here) and any `click.option`
            argument ("type", "help", "multiple", "is_flag", ...). None: every field of `of`.
        of: the dataclass, when importing it is cheap: a field's type comes from its annotation (bool -> a
            flag, tuple[X, ...] -> a repeatable option) unless "fields" gives type, is_flag, multiple or
            callback, and "{default}" in a help text becomes the field's default (the help is
            "[default: {default}]" unless given). Without it, "fields" must give the types.

    >>> @click.command()
    ... @field_options({"top_k": {"type": int, "help": "Keep the k most likely tokens."}})
    ... def cmd(**flags):
    ...     click.echo(given(flags))
    >>> from click.testing import CliRunner
    >>> CliRunner().invoke(cmd, ["--top-k", "5"]).output
    "{'top_k': 5}\\n"
    """
    if fields is None:
        fields = {f.name: {} for f in dataclasses.fields(of)}
    known = {f.name: f for f in dataclasses.fields(of)} if of is not None else {}
    hints = typing.get_type_hints(of) if of is not None else {}
    options = []
    for name, spec in fields.items():
        kwargs = dict(spec)
        flags = kwargs.pop("flags", ("--" + name.replace("_", "-"),))
        if of is not None:
            field = known[name]
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            shown = format(default, "g") if isinstance(default, float) else str(default)
            kwargs["help"] = kwargs.get("help", "[default: {default}]").replace("{default}", shown)
            if not {"type", "is_flag", "multiple", "callback"} & kwargs.keys():  # else the given ones hold
                kwargs.update(_click_type(name, hints[name]))
        options.append(click.option(*flags, name, default=None, **kwargs))

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):  # click lists the options in the order they are applied, reversed
            func = option(func)
        return func

    return decorate


def _click_type(name: str, hint: Any) -> dict[str, Any]:
    """click.option arguments for a field annotation: int, float, str, bool, X | None, tuple[X, ...]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint, args = args[0], list(typing.get_args(args[0]))
    if hint is bool:
        return {"is_flag": True}
    if hint in (int, float, str):
        return {"type": hint}
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
        return {"type": args[0], "multiple": True}
    raise TypeError(f"field_options: give a click type for {name} ({hint})")


def given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The options that were set: drops None (an unset option) and () (an unset repeatable one)."""
    return {k: v for k, v in flags.items() if v is not None and v != ()}
