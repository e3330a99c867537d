"""edgegpt: a GPT defined and trained in PyTorch, run quantized on-device by onnxruntime.

This file stays light on purpose: importing ``edgegpt`` (or ``edgegpt.runtime``) must never pull in
torch, so that a device with only the base install can run bundles.
"""

__version__ = "0.1.0"
