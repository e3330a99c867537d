"""The browser's tokenBudget (web/src/budget.js) against the Python rule it mirrors, `token_budget`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgegpt.errors import EdgeGPTError
from edgegpt.runtime.generation.budget import token_budget

BUDGET_JS = Path(__file__).resolve().parents[2] / "web" / "src" / "budget.js"

# (prompt_tokens, max_new_tokens, context, sliding_window, fit): fits, fills, overflows, None, windows, the server's fit
CASES = [
    (p, m, c, w, f)
    for c in (1, 8, 64)
    for p in (0, 1, c - 1, c, c + 1)
    for m in (None, 0, 1, 7, c)
    for w in (False, True)
    for f in (False, True)
]

RUN = """
import { tokenBudget } from %s;
const cases = JSON.parse(process.argv[1]);
const out = cases.map(([p, m, c, w, f]) => {
  try { return tokenBudget(p, m, c, { slidingWindow: w, fit: f }); } catch (e) { return e.name; }
});
console.log(JSON.stringify(out));
"""


def python_budget(p, m, c, w, f) -> int | str:
    try:
        return token_budget(p, m, c, sliding_window=w, fit=f)
    except EdgeGPTError as exc:
        return type(exc).__name__


def test_the_browser_budget_agrees_with_the_python_rule():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the browser's tokenBudget needs Node.js to run")
    script = RUN % json.dumps(BUDGET_JS.as_uri())
    run = subprocess.run(
        [node, "--input-type=module", "-e", script, json.dumps(CASES)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    browser = json.loads(run.stdout)
    python = [python_budget(*case) for case in CASES]
    assert {type(v) for v in python} == {int, str} and "SamplingError" in python  # every branch is in the table
    assert browser == python, [(case, b, p) for case, b, p in zip(CASES, browser, python) if b != p]
