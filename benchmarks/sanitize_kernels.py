"""Runs every Pallas kernel once at odd and extreme shapes and checks the
results: the workload `benchmarks/gpu_reliability.sh` runs under
compute-sanitizer (memcheck, racecheck). Exit status 1 on a wrong result.

  python -m benchmarks.sanitize_kernels [--interpret]
"""

from __future__ import annotations

import argparse
import sys

import jax

from jax_rmsnorm._src import bench
from jax_rmsnorm._src.triton import config as triton_config

# (M, N, dtype): M = 13 with Qwen's 896 and 5120 (padded to 8192), the
# longest row the backward holds, the longest the forward takes (chunked).
# Up to 128 rows the backward sums d(scale) by columns; 300 rows take its
# per-program partials, at 896 and at 14336 (held as 7 chunks).
SHAPES = [(13, 896, "bfloat16"), (13, 5120, "float32"), (13, 5120, "float16"),
          (13, triton_config.MAX_ONE_PASS_COLS, "bfloat16"),
          (300, 896, "bfloat16"), (300, 14336, "bfloat16"),
          (2, triton_config.MAX_COLS, "float32")]


def check(m: int, n: int, dtype: str, interpret: bool = False) -> bool:
  worst = bench.check_all_ops((m, n), dtype, interpret=interpret)
  print(f"{dtype:9s} {m:3d} x {n:<8d} forward, add+norm, both backwards: "
        f"{'ok' if worst.excess <= 0 else 'FAILED'} (worst error / bound "
        f"{worst.ratio:.2f})", flush=True)
  return worst.excess <= 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.sanitize_kernels", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--interpret", action="store_true",
                      help="a CPU dry run: Pallas interpret mode, the first "
                      "two shapes only")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  shapes = SHAPES[:2] if args.interpret else SHAPES
  ok = all([check(*shape, interpret=args.interpret) for shape in shapes])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
