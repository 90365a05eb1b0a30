#!/usr/bin/env bash
# Everything a developer runs on an NVIDIA GPU before calling a kernel change
# done: the test suite with the compiled kernels; the benchmark of every op
# with the Triton and Mosaic kernels against XLA (records under
# benchmarks/results/ or $1); the automatic choice's table written from it;
# the benchmark again with implementation=None, which the table now steers;
# the main job; the Llama block.
#   bash benchmarks/run_gpu_suite.sh [results-dir]
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out/auto"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
card=$(python3 -c "import jax, re; print(re.sub(r'\W+', '_', jax.devices()[0].device_kind).strip('_'))")
status=0
python3 -m pytest -q -rs tests 2>&1 | tee "$out/gpu_tests.log" | tail -n 25 || status=1
python3 -m benchmarks.benchmark_rmsnorm --implementations triton mosaic \
    --out "$out" 2>&1 | grep -v '%|' || status=1
python3 -m benchmarks.speed_table "$out"/*_"$card".json || status=1
python3 -m benchmarks.benchmark_rmsnorm --implementations auto \
    --ops forward step quant --out "$out/auto" 2>&1 | grep -v '%|' || status=1
python3 -m jax_rmsnorm > "$out/main_job.log" 2>&1 || status=1
tail -n 3 "$out/main_job.log"
python3 -m benchmarks.bench_llama_block --out "$out" | tail -n 12 || status=1
exit $status
