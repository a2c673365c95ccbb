#!/usr/bin/env bash
# The device check, on a machine with a CUDA GPU (DALI installed, e.g. `source .dali/install.sh` first):
#   bash scripts/gpu_check.sh
# Runs the real-GPU tests (every test marked `gpu` in tests/ and bench/: CUDA kernels against the CPU kernels and
# the references, CuPy and torch CUDA inputs, GPU loader modes), then the GPU benchmarks; writes logs and JSON under
# $OUT (or ./gpu-out when OUT is unset). On a machine without a GPU every step still runs to the end: the gpu tests
# report as skipped and the GPU benchmarks are skipped with a note, so the script can be rehearsed anywhere.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export RAINSWEEP_REAL_GPU=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
failed=()

step() {  # step NAME TIMEOUT COMMAND...: run, log to $out/NAME.log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    failed+=("$name (exit $rc)")
  fi
}

if nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1; then
  cat "$out/gpu.txt"
else
  echo "no nvidia-smi / no NVIDIA driver here" | tee "$out/gpu.txt"
fi
if python -c "import sys; from engine.bench.machine import gpu_available; sys.exit(0 if gpu_available() else 1)"; then
  gpu=1
else
  gpu=0
  echo "note: no CUDA GPU usable through CuPy: the gpu tests will be skipped and the GPU benchmarks not run"
fi

step tests 300 python -m pytest -q -p no:cacheprovider -rs -m gpu tests bench

if [ "$gpu" = 1 ]; then
  step bench 150 python -m engine.cli.bench --presets small,medium,large --threads all --gpu --no-peers \
    --json "$out/bench.json"
  # DALI with its source in this process (workers 0: views, feed on a helper thread) and in worker processes
  # (None: the GPU default, min(8, cores / 2)), to compare the two on the GPU host
  step loader 120 python - "$out/loader.json" <<'PY'
import json
import sys

from engine.atomic import atomic_write_text
from engine.bench.loader import run_loader_bench

rows = run_loader_bench(modes=("resident", "dali"), device="cuda", seconds=3, threads=[8], workers=(0, None),
                        dtypes=("float32", "uint8"))
print(json.dumps(rows, indent=1, default=str))
atomic_write_text(sys.argv[1], json.dumps(rows, indent=1, default=str))
PY
  # the toy's default grid on the GPU, timed (the goal: under a minute for the three networks)
  step toy 300 python -m engine.cli toy --device cuda --out "$out/toy"
else
  echo "== bench, loader, toy: skipped (no GPU)"
fi

if [ "$gpu" = 1 ]; then where="GPU present"; else where="no GPU: GPU steps skipped"; fi
if [ "${#failed[@]}" -eq 0 ]; then
  echo "gpu_check: finished, every step passed ($where); logs in $out"
else
  echo "gpu_check: finished with failures: ${failed[*]} ($where); logs in $out"
  exit 1
fi
