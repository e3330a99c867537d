"""Fixtures of the browser runtime's tests: Node.js, the npm packages, and the bundles the browser runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` executable; skips the test without it. The npm packages must be there (`make test` runs npm ci)."""
    path = shutil.which("node")
    if path is None:
        pytest.skip("node is not installed: the browser runtime's tests need Node.js (apt-get install nodejs npm)")
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        pytest.fail("web/node_modules is missing: run `make test` (or `npm ci` in web/)")
    return path


@pytest.fixture(scope="session")
def web_int4_bundle(lively_gqa_bundle, tmp_path_factory) -> Path:
    """The lively gqa bundle in int4 with accuracy_level 0 (fp32 activations). onnxruntime-web's WebAssembly
    MatMulNBits computes in fp32 whatever the level says, so level 4's int8 activations (the default) shift
    the native runtime's logits by their rounding and can flip a near-tie: docs/benchmarks.md."""
    from edgegpt.export import quantize_bundle

    return quantize_bundle(lively_gqa_bundle, tmp_path_factory.mktemp("web") / "int4", to="int4", accuracy_level=0)
