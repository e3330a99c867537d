"""Model configuration: the `GPTConfig` dataclass, its presets and its JSON round-trip.

Torch-free on purpose: the runtime reads the same config from a bundle's manifest.
Vocabulary follows nanoGPT (n_layer, n_head, n_embd, block_size, vocab_size).

Two fields exist for imported models (docs/design.md, "GELU and padded vocabularies"): `gelu` picks the
MLP's activation, GPT-2's tanh approximation (the default) or the exact erf GELU that nanoGPT and
`activation_function="gelu"` use; `sampled_vocab_size` marks ids at or above it as never sampled (the padded
rows of nanoGPT's 50304-token vocabulary, or an end-of-text token appended to a character vocabulary).
Configs written before either field existed load with their defaults.

The Llama family (Llama 2/3, SmolLM2, Qwen2, Qwen3) differs from GPT-2 in data only (STYLE.md section 11), the
fields of `FAMILY_FIELDS`: `norm` ("layernorm" | "rmsnorm", with `norm_eps`), `position` ("learned" table |
"rope", with `rope_theta` and an optional `rope_scaling` "linear" | "llama3" and its factors), `mlp` ("gelu" |
"swiglu", width `n_inner`, default 4 * n_embd), `n_kv_head` (grouped-query attention; None: n_head), `head_dim`
(None: n_embd // n_head), `qk_norm` (Qwen3's RMSNorm over each head of q and k), `qkv_bias` / `attn_proj_bias` /
`mlp_bias` (None: follow `bias`) and `tied_head`. Their defaults are GPT-2's math, and `to_dict` leaves out a
family field at its default, so a GPT-2 config's dict (in checkpoints and bundle manifests) is what it was
before these fields existed, and older edgegpt releases keep reading GPT-2 bundles written by this one.
References: Zhang & Sennrich 2019 (RMSNorm); Su et al. 2021 (RoFormer); Shazeer 2020 (GLU variants);
Ainslie et al. 2023 (GQA); transformers' LlamaConfig and modeling_rope_utils (llama3 and linear scaling).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgegpt.checks import check_bool, check_choice, check_int, check_real
from edgegpt.errors import ConfigError

# What makes a model Llama-like rather than GPT-2-like; presets and imports add the shape.
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False)
PRESETS: dict[str, dict[str, Any]] = {
    # For tests: well under 1 M parameters.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    # The GPT-2 124 M shape.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    # `small`'s cost as a Llama: SwiGLU's three 384 x 1024 matrices hold as many weights as GELU's two 384 x 1536.
    "small-llama": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, n_kv_head=2, n_inner=1024, **LLAMA),
    # HuggingFaceTB/SmolLM2-135M's shape (its config.json: rope_theta 1e5, 8192 positions, tied embeddings).
    "smollm2-135m": dict(
        n_layer=30,
        n_head=9,
        n_embd=576,
        block_size=8192,
        n_kv_head=3,
        n_inner=1536,
        vocab_size=49152,
        rope_theta=100000.0,
        **LLAMA,
    ),
}
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("linear", "llama3")  # transformers' rope types that SimpleGPT computes (None: unscaled)
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
    # The model family's fields (FAMILY_FIELDS); the defaults are GPT-2's math.
    norm: str = "layernorm"  # "rmsnorm": weight-only RMSNorm (no bias, no mean), for every norm of the model
    norm_eps: float = 1e-5
    position: str = "learned"  # "rope": rotary q and k, no position table
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # "linear" (positions / rope_factor) or "llama3" (Llama 3.1's frequency bands)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only, like the two below
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    mlp: str = "gelu"  # "swiglu": proj(silu(gate(x)) * up(x)), gate and up stacked in one `fc`
    n_inner: int | None = None  # the MLP's width; None: 4 * n_embd
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before the rotary
    qkv_bias: bool | None = None  # None: `bias`, like the two below
    attn_proj_bias: bool | None = None
    mlp_bias: bool | None = None
    tied_head: bool = True  # lm_head shares tok_emb's matrix

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_int(name, getattr(self, name), low=1)
        self._check_family()
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_bool("bias", self.bias)
        check_choice("gelu", self.gelu, GELUS)
        check_int("sampled_vocab_size", self.sampled_vocab_size, low=1, high=self.vocab_size, optional=True)

    def _check_family(self) -> None:
        """The family fields: kinds by name, widths positive, heads in whole groups, rotary pairs."""
        check_choice("norm", self.norm, NORMS)
        check_real("norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_choice("position", self.position, POSITIONS)
        check_real("rope_theta", self.rope_theta, low=0.0, low_open=True)
        check_choice("rope_scaling", self.rope_scaling, (None, *ROPE_SCALINGS))
        for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            check_real(name, getattr(self, name), low=0.0, low_open=True)
        check_int("rope_original_max_positions", self.rope_original_max_positions, low=1)
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(
                f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed rope_low_freq_factor "
                f"({self.rope_low_freq_factor}) for rope_scaling 'llama3'"
            )
        check_choice("mlp", self.mlp, MLPS)
        for name in ("n_inner", "n_kv_head", "head_dim"):
            check_int(name, getattr(self, name), low=1, optional=True)
        for name in ("qk_norm", "tied_head"):
            check_bool(name, getattr(self, name))
        for name in ("qkv_bias", "attn_proj_bias", "mlp_bias"):
            if getattr(self, name) is not None:
                check_bool(name, getattr(self, name))
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads}): each key/value head serves a whole group"
            )
        if self.position == "rope" and self.head_size % 2:
            raise ConfigError(f"position 'rope' rotates pairs of dimensions: head_size ({self.head_size}) must be even")

    @property
    def head_size(self) -> int:
        """Width of one attention head: `head_dim`, or n_embd // n_head."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `n_kv_head`, or n_head (multi-head attention); the KV cache is this many heads wide."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: `n_inner`, or 4 * n_embd."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def bias_of(self, part: str) -> bool:
        """Whether a part ("qkv", "attn_proj", "mlp") has biases: its own flag, or `bias`."""
        own = getattr(self, f"{part}_bias")
        return self.bias if own is None else own

    def sampled_ids(self, tokenizer_size: int) -> int:
        """How many ids (0..n-1) generation may pick: not the padding past the tokenizer, nor ids at or
        above `sampled_vocab_size`.

        >>> GPTConfig(vocab_size=320).sampled_ids(300), GPTConfig(vocab_size=66, sampled_vocab_size=65).sampled_ids(66)
        (300, 65)
        """
        return min(self.vocab_size, tokenizer_size, self.sampled_vocab_size or self.vocab_size)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset (tiny, small, gpt2, small-llama, smollm2-135m) with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Every field, except a family field (FAMILY_FIELDS) at its default: a GPT-2 config's dict is unchanged.

        >>> sorted(set(GPTConfig.preset("small-llama").to_dict()) - set(GPTConfig().to_dict()))
        ['mlp', 'n_inner', 'n_kv_head', 'norm', 'position']
        """
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in FAMILY_FIELDS or v != FAMILY_FIELDS[k]}

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


# The family fields and their (GPT-2) defaults: left out of `to_dict` at those defaults.
_FAMILY = (
    "norm",
    "norm_eps",
    "position",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_positions",
    "mlp",
    "n_inner",
    "n_kv_head",
    "head_dim",
    "qk_norm",
    "qkv_bias",
    "attn_proj_bias",
    "mlp_bias",
    "tied_head",
)
FAMILY_FIELDS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name in _FAMILY}
