"""The main job: `python -m jax_rmsnorm`.

Checks the Pallas kernels (rms_norm, add_rms_norm, and the gradients) against
the float64 oracle on this machine (compiled on an NVIDIA GPU, in Pallas
interpret mode elsewhere), then times them against XLA. On a CPU only XLA is
timed: interpret mode proves correctness, not speed. Exit status 1 if any
check fails.
"""

from __future__ import annotations

import argparse
import sys

import jax

from jax_rmsnorm._src import api
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import testing

# Odd shapes the self-check always covers, on any device.
CHECK_SHAPES = [((1, 1), "float32"), ((5, 7), "bfloat16"),
                ((13, 896), "bfloat16"), ((3, 5120), "float16"),
                ((2, 4, 1536), "float32"), ((2, 14336), "bfloat16"),
                ((2, 16411), "float32")]


def self_check(interpret: bool) -> bool:
  ok = True
  for shape, dtype in CHECK_SHAPES:
    worst = bench.check_all_ops(shape, dtype, interpret=interpret)
    quantized = bench.check_quantized(shape, dtype, interpret=interpret)
    passed = worst.excess <= 0 and quantized.excess <= 0
    ok &= passed
    print(f"  {dtype:9s} {str(shape):12s} {'ok' if passed else 'FAILED'}: "
          f"worst error / bound {worst.ratio:.2f} (forward, add+norm, both "
          f"backwards), {quantized.ratio:.2f} (fp8 output; its bound is half a "
          "step, which values at a rounding tie reach)")
  return ok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jax_rmsnorm", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iterations", type=int, default=20,
                      help="timed calls per measurement (median)")
  args = parser.parse_args(argv)
  gpu = platform.on_cuda_gpu()
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform}: {device.device_kind}")
  print("self-check against the float64 oracle "
        f"({'compiled kernel' if gpu else 'Pallas interpret mode on CPU'}; "
        "each element's error over its bound, <= 1 passes):")
  ok = self_check(interpret=not gpu)
  if gpu:
    for op in bench.OPS:
      rows = [bench.bench_op(op, m, n, d, iterations=args.iterations)
              for m, n, d in shapes.BENCHMARK_SHAPES]
      print(f"\n{op} ({bench.BYTES_MOVED[op]}), CUPTI median of "
            f"{args.iterations} ({device.device_kind}):")
      print(bench.format_table(rows))
      for impl, summary in bench.summaries(rows).items():
        print(f"{impl}: {bench.format_summary(summary)}")
        ok &= summary["all_numerics_ok"]
  else:
    print("\nNo NVIDIA GPU here: the kernel ran in interpret mode (correctness "
          "only).\nXLA's CPU reference, wall clock per call (dispatch "
          "included; not a GPU number):")
    for m, n, dtype in [(1, 4096, "float32"), (256, 4096, "float32"),
                        (2048, 4096, "bfloat16")]:
      x, scale = testing.random_inputs(0, (m, n), dtype)
      us = bench.measure_us(jax.jit(api.rms_norm_reference), x, scale,
                            iterations=args.iterations)
      gbps = bench.forward_bytes(m, n, dtype, dtype) / us / 1e3
      print(f"  {dtype:9s} {m:>5d}x{n:<5d} {us:9.1f} us {gbps:6.1f} GB/s")
  print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
