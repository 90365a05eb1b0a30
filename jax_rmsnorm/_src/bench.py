"""Timing and byte counts for the benchmark CLI and the self-check."""

from __future__ import annotations

import functools
import math
import statistics
import time

import jax
import numpy as np

from jax_rmsnorm._src import api
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import testing


def measure_us(fn, *args, iterations: int = 20) -> float:
  """Median time of jitted `fn(*args)` in microseconds.

  On an NVIDIA GPU: kernel time from CUPTI, all kernels of one call summed
  (a silent fallback to several XLA kernels is timed honestly). Elsewhere:
  wall clock around a blocking call, dispatch included (not kernel time).
  """
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  if platform.on_cuda_gpu():
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
    _, times_ms = profiler.measure(fn, iterations=iterations)(*args)
    return 1e3 * statistics.median(times_ms)
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e6 * statistics.median(times)


def forward_bytes(m: int, n: int, dtype, scale_dtype) -> int:
  """Fewest bytes a forward moves: read x and scale once, write y once."""
  return (2 * m * n * np.dtype(dtype).itemsize
          + n * np.dtype(scale_dtype).itemsize)


def bench_forward(m: int, n: int, dtype: str, *, implementations=("triton",),
                  iterations: int = 20) -> dict:
  """Checks and times each implementation on one shape beside XLA and copy.

  Returns one flat row: times in us, GB/s from `forward_bytes`, % of the
  measured copy bandwidth at this shape, the ratio time(xla) / time(impl)
  (> 1: faster than XLA), and the worst excess over the error bound (<= 0 is
  a pass).
  """
  x, scale = testing.random_inputs(m * 131 + n, (m, n), dtype)
  ref = testing.oracle(x, scale)
  nbytes = forward_bytes(m, n, dtype, scale.dtype)
  copy_us = measure_us(jax.jit(lambda a: a * 2), x, iterations=iterations)
  xla_us = measure_us(jax.jit(api.rms_norm_reference), x, scale,
                      iterations=iterations)
  row = dict(m=m, n=n, dtype=dtype, bytes=nbytes, copy_us=copy_us,
             copy_gbps=2 * x.nbytes / copy_us / 1e3, xla_us=xla_us,
             xla_gbps=nbytes / xla_us / 1e3)
  for name in implementations:
    fn = jax.jit(functools.partial(api.rms_norm, implementation=name))
    excess, _ = testing.worst_excess(fn(x, scale), ref, dtype, n)
    us = measure_us(fn, x, scale, iterations=iterations)
    gbps = nbytes / us / 1e3
    row.update({f"{name}_us": us, f"{name}_gbps": gbps,
                f"{name}_pct_copy": 100 * gbps / row["copy_gbps"],
                f"{name}_xla_ratio": xla_us / us,
                f"{name}_max_excess": excess, f"{name}_ok": excess <= 0})
  return row


def summarize(rows: list[dict], impl: str = "triton") -> dict:
  """The issue's bars: worst slowdown, geometric mean, copy % of large."""
  ratios = [r[f"{impl}_xla_ratio"] for r in rows]
  large = [r[f"{impl}_pct_copy"] for r in rows
           if r["m"] * r["n"] >= shapes.LARGE_ELEMENTS]
  return dict(
      geomean_xla_over_impl=math.exp(sum(map(math.log, ratios)) / len(ratios)),
      worst_impl_over_xla=max(1 / q for q in ratios),
      min_pct_copy_large=min(large) if large else None,
      all_numerics_ok=all(r[f"{impl}_ok"] for r in rows))


def format_table(rows: list[dict], impl: str = "triton") -> str:
  lines = [f"{'dtype':9s} {'M x N':>13s} {'copy us':>8s} {'xla us':>8s} "
           f"{impl + ' us':>10s} {'GB/s':>6s} {'%copy':>6s} {'xla/' + impl:>11s}"
           " ok"]
  for r in rows:
    lines.append(
        f"{r['dtype']:9s} {r['m']:>6d}x{r['n']:<6d} {r['copy_us']:8.1f} "
        f"{r['xla_us']:8.1f} {r[impl + '_us']:10.1f} {r[impl + '_gbps']:6.0f} "
        f"{r[impl + '_pct_copy']:6.1f} {r[impl + '_xla_ratio']:11.3f} "
        f"{'yes' if r[impl + '_ok'] else 'NO'}")
  return "\n".join(lines)
