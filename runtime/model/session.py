"""`SessionConfig`: how to build the onnxruntime session, as a dataclass that imports no onnxruntime.

Standard library and core only, so that the CLI can build its session flags from these fields when it
starts (`edgegpt.cli.support.session_options`) without loading onnxruntime; `session_options()` imports
onnxruntime when a session is made. The session itself is made by `providers.create_session`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgegpt.checks import check_bool, check_choice, check_int, replace_fields

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OPTIMIZATION", "PROVIDERS", "SessionConfig"]

PROVIDERS = ("auto", "cpu", "cuda")
# optimization name -> onnxruntime's GraphOptimizationLevel member
OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass(frozen=True)
class SessionConfig:
    """How to build the onnxruntime session.

    Attributes:
        provider: "auto" (CUDA if usable, else CPU), "cpu" or "cuda".
        threads: intra-op threads; None lets onnxruntime use one per physical core.
        optimization: graph optimisation level: "disable", "basic", "extended" or "all".
        memory_arena: onnxruntime's CPU memory arena (faster; holds on to its peak memory).
        spinning: let idle onnxruntime threads busy-wait for the next op (onnxruntime's own default).
            On a quiet machine it cuts the per-op hand-off, so decoding is faster. Turn it off when other
            busy processes share the cores: there the spinning threads steal the time the work needs.
        huge_pages: on CPU, move the session's weights to 2 MiB transparent huge pages after loading (Linux
            6.1+, best effort; see `huge_pages`): a decode step streams every weight, and 4 KiB pages stall
            the prefetcher at each page boundary, so decode steps run faster. The move costs load time in
            proportion to the model's size; turn it off for one-shot runs of big models. (Measurements:
            docs/design.md, "6. The session: providers, threads, huge pages".)
        device_id: the CUDA device.
        log_severity: onnxruntime's own log level, 0 (verbose) to 4 (fatal); 3 shows errors only.

    >>> SessionConfig(provider="gpu")
    Traceback (most recent call last):
    ...
    edgegpt.errors.ConfigError: provider must be one of auto, cpu, cuda, got 'gpu'
    """

    provider: str = "auto"
    threads: int | None = None
    optimization: str = "all"
    memory_arena: bool = True
    spinning: bool = True
    huge_pages: bool = True
    device_id: int = 0
    log_severity: int = 3

    def __post_init__(self):
        check_choice("provider", self.provider, PROVIDERS)
        check_int("threads", self.threads, low=1, optional=True)
        check_choice("optimization", self.optimization, OPTIMIZATION)
        for name in ("memory_arena", "spinning", "huge_pages"):
            check_bool(name, getattr(self, name))
        check_int("device_id", self.device_id)
        check_int("log_severity", self.log_severity, high=4)

    def replace(self, **overrides: Any) -> "SessionConfig":
        """A copy with some fields changed; an unknown keyword raises `TypeError` naming it.

        >>> SessionConfig().replace(threads=2).threads
        2
        >>> SessionConfig().replace(thread=2)
        Traceback (most recent call last):
        ...
        TypeError: unknown session option 'thread'; did you mean 'threads'?
        """
        return replace_fields(self, overrides, "session option")

    def session_options(self) -> "ort.SessionOptions":
        """The `ort.SessionOptions` for this config."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # a decoder graph is one chain of ops: no inter-op parallelism
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[self.optimization])
        options.enable_cpu_mem_arena = self.memory_arena
        options.log_severity_level = self.log_severity
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options
