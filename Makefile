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
DEMO_PORT  ?= 8765
# The Llama family's part of the demo: `small-llama` with a short context and small batches, so that its
# 300 steps take minutes on 2 cores (the full preset's 16 x 256 tokens a step would take about ten times longer).
DEMO_LLAMA_STEPS ?= 300
# Held-out text for the demo's quantization gate: a stdlib module from the validation tail of the default corpus.
EVAL_TEXT = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/zoneinfo/_zoneinfo.py

.PHONY: demo test install base web clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# A copy, not an editable install (as on a device), with the serve extra (torch-free too): rebuilt when any source changes.
$(BASE_VENV)/.installed: pyproject.toml $(wildcard edgegpt/*.py edgegpt/*/*.py edgegpt/*/*.json export/*.py runtime/*.py runtime/*/*.py web/*.js web/*.html web/src/*.js)
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/pip install -q --upgrade pip
	$(BASE_VENV)/bin/pip install -q ".[serve]"
	touch $@

base: $(BASE_VENV)/.installed

# The browser runtime's tests (tests/web): its npm packages, pinned by web/package-lock.json, and Debian's
# chromium for the headless-browser test (no browser download). Without node/npm those tests skip.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
web:
	@if command -v npm >/dev/null; then \
	  [ web/node_modules/.package-lock.json -nt web/package-lock.json ] || (cd web && npm ci --no-audit --no-fund); \
	  command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }; \
	else echo "node/npm not found: the browser runtime's tests will skip"; fi

test: install base web
	EDGEGPT_BASE_VENV=$(abspath $(BASE_VENV)) $(BIN)/python -m pytest -q

demo: install
	$(BIN)/edgegpt info
	$(BIN)/edgegpt train --preset tiny --steps $(DEMO_STEPS) --out $(DEMO)/run --force
	$(BIN)/edgegpt sample $(DEMO)/run "def main(" -n 48
	rm -rf $(DEMO)/fp32 $(DEMO)/int8 $(DEMO)/mobile
	$(BIN)/edgegpt export $(DEMO)/run -o $(DEMO)/fp32
	$(BIN)/edgegpt generate $(DEMO)/fp32 "def main(" -n 48
	$(BIN)/edgegpt quantize $(DEMO)/fp32 --to int8 -o $(DEMO)/int8 --eval-text $(EVAL_TEXT)
	$(BIN)/edgegpt generate $(DEMO)/int8 "def main(" -n 48 -t 0.8 --seed 0 --stop "\n\n"
	$(BIN)/edgegpt generate $(DEMO)/fp32 "def " -n 24 --regex "[a-z_]+\(([a-z]+(, [a-z]+)*)?\):"
	$(BIN)/edgegpt generate $(DEMO)/fp32 "def main(" -n 56 --lookup
	$(BIN)/edgegpt convert-ort $(DEMO)/int8 -o $(DEMO)/mobile --ort-only
	$(BIN)/edgegpt generate $(DEMO)/mobile "def main(" -n 48
	printf 'def add(a, b):\nreturn what?\n/exit\n' | $(BIN)/edgegpt chat $(DEMO)/int8 -n 24 --seed 0
	$(BIN)/edgegpt serve $(DEMO)/int8 --port $(DEMO_PORT) & server=$$!; trap 'kill $$server' EXIT; \
	for i in $$(seq 200); do curl -sf http://127.0.0.1:$(DEMO_PORT)/health >/dev/null && break; sleep 0.3; done; \
	curl -sS http://127.0.0.1:$(DEMO_PORT)/v1/completions -H 'Content-Type: application/json' \
	     -d '{"prompt": "def main(", "max_tokens": 24, "temperature": 0}'; echo
	$(BIN)/edgegpt bench $(DEMO)/int8 --short
	$(BIN)/edgegpt bench $(DEMO)/run --short --backends torch,edgegpt --formats fp32,int8
	$(BIN)/edgegpt train --preset small-llama --steps $(DEMO_LLAMA_STEPS) --batch-size 8 --block-size 64 \
	    --eval-interval $(DEMO_LLAMA_STEPS) --eval-iters 5 --out $(DEMO)/llama --force
	rm -rf $(DEMO)/llama-fp32 $(DEMO)/llama-int4
	$(BIN)/edgegpt export $(DEMO)/llama -o $(DEMO)/llama-fp32
	$(BIN)/edgegpt quantize $(DEMO)/llama-fp32 --to int4 -o $(DEMO)/llama-int4 --eval-text $(EVAL_TEXT)
	$(BIN)/edgegpt generate $(DEMO)/llama-int4 "def main(" -n 32
	printf 'def add(a, b):\nreturn what?\n/exit\n' | $(BIN)/edgegpt chat $(DEMO)/llama-int4 -n 24 --seed 0
	$(BIN)/edgegpt export-hf $(DEMO)/llama -o $(DEMO)/llama-hf --force
	$(BIN)/edgegpt import-hf $(DEMO)/llama-hf -o $(DEMO)/llama-hf-import --force
	$(BIN)/edgegpt sample $(DEMO)/llama-hf-import "def main(" -n 32

clean:
	rm -rf $(VENV) $(BASE_VENV) runs build *.egg-info
