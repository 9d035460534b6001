#!/usr/bin/env bash
# The GPU checks, in one run on a lent CUDA machine (docs/BENCHMARKS.md §2 and §8):
#   1. tests/test_cuda.py: bf16 loading, scoring, KD / LoRA-KD / block-recon in bf16 autocast, streamed scoring;
#   2. bench/recovery.py on CUDA: KD tokens/s and MFU against a Hugging Face Trainer, peak GPU memory
#      next to the planner's estimate (SmolLM2's shapes; a random stand-in where its weights cannot travel);
#   3. bench/planner.py --device cuda: the planner's recovery estimate against measured GPU memory, up to 8B.
# Results land in $OUT/results (bench/results/*-cuda.json once copied back), the log in $OUT/log.
# What travels with the working tree (the device tool's `carry`): .whl (this project's transformers, peft,
# accelerate and their newer dependencies, from `pip download`), .gpu/smollm2-135m (config and tokenizer),
# data. ITERABRE_BENCH_COMMIT names the commit when the copy has no .git. PYTHON: the interpreter with torch
# (default python3; on a machine set up with `make setup`: PYTHON=.venv/bin/python).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT/results"
exec > >(tee "$OUT/log") 2>&1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 ITERABRE_BENCH_RESULTS=$OUT/results \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, \
torch.cuda.get_device_name(0))" || exit 1
[ -f models/smollm2-135m/model.safetensors ] || $PY bench/stand_in.py .gpu/smollm2-135m models/smollm2-135m
$PY -c "import iterabre, os; print('allocator:', os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
s=$SECONDS; timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py; echo "[tests: $((SECONDS - s)) s]"
s=$SECONDS; timeout 150 $PY bench/recovery.py --device cuda --batch-size 8 --seq-len 512; echo "[recovery: $((SECONDS - s)) s]"
s=$SECONDS; timeout 220 $PY bench/planner.py --device cuda; echo "[planner: $((SECONDS - s)) s]"
