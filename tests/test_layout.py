"""The import rule of the layout (README, "Layout"), checked on the source of every module.

    core (edgegpt/*.py)        -> the standard library, numpy, onnxruntime, tokenizers, click; core
    runtime (runtime/)         -> the same; core, runtime; an extra's libraries in that extra's package
                                  (runtime/serve/), or lazily (inside a function) where the runtime offers
                                  the extra's feature and names the extra when it is missing
    train (edgegpt/train/)     -> core, train (and torch, safetensors, tqdm, ...)
    export (export/)           -> core, train, runtime, export
    bench (edgegpt/bench/)     -> anything
    CLI modules (*cli.py)      -> at module level only the standard library, click, core and other CLI modules;
                                  anything inside a command (lazily)

Every import counts, also those inside functions, except where noted for the CLI: a lazy import against
the rule still breaks a device the day that function runs. A second test proves the checker fails on a
module that breaks the rule, and a third imports every runtime module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVICE_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "click"}
# An extra's own libraries (pyproject.toml), and the runtime package that is that extra.
EXTRAS = {
    "serve": {"uvicorn", "starlette", "sse_starlette", "anyio", "prometheus_client", "jinja2", "httpx"},
    "constrain": {"llguidance"},
}
EXTRA_PACKAGES = {"runtime/serve/": "serve"}
CLI_FILES = {
    "edgegpt/cli.py",
    "export/cli.py",
    "export/quantize_cli.py",
    "runtime/cli.py",
    "runtime/web_cli.py",
    "edgegpt/bench/cli.py",
    "runtime/serve/cli.py",
}
ALLOWED = {  # layer -> the edgegpt layers it may import
    "core": {"core"},
    "runtime": {"core", "runtime"},
    "train": {"core", "train"},
    "export": {"core", "train", "runtime", "export"},
    "bench": {"core", "train", "runtime", "export", "bench", "cli"},
}


def layer_of_file(relative: str) -> str:
    """The layer a source file (path relative to the repository root) belongs to."""
    if relative in CLI_FILES:
        return "cli"
    for prefix, layer in (
        ("edgegpt/train/", "train"),
        ("edgegpt/bench/", "bench"),
        ("export/", "export"),
        ("runtime/", "runtime"),
    ):
        if relative.startswith(prefix):
            return layer
    return "core"


def layer_of_module(name: str) -> str | None:
    """The layer of an imported module, or None for a module outside edgegpt."""
    if name != "edgegpt" and not name.startswith("edgegpt."):
        return None
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in ("train", "bench", "export", "runtime"):
        if parts[-1] in ("cli", "quantize_cli", "web_cli"):
            return "cli"
        return parts[1]
    return "cli" if name == "edgegpt.cli" else "core"


def imports(source: str, package: str) -> list[tuple[str, int, bool]]:
    """(module, line, at module level) for every import in `source`; relative imports resolved in `package`."""
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.append((base, node.lineno, id(node) in top))
    return found


def violations(relative: str, source: str) -> list[str]:
    """The imports of one source file that break the rule, as "file:line: message"."""
    layer = layer_of_file(relative)
    folder = relative.rsplit("/", 1)[0].replace("/", ".")
    package = folder if folder.startswith("edgegpt") else f"edgegpt.{folder}"
    out = []
    for name, line, module_level in imports(source, package):
        if name == "__future__" or name.split(".")[0] in sys.stdlib_module_names:
            continue
        target = layer_of_module(name)
        if layer == "cli":
            if module_level and target not in ("core", "cli") and name.split(".")[0] not in {"click"}:
                out.append(
                    f"{relative}:{line}: CLI module imports {name} at module level; import it inside the command"
                )
            continue
        if target is None:
            if layer == "runtime" and _extra_import(relative, name.split(".")[0], module_level):
                continue
            if layer in ("core", "runtime") and name.split(".")[0] not in DEVICE_THIRD_PARTY:
                out.append(f"{relative}:{line}: {layer} imports {name}, which a device's base install does not have")
        elif target not in ALLOWED[layer]:
            out.append(
                f"{relative}:{line}: {layer} imports {name} ({target}); the layout allows {sorted(ALLOWED[layer])}"
            )
    return out


def _extra_import(relative: str, top: str, module_level: bool) -> bool:
    """Whether a runtime file may import `top`: an extra's library, in that extra's package or lazily."""
    extra = next((e for prefix, e in EXTRA_PACKAGES.items() if relative.startswith(prefix)), None)
    if extra is not None and top in EXTRAS[extra]:
        return True
    return not module_level and any(top in libraries for libraries in EXTRAS.values())


def sources() -> list[Path]:
    return sorted(p for d in ("edgegpt", "export", "runtime") for p in (ROOT / d).rglob("*.py"))


def test_every_module_follows_the_import_rule():
    broken = [v for path in sources() for v in violations(path.relative_to(ROOT).as_posix(), path.read_text())]
    assert not broken, "\n".join(broken)


# The runtime's wings, in the order a request meets them: each imports only the wings before it (and itself).
WINGS = ("model", "engine", "generation", "serve")


def wing_violations(relative: str, source: str) -> list[str]:
    """Imports of one runtime/ file that reach a later wing, as "file:line: message"."""
    parts = relative.split("/")
    if parts[0] != "runtime" or len(parts) < 3 or parts[1] not in WINGS:
        return []
    allowed = WINGS[: WINGS.index(parts[1]) + 1]
    package = "edgegpt." + ".".join(parts[:-1])
    out = []
    for name, line, _ in imports(source, package):
        wing = name.split(".")[2] if name.startswith("edgegpt.runtime.") else None
        if wing in WINGS and wing not in allowed:
            out.append(f"{relative}:{line}: runtime/{parts[1]}/ imports {name}; a wing may import {', '.join(allowed)}")
    return out


def test_each_wing_imports_only_the_wings_before_it():
    files = sorted((ROOT / "runtime").rglob("*.py"))
    broken = [v for p in files for v in wing_violations(p.relative_to(ROOT).as_posix(), p.read_text())]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    "relative, source, broken",
    [
        ("runtime/model/bundle.py", "from edgegpt.runtime.engine.cache import KV_CACHES\n", True),
        ("runtime/engine/state.py", "def f():\n    from edgegpt.runtime.generation.sampling import Sampler\n", True),
        ("runtime/generation/generator.py", "from ..serve.scheduler import Scheduler\n", True),
        ("runtime/serve/app.py", "from edgegpt.runtime.generation.generator import Generator\n", False),
        (
            "runtime/engine/slots.py",
            "from .cache import SharedBufferKVCache\nfrom ..model.bundle import Bundle\n",
            False,
        ),
    ],
)
def test_the_wing_check_sees_an_import_against_the_order(relative, source, broken):
    assert bool(wing_violations(relative, source)) == broken


@pytest.mark.parametrize(
    "relative, source",
    [
        ("runtime/generation/generator.py", "def f():\n    import torch\n"),
        ("runtime/generation/generator.py", "from edgegpt.export import export_bundle\n"),
        ("runtime/engine/state.py", "from ...train.model import SimpleGPT\n"),
        ("edgegpt/config.py", "import onnx\n"),
        ("edgegpt/tokenizer.py", "from edgegpt.bench.compare import run_bench\n"),
        ("edgegpt/train/model.py", "from edgegpt.runtime import Generator\n"),
        ("export/quantize.py", "from edgegpt.bench import compare\n"),
        ("runtime/cli.py", "import numpy\n"),
        ("runtime/generation/constraints.py", "import llguidance\n"),
        ("edgegpt/config.py", "def f():\n    import llguidance\n"),
        ("edgegpt/cli.py", "from edgegpt.train.trainer import train\n"),
        (
            "runtime/generation/templates.py",
            "import jinja2\n",
        ),  # an extra's library at module level outside its package
        ("runtime/serve/app.py", "import torch\n"),
    ],
)
def test_the_checker_refuses_an_import_against_the_rule(relative, source):
    assert violations(relative, source), f"{relative}: {source!r} should break the rule"


@pytest.mark.parametrize(
    "relative, source",
    [
        (
            "runtime/generation/generator.py",
            "import numpy as np\nimport onnxruntime as ort\nfrom edgegpt.errors import EdgeGPTError\n",
        ),
        (
            "export/quantize.py",
            "import onnx\nfrom edgegpt.runtime.model.bundle import Bundle\nfrom edgegpt.train.model import SimpleGPT\n",
        ),
        ("edgegpt/cli.py", "import click\ndef f():\n    from edgegpt.train.trainer import train\n"),
        ("runtime/engine/state.py", "from .binding import Binding\n"),
        ("runtime/serve/app.py", "from starlette.applications import Starlette\n"),
        ("runtime/generation/templates.py", "def f():\n    import jinja2\n"),
        ("runtime/generation/constraints.py", "def f():\n    import llguidance\n"),
    ],
)
def test_the_checker_allows_what_the_rule_allows(relative, source):
    assert not violations(relative, source)


def test_every_runtime_module_loads_without_torch_or_onnx():
    extras = set().union(*EXTRAS.values())
    modules = sorted(
        "edgegpt." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "runtime").rglob("*.py")
        if p.stem != "__init__"
        and not any(m.split(".")[0] in extras for m, _, top in imports(p.read_text(), "") if top)
    )  # every module a base install can load: all but those that import an extra's library at module level
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'onnx', 'edgegpt.train', 'edgegpt.export', 'edgegpt.bench') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def private_names(source: str) -> set[str]:
    """The private names a module defines: `_function`, `_Class`, `_CONSTANT`, `self._attribute`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and node.name.startswith("_")
            and not node.name.startswith("__")
        ):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
            names.add(node.attr)
        elif (
            isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Store)
            and node.id.startswith("_")
            and node.id != "_"
        ):
            names.add(node.id)
    return {n for n in names if not n.startswith("__")}


