#!/usr/bin/env bash
# Everything that needs the GPU, in one call of the lent device: environment, kernel tests on CUDA,
# large-tensor bit-identity (Triton vs C vs torch), kernel timing vs copy bandwidth (config sweep),
# and the end-to-end benchmark (cpu vs cuda, byte-identical outputs, 1 vs 2 layers) on checkpoints
# built on that machine. Logs and JSON go to $OUT (default /tmp/qstream-gpu-out).
#   bash bench/gpu_all.sh [LAYERS]      # LAYERS default 1,2; 1,2,4 took 406 s on an H100 machine
set -u
OUT=${OUT:-/tmp/qstream-gpu-out}
LAYERS=${1:-1,2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
step() { echo "=== $1 ($(date +%T))"; }
step env
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  gcc --version | head -1; nproc; free -g | head -2; df -h /tmp | tail -1; } 2>&1 | tee "$OUT/env.txt"
step tests
timeout 100 $PY -m pytest tests/test_kernels.py tests/test_mxfp4.py -q -p no:cacheprovider -x 2>&1 | tail -8 | tee "$OUT/tests.txt"
step kernels
timeout 240 $PY bench/bench_kernels.py --check --sweep --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
step end-to-end
timeout ${E2E_TIMEOUT:-320} $PY bench/bench_quantize.py --layers "$LAYERS" --no-peer --work /tmp/qsb --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.txt"
step done
