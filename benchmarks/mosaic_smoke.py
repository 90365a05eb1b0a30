"""Smoke test of the Mosaic GPU kernels on a Hopper GPU (JAX 0.11.2).

Per shape: the compiled Mosaic forward and backward against the float64
oracle (on a sample of rows; d(scale) against XLA's float32 sum), a batch
invariance probe (the first rows alone give the same bits), then CUPTI
kernel times beside the Triton kernels and XLA. Every step catches and
prints its own exception, so one failing shape costs nothing else; a compact
table comes at the end.

  python -m benchmarks.mosaic_smoke             # 15 shapes: ~75 s, H200
  python -m benchmarks.mosaic_smoke --quick     # four shapes
  python -m benchmarks.mosaic_smoke --no-time   # correctness only, ~60 s
  python -m benchmarks.mosaic_smoke --sweep     # + configs around the
                                                #   default: ~45 s more

Columns: us = median CUPTI microseconds of the kernels of one call (the
forwards compute y only; the backwards start from the saved rstd); "copy" is
XLA's x * 2 (read + write x); GB/s for the Mosaic forward from the fewest
bytes it must move (`bench.forward_bytes`); "fwd ok" = max excess over the
float64 oracle's bound (<= 0 passes); "bwd ok" = dx's error in units of its
bound (<= 1 passes) and d(scale)'s relative distance from XLA's float32 sum;
"inv" = the first rows alone gave the same bits.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jax_rmsnorm._src import bench
from jax_rmsnorm._src import reference

SHAPES = [  # (rows, n, dtype): the benchmark list's large shapes, then small ones.
    (32768, 4096, "bfloat16"),
    (16384, 8192, "bfloat16"),
    (32768, 3072, "bfloat16"),
    (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"),
    (8192, 5120, "bfloat16"),
    (32768, 4096, "float32"),
    (4096, 14336, "float32"),
    (2048, 4096, "bfloat16"),
    (256, 4096, "bfloat16"),
    (16, 4096, "bfloat16"),
    (1, 8192, "bfloat16"),
    (13, 5120, "bfloat16"),
    (64, 1000, "bfloat16"),   # n not a multiple of 128: overlapping tail
    (4096, 4099, "bfloat16"),  # refused (rows not 16-byte aligned)
]
QUICK = [(32768, 4096, "bfloat16"), (4096, 14336, "bfloat16"),
         (65536, 896, "bfloat16"), (13, 5120, "bfloat16")]
EPS = 1e-6
SAMPLE_ROWS = 96  # rows compared against the float64 oracle per shape


def _short(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".replace("\n", " ")
  return text[:160]


def _kernels():
  """{name: (forward, backward)} of the implementations present."""
  out = {}
  for name in ("mosaic", "triton"):
    try:
      fwd = importlib.import_module(f"jax_rmsnorm._src.{name}.forward")
      bwd = importlib.import_module(f"jax_rmsnorm._src.{name}.backward")
      out[name] = (fwd.forward, bwd.backward)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name} kernels not importable:", _short(e))
  out["xla"] = (reference.forward, reference.backward)
  return out


def _fwd(fn, save_rstd=True):
  """(x, w) -> (y, rstd) (or (y,): what inference runs, and what XLA
  fuses into one kernel)."""
  def run(x, w):
    out = fn(x, None, w, epsilon=EPS, scale_offset=0.0, save_rstd=save_rstd)
    return (out.y, out.rstd) if save_rstd else (out.y,)
  return jax.jit(run)


def _inputs(seed: int, shape, dtype):
  """x ~ N(0, 1) and scale ~ 1 + 0.1 N(0, 1), as the benchmarks draw them."""
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(ks, tuple(shape[-1:]), jnp.float32)
  return x, scale.astype(dtype)


def _probe_rows(m: int, n: int) -> int:
  """A few rows, as many as a block of the Mosaic kernels may hold."""
  from jax_rmsnorm._src.mosaic import config  # pylint: disable=g-import-not-at-top
  multiple = config.row_multiple(n)
  return min(m - 1, max(multiple, 7 // multiple * multiple))


def _bwd(fn):
  return jax.jit(lambda x, dy, w, rstd: fn(x, dy, None, w, rstd,
                                           scale_offset=0.0))


def _sample(m: int) -> np.ndarray:
  rows = np.unique(np.concatenate([
      np.arange(min(m, SAMPLE_ROWS // 3)),
      np.arange(max(0, m - SAMPLE_ROWS // 3), m),
      np.random.default_rng(0).integers(0, m, SAMPLE_ROWS // 3)]))
  return rows


# The float64 oracle and bounds, written out here (the package's testing
# module may change its API): one rounding to the dtype at the end, after
# float32 sums of n terms (4 sqrt(n) 2**-24, a 4-sigma random walk).
def _f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _tol(dtype, n: int) -> float:
  return float(jnp.finfo(dtype).eps) + 4 * np.sqrt(n) * 2.0**-24


def _forward_excess(y, x, w, dtype) -> float:
  """max over elements of |y - oracle| - tol * |oracle| (<= 0 passes)."""
  x, w = _f64(x), _f64(w)
  rstd = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
  ref = x * rstd * w
  bound = _tol(dtype, x.shape[-1]) * np.abs(ref) + float(
      jnp.finfo(dtype).tiny)
  excess = np.abs(_f64(y) - ref) - bound
  excess[~np.isfinite(_f64(y))] = np.inf
  return float(excess.max())


def _dx_error(dx, x, w, dy, dtype) -> float:
  """||dx - oracle|| / ||rstd * g|| over the tolerance of a dx element."""
  x, w, dy = _f64(x), _f64(w), _f64(dy)
  rstd = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
  xhat, g = x * rstd, dy * w
  ref = rstd * (g - xhat * np.mean(g * xhat, -1, keepdims=True))
  size = max(np.linalg.norm(ref), np.linalg.norm(rstd * g))
  err = np.linalg.norm(_f64(dx) - ref) / size
  return float(err / (2 * _tol(dtype, x.shape[-1])))


def check_shape(m, n, dtype, kernels, row: dict) -> dict:
  """Correctness of the compiled Mosaic kernels; fills `row`, returns the
  arrays for timing."""
  x, w = _inputs(1, (m, n), dtype)
  dy = _inputs(2, (m, n), dtype)[0]
  arrays = dict(x=x, w=w, dy=dy)
  if "mosaic" not in kernels:
    return arrays
  mfwd, mbwd = kernels["mosaic"]
  rows = _sample(m)
  k = _probe_rows(m, n)
  try:
    y, rstd = jax.block_until_ready(_fwd(mfwd)(x, w))
    arrays["rstd"] = rstd
    excess = _forward_excess(y[rows], x[rows], w, dtype)
    xs = _f64(x[rows])
    rstd_ref = 1 / np.sqrt(np.mean(xs * xs, -1) + EPS)
    rstd_err = float(np.max(np.abs(_f64(rstd[rows]) / rstd_ref - 1)))
    row["fwd ok"] = f"{excess:.2g}" + ("" if rstd_err < 1e-5 else
                                       f" rstd {rstd_err:.1g}")
    if k >= 1:  # The first rows alone give the same bits.
      y_few = _fwd(mfwd)(x[:k], w)[0]
      same = bool(np.array_equal(np.asarray(y_few), np.asarray(y[:k])))
      row["fwd ok"] += " inv" if same else " NOT-INVARIANT"
  except Exception as e:  # pylint: disable=broad-except
    row["fwd ok"] = "ERR " + _short(e)
    traceback.print_exc(limit=4)
    return arrays
  try:
    dx, dw = jax.block_until_ready(_bwd(mbwd)(x, dy, w, rstd))
    dx_err = _dx_error(dx[rows], x[rows], w, dy[rows], dtype)
    # d(scale) sums every row: against XLA's float32 sum of the same terms.
    _, dw_ref = jax.jit(functools.partial(reference.backward,
                                          scale_offset=0.0))(
        x, dy, None, w, rstd)
    dw_err = float(np.linalg.norm(_f64(dw) - _f64(dw_ref))
                   / np.linalg.norm(_f64(dw_ref)))
    row["bwd ok"] = (f"dx {dx_err:.2g}tol dw {dw_err:.1g}"
                     + ("" if dw.dtype == jnp.float32 else " dw-not-f32"))
    if k >= 1:
      dx_few = _bwd(mbwd)(x[:k], dy[:k], w, rstd[:k])[0]
      same = bool(np.array_equal(np.asarray(dx_few), np.asarray(dx[:k])))
      row["bwd ok"] += " inv" if same else " NOT-INVARIANT"
  except Exception as e:  # pylint: disable=broad-except
    row["bwd ok"] = "ERR " + _short(e)
    traceback.print_exc(limit=4)
  return arrays


def time_shape(m, n, dtype, kernels, arrays, row: dict, iterations: int):
  x, w, dy = arrays["x"], arrays["w"], arrays["dy"]
  try:
    row["copy"] = bench.measure_us(jax.jit(lambda x: x * 2), x,
                                   iterations=iterations)
  except Exception as e:  # pylint: disable=broad-except
    row["copy"] = "ERR " + _short(e)
  rstd = arrays.get("rstd")
  if rstd is None:
    rstd = reference.forward(x, None, w, epsilon=EPS, scale_offset=0.0,
                             save_rstd=True).rstd
  for name, (fwd, bwd) in kernels.items():
    for op, fn, args in (("fwd", _fwd(fwd, save_rstd=False), (x, w)),
                         ("bwd", _bwd(bwd), (x, dy, w, rstd))):
      try:
        row[f"{name} {op}"] = bench.measure_us(fn, *args,
                                               iterations=iterations)
      except Exception as e:  # pylint: disable=broad-except
        row[f"{name} {op}"] = "ERR " + _short(e)
  us = row.get("mosaic fwd")
  if isinstance(us, float):
    row["mosaic fwd GB/s"] = bench.forward_bytes(m, n, dtype, dtype) / (
        us * 1e3)


SWEEP = [("fwd", 65536, 896, "bfloat16"), ("fwd", 4096, 14336, "float32"),
         ("fwd", 32768, 4096, "bfloat16"), ("bwd", 32768, 4096, "bfloat16"),
         ("bwd", 4096, 14336, "bfloat16"), ("bwd", 65536, 896, "bfloat16")]


def sweep(iterations: int) -> None:
  """Times launch configurations around the default one (config.py's
  heuristic) at a few shapes: what to tune next."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  kernels = _kernels()
  if "mosaic" not in kernels:
    return
  from jax_rmsnorm._src.mosaic import common, config as mconfig  # pylint: disable=g-import-not-at-top
  for op, m, n, dtype in SWEEP:
    x, w = _inputs(1, (m, n), dtype)
    dy = _inputs(2, (m, n), dtype)[0]
    rstd = reference.forward(x, None, w, epsilon=EPS, scale_offset=0.0,
                             save_rstd=True).rstd
    fwd, bwd = kernels["mosaic"]
    if op == "fwd":
      tiles, fixed, extra = [x.dtype], 0, [w.dtype]
    else:
      tiles, extra = [x.dtype, dy.dtype], [w.dtype, jnp.float32]
      vec = mconfig.pick_vec(n, 4)
      fixed = 4 * common.Chunks(n, 128 * vec).padded_cols
    base = mconfig.get_config(
        n, n * sum(jnp.dtype(d).itemsize for d in tiles),
        max(jnp.dtype(d).itemsize for d in tiles + extra), fixed, 1,
        n * w.dtype.itemsize)
    variants = {base}
    for rows in {base.block_rows, max(1, base.block_rows // 2),
                 base.block_rows * 2}:
      for stages in (2, 3):
        for ctas in (1, 2):
          for scale_in_smem in (True, False) if n >= 8192 else (True,):
            variants.add(dataclasses.replace(
                base, block_rows=rows, stages=stages, ctas_per_sm=ctas,
                scale_in_smem=scale_in_smem))
    row_bytes = n * sum(jnp.dtype(d).itemsize for d in tiles)
    for cfg in sorted(variants, key=str):
      smem = (cfg.stages * cfg.block_rows * row_bytes + fixed
              + n * w.dtype.itemsize * cfg.scale_in_smem)
      if smem > mconfig.smem_budget(1):
        continue
      try:
        if op == "fwd":
          fn = jax.jit(lambda x, w, cfg=cfg: fwd(
              x, None, w, epsilon=EPS, scale_offset=0.0, config=cfg).y)
          us = bench.measure_us(fn, x, w, iterations=iterations)
        else:
          fn = jax.jit(lambda x, dy, w, r, cfg=cfg: bwd(
              x, dy, None, w, r, scale_offset=0.0, config=cfg))
          us = bench.measure_us(fn, x, dy, w, rstd, iterations=iterations)
        text = f"{us:8.1f} us"
      except Exception as e:  # pylint: disable=broad-except
        text = "ERR " + _short(e)[:90]
      mark = "*" if cfg == base else " "
      print(f"sweep {op} {dtype[:4]} {m}x{n} {mark} rows={cfg.block_rows} "
            f"stages={cfg.stages} ctas/sm={cfg.ctas_per_sm} "
            f"scale_smem={cfg.scale_in_smem}: {text}", flush=True)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.1f}"
  return "-" if value is None else str(value)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.mosaic_smoke", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-time", action="store_true")
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--sweep", action="store_true",
                      help="also time configurations around the default")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  kernels = _kernels()
  shapes = QUICK if args.quick else SHAPES
  table = []
  for m, n, dtype in shapes:
    row = {"shape": f"{dtype[:4]} {m}x{n}"}
    table.append(row)
    start = time.perf_counter()
    print(f"--- {row['shape']}", flush=True)
    try:
      from jax_rmsnorm._src.mosaic import common  # pylint: disable=g-import-not-at-top
      common.check_supported(m, n, dtype)
      common.check_supported(m, n, dtype, backward=True)
    except Exception as e:  # pylint: disable=broad-except
      row["fwd ok"] = "refused: " + _short(e)[:60]
    try:
      arrays = check_shape(m, n, dtype, kernels, row) if "fwd ok" not in row \
          else dict(zip(("x", "w"), _inputs(1, (m, n), dtype)),
                    dy=_inputs(2, (m, n), dtype)[0])
      if not args.no_time:
        time_shape(m, n, dtype, kernels, arrays, row, args.iterations)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = _short(e)
      traceback.print_exc(limit=4)
    print("   ", {k: _fmt(v) for k, v in row.items()},
          f"({time.perf_counter() - start:.0f} s)", flush=True)

  columns = ["shape", "fwd ok", "bwd ok", "copy", "mosaic fwd",
             "triton fwd", "xla fwd", "mosaic fwd GB/s", "mosaic bwd",
             "triton bwd", "xla bwd", "error"]
  columns = [c for c in columns if any(c in r for r in table)]
  cells = [[_fmt(r.get(c)) for c in columns] for r in table]
  widths = [max(len(c), *(len(row[i]) for row in cells))
            for i, c in enumerate(columns)]
  widths = [min(w, 48) for w in widths]
  print()
  print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print(" | ".join(v[:w].ljust(w) for v, w in zip(row, widths)))
  print("\nus: median CUPTI microseconds; xla bwd = reference.backward "
        "from saved rstd; ok: excess over tolerance (<= 0 passes), "
        "dx in units of its tolerance (<= 1 passes), dw relative to XLA's, "
        "inv = batch invariant")
  if args.sweep:
    sweep(args.iterations)
  return 0


if __name__ == "__main__":
  sys.exit(main())
