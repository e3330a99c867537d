"""Execution-provider choice: `create_session` runs a `SessionConfig` (session_config.py) on its provider.

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
from pathlib import Path

import onnxruntime as ort

from edgegpt.errors import BundleError, ProviderError
from edgegpt.runtime.model.huge_pages import huge_pages_for_new_memory
from edgegpt.runtime.model.session_config import SessionConfig

__all__ = ["SessionConfig", "create_session", "cuda_problem"]

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


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
