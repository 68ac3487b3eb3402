#!/usr/bin/env bash
# Calibration, GPTQ and verify on the GPU, in one call of the lent device (issues 13-15): the engine's calibrate
# against `cat` (2 and 4 layers), quantize --method gptq of a 35B-shaped layer, the batched solve of one layer
# alone, and copy / quantize / verify --source on cpu and cuda (bench_verify.py). Logs and JSON go to $OUT.
#   bash bench/gpu_calib.sh                      # every step: about 10 minutes on an H200 (checkpoints built there)
#   STEPS="gptq-layer verify" bash bench/gpu_calib.sh   # some steps (two calls fit the device's 10-minute limit)
set -u
STEPS=${STEPS:-"gptq-solve engine gptq-layer verify"}
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
OUT=${OUT:-/tmp/qstream-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
step() { echo "=== $1 ($(date +%T))"; }
step env
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; free -g | head -2; } 2>&1 | tee "$OUT/env.txt"
want gptq-solve && step gptq-solve && \
timeout 90 $PY bench/bench_gptq.py --solve --device cuda 2>&1 | tee "$OUT/gptq_solve.txt"
want engine && step engine && \
timeout ${ENGINE_TIMEOUT:-260} $PY bench/bench_engine.py --device cuda --samples 128 --seq-len 2048 --experts all,routed \
  --layers 2,4 --work /tmp/qsb --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.txt"
want gptq-layer && step gptq-layer && \
timeout ${GPTQ_TIMEOUT:-150} $PY bench/bench_engine.py --device cuda --samples 128 --seq-len 2048 --experts routed --gptq \
  --layers 1 --work /tmp/qsb --json "$OUT/gptq_engine.json" 2>&1 | tee "$OUT/gptq_engine.txt"
want verify && step verify && \
timeout ${VERIFY_TIMEOUT:-200} $PY bench/bench_verify.py --work /tmp/qsb --layers 1,4 --devices cpu,cuda --no-full --json "$OUT/verify.json" \
  2>&1 | tee "$OUT/verify.txt"
step done
