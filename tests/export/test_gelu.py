"""GPTConfig.gelu through the export: each GELU fuses into its own onnxruntime kernel and keeps its function.

tanh (GPT-2) -> FastGelu; erf (nanoGPT, transformers' "gelu") -> BiasGelu, or Gelu without a bias. The
optimizer's `enable_gelu_approximation` would turn erf into FastGelu, and ONNX's opset-20 tanh Gelu comes out
of the optimizer as the erf BiasGelu (ORT-NOTES): `check_gelu` refuses a graph whose GELU is not the config's.
"""

from __future__ import annotations

import onnx
import pytest
import torch

from edgegpt.config import GPTConfig
from edgegpt.errors import ConfigError, ExportError
from edgegpt.export import validate
from edgegpt.export.onnx_export import export_onnx, optimize_graph
from edgegpt.export.optimize import check_gelu, gelu_kinds, op_counts
from edgegpt.train.model import SimpleGPT


def _model(gelu: str, bias: bool) -> SimpleGPT:
    torch.manual_seed(0)
    model = SimpleGPT(
        GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, gelu=gelu, bias=bias)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # large pre-activations, where tanh and erf GELU differ most
    return model


@pytest.mark.parametrize(
    "gelu, bias, attention, fused",
    [
        ("tanh", True, "gqa", "FastGelu"),
        ("erf", True, "gqa", "BiasGelu"),
        ("erf", False, "mha", "Gelu"),
        ("tanh", False, "mha", "FastGelu"),
    ],
)
def test_each_gelu_fuses_into_its_kernel_and_matches_pytorch(tmp_path, gelu, bias, attention, fused):
    model = _model(gelu, bias)
    raw = export_onnx(model, tmp_path / "raw.onnx", attention=attention)
    validate.check_graph(raw, model.config)
    assert gelu_kinds(onnx.load(str(raw)))[gelu] == 2
    optimize_graph(raw, tmp_path / "opt.onnx", model.config, attention=attention, external_data=False)
    validate.check_graph(tmp_path / "opt.onnx", model.config)
    graph = onnx.load(str(tmp_path / "opt.onnx"))
    assert op_counts(graph, "com.microsoft")[fused] == 2
    assert gelu_kinds(graph) == {"tanh": 2 * (gelu == "tanh"), "erf": 2 * (gelu == "erf"), "other": 0}
    parity = validate.check_parity(model, tmp_path / "opt.onnx")
    assert max(case["logits"] for case in parity.values()) <= validate.ATOL
    validate.check_greedy(model, tmp_path / "opt.onnx")


def test_the_two_gelus_are_different_models_but_close():
    """Same weights, only the activation differs: the logits move by about parity's atol (here 2e-4), so
    parity alone could miss a tanh/erf mix-up; check_gelu looks at the graph itself."""
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tanh, erf = _model("tanh", True)(ids)[0], _model("erf", True)(ids)[0]
    assert 1e-5 < (tanh - erf).abs().max().item() < 1e-2


def test_a_graph_computing_the_other_gelu_is_refused(tmp_path):
    model = _model("erf", True)
    raw = export_onnx(model, tmp_path / "raw.onnx", attention="gqa")
    optimize_graph(raw, tmp_path / "opt.onnx", model.config, attention="gqa", external_data=False)
    as_tanh = GPTConfig(**{**model.config.to_dict(), "gelu": "tanh"})
    for path in (raw, tmp_path / "opt.onnx"):
        with pytest.raises(
            ExportError,
            match=r"GELU nodes compute \{'tanh': 0, 'erf': 2, 'other': 0\} but the model uses the tanh GELU",
        ):
            validate.check_graph(path, as_tanh)
    # ONNX's own Gelu (opset 20) is read by its attribute: approximate="tanh" is the tanh GELU
    node = onnx.helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")
    graph = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    assert gelu_kinds(graph) == {"tanh": 1, "erf": 0, "other": 0}
    with pytest.raises(ExportError, match="a graph rewrite changed the model's function"):
        check_gelu(graph, GPTConfig(n_layer=1, gelu="erf"), "g")


def test_config_gelu_round_trips_and_old_configs_load(tmp_path):
    config = GPTConfig.preset("tiny", vocab_size=320, gelu="erf", sampled_vocab_size=300)
    config.to_json(tmp_path / "c.json")
    assert GPTConfig.from_json(tmp_path / "c.json") == config
    old = {k: v for k, v in config.to_dict().items() if k not in ("gelu", "sampled_vocab_size")}  # before the fields
    assert GPTConfig.from_dict(old).gelu == "tanh" and GPTConfig.from_dict(old).sampled_vocab_size is None
    with pytest.raises(ConfigError, match="gelu must be one of tanh, erf, got 'exact'"):
        GPTConfig(gelu="exact")
    with pytest.raises(ConfigError, match="sampled_vocab_size must be an integer in 1..320"):
        GPTConfig(vocab_size=320, sampled_vocab_size=321)
    assert config.sampled_ids(300) == config.sampled_ids(310) == 300 and GPTConfig(vocab_size=64).sampled_ids(64) == 64
