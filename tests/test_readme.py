"""README.md's quick start, run as a new user would: every command line of it, in order, in a fresh folder.

The one change: training runs 30 steps instead of the README's 1,500 (the commands after it only need a
checkpoint). A line whose comment starts with "needs" names an input the reader brings (their own
checkpoint, say) and is not run. `chat` reads "/exit" from its standard input.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start_lines() -> list[str]:
    """The command lines of README's "Quick start" bash block, comments kept."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line.strip()]


def test_the_quick_start_is_found_and_shows_every_command():
    text = "\n".join(quick_start_lines())
    for command in ("train", "sample", "export", "quantize", "eval", "generate", "chat", "bench", "info"):
        assert re.search(rf"^edgegpt {command}\b", text, re.M), f"the quick start does not show `edgegpt {command}`"


@pytest.mark.slow
def test_every_quick_start_line_runs(tmp_path):
    bin_dir = Path(sys.executable).parent
    script = ["set -euxo pipefail"]  # -x: bash shows each line on stderr before it runs it
    for line in quick_start_lines():
        command, _, comment = line.partition("  #")
        if comment.strip().startswith("needs"):
            continue
        command = command.replace("--steps 1500", "--steps 30")
        script.append(f"echo /exit | {command}" if command.startswith("edgegpt chat") else command)
    script.append("echo the-end")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and proc.stdout.endswith("the-end\n"), proc.stderr[-4000:]
