"""How many new tokens a prompt may get: the one rule every caller asks.

`Generator` (its requests and `new_completion`), `edgegpt generate` (its default max_new_tokens) and the
server's scheduler (a request's max_tokens against a slot) call `token_budget`; the browser runtime mirrors it
in web/src/budget.js (`tokenBudget`), and tests/web/test_budget.py checks that the two agree.
"""

from __future__ import annotations

from edgegpt.errors import ContextLengthError, SamplingError

__all__ = ["token_budget"]


def token_budget(
    prompt_tokens: int, max_new_tokens: int | None, context: int, *, sliding_window: bool = False, fit: bool = False
) -> int:
    """The new tokens a prompt of `prompt_tokens` gets in a context of `context` positions.

    The room is `context - prompt_tokens`. max_new_tokens None asks for all of it; a number must fit in it
    (with sliding_window any number goes: the window drops old tokens). `fit` is the server's rule: a number
    larger than the room is lowered to it, and the prompt must leave room for at least one token.

    Args:
        prompt_tokens: the prompt's length (an empty prompt is fed as end-of-text: 1).
        max_new_tokens: the tokens asked for, or None for as many as the context has room for.
        context: the positions a sequence may fill (the model's block_size, or a slot's capacity).
        sliding_window: old tokens are dropped when the context fills (max_new_tokens None is refused).
        fit: lower max_new_tokens to the room instead of raising; refuse a prompt that leaves no room.

    Returns:
        The most new tokens (>= 0; >= 1 with `fit`).

    Raises:
        ContextLengthError: the prompt (plus max_new_tokens, without `fit`) does not fit the context.
        SamplingError: max_new_tokens None with sliding_window (a window never fills: no end).

    >>> token_budget(10, None, 64), token_budget(10, 16, 64), token_budget(60, 16, 64, fit=True)
    (54, 16, 4)
    >>> token_budget(70, None, 64)
    Traceback (most recent call last):
    ...
    edgegpt.errors.ContextLengthError: prompt of 70 tokens exceeds the model's context of 64 tokens
    """
    room = context - prompt_tokens
    if fit:
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; this model's slots hold {context} positions, so at most "
                f"{context - 1} prompt tokens leave room for one new token"
            )
        return room if max_new_tokens is None else min(max_new_tokens, room)
    if max_new_tokens is None:
        if sliding_window:
            raise SamplingError(
                "max_new_tokens=None (until the context is full) cannot be used with sliding_window=True"
            )
        if room < 0:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens exceeds the model's context of {context} tokens"
            )
        return room
    if room < max_new_tokens and not sliding_window:
        raise ContextLengthError(
            f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = {prompt_tokens + max_new_tokens} "
            f"exceeds the model's context of {context} tokens; shorten the prompt, lower max_new_tokens to "
            f"{max(room, 0)} or pass sliding_window=True"
        )
    return max_new_tokens