def private_uses(source: str, private: set[str]) -> list[tuple[str, int]]:
    """(name, line) for every `x._name` or `from ... import _name` of a name in `private`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append((node.attr, node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgegpt.runtime"):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("_")]
    return found


def test_nothing_outside_the_runtime_uses_its_private_names():
    """The runtime's public layer (DecodeState, Generator, ...) is what the bench, export and tests build on."""
    runtime = {path: path.read_text() for path in (ROOT / "runtime").rglob("*.py")}
    others = {path: path.read_text() for d in ("edgegpt", "export", "tests") for path in (ROOT / d).rglob("*.py")}
    defined_elsewhere = set().union(*(private_names(text) for text in others.values()))
    private = set().union(*(private_names(text) for text in runtime.values())) - defined_elsewhere
    uses = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p, text in others.items()
        for name, line in private_uses(text, private)
    ]
    assert not uses, "private runtime names used outside runtime/:\n" + "\n".join(uses)


def test_the_private_name_check_sees_a_use():
    private = private_names("class A:\n    def __init__(self):\n        self._fast = True\n")
    assert private == {"_fast"}
    assert private_uses("def f(b):\n    b._fast = False\n", private) == [("_fast", 2)]
    hidden = "_" + "hidden"  # built, so that this file holds no import of a private name itself
    assert private_uses(f"from edgegpt.runtime.generation.evaluate import {hidden}\n", set()) == [(hidden, 1)]


def test_the_readme_layout_names_every_module():
    """README's Layout block lists each package folder and every module in it, and nothing that is gone."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    folders = {
        "edgegpt/": ROOT / "edgegpt",
        "edgegpt/train/": ROOT / "edgegpt/train",
        "edgegpt/bench/": ROOT / "edgegpt/bench",
        "export/": ROOT / "export",
        "runtime/": ROOT / "runtime",
    }
    sections, current = {}, None
    for line in block.splitlines():
        head = line.split(" ", 1)[0]
        if head in folders or head.endswith("/"):
            current = head
        if current:
            sections[current] = sections.get(current, "") + " " + line
    for folder, path in folders.items():
        assert folder in sections, f"README's layout does not list {folder}"
        modules = {p.stem for p in path.glob("*.py") if p.stem != "__init__"} | {p.name for p in path.glob("*.json")}
        missing = sorted(m for m in modules if m not in sections[folder])
        assert not missing, f"README's layout misses {folder}: {missing}"
        gone = sorted(
            name for name in re.findall(r"\b(\w+\.(?:py|json))\b", sections[folder]) if not (path / name).exists()
        )
        assert not gone, f"README's layout names files that {folder} does not have: {gone}"
