"""Training settings: the `TrainConfig` dataclass (torch-free, so the CLI builds its flags without torch)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from edgegpt.checks import check_int, check_real
from edgegpt.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; every field is a CLI flag of `edgegpt train`.

    >>> TrainConfig(steps=10, warmup_steps=2).lr_at(1)
    0.0006
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # cosine horizon; default `steps` (set it to resume past `steps`)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    save_interval: int = 500
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    compile: bool = False

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_iters",
            "save_interval",
            "log_interval",
        ):
            check_int(name, getattr(self, name), low=1)
        check_int("warmup_steps", self.warmup_steps)
        check_real("learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_real("min_lr", self.min_lr, low=0.0)
        check_real("grad_clip", self.grad_clip, low=0.0)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / (self.warmup_steps + 1)
        horizon = self.lr_decay_steps or self.steps
        if step >= horizon:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, horizon - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.learning_rate - self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**data)
