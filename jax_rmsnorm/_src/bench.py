"""Timing, byte counts and numerics for the benchmark CLI and the self-check.

A benchmark row (`bench_op`) is flat and self-describing: the op, shape,
dtypes, the bytes counted and what they are, the timer, the copy ceiling and
which copy set it, then for XLA and each implementation asked for: time,
GB/s, % of the copy bandwidth, time(XLA) / time(it), and its worst error /
bound against the float64 oracle (`testing`; <= 1 passes).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import api
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import common as triton_common

logger = logging.getLogger("jax_rmsnorm")

OPS = ("forward", "backward", "add", "step", "quant", "quant-static",
       "quant-residual", "quant-static-residual", "quant-channel",
       "quant-channel-residual")

# What each op's byte count holds: the fewest bytes it can move, each array
# read or written once.
BYTES_MOVED = {
    "forward": "read x, scale; write y",
    "backward": "read x, dy, scale; write dx, d(scale)",
    "add": "read x, residual, scale; write y, h",
    "step": "read x, dy, scale; write y, dx, d(scale)",
    "quant": "read x, scale; write y_q (1 byte), row scales",
    "quant-static": "read x, scale; write y_q (1 byte)",
    "quant-residual": "read x, residual, scale; write y_q (1 byte), h, "
                      "row scales",
    "quant-static-residual": "read x, residual, scale; write y_q (1 byte), h",
    "quant-channel": "read x, scale, quant scale (N float32); write y_q "
                     "(1 byte)",
    "quant-channel-residual": "read x, residual, scale, quant scale (N "
                              "float32); write y_q (1 byte), h",
}


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


def timer() -> str:
  """What `measure_us` measures here."""
  if platform.on_cuda_gpu():
    return "CUPTI kernel time"
  return "wall clock (dispatch included)"


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


def step_bytes(m: int, n: int, dtype, scale_dtype) -> int:
  """Fewest bytes a forward and backward in one jit move: read x and dy,
  write y and dx; read the scale, write d(scale). (rstd stays on chip in
  the fewest-bytes ideal; the kernels write and read m float32s.)"""
  return (4 * m * n * np.dtype(dtype).itemsize
          + 2 * n * np.dtype(scale_dtype).itemsize)


def quant_bytes(op: str):
  """The byte count of a quantized op: x (and residual, h) in x's dtype,
  y_q one byte an element, the row scales float32 (dynamic), a static
  scale of one float32 a column ("channel")."""
  def count(m: int, n: int, dtype, scale_dtype) -> int:
    item = np.dtype(dtype).itemsize
    total = m * n * (item + 1) + n * np.dtype(scale_dtype).itemsize
    if "residual" in op:
      total += 2 * m * n * item
    if "channel" in op:
      total += 4 * n
    elif "static" not in op:
      total += 4 * m
    return total
  return count


OP_BYTES = {"forward": forward_bytes, "backward": backward_bytes,
            "add": add_bytes, "step": step_bytes,
            **{op: quant_bytes(op) for op in OPS if op.startswith("quant")}}
# The quantized ops' output dtype and static scale (one value, or one a
# column: this one times 0.5 to 2, varying from column to column).
QUANT_DTYPE = "float8_e4m3fn"
QUANT_STATIC_SCALE = 0.01


def channel_scale(n: int) -> jax.Array:
  """The "quant-channel" ops' static scale of one value a column."""
  return jnp.asarray(QUANT_STATIC_SCALE * (0.5 + (np.arange(n) % 7) / 4),
                     jnp.float32)


# The copy ceiling --------------------------------------------------------

COPY_KERNEL_NAME = "jax_rmsnorm_copy"
# (elements a program copies, warps): a power of two each (Triton's rule).
COPY_CONFIGS = ((4096, 4), (8192, 8), (16384, 16))


def _copy_kernel(x_ref, o_ref, *, total: int, block: int, cache_hints: bool):
  """Copies one block of the flat array; masked where the last block
  passes the end. cache_hints: the forward's (Config.cache_hints)."""
  load_hint, store_hint = triton_common.eviction_hints(cache_hints)
  if total % block == 0:
    plgpu.store(o_ref, plgpu.load(x_ref, **load_hint), **store_hint)
    return
  offsets = pl.program_id(0) * block + jax.lax.iota(jnp.int32, block)
  mask = offsets < total
  plgpu.store(o_ref, plgpu.load(x_ref, mask=mask, other=0.0, **load_hint),
              mask=mask, **store_hint)


