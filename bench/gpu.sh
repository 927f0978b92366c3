#!/usr/bin/env bash
# The GPU measurement in one device call (10 minutes at most), from the repository root on the device machine:
#   here, once:  echo /.whl/ >> .git/info/exclude
#                ../shared/tools/gpu-wheels 'bentoml==1.4.39' 'diffusers==0.42.1' 'pydantic-settings' 'pynvml'
#   device run:  bash bench/gpu.sh [tests|bench|ready|qkv|all]   (carry .whl; results under $OUT)
# tests: the CUDA-only unit tests (CUDA graphs replay the same function); bench: bench/engine.py at SDXL's size
# (1024x1024, 30 steps, base + refiner); ready: process start to ready, cold and with a warm compile cache;
# qkv: the same bench with fused QKV projections and channels_last, to keep them only if they help.
set -euo pipefail
part=${1:-all}
out=${OUT:-/tmp/out}; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true TQDM_DISABLE=1
export BENTOML_HOME=${BENTOML_HOME:-/tmp/sdxl-bench-home}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c 'import torch, diffusers; print(torch.__version__, diffusers.__version__)'; } | tee "$out/versions.txt"
if [ "$part" = tests ] || [ "$part" = all ]; then
  python3 -m pytest tests/unit/test_accel.py tests/unit/test_deepcache.py -q -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tee "$out/tests.log"
fi
common=(--preset full --size 1024 --steps 30 --repeats 5 --batches 1,2,4 --refiner --compile-cache /tmp/sdxl-compile-cache)
if [ "$part" = bench ] || [ "$part" = all ]; then
  python3 bench/engine.py "${common[@]}" --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
fi
if [ "$part" = ready ]; then
  python3 bench/engine.py "${common[@]}" --repeats 1 --batches 1 --deepcache 0 --ready --out "$out/ready.json" 2>&1 | tee "$out/ready.log"
fi
if [ "$part" = qkv ]; then
  python3 bench/engine.py "${common[@]}" --deepcache 0 --fuse-qkv --channels-last --out "$out/qkv.json" 2>&1 | tee "$out/qkv.log"
fi
