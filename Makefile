# Every target installs what it needs into .venv (idempotent): torch first, pinned to the
# CPU build that lies on this machine's disk, so that pip never pulls a multi-GB CUDA build.
# open-flamingo and salesforce-lavis (references for parity tests) pin ancient versions in their metadata: --no-deps.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps open-flamingo==2.0.1 einops einops-exts
	$(BIN)/pip install -q --no-deps salesforce-lavis==1.0.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts experiments benchmarks
	$(BIN)/ruff format --check src tests scripts experiments benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench --out bench-output
	$(BIN)/python -m benchmarks.bench_transformers --out bench-output
	$(BIN)/python -m benchmarks.bench_memory --out bench-output
	$(BIN)/python -m benchmarks.bench_serving --out bench-output

# The BLIP-2 that `make demo` trains, behind OpenAI's chat completions API (docs/serving.md).
SERVE_MODEL ?= demo-output/stage2/final
serve: $(STAMP)
	@test -f $(SERVE_MODEL)/config.json || { echo "no model at $(SERVE_MODEL): run 'make demo' first (it trains one), or 'make serve SERVE_MODEL=DIR' for another saved model"; exit 1; }
	$(BIN)/vlbridge serve $(SERVE_MODEL) --served-model-name blip2-shapesworld

clean:
	rm -rf $(VENV) demo-output bench-output .pytest_cache
