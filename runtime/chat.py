"""`Conversation`: a chat on one `Generator` that keeps its KV cache from turn to turn.

The text of the conversation is "User: ...\\nAssistant: ...\\n" turns; each reply stops at the next
"\\nUser:". Every turn continues on the same `DecodeState` (`Generator.stream(..., state=...)`): the
tokens the cache already holds (the longest common prefix of the conversation so far and the new text)
are not fed again, so a turn costs its own new tokens, not the whole history. When the conversation
outgrows the model's context, the oldest tokens are dropped and the cache is recomputed once (the
sliding window of `SamplingConfig`).
"""

from __future__ import annotations

from typing import Iterator

from edgegpt.runtime.generator import GenerationResult, Generator
from edgegpt.runtime.sampling import SamplingConfig

__all__ = ["ASSISTANT", "USER", "Conversation"]

USER, ASSISTANT = "User:", "Assistant:"


class Conversation:
    """Turns of a chat; `say` streams the reply, the history and the cache carry over to the next turn.

    >>> chat = Conversation(gen, SamplingConfig(max_new_tokens=64))  # doctest: +SKIP
    >>> print("".join(chat.say("What is a list comprehension?")))  # doctest: +SKIP
    >>> chat.last_result.cached_tokens  # prompt tokens not fed again  # doctest: +SKIP
    """

    def __init__(self, gen: Generator, sampling: SamplingConfig | None = None):
        base = SamplingConfig() if sampling is None else sampling
        self.gen = gen
        self.sampling = base.replace(stop=(f"\n{USER}", *base.stop), sliding_window=True)
        self.state = gen.new_state()
        self.history = ""
        self.last_result: GenerationResult | None = None

    def say(self, message: str) -> Iterator[str]:
        """Add a user turn and stream the reply; the reply joins the history once the stream is exhausted."""
        self.history += f"{USER} {message}\n{ASSISTANT}"
        stream = self.gen.stream(self.history, self.sampling, state=self.state)
        reply = []
        for piece in stream:
            reply.append(piece)
            yield piece
        self.history += "".join(reply) + "\n"
        self.last_result = stream.result

    def reset(self) -> None:
        """Forget the conversation (the cache too)."""
        self.history = ""
        self.state.rewind(0)
