#!/usr/bin/env bash
# The GPU checks in one go (docs/gpu.md): the `gpu` test suite (CuPy kernels and layers on CUDA
# against the torch reference), then the SPEC section 8 profiles at batch 256 on 3x32x32 and the
# per-op benchmark. Writes logs and JSON under $OUT (default: runs/gpu-check). Runs with the
# python that has torch and cupy ($PYTHON, default python3) and this checkout on PYTHONPATH, so
# it needs no install.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"
} 2>&1 | tee "$OUT/device.txt"
timeout "${SUITE_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests \
  > "$OUT/gpu_suite.log" 2>&1
echo "gpu suite exit: $?" | tee -a "$OUT/gpu_suite.log"
grep -E "passed|failed|error" "$OUT/gpu_suite.log" | tail -n 3
for model in ${MODELS:-tinyconv resnet_tiny}; do
  for target in sc am analog; do
    timeout 120 "$PY" -m approxctl profile "$model" --target "$target" --device cuda \
      --batch-size 256 --input-shape 3,32,32 --iters "${ITERS:-15}" --warmup 3 --json \
      > "$OUT/profile_${model}_${target}.json" 2>> "$OUT/profile.err"
    echo "$model $target exit $?"
  done
done 2>&1 | tee "$OUT/profile.log"
timeout 120 "$PY" benchmarks/bench_ops.py --device cuda --rows 65536 2>&1 | tee "$OUT/bench_ops.log"
