"""The typed errors of edgegpt. Every user-facing failure is one of these, never a bare assert."""


class EdgeGPTError(Exception):
    """Base class: catch this to handle any edgegpt failure in an embedding app."""


class ConfigError(EdgeGPTError, ValueError):
    """An impossible or unknown configuration value."""


class DataError(EdgeGPTError, ValueError):
    """A corpus that cannot be trained on (empty, binary, too short)."""


class CheckpointError(EdgeGPTError):
    """A missing, corrupt or inconsistent checkpoint directory."""


class BundleError(EdgeGPTError):
    """A missing, tampered or incompatible bundle directory."""


class ExportError(EdgeGPTError):
    """The ONNX export failed."""


class ParityError(ExportError):
    """ONNX outputs differ from PyTorch's beyond tolerance."""

    def __init__(self, message: str, *, output: str, case: str, max_abs_diff: float, atol: float):
        super().__init__(message)
        self.output, self.case, self.max_abs_diff, self.atol = output, case, max_abs_diff, atol


class QuantizationError(EdgeGPTError):
    """Quantization failed or its result missed the accuracy gate."""


class ContextLengthError(EdgeGPTError, ValueError):
    """Prompt plus new tokens do not fit in the model's context."""


class ProviderError(EdgeGPTError):
    """An onnxruntime execution provider was asked for but cannot be used."""


class SamplingError(EdgeGPTError, ValueError):
    """An invalid sampling parameter."""


class UnknownParameterError(SamplingError, TypeError):
    """A keyword that is not a `SamplingConfig` field (a `TypeError` too, as Python's own would be)."""


class PromptError(EdgeGPTError, ValueError):
    """Input the model cannot take: token ids outside the vocabulary, or not token ids at all."""


class QueueFullError(EdgeGPTError, RuntimeError):
    """The scheduler's queue is full: retry later (the server answers 429 with Retry-After)."""


class ConstraintError(SamplingError):
    """A JSON schema, regex or grammar the constraint library refuses (its reason in one line), or a
    constraint asked for where it cannot apply."""


class InputLimitError(EdgeGPTError, ValueError):
    """Input from outside (a request body, a schema, a pickle, a manifest) nested too deeply or too large to read
    safely; the message names it and the bound (`edgegpt.limits`)."""


class ExtraMissingError(EdgeGPTError, ImportError):
    """An optional dependency (an extra) is not installed; the message names the pip command that adds it."""


class StorageError(EdgeGPTError, OSError):
    """A file or directory could not be written (disk full, quota, permissions); what was there is kept."""


class LockError(EdgeGPTError):
    """Another process is writing the same output (a training run directory); its process id is named."""
