#!/usr/bin/env bash
# GPU benchmarks (issue 8), for a machine with an NVIDIA GPU; run from the repository root:
#
#     bash benchmarks/gpu.sh
#
# 1. installs the CUDA stack in .venv-gpu (torch 2.13.0's default PyPI wheel is the CUDA build;
#    onnxruntime-gpu replaces onnxruntime);
# 2. trains the quickstart recipe with `launch` on one GPU (NCCL, bf16) at ZeRO 0/2/3 and the
#    transformers Trainer with the same DeepSpeed config: samples/s and peak GPU memory per stage;
# 3. finds the largest encoder (random-init BERT shapes) each stage trains on that GPU;
# 4. runs serve_latency.py with onnxruntime's CUDA provider (fp32, fp16, IO binding);
# 5. with wrk on the PATH: serve_http.py --device cuda (zeroship serve on the GPU, one box and Ray Serve,
#    beside the hand-written server on the GPU).
# Every table is appended to benchmarks/RESULTS.md with the device named.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: this machine has no NVIDIA GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# 1. the CUDA stack in .venv-gpu (the same install `make test-gpu` uses)
make install-gpu
VENV=.venv-gpu
PY=$VENV/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/$VENV/bin:$PATH"

# 2. launch vs Trainer+DeepSpeed, per ZeRO stage (bf16, 1 GPU, batch 32)
"$PY" benchmarks/train_overhead.py --gpu --stages 0 2 3 --epochs 3

# 3. the largest encoder each stage trains on this GPU (batch 16, seq ≤ 64, 1 epoch on the toy data)
SHAPES=${SHAPES:-"768x12 1024x24 1536x24 2048x24 2560x32 3072x40 4096x48"}
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT
{
  echo "| ZeRO stage | largest encoder trained (hidden × layers) | parameters | first that failed |"
  echo "|---|---|---|---|"
  for stage in 0 2 3; do
    best="-"; params="-"; failed="-"
    for shape in $SHAPES; do
      hidden=${shape%x*}; layers=${shape#*x}
      enc="$RUNS/enc-$shape"
      [ -f "$enc/params" ] || "$PY" benchmarks/make_encoder.py "$enc" --hidden "$hidden" --layers "$layers" \
        | tail -1 > "$enc/params"
      n="$(( $(cat "$enc/params") / 1000000 ))M"
      if launch recipes/quickstart_ner.yaml model.encoder="$enc" model.num_hidden_layers="$layers" \
           deepspeed.zero_stage=$stage deepspeed.precision=bf16 scaling.use_gpu=true scaling.workers=1 \
           train.epochs=1 train.batch_size=16 --runs "$RUNS/runs" >"$RUNS/log-$stage-$shape" 2>&1; then
        best="${hidden}×${layers}"; params=$n
      else
        failed="${hidden}×${layers} ($(grep -o 'OutOfMemoryError\|CUDA out of memory' "$RUNS/log-$stage-$shape" | head -1 || echo 'see log'))"
        break
      fi
    done
    echo "| $stage | $best | $params | $failed |"
  done
} | tee "$RUNS/largest.md"
"$PY" - "$RUNS/largest.md" <<'PYEOF'
import sys
sys.path.insert(0, ".")
from benchmarks.results import append_results
append_results("largest encoder per ZeRO stage (GPU)", "bash benchmarks/gpu.sh", open(sys.argv[1]).read())
PYEOF

# 4. serving on the GPU: needs a trained run; the quickstart is enough (latency depends on the shape)
launch recipes/quickstart_ner.yaml scaling.use_gpu=true deepspeed.precision=bf16 scaling.workers=1
"$PY" benchmarks/serve_latency.py --gpu  # exports the run's fp16 variant if it has none

# 5. zeroship serve on the GPU under load (the same bundle; `auto` picks fp16 on CUDA)
if command -v wrk >/dev/null; then
  "$PY" benchmarks/serve_http.py --device cuda
else
  echo "gpu.sh: wrk not found (apt-get install wrk): serve_http.py --device cuda skipped" >&2
fi