def pallas_copy(x: jax.Array, *, block: int = 8192, num_warps: int = 8,
                num_stages: int = 1, cache_hints: bool = False,
                interpret: bool = False) -> jax.Array:
  """A device-to-device copy of `x` by a Pallas kernel (Triton backend):
  `block` elements a program (a power of two) over x as a flat array, read
  once and written once, with the forward's L2 eviction hints where
  `cache_hints` (they sped the copy up as much as the forward). The copy
  ceiling's second candidate, beside XLA's `x * 2`."""
  total = x.size
  block = min(block, pl.next_power_of_2(max(total, 1)))
  spec = pl.BlockSpec((block,), lambda i: (i,))
  out = pl.pallas_call(
      functools.partial(_copy_kernel, total=total, block=block,
                        cache_hints=cache_hints),
      out_shape=jax.ShapeDtypeStruct((total,), x.dtype),
      grid=(pl.cdiv(total, block),),
      in_specs=[spec],
      out_specs=spec,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name=COPY_KERNEL_NAME,
  )(x.reshape(total))
  return out.reshape(x.shape)


@functools.cache
def copy_ceiling(m: int, n: int, dtype: str, iterations: int = 20,
                 interpret: bool = False) -> dict:
  """The practical bandwidth ceiling at this shape: the faster of XLA's
  `x * 2` and the Pallas copy (`pallas_copy`, the fastest of
  COPY_CONFIGS, each with and without cache hints), each reading and
  writing m * n elements of `dtype`.

  Returns xla_copy_us, pallas_copy_us (None if no configuration ran and
  copied exactly), pallas_copy_config, copy_us (the faster), copy_is (which
  one) and copy_gbps. Cached per shape, so that every op of a run divides by
  the same ceiling.
  """
  x = jax.random.normal(jax.random.key(m * 131 + n), (m, n),
                        jnp.float32).astype(dtype)
  xla_us = measure_us(jax.jit(lambda a: a * 2), x, iterations=iterations)
  best, best_config = None, None
  for (block, warps), hints in itertools.product(COPY_CONFIGS, (False, True)):
    fn = jax.jit(functools.partial(pallas_copy, block=block, num_warps=warps,
                                   cache_hints=hints, interpret=interpret))
    try:
      if not bool(jnp.array_equal(fn(x), x)):
        raise ValueError("the copy differs from its input")
      us = measure_us(fn, x, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      # The ceiling falls back to XLA's copy; the row says so.
      logger.warning("pallas copy (block %d, %d warps, cache hints %s) at "
                     "%dx%d %s failed: %s", block, warps, hints, m, n, dtype,
                     str(e)[:300])
      continue
    if best is None or us < best:
      best, best_config = us, (f"block {block}, {warps} warps"
                               + (", cache hints" if hints else ""))
  pallas_faster = best is not None and best < xla_us
  copy_us = best if pallas_faster else xla_us
  return dict(xla_copy_us=xla_us, pallas_copy_us=best,
              pallas_copy_config=best_config, copy_us=copy_us,
              copy_is="pallas copy" if pallas_faster else "xla x * 2",
              copy_gbps=2 * x.nbytes / copy_us / 1e3)


# The ops -----------------------------------------------------------------

def _vjp_fn(kwargs):
  """(x, scale) -> the vjp function of rms_norm, holding its residuals."""
  def run(x, scale):
    fwd = functools.partial(api.rms_norm, **kwargs)
    return jax.vjp(fwd, x, scale)[1]
  return run


def xla_backward(x, scale, dy):
  """XLA's autodiff of the reference, forward included: XLA drops y, fuses
  the rstd recomputation into the backward's kernels. Its fastest form, and
  the form the peers were timed in."""
  return jax.vjp(api.rms_norm_reference, x, scale)[1](dy)


def step_fn(**kwargs):
  """y, dx and d(scale) of rms_norm(x, scale, **kwargs) from one function
  (jit it): the forward and backward of a training step."""
  def step(x, scale, dy):
    y, pull = jax.vjp(
        lambda x, s: api.rms_norm(x, s, **kwargs), x, scale)
    return (y, *pull(dy))
  return step


def _implementations(implementations) -> tuple[str, ...]:
  """XLA first (the baseline), then the others, once each."""
  names = ["xla"]
  for name in implementations:
    if name not in names:
      names.append(name)
  return tuple(names)


def bench_op(op: str, m: int, n: int, dtype: str, *,
             implementations=("triton",), iterations: int = 20,
             interpret: bool = False, scale_dtype=None) -> dict:
  """Checks and times one op on one shape beside XLA and the copy ceiling,
  same card, same run.

  op: "forward" (rms_norm), "backward" (dx and d(scale) of rms_norm from
  the residuals its forward saved, against XLA's autodiff of the reference,
  forward included), "add" (add_rms_norm; XLA runs the unfused add then
  norm), "step" (y, dx and d(scale) from one jit: the forward and its
  vjp, against the same with implementation="xla") or "quant..."
  (rms_norm_quantized to float8_e4m3fn, dynamic, "-static" (one scale) or
  "-channel" (a static scale a column), with or without "-residual"; XLA
  runs the reference: the norm, then the amax and the quantization, as
  many kernels as it fuses them into).
  implementations: the kernel families to run beside XLA, which always runs
  as the baseline, and "auto" for implementation=None (the speed table's
  choice). interpret: run the kernels in Pallas interpret mode (a
  CPU dry run of these code paths; its times mean nothing). scale_dtype:
  the scale's dtype (default x's; float32 is what Flax's RMSNorm gives,
  its param_dtype default).

  Returns one flat row (see the module docstring). Per implementation
  `name` (xla included): name_us, name_gbps, name_pct_copy,
  name_error_over_bound, name_ok; and, but for XLA, name_xla_ratio
  (time(xla) / time(name): > 1 is faster than XLA).
  """
  x, scale = testing.random_inputs(m * 131 + n, (m, n), dtype, scale_dtype)
  other, _ = testing.random_inputs(m * 131 + n + 1, (m, n), dtype)
  names = _implementations(implementations)
  nbytes = OP_BYTES[op](m, n, dtype, scale.dtype)
  row = dict(op=op, m=m, n=n, dtype=dtype, scale_dtype=str(scale.dtype),
             bytes=nbytes, bytes_moved=BYTES_MOVED[op], timer=timer(),
             implementations=" ".join(names))
  row.update(copy_ceiling(m, n, dtype, iterations, interpret))

  def kwargs(name):
    if name == "xla":
      return dict(implementation="xla")
    if name == "auto":  # implementation=None: what users get by default
      return dict(implementation=None)
    return dict(implementation=name, interpret=interpret)

  if op == "forward":
    ref = testing.oracle(x, scale)
    def make(name):
      fn = jax.jit(functools.partial(api.rms_norm, **kwargs(name)))
      return fn, (x, scale), lambda y: testing.worst_excess(y, ref, dtype, n)
  elif op == "add":
    h64 = testing.as_float64(x) + testing.as_float64(other)
    h_ref = np.asarray(reference.residual_add(x, other))
    ref = testing.oracle(h_ref, scale)
    def check(out):
      y, h = out
      # h: the float32 sum rounded once: bit for bit the reference's, and
      # within its bound of the exact sum.
      exact = testing.Worst(-np.inf if np.array_equal(np.asarray(h), h_ref)
                            else np.inf, ("h",))
      return testing.worst_of(testing.worst_excess(y, ref, dtype, n),
                              testing.worst_excess(h, h64, dtype, 1), exact)
    def make(name):
      fn = jax.jit(functools.partial(api.add_rms_norm, **kwargs(name)))
      return fn, (x, other, scale), check
  elif op == "backward":
    dy = other
    grads = testing.oracle_grad(x, scale, dy)
    def check(out):
      return testing.grads_excess(out[0], out[1], grads, dtype, scale.dtype)
    def make(name):
      if name == "xla":
        return jax.jit(xla_backward), (x, scale, dy), check
      # Ours: the backward pass alone, from the residuals its forward saved
      # (x and a float32 rstd per row), as it runs in a training step.
      vjp = jax.jit(_vjp_fn(kwargs(name)))(x, scale)
      return jax.jit(lambda f, g: f(g)), (vjp, dy), check
  elif op == "step":
    dy = other
    ref = testing.oracle(x, scale)
    grads = testing.oracle_grad(x, scale, dy)
    def check(out):
      y, dx, dscale = out
      return testing.worst_of(
          testing.worst_excess(y, ref, dtype, n),
          testing.grads_excess(dx, dscale, grads, dtype, scale.dtype))
    def make(name):
      return jax.jit(step_fn(**kwargs(name))), (x, scale, dy), check
  elif op.startswith("quant"):
    residual = other if "residual" in op else None
    static = (QUANT_STATIC_SCALE if "static" in op
              else channel_scale(n) if "channel" in op else None)
    h = None if residual is None else np.asarray(
        reference.residual_add(x, residual))
    y64 = testing.oracle(x if h is None else h, scale)
    rel = testing.quantized_relative_error(n)
    def check(out):
      out = out if isinstance(out, tuple) else (out,)
      y_q = out[0]
      s = static if static is not None else out[1]
      worst = [testing.quantized_excess(y_q, s, y64, QUANT_DTYPE, rel)]
      if static is None:
        worst.append(testing.scales_excess(out[1], y64, QUANT_DTYPE, n))
      if h is not None:
        worst.append(testing.Worst(
            -np.inf if np.array_equal(np.asarray(out[-1]), h) else np.inf,
            ("h",)))
      return testing.worst_of(*worst)
    def make(name):
      fn = jax.jit(functools.partial(
          api.rms_norm_quantized, quant_dtype=QUANT_DTYPE,
          quant_scale=static, **kwargs(name)))
      if residual is None:
        return fn, (x, scale), check
      return (jax.jit(lambda x, s, r: fn(x, s, residual=r)),
              (x, scale, residual), check)
  else:
    raise ValueError(f"unknown {op=}; choose from {OPS}")

  for name in names:
    try:
      fn, args, check_of = make(name)
      worst = check_of(fn(*args))
    except NotImplementedError as e:
      # A kernel family that does not run this shape (e.g. Mosaic at rows
      # not 16-byte aligned): the row says why; the others still run.
      row[f"{name}_refused"] = str(e)[:300]
      continue
    us = measure_us(fn, *args, iterations=iterations)
    gbps = nbytes / us / 1e3
    row.update({f"{name}_us": us, f"{name}_gbps": gbps,
                f"{name}_pct_copy": 100 * gbps / row["copy_gbps"]})
    if name != "xla":
      row[f"{name}_xla_ratio"] = row["xla_us"] / us
    row.update({f"{name}_error_over_bound": worst.ratio,
                f"{name}_ok": bool(worst.excess <= 0)})
  return row


def implementations_of(rows: list[dict]) -> list[str]:
  """The implementations timed beside XLA in benchmark rows, in order of
  appearance (new rows name them, and a record merged from two runs may
  hold rows that name different ones; older records have
  <name>_xla_ratio columns)."""
  names = []
  for row in rows:
    for name in row_implementations(row):
      if name != "xla" and name not in names:
        names.append(name)
  return names


def row_implementations(row: dict) -> list[str]:
  """The implementations one benchmark row ran (XLA included where named):
  one that ran and has no time refused the shape."""
  if "implementations" in row:
    return row["implementations"].split()
  return [key[:-len("_xla_ratio")] for key in row
          if key.endswith("_xla_ratio")]


# The self-check ----------------------------------------------------------

def check_all_ops(shape, dtype: str, *,
                  interpret: bool = False) -> testing.Worst:
  """The worst error over its bound (`testing.Worst`: excess <= 0, i.e.
  ratio <= 1, passes) of the Pallas kernels at one shape: rms_norm;
  add_rms_norm's y and h; gradients of rms_norm (dx, dscale) and of
  add_rms_norm with an upstream dh (dx, dresidual, dscale). For the main
  job's self-check and the sanitizer run."""
  n = shape[-1]
  kernel = dict(implementation="triton", interpret=interpret)
  x, scale = testing.random_inputs(len(shape) * n, shape, dtype, "float32")
  other, _ = testing.random_inputs(len(shape) * n + 1, shape, dtype)
  y = jax.jit(functools.partial(api.rms_norm, **kernel))(x, scale)
  worst = [testing.worst_excess(y, testing.oracle(x, scale), dtype, n)]
  y, h = jax.jit(functools.partial(api.add_rms_norm, **kernel))(
      x, other, scale)
  worst.append(testing.worst_excess(y, testing.oracle(h, scale), dtype, n))
  if not np.array_equal(np.asarray(h), np.asarray(
      reference.residual_add(x, other))):
    worst.append(testing.Worst(np.inf, ("h",)))

  # Gradients: rows past the backward kernel's limit take the reference's
  # gradient (the forward above is the kernel's, strictly).
  grad_kernel = dict(implementation=("triton", "xla"), interpret=interpret)

  def norm_loss(x, s):
    y = api.rms_norm(x, s, **grad_kernel)
    return jnp.sum(y.astype(jnp.float32) * other.astype(jnp.float32))

  dx, dscale = jax.jit(jax.grad(norm_loss, argnums=(0, 1)))(x, scale)
  worst.append(testing.grads_excess(
      dx, dscale, testing.oracle_grad(x, scale, other), dtype, "float32"))

  def add_loss(x, r, s):
    y, h = api.add_rms_norm(x, r, s, **grad_kernel)
    return jnp.sum(y.astype(jnp.float32) * other.astype(jnp.float32)
                   + h.astype(jnp.float32))

  dx, dres, dscale = jax.jit(jax.grad(add_loss, argnums=(0, 1, 2)))(
      x, other, scale)
  ref = testing.oracle_grad(h, scale, other, dh=np.ones(shape))
  worst.append(testing.grads_excess(dx, dscale, ref, dtype, "float32"))
  worst.append(testing.dx_excess(dres, ref, dtype))
  return testing.worst_of(*worst)


def check_quantized(shape, dtype: str, *,
                    interpret: bool = False) -> testing.Worst:
  """The quantized kernel's check at one shape (`testing.Worst`): y_q to
  float8_e4m3fn within half a quantization step of the float64 norm (values
  at a rounding tie come close to the bound by nature), and its per-token
  scales."""
  n = shape[-1]
  x, scale = testing.random_inputs(len(shape) * n, shape, dtype, "float32")
  y_q, row_scales = jax.jit(functools.partial(
      api.rms_norm_quantized, quant_dtype=QUANT_DTYPE,
      implementation="triton", interpret=interpret))(x, scale)
  y64 = testing.oracle(x, scale)
  return testing.worst_of(
      testing.quantized_excess(y_q, row_scales, y64, QUANT_DTYPE,
                               testing.quantized_relative_error(n)),
      testing.scales_excess(row_scales, y64, QUANT_DTYPE, n))


# Summaries and tables ----------------------------------------------------

def summarize(rows: list[dict], impl: str = "triton") -> dict:
  """The issue's bars for one implementation over the shapes it ran:
  worst slowdown, geometric mean, copy % of the large shapes, numerics;
  and how many shapes it refused (of those it was asked to run)."""
  rows = [r for r in rows if impl in row_implementations(r)]
  refused = sum(r.get(f"{impl}_us") is None for r in rows)
  rows = [r for r in rows if r.get(f"{impl}_us") is not None]
  if not rows:
    return dict(refused=refused, all_numerics_ok=True)
  ratios = [r[f"{impl}_xla_ratio"] for r in rows]
  large = [r for r in rows if r["m"] * r["n"] >= shapes.LARGE_ELEMENTS]
  return dict(
      geomean_xla_over_impl=math.exp(sum(map(math.log, ratios)) / len(ratios)),
      worst_impl_over_xla=max(1 / q for q in ratios),
      min_xla_over_impl_large=(min(r[f"{impl}_xla_ratio"] for r in large)
                               if large else None),
      min_pct_copy_large=(min(r[f"{impl}_pct_copy"] for r in large)
                          if large else None),
      worst_error_over_bound=max(r[f"{impl}_error_over_bound"] for r in rows),
      all_numerics_ok=all(r[f"{impl}_ok"] for r in rows),
      refused=refused)


def summaries(rows: list[dict]) -> dict:
  """summarize() of every implementation in the rows, by name."""
  return {impl: summarize(rows, impl) for impl in implementations_of(rows)}


def format_summary(summary: dict) -> str:
  return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in summary.items())


