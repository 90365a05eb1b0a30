"""The Mosaic forward and its quantized outputs (`--kinds`: the forward,
float8 codes with a dynamic or a static scale, one value or one a column,
with a residual or not) launched with other block sizes, pipeline depths
and CTAs an SM than `get_config` picks, against the Triton kernel and the
copy ceiling (H200 sweep).

For every shape: the heuristic's configuration, the same with the
forward's chunks held in registers or read again from shared memory
(`Config.hold_chunks` flipped; alone with `--hold-only`), and each variant
of (ctas_per_sm, block_rows) with as many stages (2 to 4) as the shared
memory of that many CTAs holds; vec, the warpgroups and so every row's
arithmetic stay the heuristic's, so each variant's output must equal the
heuristic's bit for bit (checked on the full batch; the heuristic's own
forward against the float64 oracle), then all are timed in alternating
rounds (`sweep.time_alternated`) beside implementation="triton". With
`--columns-in-smem`, where the heuristic reads the per-column vectors from
GMEM, the launches with them in shared memory too. Results go to a JSON
file.

  python -m benchmarks.mosaic_forward_configs --kinds fwd quant --out c.json
  python -m benchmarks.mosaic_forward_configs --kinds channel --columns-in-smem
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jax_rmsnorm
from benchmarks import sweep
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.mosaic import common
from jax_rmsnorm._src.mosaic import config as mosaic_config
from jax_rmsnorm._src.mosaic import forward as mosaic_forward
from jax_rmsnorm._src.mosaic import quantize as mosaic_quantize

SHAPES = [(32768, 4096, "bfloat16"), (16384, 8192, "bfloat16"),
          (8192, 5120, "bfloat16"), (32768, 3072, "bfloat16"),
          (65536, 896, "bfloat16"), (32768, 4096, "float32")]
EPS = 1e-6
MAX_STAGES = 4


def variants(base: mosaic_config.Config, row_bytes: int,
             fixed_bytes: int, launches: bool = True,
             holds=None) -> dict[str, mosaic_config.Config]:
  """The heuristic's `base`, the base with the forward's chunks held in
  registers or read again (Config.hold_chunks flipped) and, with
  `launches`, for 1-4 CTAs an SM and blocks of 1 to 32 / vec rows (a power
  of two, or the base's; one row where warpgroups split rows), the deepest
  pipeline (2 to MAX_STAGES) whose stages of `row_bytes` a row fit in
  shared memory beside `fixed_bytes`; each launch holds its chunks where
  `holds(config)` says (the heuristic's rule; default: as the base)."""
  out = {"base": base,
         "base_hold" if not base.hold_chunks else "base_reread":
             dataclasses.replace(base, hold_chunks=not base.hold_chunks)}
  if not launches:
    return out
  block_rows = [1] if base.warpgroups > 1 else sorted(
      {b for b in (1, 2, 4, 8) if b * base.vec <= 32} | {base.block_rows})
  for ctas in (1, 2, 3, 4):
    room = mosaic_config.smem_budget(ctas) - fixed_bytes
    for rows in block_rows:
      stages = min(MAX_STAGES, room // (rows * row_bytes))
      if stages < 2:  # One stage waits for every load: not a contender.
        continue
      config = dataclasses.replace(base, ctas_per_sm=ctas, block_rows=rows,
                                   stages=stages)
      if holds is not None:
        config = dataclasses.replace(config, hold_chunks=holds(config))
      if config != base:
        out[f"c{ctas}_b{rows}_s{stages}"] = config
  return out


STATIC_SCALE = 0.05


def kinds(n: int, itemsize: int) -> dict:
  """kind -> (mosaic(config) -> fn, the Triton kernel's fn, shared memory
  bytes of one row in one stage, totals a split row hands over); every fn
  maps (x, residual, scale) to its outputs. "fwd": y; "quant": dynamic
  float8 codes and row scales; "static": codes of a static scale (one
  value); "channel": of a static scale a column; "residual": the dynamic
  codes, row scales and h of x + residual; "static-residual": the static
  scale's codes and h."""
  eps = dict(epsilon=EPS, scale_offset=0.0)
  q = dict(quant_dtype="float8_e4m3fn")
  static = jnp.float32(STATIC_SCALE)
  channel = jnp.full((n,), STATIC_SCALE, jnp.float32)
  triton = dict(implementation="triton")
  return {
      "fwd": (lambda c: lambda x, r, s: mosaic_forward.forward(
          x, None, s, config=c, **eps)[:1],
              lambda x, r, s: jax_rmsnorm.rms_norm(x, s, **triton),
              n * itemsize, 1),
      "quant": (lambda c: lambda x, r, s: mosaic_quantize.forward(
          x, None, s, None, config=c, **eps, **q)[:2],
                lambda x, r, s: jax_rmsnorm.rms_norm_quantized(
                    x, s, **q, **triton),
                n * (itemsize + 1), 2),
      "static": (lambda c: lambda x, r, s: mosaic_quantize.forward(
          x, None, s, static, config=c, **eps, **q)[:1],
                 lambda x, r, s: jax_rmsnorm.rms_norm_quantized(
                     x, s, quant_scale=static, **q, **triton),
                 n * (itemsize + 1), 1),
      "channel": (lambda c: lambda x, r, s: mosaic_quantize.forward(
          x, None, s, channel, config=c, **eps, **q)[:1],
                  lambda x, r, s: jax_rmsnorm.rms_norm_quantized(
                      x, s, quant_scale=channel, **q, **triton),
                  n * (itemsize + 1), 1),
      "residual": (lambda c: lambda x, r, s: mosaic_quantize.forward(
          x, r, s, None, config=c, **eps, **q),
                   lambda x, r, s: jax_rmsnorm.rms_norm_quantized(
                       x, s, residual=r, **q, **triton),
                   n * (2 * itemsize + 1), 2),
      "static-residual": (lambda c: lambda x, r, s: mosaic_quantize.forward(
          x, r, s, static, config=c, **eps, **q)[::2],
                          lambda x, r, s: jax_rmsnorm.rms_norm_quantized(
                              x, s, residual=r, quant_scale=static, **q,
                              **triton),
                          n * (2 * itemsize + 1), 1),
  }


def run_shape(m: int, n: int, dtype: str, kinds_run: list[str],
              launches: bool, columns_in_smem: bool, iterations: int
              ) -> dict:
  x, scale = testing.random_inputs(1, (m, n), dtype)
  residual = testing.random_inputs(2, (m, n), dtype)[0]
  args = (x, residual, scale)
  itemsize = jnp.dtype(dtype).itemsize
  row = {"m": m, "n": n, "dtype": dtype, "configs": {}}
  fns = {}
  for kind in kinds_run:
    mosaic, triton, row_bytes, totals = kinds(n, itemsize)[kind]
    base = sweep.launched_config(mosaic(None), *args)
    # The scale (and a per-channel reciprocal), and where rows split the
    # totals handed over.
    fixed = n * itemsize + 4 * n * (kind == "channel") + (
        common.RowTotals.smem_bytes(totals, base.warpgroups,
                                    base.chunk_cols))
    chunks = common.Chunks(n // base.warpgroups, base.chunk_cols)
    holds = lambda c, chunks=chunks: mosaic_config.forward_holds_chunks(
        c, chunks.count + chunks.has_tail, chunks.count <= chunks.UNROLL)
    expected = None
    configs = variants(base, row_bytes, fixed, launches, holds)
    if columns_in_smem and not base.scale_in_smem:
      configs.update({f"smem_{name}": config for name, config in variants(
          dataclasses.replace(base, scale_in_smem=True), row_bytes, fixed,
          True, holds).items()})
    for name, config in configs.items():
      fn = jax.jit(mosaic(config))
      try:
        out = jax.block_until_ready(fn(*args))
      except Exception as e:  # pylint: disable=broad-except
        row[f"{kind}_{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        continue
      out = [np.asarray(o.astype(jnp.float32)) for o in out if o is not None]
      if expected is None:
        expected = out
        if kind == "fwd":
          row["fwd_base_excess"] = float(testing.worst_excess(
              out[0], testing.oracle(x, scale), dtype, n)[0])
      same = all(np.array_equal(a, b, equal_nan=True)
                 for a, b in zip(out, expected))
      row[f"{kind}_{name}_same"] = bool(same)
      row["configs"][f"{kind}_{name}"] = str(config)
      if same:
        fns[f"{kind}_{name}"] = fn
    fns[f"{kind}_triton"] = jax.jit(triton)
  row.update(bench.copy_ceiling(m, n, dtype, iterations=iterations))
  sweep.time_alternated(row, {name: (fn, args) for name, fn in fns.items()},
                        iterations=iterations)
  for kind in kinds_run:
    timed = [k for k in fns
             if k.startswith(kind + "_") and not k.endswith("triton")]
    if timed:
      row[f"{kind}_best"] = min(timed, key=lambda k: row[f"{k}_us"])
  return row


def main(argv=None) -> int:
  return sweep.main(
      argv, prog="python -m benchmarks.mosaic_forward_configs", doc=__doc__,
      shapes=SHAPES, run_shape=run_shape,
      add_arguments=_add_arguments,
      options=lambda args: dict(kinds_run=args.kinds,
                                launches=not args.hold_only,
                                columns_in_smem=args.columns_in_smem))


def _add_arguments(parser) -> None:
  parser.add_argument(
      "--kinds", nargs="+", default=["fwd", "quant"],
      choices=("fwd", "quant", "static", "channel", "residual",
               "static-residual"),
      help="what to sweep (default: the forward and the dynamic float8 "
      "output)")
  parser.add_argument(
      "--hold-only", action="store_true",
      help="only the heuristic's launch, with its chunks held and read "
      "again (Config.hold_chunks)")
  parser.add_argument(
      "--columns-in-smem", action="store_true",
      help="where the heuristic reads the scale (and a per-channel "
      "reciprocal) from GMEM, also every launch with them in shared memory "
      "(Config.scale_in_smem)")


if __name__ == "__main__":
  raise SystemExit(main())
