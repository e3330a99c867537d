# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned: an unpinned torch pulls a multi-GB CUDA build; this one is a CPU wheel.
TORCH  := torch==2.13.0
# The base (device) install: runtime only, no torch. Tests use it to prove `edgegpt generate` runs without torch.
BASE_VENV := .venv-base
DEMO   := runs/demo
DEMO_STEPS ?= 1500

.PHONY: demo test install base clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(BASE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/pip install -q --upgrade pip
	$(BASE_VENV)/bin/pip install -q .
	touch $@

base: $(BASE_VENV)/.installed

test: install base
	EDGEGPT_BASE_VENV=$(abspath $(BASE_VENV)) $(BIN)/python -m pytest -q

demo: install
	$(BIN)/edgegpt info
	$(BIN)/edgegpt train --preset tiny --steps $(DEMO_STEPS) --out $(DEMO)/run --force
	$(BIN)/edgegpt sample $(DEMO)/run "def main(" -n 64 --seed 0
	$(BIN)/edgegpt export $(DEMO)/run -o $(DEMO)/fp32 --force
	$(BIN)/edgegpt generate $(DEMO)/fp32 "def main(" -n 64 --seed 0

clean:
	rm -rf $(VENV) $(BASE_VENV) runs build *.egg-info
