#!/usr/bin/env bash
# The kernels under compute-sanitizer (memcheck, then racecheck) at odd and
# extreme shapes, then the numerics of the compiled kernels on every
# benchmark shape. Logs into $1 (default benchmarks/results/).
#   bash benchmarks/gpu_reliability.sh [results-dir]
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/sanitizer.log"
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool" | tee -a "$out/sanitizer.log"
  compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
      python3 -m benchmarks.sanitize_kernels 2>&1 \
      | grep -v -i deprecat | tee -a "$out/sanitizer.log" || status=1
done
echo "== numerics of the compiled kernels, every benchmark shape" | tee -a "$out/sanitizer.log"
python3 -m pytest -q -p no:cacheprovider tests/test_rms_norm.py tests/test_grad.py tests/test_add_rms_norm.py \
    -k "benchmark_shapes or compiled_program" 2>&1 | tail -n 3 | tee -a "$out/sanitizer.log" || status=1
exit $status
