#!/usr/bin/env bash
# The device check, for a session that has the GPU machine (see ../shared/gpu/README.md for the four-run recipe):
#   source .dali/install.sh && bash scripts/gpu_check.sh
# Runs the real-GPU tests (CUDA kernels against the CPU kernels, CuPy and torch CUDA inputs, GPU loader modes) and
# the GPU benchmarks; writes logs and JSON under $OUT (or ./gpu-out when OUT is unset).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export RAINSWEEP_REAL_GPU=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 240 python -m pytest -q -p no:cacheprovider -rs \
  tests/test_synth.py tests/test_rain_streak.py tests/test_rain_heldout.py tests/test_metrics.py tests/test_loader.py \
  -k "gpu or cuda or cupy" 2>&1 | tee "$out/tests.log"
timeout 150 python -m engine.cli bench --presets small,medium,large --threads all --gpu --no-peers \
  --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
timeout 120 python - "$out/loader.json" <<'PY' 2>&1 | tee "$out/loader.log"
import json, sys
from engine.bench.loader import run_loader_bench
# DALI with its source in this process (workers 0: views, feed on a helper thread) and in worker processes (None:
# the GPU default, min(8, cores / 2)); which one is faster on the GPU host has not been measured yet
rows = run_loader_bench(modes=("resident", "dali"), device="cuda", seconds=3, threads=[8], workers=(0, None),
                        dtypes=("float32", "uint8"))
print(json.dumps(rows, indent=1, default=str))
json.dump(rows, open(sys.argv[1], "w"), indent=1, default=str)
PY
