"""The edge boundary: the runtime, the package root and the CLI load without torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["edgegpt", "edgegpt.runtime", "edgegpt.cli", "edgegpt.tokenizer", "edgegpt.manifest"]
)
def test_imports_without_torch(module):
    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch was imported'; assert 'onnx' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_packages_install_under_the_edgegpt_namespace():
    import edgegpt.export
    import edgegpt.runtime

    assert edgegpt.export.__name__ == "edgegpt.export"
    assert edgegpt.runtime.__file__.replace("\\", "/").endswith("runtime/__init__.py")
