#!/usr/bin/env bash
# The GPU checks, in one run on a lent CUDA machine (docs/BENCHMARKS.md §2 and §8):
#   1. tests/test_cuda.py: bf16 loading, scoring, KD / LoRA-KD / block-recon in bf16 autocast, streamed scoring;
#   2. bench/recovery.py on CUDA: KD tokens/s and MFU against a Hugging Face Trainer, peak GPU memory
#      next to the planner's estimate (SmolLM2's shapes; a random stand-in where its weights cannot travel);
#   3. bench/planner.py --device cuda: the planner's recovery estimate against measured GPU memory, up to 8B;
#   4. bench/phase_rates.py --device cuda: achieved TFLOP/s of scoring, block-recon and KD, up to 8B.
# Arguments pick some of them by name (tests recovery planner phase_rates); none: all four.
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
steps=${*:-tests recovery planner phase_rates}
run() {  # run STEP LIMIT CMD...: one step under its time limit, if it was asked for
  local step=$1 limit=$2 s=$SECONDS; shift 2
  [[ " $steps " == *" $step "* ]] || return 0
  timeout "$limit" "$@"; echo "[$step: $((SECONDS - s)) s]"
}
run tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
run recovery 150 $PY bench/recovery.py --device cuda --batch-size 8 --seq-len 512
run planner 220 $PY bench/planner.py --device cuda
run phase_rates 400 $PY bench/phase_rates.py --device cuda
