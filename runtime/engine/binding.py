"""`Binding`: one request's onnxruntime IOBinding, with the per-call Python cost kept small.

IO binding keeps the KV cache where the session computes it (on CUDA it never comes back to the host)
and lets onnxruntime allocate outputs whose shape changes each step, or write into values allocated
once (`allocate`, `wrap`, `bind_output_value`: the shared KV buffer, the logits). A decode step binds
about 3 + 4 * n_layer values. The public wrapper (`onnxruntime.IOBinding`) rebuilds an `OrtDevice` and
re-validates every value on each call and wraps each output in a new Python object, which costs the main
thread noticeable CPU time outside session.run per decode step (measurements: docs/design.md, "7. The
IOBinding fast path"). The pybind object underneath (`IOBinding._iobinding`, with the same methods across
onnxruntime 1.x) takes the same calls directly, so it is used when present; otherwise, or with
EDGEGPT_PUBLIC_IOBINDING=1 in the environment, the public API is.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

__all__ = ["Binding", "PUBLIC_API_VARIABLE"]

# Set to 1 to bind through the public onnxruntime.IOBinding only (slower): the escape hatch should an
# onnxruntime release change the pybind object the fast path uses. Read when a Binding is made.
PUBLIC_API_VARIABLE = "EDGEGPT_PUBLIC_IOBINDING"


class Binding:
    """Bind numpy inputs, device values and device outputs by name; run; read the outputs.

    Values handed out by `outputs()` and taken by `bind_value()` are opaque handles for this class
    (pybind OrtValues on the fast path, `ort.OrtValue` otherwise); `empty()` makes one from numpy.
    """

    def __init__(self, session: ort.InferenceSession, device: tuple[str, int]):
        self._session, self._device_name = session, device
        self._public = session.io_binding()
        self._c = getattr(self._public, "_iobinding", None)
        self._c_session = getattr(session, "_sess", None)
        usable = self._c is not None and self._c_session is not None and hasattr(ort.OrtDevice, "make")
        self._fast = usable and os.environ.get(PUBLIC_API_VARIABLE, "") in ("", "0")
        if self._fast:
            self._c_device = ort.OrtDevice.make(*device)._get_c_device()
            self._c_cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._numpy: dict[str, np.ndarray] = {}  # bound host arrays must outlive the run
        # A CPU session reads a bound host array's memory when it runs (no copy at bind time), so an array
        # updated in place needs no rebinding; other devices copy it to the device when it is bound.
        self.reads_bound_arrays = device[0] == "cpu"

    @property
    def fast(self) -> bool:
        """Whether calls go to onnxruntime's pybind IOBinding directly (False: the public API)."""
        return self._fast

    def empty(self, array: np.ndarray):
        """A value holding a zero-size `array` (the first step's past), in this binding's handle type.

        It stays on the CPU even for a CUDA session: there are no bytes to copy, and no zero-byte
        device allocation is asked for. onnxruntime moves inputs to the device that consumes them.
        """
        value = ort.OrtValue.ortvalue_from_numpy(array)
        return value._ortvalue if self._fast else value

    def bind_numpy(self, name: str, array: np.ndarray) -> None:
        """Bind a host array as an input (copied to the device by onnxruntime when the session is on CUDA)."""
        self._numpy[name] = array
        if self._fast:
            self._c.bind_input(name, array)
        else:
            self._public.bind_cpu_input(name, array)

    def bind_value(self, name: str, value) -> None:
        """Bind a device value (a past KV tensor) as an input, without a copy."""
        if self._fast:
            self._c.bind_ortvalue_input(name, value)
        else:
            self._public.bind_ortvalue_input(name, value)

    def bind_rows(
        self, name: str, value, shape: tuple[int, ...], dtype: np.dtype, start: int, rows: int, output: bool = False
    ) -> None:
        """Bind rows [start, start + rows) of a C-contiguous device value of `shape` as an input (or an
        output), without a copy: such rows are themselves one contiguous block (a server slot's KV cache)."""
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        view, pointer = (rows, *shape[1:]), value.data_ptr() + start * row_bytes
        if self._fast:
            bind = self._c.bind_output if output else self._c.bind_input
            bind(name, self._c_device, np.dtype(dtype).type, view, pointer)
        elif output:
            self._public.bind_output(name, *self._device_name, np.dtype(dtype).type, view, pointer)
        else:
            self._public.bind_input(name, *self._device_name, np.dtype(dtype).type, view, pointer)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype):
        """A new, uninitialised value of `shape` on the session's device (a shared KV buffer)."""
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, *self._device_name)
        return value._ortvalue if self._fast else value

    def from_numpy(self, array: np.ndarray):
        """A new value on the session's device holding a copy of `array` (a copied or shortened KV tensor).

        onnxruntime owns the memory: a value made over the array itself (`ortvalue_from_numpy` on the CPU)
        would point into memory that Python frees once the array goes.
        """
        value = self.allocate(array.shape, array.dtype)
        value.update_inplace(np.ascontiguousarray(array))
        return value

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        """A host copy of a value (from the device when the session is on CUDA; on the CPU `numpy()` is a view)."""
        return np.array(value.numpy())

    def wrap(self, array: np.ndarray):
        """A value over a host array's memory, no copy (a preallocated output that is read as numpy).

        The caller keeps `array` alive as long as the value is bound.
        """
        value = ort.OrtValue.ortvalue_from_numpy(array)
        return value._ortvalue if self._fast else value

    def clear_outputs(self) -> None:
        if self._fast:
            self._c.clear_binding_outputs()
        else:
            self._public.clear_binding_outputs()

    def bind_output_value(self, name: str, value) -> None:
        """Bind a preallocated value as an output: onnxruntime writes into it (its shape must be the output's)."""
        if self._fast:
            self._c.bind_ortvalue_output(name, value)
        else:
            self._public.bind_ortvalue_output(name, value)

    def bind_outputs(self, host: list[str], device: list[str]) -> None:
        """Let onnxruntime allocate `host` outputs on the CPU and `device` ones on the device (after `clear_outputs`)."""
        if self._fast:
            for name in host:
                self._c.bind_output(name, self._c_cpu)
            for name in device:
                self._c.bind_output(name, self._c_device)
            return
        for name in host:
            self._public.bind_output(name, "cpu", 0)
        for name in device:
            self._public.bind_output(name, *self._device_name)

    def run(self) -> None:
        if self._fast:
            self._c_session.run_with_iobinding(self._c, None)
        else:
            self._session.run_with_iobinding(self._public)

    def outputs(self) -> list:
        """The outputs of the last run, in binding order (host ones convert with `.numpy()`)."""
        if not self._fast:
            return self._public.get_outputs()
        # Index, never iterate: OrtValueVector.__getitem__ returns an owning copy (a shared reference to
        # the tensor), while its iterator yields references into the binding's own vector, which the
        # next clear_binding_outputs() destroys (a use-after-free that corrupts the heap).
        values = self._c.get_outputs()
        return [values[i] for i in range(len(values))]
