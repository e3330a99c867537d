"""`SessionConfig` (runtime/model/session_config.py) and `Generator.load`'s session: a config, keywords that replace its
fields, an unknown keyword refused by name; the module loads without onnxruntime, for the CLI's flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgegpt.errors import ConfigError
from edgegpt.runtime import Generator, SessionConfig


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    from edgegpt.export import export_bundle

    return Path(export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("session") / "tiny", validate=False))


def test_load_takes_a_session_config_and_keywords_that_replace_its_fields(bundle):
    gen = Generator.load(bundle, SessionConfig(provider="cpu", threads=1, spinning=False), huge_pages=False)
    assert gen.session_config == SessionConfig(provider="cpu", threads=1, spinning=False, huge_pages=False)
    assert Generator.load(bundle, provider="cpu", threads=2).session_config == SessionConfig(provider="cpu", threads=2)


def test_load_refuses_an_unknown_session_keyword_by_name(bundle):
    with pytest.raises(TypeError, match="unknown session option 'thread'; did you mean 'threads'"):
        Generator.load(bundle, provider="cpu", thread=2)
    with pytest.raises(TypeError, match="session must be a SessionConfig, got 'cpu'; give provider= and threads="):
        Generator.load(bundle, "cpu")
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        Generator.load(bundle, provider="cpu", threads=0)


def test_session_config_loads_without_onnxruntime():
    code = "import sys, edgegpt.runtime.model.session_config; assert not {'onnxruntime', 'numpy'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
