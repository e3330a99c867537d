"""The generation wing: from a prompt to text (sampling, completion, constraints, logprobs, speculative
decoding, `Generator`, chat, templates, evaluation)."""
