"""`Conversation`: a chat on one `Generator` that keeps its KV cache from turn to turn.

The conversation is a list of messages rendered by the bundle's chat template (`Generator.chat_template`:
the model's own Hugging Face template, or edgegpt's plain "User: ...\nAssistant: ..." default, whose replies
stop at the next "\nUser:"), the same text the server's /v1/chat/completions renders. It is kept as token
ids, the reply's as the model sampled them: each turn appends only the text the template adds (the user's
message and the reply's opening), so the next turn's prompt starts with exactly the tokens the cache
holds, every turn continues on the same `DecodeState` (`Generator.stream_ids(..., state=...)`) and feeds
only its own new tokens (the longest common prefix is reused, as llama.cpp's server does for a slot).
When the conversation outgrows the model's context, its oldest tokens are dropped and the cache is
recomputed once.
"""

from __future__ import annotations

from typing import Iterator

from edgegpt.runtime.generation.generator import GenerationResult, Generator
from edgegpt.runtime.generation.sampling import SamplingConfig

__all__ = ["Conversation"]


class Conversation:
    """Turns of a chat; `say` streams the reply, and the history and the cache carry over to the next turn.

    Attributes:
        messages: the conversation so far, as {"role", "content"} dicts.
        history: its text, as the chat template renders it.
        ids: its token ids, as the model saw them.
        last_result: the last reply's `GenerationResult` (`cached_tokens`: prompt tokens not fed again).

    >>> chat = Conversation(gen, SamplingConfig(max_new_tokens=64))  # doctest: +SKIP
    >>> print("".join(chat.say("What is a list comprehension?")))  # doctest: +SKIP
    """

    def __init__(self, gen: Generator, sampling: SamplingConfig | None = None):
        base = SamplingConfig() if sampling is None else sampling
        self.gen, self.template = gen, gen.chat_template
        self.sampling = base.replace(stop=(*self.template.stop, *base.stop), sliding_window=True)
        self.state = gen.new_state()
        self.messages: list[dict[str, str]] = []
        self.history = ""
        self.ids: list[int] = []
        self.last_result: GenerationResult | None = None

    def say(self, message: str) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply joins the history once the stream is exhausted."""
        messages = [*self.messages, {"role": "user", "content": message}]
        text = self.template.render(messages)
        prompt = self._fit(self._extend(self.ids, self.history, text))
        stream = self.gen.stream_ids(prompt, self.sampling, state=self.state)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        history = self.template.render(self.messages, add_generation_prompt=False)
        self.ids = self._extend(prompt + self._reply_ids(stream.result.tokens, reply), text + reply, history)
        self.history, self.last_result = history, stream.result

    def reset(self) -> None:
        """Forget the conversation (the cache too)."""
        self.messages, self.history, self.ids = [], "", []
        self.state.rewind(0)

    def _extend(self, ids: list[int], before: str, after: str) -> list[int]:
        """`ids` (the tokens of `before`) plus the tokens of what `after` adds; all of `after` re-encoded when
        the template rewrote earlier text instead of appending."""
        if after.startswith(before):
            return ids + self.gen.encode(after[len(before) :])
        return self.gen.encode(after)

    def _fit(self, ids: list[int]) -> list[int]:
        """The most recent tokens, leaving room for a reply; unchanged while the conversation fits."""
        block = self.gen.config.block_size
        room = min(self.sampling.max_new_tokens or block // 2, block // 2)
        return ids if len(ids) + room <= block else ids[-(block - room) :]

    def _reply_ids(self, tokens: list[int], reply: str) -> list[int]:
        """The sampled tokens that spell `reply` (a stop string cut after them is dropped), as sampled."""
        for k in range(len(tokens), -1, -1):
            text = self.gen.decode(tokens[:k])
            if reply.startswith(text):  # k = len(tokens) at once, unless a stop string cut the reply
                return tokens[:k] + (self.gen.encode(reply[len(text) :]) if len(text) < len(reply) else [])
        return self.gen.encode(reply)
