"""Log-probabilities of generated tokens: the picked token's and the most likely alternatives'.

They are the model's own distribution at each step: a log-softmax of the logits the model produced (over
the ids that may be sampled, `Generator.sampled_vocab_size`), before logit_bias, a logits processor, a
constraint's mask, penalties or temperature change them, as OpenAI's `logprobs` and vLLM's default report.
So a token a constraint forced can carry a low logprob: it says how far the constraint pulled the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TokenLogprob", "token_logprob"]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `top` most likely tokens at its step.

    Attributes:
        token: the generated token id.
        logprob: its natural log-probability under the model.
        top: (token id, logprob) pairs, most likely first (ties: lower id first); empty unless top_logprobs.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprob:
    """The log-softmax of one row of logits (V,) at `token`, and its `top` best entries.

    >>> entry = token_logprob(np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32)), 1, top=2)
    >>> round(entry.logprob, 4), [(i, round(p, 4)) for i, p in entry.top]
    (-1.3863, [(0, -0.6931), (1, -1.3863)])
    """
    x = logits.astype(np.float64)
    peak = x.max()
    log_z = peak + np.log(np.exp(x - peak).sum())  # (V,) -> scalar: log of the partition function
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, x.size)
        ids = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        ids = ids[np.lexsort((ids, -x[ids]))]  # by logit, descending; ties by id
        best = tuple((int(i), float(x[i] - log_z)) for i in ids)
    return TokenLogprob(int(token), float(x[token] - log_z), best)
