// How many new tokens a prompt may get: the mirror of runtime/generation/budget.py `token_budget`, branch for
// branch (null for None, { slidingWindow, fit } for its keywords); tests/web/test_budget.py checks that the two
// agree on a table of cases. Change both or neither.

import { SamplingError } from "./sampling.js";

export class ContextLengthError extends RangeError {
  constructor(message) {
    super(message);
    this.name = "ContextLengthError";
  }
}

/**
 * The new tokens a prompt of `promptTokens` gets in a context of `context` positions: maxNewTokens null asks for
 * all the room (context - promptTokens), a number must fit in it (any number with slidingWindow); `fit` lowers
 * it to the room and refuses a prompt that leaves no room for one token. Throws ContextLengthError or SamplingError.
 */
export function tokenBudget(promptTokens, maxNewTokens, context, { slidingWindow = false, fit = false } = {}) {
  const room = context - promptTokens;
  if (fit) {
    if (room < 1) {
      throw new ContextLengthError(
        `the prompt has ${promptTokens} tokens; this model's slots hold ${context} positions, ` +
          `so at most ${context - 1} prompt tokens leave room for one new token`,
      );
    }
    return maxNewTokens === null ? room : Math.min(maxNewTokens, room);
  }
  if (maxNewTokens === null) {
    if (slidingWindow) {
      throw new SamplingError("maxNewTokens null (until the context is full) cannot be used with slidingWindow");
    }
    if (room < 0) {
      throw new ContextLengthError(`prompt of ${promptTokens} tokens exceeds the model's context of ${context} tokens`);
    }
    return room;
  }
  if (room < maxNewTokens && !slidingWindow) {
    throw new ContextLengthError(
      `prompt of ${promptTokens} tokens + maxNewTokens ${maxNewTokens} exceeds the model's context of ${context} ` +
        `tokens; shorten the prompt or lower maxNewTokens to ${Math.max(room, 0)}`,
    );
  }
  return maxNewTokens;
}