def format_table(rows: list[dict], impls=None) -> str:
  """A text table: copy ceiling, XLA, then each implementation's time,
  GB/s, % of copy, XLA / it and worst error / bound (<= 1 passes)."""
  impls = implementations_of(rows) if impls is None else list(impls)
  if isinstance(impls, str):
    impls = [impls]
  head = (f"{'dtype':9s} {'M x N':>13s} {'copy us':>8s} {'xla us':>8s} "
          f"{'err/bd':>6s}")
  for impl in impls:
    head += (f" | {impl + ' us':>10s} {'GB/s':>6s} {'%copy':>6s} "
             f"{'xla/' + impl:>11s} {'err/bd':>6s} ok")
  lines = [head]
  for r in rows:
    xla_error = r.get("xla_error_over_bound", math.nan)
    line = (f"{r['dtype']:9s} {r['m']:>6d}x{r['n']:<6d} {r['copy_us']:8.1f} "
            f"{r['xla_us']:8.1f} {xla_error:6.2f}")
    for impl in impls:
      if r.get(impl + "_us") is None:
        line += f" | {'refused':>10s} {'':41s}"
        continue
      line += (f" | {r[impl + '_us']:10.1f} {r[impl + '_gbps']:6.0f} "
               f"{r[impl + '_pct_copy']:6.1f} {r[impl + '_xla_ratio']:11.3f} "
               f"{r[impl + '_error_over_bound']:6.2f} "
               f"{'yes' if r[impl + '_ok'] else 'NO'}")
    lines.append(line)
  return "\n".join(lines)
