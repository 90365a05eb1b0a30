"""Timing and byte counts for the benchmark CLI and the self-check."""

from __future__ import annotations

import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_rmsnorm._src import api
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import reference
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


def backward_bytes(m: int, n: int, dtype, scale_dtype) -> int:
  """Fewest bytes a backward moves: read x and dy, write dx; read the scale,
  write d(scale)."""
  return (3 * m * n * np.dtype(dtype).itemsize
          + 2 * n * np.dtype(scale_dtype).itemsize)


def add_bytes(m: int, n: int, dtype, scale_dtype) -> int:
  """Fewest bytes add_rms_norm moves: read x and residual, write y and h."""
  return (4 * m * n * np.dtype(dtype).itemsize
          + n * np.dtype(scale_dtype).itemsize)


OPS = ("forward", "backward", "add")


def _vjp_fn(implementation):
  """(x, scale) -> the vjp function of rms_norm, holding its residuals."""
  def run(x, scale):
    fwd = functools.partial(api.rms_norm, implementation=implementation)
    return jax.vjp(fwd, x, scale)[1]
  return run


def xla_backward(x, scale, dy):
  """XLA's autodiff of the reference, forward included: XLA drops y, fuses
  the rstd recomputation into the backward's kernels. Its fastest form, and
  the form anchors.md timed."""
  return jax.vjp(api.rms_norm_reference, x, scale)[1](dy)


def bench_op(op: str, m: int, n: int, dtype: str, *,
             implementations=("triton",), iterations: int = 20) -> dict:
  """Checks and times one op on one shape beside XLA and copy, same card.

  op: "forward" (rms_norm), "backward" (dx and d(scale) of rms_norm, without
  the forward) or "add" (add_rms_norm; XLA runs the unfused add then norm).
  Returns one flat row: times in us, GB/s from the op's fewest bytes, % of
  the measured copy bandwidth at this shape, time(xla) / time(impl) (> 1:
  faster than XLA) and the worst excess over the error bound (<= 0: pass).
  """
  x, scale = testing.random_inputs(m * 131 + n, (m, n), dtype)
  other, _ = testing.random_inputs(m * 131 + n + 1, (m, n), dtype)
  nbytes = {"forward": forward_bytes, "backward": backward_bytes,
            "add": add_bytes}[op](m, n, dtype, scale.dtype)
  copy_us = measure_us(jax.jit(lambda a: a * 2), x, iterations=iterations)
  row = dict(op=op, m=m, n=n, dtype=dtype, bytes=nbytes, copy_us=copy_us,
             copy_gbps=2 * x.nbytes / copy_us / 1e3)

  if op == "forward":
    ref = testing.oracle(x, scale)
    def make(name):
      fn = jax.jit(functools.partial(api.rms_norm, implementation=name))
      return fn, (x, scale), lambda y: testing.worst_excess(y, ref, dtype, n)[0]
  elif op == "add":
    h64 = np.asarray(x, np.float64) + np.asarray(other, np.float64)
    h_ref = np.asarray(reference.residual_add(x, other))
    ref = testing.oracle(h_ref, scale)
    def make(name):
      fn = jax.jit(functools.partial(api.add_rms_norm, implementation=name))
      def excess(out):
        y, h = out
        # h: the f32 add rounded once, exactly; and within half an ulp of
        # the exact sum.
        h_err = testing.worst_excess(h, h64, dtype, 1)[0]
        exact = np.array_equal(np.asarray(h), h_ref)
        return max(testing.worst_excess(y, ref, dtype, n)[0], h_err,
                   0.0 if exact else np.inf)
      return fn, (x, other, scale), excess
  else:
    dy = other
    ref = testing.oracle_grad(x, scale, dy)
    def excess(out):
      return testing.grads_excess(out[0], out[1], ref, dtype,
                                  scale.dtype).excess
    def make(name):
      if name == "xla":
        return jax.jit(xla_backward), (x, scale, dy), excess
      # Ours: the backward pass alone, from the residuals its forward saved
      # (x and a float32 rstd per row), as it runs in a training step.
      vjp = jax.jit(_vjp_fn(name))(x, scale)
      return jax.jit(lambda f, g: f(g)), (vjp, dy), excess

  xla_fn, xla_args, _ = make("xla")
  row["xla_us"] = xla_us = measure_us(xla_fn, *xla_args,
                                      iterations=iterations)
  row["xla_gbps"] = nbytes / xla_us / 1e3
  for name in implementations:
    fn, args, excess_of = make(name)
    worst = excess_of(fn(*args))
    us = measure_us(fn, *args, iterations=iterations)
    gbps = nbytes / us / 1e3
    row.update({f"{name}_us": us, f"{name}_gbps": gbps,
                f"{name}_pct_copy": 100 * gbps / row["copy_gbps"],
                f"{name}_xla_ratio": xla_us / us,
                f"{name}_max_excess": worst, f"{name}_ok": worst <= 0})
  return row


