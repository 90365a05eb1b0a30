"""The Mosaic backward's heuristic choice against its variants (H200 sweep).

Where a backward's rows are split between warpgroups and the scale does
not fit in shared memory, the heuristic holds each warpgroup's chunks of
the scale in registers (`Config.scale_in_registers`), rather than read
them from GMEM in every chunk of both passes. This times, in one run on one
card, alternating the variants:

- the backward alone (from the saved rstd): the heuristic's configuration
  against the same with the scale held or not;
- the training step (y, dx and d(scale) from one jit, `bench.step_fn`) with
  the public API's automatic choice, with and without the heuristic's
  choice, beside XLA's.

Each variant's dx and d(scale) are checked against the float64 oracle on
the full batch first. Results go to a JSON file. The scale is float32 by
default, as Flax's RMSNorm makes it (param_dtype).

  python -m benchmarks.mosaic_backward_variants --out variants.json

(Commit 4cc456b also had a variant releasing x's buffer early in one
stage, `mosaic_early_x_h200.json`; with the scale held it lost at 4096 x
14336, 183.5 against 177.8 us, `mosaic_scale_regs_h200.json`, and was
removed.)
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import jax

from benchmarks import sweep
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.mosaic import backward as mosaic_backward
from jax_rmsnorm._src.mosaic import config as mosaic_config

SHAPES = [(4096, 14336, "bfloat16"), (16384, 8192, "bfloat16"),
          (4096, 14336, "float32"), (2048, 16384, "float32")]
EPS = 1e-6


def _without_held_scale():
  """A context in which the heuristic never holds the scale."""
  return mock.patch.object(mosaic_config, "backward_scale_in_registers",
                           lambda *args: False)


def run_shape(m: int, n: int, dtype: str, scale_dtype: str,
              iterations: int) -> dict:
  x, scale = testing.random_inputs(1, (m, n), dtype, scale_dtype)
  dy = testing.random_inputs(2, (m, n), dtype)[0]
  rstd = reference.forward(x, None, scale, epsilon=EPS, scale_offset=0.0,
                           save_rstd=True).rstd
  base = sweep.launched_config(functools.partial(
      mosaic_backward.backward, scale_offset=0.0), x, dy, None, scale, rstd)
  variants = {"default": base}
  if base.warpgroups > 1 and not base.scale_in_smem:
    variants["scale_held" if not base.scale_in_registers
             else "scale_not_held"] = dataclasses.replace(
                 base, scale_in_registers=not base.scale_in_registers)
  row = {"m": m, "n": n, "dtype": dtype, "scale_dtype": scale_dtype,
         "configs": {k: str(v) for k, v in variants.items()}}
  grads = testing.oracle_grad(x, scale, dy, EPS, 0.0)
  bwd = {}
  for name, cfg in variants.items():
    fn = jax.jit(functools.partial(mosaic_backward.backward, scale_offset=0.0,
                                   config=cfg))
    dx, dscale = fn(x, dy, None, scale, rstd)
    worst = testing.grads_excess(dx, dscale, grads, dtype, scale_dtype)
    row[f"{name}_excess"] = float(worst.excess)
    bwd[name] = fn
  step_auto = jax.jit(bench.step_fn())
  with _without_held_scale():
    step_off = jax.jit(bench.step_fn())
    jax.block_until_ready(step_off(x, scale, dy))  # Traced without it.
  steps = {"xla": jax.jit(bench.step_fn(implementation="xla")),
           "auto": step_auto, "auto_not_held": step_off}
  timed = {f"bwd_{name}": (fn, (x, dy, None, scale, rstd))
           for name, fn in bwd.items()}
  timed.update({f"step_{name}": (fn, (x, scale, dy))
                for name, fn in steps.items()})
  sweep.time_alternated(row, timed, iterations=iterations, suffix="")
  row["xla_over_auto_step"] = row["step_xla"] / row["step_auto"]
  return row


def main(argv=None) -> int:
  return sweep.main(
      argv, prog="python -m benchmarks.mosaic_backward_variants",
      doc=__doc__, shapes=SHAPES, run_shape=run_shape,
      add_arguments=lambda p: p.add_argument("--scale-dtype",
                                             default="float32"),
      options=lambda args: dict(scale_dtype=args.scale_dtype))


if __name__ == "__main__":
  raise SystemExit(main())
