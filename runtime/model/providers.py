"""Execution-provider choice and session options: `SessionConfig` and `create_session`.

"cpu" runs CPUExecutionProvider. "cuda" runs CUDAExecutionProvider or raises `ProviderError` saying why
(onnxruntime-gpu missing, no NVIDIA driver or device, CUDA/cuDNN libraries that fail to load). "auto"
prefers CUDA and falls back to CPU; the fallback logs one warning line when this onnxruntime offers CUDA
but cannot use it (a CPU-only onnxruntime, the usual device install, picks CPU quietly).
After the session exists, `session.get_providers()` is checked, so a silent fallback is impossible.
References: https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgegpt.checks import check_bool, check_choice, check_int
from edgegpt.errors import BundleError, ProviderError
from edgegpt.runtime.model.huge_pages import huge_pages_for_new_memory

__all__ = ["SessionConfig", "create_session", "cuda_problem"]

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
PROVIDERS = ("auto", "cpu", "cuda")
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
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

    def session_options(self) -> ort.SessionOptions:
        """The `ort.SessionOptions` for this config."""
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # a decoder graph is one chain of ops: no inter-op parallelism
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = OPTIMIZATION[self.optimization]
        options.enable_cpu_mem_arena = self.memory_arena
        options.log_severity_level = self.log_severity
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return options


def cuda_problem() -> str | None:
    """Why CUDA cannot be used by onnxruntime here, or None if nothing is known to be wrong yet.

    >>> isinstance(cuda_problem(), (str, type(None)))
    True
    """
    available = ort.get_available_providers()
    if CUDA not in available:
        return (
            f"onnxruntime-gpu is not installed (this onnxruntime {ort.__version__} offers {', '.join(available)}); "
            'install it instead of onnxruntime: pip uninstall -y onnxruntime && pip install "edgegpt[gpu]"'
        )
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            libcuda = ctypes.CDLL(name)
            break
        except OSError as exc:
            error = exc
    else:
        return f"no NVIDIA driver: {names[0]} failed to load ({error})"
    count = ctypes.c_int(0)
    status = libcuda.cuInit(0)
    if status == 0:
        status = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if status == 100 or (status == 0 and count.value == 0):  # CUDA_ERROR_NO_DEVICE
        return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)"
    if status != 0:
        return f"the NVIDIA driver failed to initialise (cuInit error {status}); check nvidia-smi"
    return None


def _cuda_session(model: Path, config: SessionConfig) -> ort.InferenceSession:
    problem = cuda_problem()
    if problem:
        raise ProviderError(f"CUDA requested but unusable: {problem}")
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip wheels, when installed that way
        try:
            ort.preload_dlls()
        except Exception as exc:  # best effort: the libraries may come from the system instead
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    options = {"device_id": config.device_id}
    try:
        session = ort.InferenceSession(str(model), config.session_options(), providers=[(CUDA, options), CPU])
    except Exception as exc:  # onnxruntime raises its own Fail / RuntimeException types
        raise ProviderError(f"CUDA requested but the CUDA libraries failed to load: {exc}") from exc
    if session.get_providers()[:1] != [CUDA]:
        raise ProviderError(
            f"CUDA requested but onnxruntime fell back to {session.get_providers()}: the CUDA or cuDNN libraries "
            "failed to load (see onnxruntime's log above; versions must match the onnxruntime-gpu build)"
        )
    return session


def create_session(model: str | Path, config: SessionConfig) -> ort.InferenceSession:
    """Create the session on the requested provider and check that onnxruntime really uses it.

    Raises:
        ProviderError: "cuda" was asked for and cannot be used; the message says why.
        BundleError: onnxruntime refused the model file.
    """
    model = Path(model)
    if config.provider in ("cuda", "auto"):
        try:
            return _cuda_session(model, config)
        except ProviderError as exc:
            if config.provider == "cuda":
                raise
            if CUDA in ort.get_available_providers():
                log.warning("provider auto: using CPU; %s", exc)
            else:
                log.debug("provider auto: using CPU; %s", exc)
    try:
        with huge_pages_for_new_memory(config.huge_pages):
            session = ort.InferenceSession(os.fspath(model), config.session_options(), providers=[CPU])
    except Exception as exc:  # onnxruntime's InvalidProtobuf / Fail / InvalidGraph
        raise BundleError(f"{model}: onnxruntime cannot load the model ({exc}); re-export the bundle") from exc
    if session.get_providers()[:1] != [CPU]:  # internal invariant, kept as a typed error
        raise ProviderError(f"asked for CPUExecutionProvider, onnxruntime runs {session.get_providers()}")
    return session