def check_all_ops(shape, dtype: str, *, interpret: bool = False) -> float:
  """Worst excess over the error bounds (<= 0: every check passed) of the
  Pallas kernels at one shape: rms_norm; add_rms_norm's y and h; gradients
  of rms_norm (dx, dscale) and of add_rms_norm with an upstream dh (dx,
  dresidual, dscale). For the main job's self-check and the sanitizer run."""
  n = shape[-1]
  kernel = dict(implementation="triton", interpret=interpret)
  x, scale = testing.random_inputs(len(shape) * n, shape, dtype, "float32")
  other, _ = testing.random_inputs(len(shape) * n + 1, shape, dtype)
  y = jax.jit(functools.partial(api.rms_norm, **kernel))(x, scale)
  worst = testing.worst_excess(y, testing.oracle(x, scale), dtype, n)[0]
  y, h = jax.jit(functools.partial(api.add_rms_norm, **kernel))(
      x, other, scale)
  worst = max(worst, testing.worst_excess(y, testing.oracle(h, scale), dtype,
                                          n)[0])
  if not np.array_equal(np.asarray(h), np.asarray(
      reference.residual_add(x, other))):
    return np.inf

  def grad_excess(got_dx, dscale, ref):
    return testing.grads_excess(got_dx, dscale, ref, dtype, "float32").excess

  # Gradients: rows past the backward kernel's limit take the reference's
  # gradient (the forward above is the kernel's, strictly).
  grad_kernel = dict(implementation=("triton", "xla"), interpret=interpret)

  def norm_loss(x, s):
    y = api.rms_norm(x, s, **grad_kernel)
    return jnp.sum(y.astype(jnp.float32) * other.astype(jnp.float32))

  dx, dscale = jax.jit(jax.grad(norm_loss, argnums=(0, 1)))(x, scale)
  worst = max(worst, grad_excess(dx, dscale,
                                 testing.oracle_grad(x, scale, other)))

  def add_loss(x, r, s):
    y, h = api.add_rms_norm(x, r, s, **grad_kernel)
    return jnp.sum(y.astype(jnp.float32) * other.astype(jnp.float32)
                   + h.astype(jnp.float32))

  dx, dres, dscale = jax.jit(jax.grad(add_loss, argnums=(0, 1, 2)))(
      x, other, scale)
  ref = testing.oracle_grad(h, scale, other, dh=np.ones(shape))
  return max(worst, grad_excess(dx, dscale, ref),
             testing.dx_excess(dres, ref, dtype).excess)


def summarize(rows: list[dict], impl: str = "triton") -> dict:
  """The issue's bars: worst slowdown, geometric mean, copy % of large."""
  ratios = [r[f"{impl}_xla_ratio"] for r in rows]
  large = [r[f"{impl}_pct_copy"] for r in rows
           if r["m"] * r["n"] >= shapes.LARGE_ELEMENTS]
  large_ratios = [r[f"{impl}_xla_ratio"] for r in rows
                  if r["m"] * r["n"] >= shapes.LARGE_ELEMENTS]
  return dict(
      geomean_xla_over_impl=math.exp(sum(map(math.log, ratios)) / len(ratios)),
      worst_impl_over_xla=max(1 / q for q in ratios),
      min_xla_over_impl_large=min(large_ratios) if large_ratios else None,
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
