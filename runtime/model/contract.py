"""The contract between a bundle's graph and this runtime: the KV-cache layouts it runs, and the onnxruntime each needs.

A manifest names its layout in `graph.kv_cache.layout`; `engine/cache.py` holds one strategy class per layout
named here. Checked before a session is created, so an old onnxruntime fails with the fix, not inside a kernel.
"""

from __future__ import annotations

from edgegpt.errors import BundleError

__all__ = ["KV_LAYOUTS", "check_onnxruntime", "version_tuple"]

# layout -> the oldest onnxruntime (major, minor) that runs its graph
KV_LAYOUTS = {
    "concat": (1, 20),  # the MultiHeadAttention graph; the package's own floor
    "shared_buffer": (1, 22),  # GroupQueryAttention's attention_bias input: 1.20 and 1.21 refuse the graph
}


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string, a non-numeric part as 0: "1.22.0" -> (1, 22), "1.23.dev1" -> (1, 23)."""
    return tuple(int(part) if part.isdigit() else 0 for part in str(version).split(".")[:2])


def check_onnxruntime(layout: str, version: str, where: str = "bundle") -> None:
    """BundleError if onnxruntime `version` cannot run a graph of this layout (checked before loading it)."""
    need = KV_LAYOUTS[layout]
    have = version_tuple(version)
    if have < need:
        raise BundleError(
            f"{where}: KV-cache layout {layout!r} needs onnxruntime >= {need[0]}.{need[1]}, this is {version}; "
            "upgrade onnxruntime or re-export the bundle with attention='mha' (--attention mha)"
        )
