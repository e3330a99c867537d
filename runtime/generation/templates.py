"""`ChatTemplate`: chat messages -> the prompt text a model was trained to continue, the Hugging Face way.

A bundle may carry its model's own template as `chat_template` in tokenizer_config.json (what
`transformers`' `apply_chat_template` reads; `edgegpt import-hf` keeps it). It is Jinja, rendered in
Jinja's immutable sandbox with the variables Hugging Face passes (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`) and `raise_exception`; rendering one needs `jinja2` (the `serve` extra).

A bundle without one gets edgegpt's default, a plain transcript, rendered without Jinja:

    System: {content}\\n      (system or developer messages)
    User: {content}\\n
    Assistant:{content}\\n   (the model's reply follows "Assistant:" as it sampled it, leading space included)

and, for the next reply, "Assistant:". Its replies end at the next "\\nUser:" (`stop`), since a model
trained on plain text has no end-of-turn token. `edgegpt chat`, `Conversation` and the server's
/v1/chat/completions all render through this class, so a conversation is the same text everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgegpt.errors import BundleError, ConfigError, DataError
from edgegpt.tokenizer import chat_template_of, read_tokenizer_config

__all__ = ["ChatTemplate"]

_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class ChatTemplate:
    """Render messages ([{"role", "content"}]) to prompt text; `source` is a Jinja template or None (the default).

    >>> t = ChatTemplate()
    >>> t.render([{"role": "user", "content": "hi"}])
    'User: hi\\nAssistant:'
    >>> t.stop
    ('\\nUser:',)
    """

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self.stop: tuple[str, ...] = ("\nUser:",) if source is None else ()
        self._compiled = None if source is None else _compile(source)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path) -> "ChatTemplate":
        """The template in the bundle's tokenizer_config.json, or the default when it has none."""
        try:
            config = read_tokenizer_config(bundle_dir)
            source = chat_template_of(config)
        except DataError as exc:
            raise BundleError(f"{Path(bundle_dir)}: {exc}") from None
        if source is None:
            return cls()
        return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (each {"role", "content"}), ending with the reply's opening if asked."""
        if self._compiled is None:
            text = "".join(
                f"{_ROLES.get(m['role'], m['role'].title())}:"
                f"{m['content'] if m['role'] == 'assistant' else ' ' + m['content']}\n"
                for m in messages
            )
            return text + ("Assistant:" if add_generation_prompt else "")
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:  # the template's own raise_exception, or an error inside it
            raise ConfigError(f"the chat template failed on these messages: {exc}") from None


def _token(value: Any) -> str:
    """bos_token / eos_token: a string, or {"content": ...} (AddedToken's JSON form)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _compile(source: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError(
            'this bundle has its own chat template (Jinja): pip install "edgegpt[serve]" to render it'
        ) from None

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise BundleError(f"the bundle's chat_template is not valid Jinja: {exc}") from None
