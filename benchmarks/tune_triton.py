"""Sweeps launch configurations of the Triton kernels on one GPU.

Each (M, N, dtype) of the sweep is checked against the float64 oracle and
timed with CUPTI beside XLA (the fused reference, or its autodiff for the
backward) and the copy ceiling, in the same run. A configuration whose
result fails the oracle's bounds (worst error / bound > 1) is recorded but
never the best. The best configurations feed `triton_config.get_config` /
`get_backward_config` by hand.

  python -m benchmarks.tune_triton --out /tmp/tune.json
  python -m benchmarks.tune_triton --sweep backward --out /tmp/tune_bwd.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys

import jax

from jax_rmsnorm._src import api
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import backward as triton_backward
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import forward as triton_forward

SWEEP = (
    (32768, 4096, "bfloat16"), (16384, 8192, "bfloat16"),
    (32768, 3072, "bfloat16"), (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"), (8192, 5120, "bfloat16"),
    (4096, 2048, "bfloat16"), (256, 4096, "bfloat16"),
    (16, 4096, "bfloat16"), (1, 8192, "bfloat16"),
    (32768, 4096, "float32"), (65536, 896, "float32"),
    (4096, 14336, "float32"), (8192, 5120, "float32"),
    (16, 4096, "float32"), (1024, 65536, "bfloat16"),
    (512, 65536, "float32"),
)

# Decode sizes and short rows, timed with more iterations.
SMALL_SWEEP = (
    (1, 4096, "bfloat16"), (16, 4096, "bfloat16"), (64, 4096, "bfloat16"),
    (16, 8192, "bfloat16"), (16, 4096, "float32"), (65536, 128, "bfloat16"),
    (65536, 256, "float32"), (32768, 512, "bfloat16"),
)

# Hidden sizes that are not powers of two (one pass, several chunks held in
# registers) and the power-of-two rows whose warps were in doubt.
CHUNK_SWEEP = (
    (32768, 3072, "bfloat16"), (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"), (8192, 5120, "bfloat16"),
    (65536, 896, "float32"), (4096, 14336, "float32"),
    (8192, 5120, "float32"), (16384, 8192, "float32"),
    (16384, 8192, "bfloat16"), (32768, 4096, "bfloat16"),
)
# The backward: the large shapes plus decode and mid sizes.
BACKWARD_SWEEP = (
    (16384, 8192, "bfloat16"), (4096, 14336, "bfloat16"),
    (16384, 8192, "float32"), (8192, 5120, "float32"),
    (32768, 4096, "bfloat16"), (8192, 5120, "bfloat16"),
    (65536, 896, "bfloat16"), (4096, 14336, "float32"),
    (2048, 4096, "bfloat16"), (16, 4096, "bfloat16"), (1, 8192, "bfloat16"),
)
# The backward at few rows, where the partials of d(scale) weigh.
BACKWARD_SMALL_SWEEP = (
    (128, 14336, "bfloat16"), (256, 4096, "bfloat16"), (16, 4096, "bfloat16"),
    (1, 8192, "bfloat16"), (256, 4096, "float32"), (16, 4096, "float32"),
    (2048, 4096, "bfloat16"), (4096, 2048, "bfloat16"),
    (512, 14336, "bfloat16"), (1024, 8192, "bfloat16"),
)
# The backward's register choices (chunks of wide rows, the scale held or
# re-read) on the large shapes, and how d(scale) is summed at few rows.
BACKWARD_REGISTERS_SWEEP = (
    (4096, 14336, "bfloat16"), (4096, 14336, "float32"),
    (16384, 8192, "bfloat16"), (32768, 4096, "float32"),
    (8192, 5120, "bfloat16"), (65536, 896, "bfloat16"),
) + tuple((m, n, dtype) for n, dtype in (
    (14336, "bfloat16"), (14336, "float32"), (8192, "bfloat16"),
    (4096, "bfloat16"), (4096, "float32"), (896, "bfloat16"))
          for m in (1, 16, 128, 256))
SWEEPS = {"large": SWEEP, "small": SMALL_SWEEP, "chunks": CHUNK_SWEEP,
          "backward": BACKWARD_SWEEP, "backward-small": BACKWARD_SMALL_SWEEP,
          "backward-registers": BACKWARD_REGISTERS_SWEEP}


def candidates(n: int):
  cols = triton_config.next_power_of_2(n)
  if cols > triton_config.MAX_ONE_PASS_COLS:
    for chunk, warps, stages in itertools.product(
        (1024, 2048, 4096, 8192), (4, 8, 16), (1, 2, 3)):
      yield triton_config.Config(1, chunk, warps, stages)
    return
  for rows, warps in itertools.product((1, 2, 4, 8, 16, 32), (2, 4, 8, 16, 32)):
    if rows * cols <= 32768 and rows * cols >= 32 * warps:
      yield triton_config.Config(rows, cols, warps, 1)
  # One row held in registers as up to 16 chunks: less padding for widths
  # such as 896 = 7 x 128 or 14336 = 7 x 2048.
  chunk = max(128, triton_config.next_power_of_2(-(-n // 16)))
  while chunk < cols:
    for warps in (2, 4, 8, 16, 32):
      yield triton_config.Config(1, chunk, warps, 1)
    chunk *= 2


def backward_candidates(m: int, n: int, dtype: str):
  base = triton_config.get_backward_config(m, n, dtype)
  cols = triton_config.next_power_of_2(n)
  widths = sorted({cols} | {w for w in (2048,) if n >= 4096 and w < cols})
  warps = (4, 8) if cols <= 1024 else (8, 16, 32)
  per_sm = (4, 8) if cols <= 1024 else (1, 2)
  for width, w, p, prefetch in itertools.product(widths, warps, per_sm,
                                                 (False, True)):
    if base.block_rows * width >= 32 * w:
      yield dataclasses.replace(base, block_cols=width, num_warps=w,
                                programs_per_sm=p, prefetch=prefetch)


def backward_small_candidates(m: int, n: int, dtype: str):
  base = triton_config.get_backward_config(m, n, dtype)
  for blocks, prefetch in itertools.product((1, 2, 4, 8), (False, True)):
    yield dataclasses.replace(base, min_blocks_per_program=blocks,
                              prefetch=prefetch)


def backward_register_candidates(m: int, n: int, dtype: str):
  """The heuristic's choice, then each of its register choices flipped."""
  base = triton_config.get_backward_config(m, n, dtype)
  yield base
  yield dataclasses.replace(base, dscale_by_columns=not base.dscale_by_columns)
  if m <= 256:
    return
  yield dataclasses.replace(base, hold_scale=not base.hold_scale)
  cols = triton_config.next_power_of_2(n)
  if cols > 8192:
    for width, warps in ((cols, 8), (cols, 16), (2048, 8), (2048, 16)):
      yield dataclasses.replace(base, block_cols=width, num_warps=warps)


