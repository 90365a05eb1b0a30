"""The Mosaic forward with each row split between 1, 2 or 4 warpgroups
(`Config.warpgroups`, `mosaic_config.row_slices`) against the Triton
forward, XLA and the copy ceiling (H200 sweep).

For every shape and every split the rows allow, the forward's own
configuration for that split (the measured table replaced by a forced
choice) is checked against the float64 oracle on the full batch, then all
of them are timed in alternating rounds, beside `rms_norm` with
implementation="triton" and "xla" and the copy ceiling of the same bytes
(`bench.copy_ceiling`). With `--quant`, the dynamic float8 output
(`rms_norm_quantized`) is timed the same way. Results go to a JSON file.

  python -m benchmarks.mosaic_forward_slices --out slices.json
"""

from __future__ import annotations

import functools
from unittest import mock

import jax

import jax_rmsnorm
from benchmarks import sweep
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.mosaic import config as mosaic_config
from jax_rmsnorm._src.mosaic import forward as mosaic_forward
from jax_rmsnorm._src.mosaic import quantize as mosaic_quantize

SHAPES = [(4096, 14336, "bfloat16"), (16384, 8192, "bfloat16"),
          (8192, 5120, "bfloat16"), (32768, 4096, "bfloat16"),
          (4096, 14336, "float32"), (16384, 8192, "float32"),
          (8192, 5120, "float32")]
EPS = 1e-6


def _forced(warpgroups: int):
  """A context in which the forward splits rows in `warpgroups` wherever
  they split (1: never, with the unsplit rows' chunks; JSON files of
  earlier runs forced 1 through the table, which reads bf16 rows in
  float32-sized chunks as split rows do)."""
  table = {} if warpgroups == 1 else {2: ((0, warpgroups),),
                                      4: ((0, warpgroups),)}
  return mock.patch.dict(mosaic_config.ROW_SLICES,
                         {"forward": table, "quant": table})


def run_shape(m: int, n: int, dtype: str, quant: bool,
              iterations: int) -> dict:
  x, scale = testing.random_inputs(1, (m, n), dtype)
  ref = testing.oracle(x, scale)
  row = {"m": m, "n": n, "dtype": dtype, "configs": {}}
  fwd, qfwd = {}, {}
  for w in (1, 2, 4):
    with _forced(w):
      base = sweep.launched_config(functools.partial(
          mosaic_forward.forward, epsilon=EPS, scale_offset=0.0), x, None,
                     scale)
      if base.warpgroups != w:
        continue  # The rows do not split in w.
      row["configs"][f"w{w}"] = str(base)
      fn = jax.jit(functools.partial(mosaic_forward.forward, epsilon=EPS,
                                     scale_offset=0.0, config=base))
      excess = testing.worst_excess(fn(x, None, scale).y, ref, dtype, n)[0]
      row[f"w{w}_excess"] = float(excess)
      fwd[f"w{w}"] = lambda x, s, fn=fn: fn(x, None, s).y
      if quant:
        qcfg = sweep.launched_config(functools.partial(
            mosaic_quantize.forward, epsilon=EPS, scale_offset=0.0,
            quant_dtype="float8_e4m3fn"), x, None, scale, None)
        row["configs"][f"quant_w{w}"] = str(qcfg)
        qfn = jax.jit(functools.partial(
            mosaic_quantize.forward, epsilon=EPS, scale_offset=0.0,
            quant_dtype="float8_e4m3fn", config=qcfg))
        qfwd[f"quant_w{w}"] = lambda x, s, fn=qfn: fn(x, None, s, None)[:2]
  for impl in ("triton", "xla"):
    fwd[impl] = jax.jit(functools.partial(jax_rmsnorm.rms_norm,
                                          implementation=impl))
    if quant:
      qfwd[f"quant_{impl}"] = jax.jit(functools.partial(
          jax_rmsnorm.rms_norm_quantized, quant_dtype="float8_e4m3fn",
          implementation=impl))
  row.update(bench.copy_ceiling(m, n, dtype, iterations=iterations))
  sweep.time_alternated(
      row, {name: (fn, (x, scale)) for name, fn in {**fwd, **qfwd}.items()},
      iterations=iterations)
  for key in fwd:
    row[f"{key}_pct_copy"] = 100 * row["copy_us"] / row[f"{key}_us"]
  return row


def main(argv=None) -> int:
  return sweep.main(
      argv, prog="python -m benchmarks.mosaic_forward_slices", doc=__doc__,
      shapes=SHAPES, run_shape=run_shape,
      add_arguments=lambda p: p.add_argument(
          "--quant", action="store_true",
          help="also the dynamic float8 output"),
      options=lambda args: dict(quant=args.quant))


if __name__ == "__main__":
  raise SystemExit(main())
