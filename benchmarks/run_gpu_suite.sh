#!/usr/bin/env bash
# Everything a developer runs on an NVIDIA GPU before calling a kernel change
# done: the test suite with the compiled kernels; the benchmark of every op
# with the Triton and Mosaic kernels against XLA (records under
# benchmarks/results/ or $1); the automatic choice's table written from it;
# the benchmark again with implementation=None, which the table now steers;
# the main job; the Llama block.
#   bash benchmarks/run_gpu_suite.sh [results-dir [step ...]]
# Steps: tests bench table auto main llama (default: all, about 30 minutes
# on an H200); name some to split the suite over shorter sessions, e.g.
#   bash benchmarks/run_gpu_suite.sh benchmarks/results bench table
# and, not in the default list, flax-scale: the backward and the step of
# the large shapes with a float32 scale (Flax's RMSNorm default,
# param_dtype) beside bf16 and float32 rows, into <results>/scale_float32.
set -uo pipefail
out=${1:-benchmarks/results}
shift || true
steps=${*:-tests bench table auto main llama}
mkdir -p "$out/auto"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
card=$(python3 -c "import jax, re; print(re.sub(r'\W+', '_', jax.devices()[0].device_kind).strip('_'))")
bench="python3 -m benchmarks.benchmark_rmsnorm"
status=0
for step in $steps; do
  echo "=== $step"
  case $step in
    tests)
      # Eight worker processes: the whole suite took 2:45 on an H200 host
      # with 14 (gpu_tests_h200_run28_full.log).
      python3 -m pytest -q -n 8 -rs tests 2>&1 | tee "$out/gpu_tests.log" \
          | tail -n 25 || status=1 ;;
    bench)
      $bench --implementations triton mosaic --out "$out" 2>&1 \
          | grep -v '%|' || status=1 ;;
    table)
      python3 -m benchmarks.speed_table "$out"/*_"$card".json || status=1 ;;
    auto)
      $bench --implementations auto --ops forward step quant quant-static \
          quant-residual quant-static-residual quant-channel \
          quant-channel-residual --out "$out/auto" 2>&1 | grep -v '%|' \
          || status=1 ;;
    main)
      python3 -m jax_rmsnorm > "$out/main_job.log" 2>&1 || status=1
      tail -n 3 "$out/main_job.log" ;;
    flax-scale)
      $bench --implementations triton mosaic auto --ops backward step \
          --scale-dtype float32 --min-elements 8e6 \
          --out "$out/scale_float32" 2>&1 | grep -v '%|' || status=1 ;;
    llama)
      python3 -m benchmarks.bench_llama_block --rounds 5 --out "$out" \
          | tail -n 12 || status=1 ;;
    *)
      echo "unknown step $step (tests bench table auto main llama" \
           "flax-scale)" >&2
      exit 2 ;;
  esac
done
exit $status