def _backward_row(m, n, dtype, iterations, candidates=backward_candidates):
  x, scale = testing.random_inputs(0, (m, n), dtype)
  dy, _ = testing.random_inputs(1, (m, n), dtype)
  ref = testing.oracle_grad(x, scale, dy)
  rstd = jax.jit(lambda a, s: triton_forward.forward(
      a, None, s, epsilon=1e-6, scale_offset=0.0, save_rstd=True).rstd)(
          x, scale)
  row = dict(m=m, n=n, dtype=dtype,
             copy_us=bench.copy_ceiling(m, n, dtype)["copy_us"],
             xla_us=bench.measure_us(jax.jit(bench.xla_backward), x, scale, dy),
             default=str(triton_config.get_backward_config(m, n, dtype)),
             configs=[])
  for cfg in candidates(m, n, dtype):
    fn = jax.jit(functools.partial(triton_backward.backward, scale_offset=0.0,
                                   config=cfg))
    try:
      dx, ds = fn(x, dy, None, scale, rstd)
      # The kernel's d(scale) is float32 (the vjp rounds it afterwards).
      worst = testing.grads_excess(dx, ds, ref, dtype, "float32")
      us = bench.measure_us(fn, x, dy, None, scale, rstd,
                            iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      row["configs"].append(dict(config=str(cfg), error=repr(e)[:300]))
      continue
    row["configs"].append(dict(config=str(cfg), us=us,
                               error_over_bound=worst.ratio))
  return row


def passed(config_row: dict) -> bool:
  """The gate: timed, and within the oracle's bounds."""
  return "us" in config_row and config_row["error_over_bound"] <= 1


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.tune_triton", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="tune.json")
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--sweep", choices=tuple(SWEEPS), default="large")
  args = parser.parse_args(argv)
  results = []
  for m, n, dtype in SWEEPS[args.sweep]:
    if args.sweep == "backward":
      row = _backward_row(m, n, dtype, args.iterations)
    elif args.sweep == "backward-small":
      row = _backward_row(m, n, dtype, args.iterations,
                          backward_small_candidates)
    elif args.sweep == "backward-registers":
      row = _backward_row(m, n, dtype, args.iterations,
                          backward_register_candidates)
    else:
      row = _forward_row(m, n, dtype, args.iterations)
    ok = sorted(filter(passed, row["configs"]), key=lambda c: c["us"])
    failed = sum("us" in c and not passed(c) for c in row["configs"])
    best = ok[0] if ok else None
    print(f"{dtype:9s} {m:6d}x{n:<6d} copy {row['copy_us']:8.1f} xla "
          f"{row['xla_us']:8.1f} best "
          + (f"{best['us']:8.1f} {best['config']} error/bound "
             f"{best['error_over_bound']:.2f}" if best else "none passed")
          + f" | failed the bounds: {failed}"
          f" | next: {[(c['config'], round(c['us'], 1)) for c in ok[1:4]]}",
          flush=True)
    results.append(row)
    with open(args.out, "w") as f:
      json.dump(dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                     results=results), f, indent=1)
  return 0


def _forward_row(m, n, dtype, iterations):
  x, scale = testing.random_inputs(0, (m, n), dtype)
  ref64 = testing.oracle(x, scale)
  xla = jax.jit(functools.partial(api.rms_norm_reference, epsilon=1e-6))
  row = dict(m=m, n=n, dtype=dtype,
             copy_us=bench.copy_ceiling(m, n, dtype)["copy_us"],
             xla_us=bench.measure_us(xla, x, scale),
             default=str(triton_config.get_config(m, n, dtype)),
             configs=[])
  for cfg in candidates(n):
    fn = jax.jit(lambda a, s, cfg=cfg: triton_forward.forward(
        a, None, s, epsilon=1e-6, scale_offset=0.0, config=cfg).y)
    try:
      worst = testing.worst_excess(fn(x, scale), ref64, dtype, n)
      us = bench.measure_us(fn, x, scale, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      row["configs"].append(dict(config=str(cfg), error=repr(e)[:300]))
      continue
    row["configs"].append(dict(config=str(cfg), us=us,
                               error_over_bound=worst.ratio))
  return row


if __name__ == "__main__":
  sys.exit(main())
