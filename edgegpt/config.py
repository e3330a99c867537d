"""Model configuration: the `GPTConfig` dataclass, its presets and its JSON round-trip.

Torch-free on purpose: the runtime reads the same config from a bundle's manifest.
Vocabulary follows nanoGPT (n_layer, n_head, n_embd, block_size, vocab_size).

Two fields exist for imported models (docs/design.md, "GELU and padded vocabularies"): `gelu` picks the
MLP's activation, GPT-2's tanh approximation (the default) or the exact erf GELU that nanoGPT and
`activation_function="gelu"` use; `sampled_vocab_size` marks ids at or above it as never sampled (the padded
rows of nanoGPT's 50304-token vocabulary, or an end-of-text token appended to a character vocabulary).
Configs written before either field existed load with their defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegpt.checks import check_bool, check_choice, check_int, check_real
from edgegpt.errors import ConfigError

PRESETS: dict[str, dict[str, int]] = {
    # For tests: well under 1 M parameters.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    # The GPT-2 124 M shape.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}
# The MLP's GELU: "tanh" is GPT-2's approximation (nn.GELU(approximate="tanh")), "erf" the exact
# x * Phi(x) of nn.GELU() that nanoGPT uses. They differ by up to ~5e-4 per activation.
GELUS = ("tanh", "erf")


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a SimpleGPT.

    >>> GPTConfig.preset("tiny", vocab_size=512).head_size
    32
    """

    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    gelu: str = "tanh"
    sampled_vocab_size: int | None = None  # None: every id below vocab_size may be sampled

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(name, getattr(self, name), low=1)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_bool("bias", self.bias)
        check_choice("gelu", self.gelu, GELUS)
        check_int("sampled_vocab_size", self.sampled_vocab_size, low=1, high=self.vocab_size, optional=True)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def sampled_ids(self, tokenizer_size: int) -> int:
        """How many ids (0..n-1) generation may pick: not the padding past the tokenizer, nor ids at or
        above `sampled_vocab_size`.

        >>> GPTConfig(vocab_size=320).sampled_ids(300), GPTConfig(vocab_size=66, sampled_vocab_size=65).sampled_ids(66)
        (300, 65)
        """
        return min(self.vocab_size, tokenizer_size, self.sampled_vocab_size or self.vocab_size)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset (tiny, small, gpt2) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Build from a dict, rejecting unknown keys by name."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "GPTConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read model config ({exc})") from exc
        return cls.from_dict(data)
