#!/usr/bin/env bash
# Everything a developer runs on an NVIDIA GPU before calling a kernel change
# done: the test suite with the compiled kernels, the forward benchmark
# (results under benchmarks/results/ or $1), and the main job.
#   bash benchmarks/run_gpu_suite.sh [results-dir]
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
status=0
python3 -m pytest -q -rs tests 2>&1 | tee "$out/gpu_tests.log" | tail -n 25 || status=1
python3 -m benchmarks.benchmark_rmsnorm --out "$out" 2>&1 | grep -v '%|' || status=1
python3 -m jax_rmsnorm > "$out/main_job.log" 2>&1 || status=1
tail -n 3 "$out/main_job.log"
exit $status
