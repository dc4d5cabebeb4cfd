# Set-up and everyday commands. `make serve` and `make test` work on a fresh machine:
# each creates .venv if missing, installs torch==2.13.0 first (the local CPU build),
# then the project, so pip never reaches for a CUDA build of torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DATA_DIR ?= data
PYTEST_ARGS ?=

.PHONY: serve test lint bench demo-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/coserve serve --data-dir $(DATA_DIR)

test: $(STAMP)
	$(BIN)/ruff check coserve tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check coserve tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/engine_throughput.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python -m benchmarks.multi_adapter
	$(BIN)/python -m benchmarks.adapter_swap
	for slo in 100 250 0; do $(BIN)/python -m benchmarks.coserve --duration 20 --samples 64 \
		--microbatch-tokens 256 --itl-slo-ms $$slo || exit 1; done
	$(BIN)/python -m benchmarks.ts_peft --sizes tiny,small --epochs 6 --lr 1e-2

clean:
	rm -rf $(VENV) .pytest_cache
