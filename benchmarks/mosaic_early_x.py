"""Does the Mosaic backward's early release of x's buffer pay? (H200 sweep)

Where shared memory holds one stage only (float32 rows of 12288 to 16384,
four warpgroups a row), the next row used to be loaded only after this one
was computed and stored. With `Config.early_x` the first pass keeps xhat in
registers, x's buffer takes the next row at once and dx goes out through
dy's buffer. This times, in one run on one card, alternating the variants:

- the backward alone (from the saved rstd), the heuristic's choice against
  the same configuration without early_x (and, for bf16, whose rows get two
  stages, one stage with early_x against the default two);
- the training step (y, dx and d(scale) from one jit, `bench.step_fn`) with
  the public API's automatic choice, with and without early_x, beside XLA's.

Each variant's dx and d(scale) are checked against the float64 oracle on
the full batch first. Results go to a JSON file.

  python -m benchmarks.mosaic_early_x --out early_x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import bench
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.mosaic import backward as mosaic_backward
from jax_rmsnorm._src.mosaic import config as mosaic_config

SHAPES = [(4096, 14336, "float32"), (2048, 16384, "float32"),
          (4096, 12288, "float32"), (4096, 14336, "bfloat16")]
EPS = 1e-6
ROUNDS = 3


def _default_config(x, dy, scale, rstd) -> mosaic_config.Config:
  """The configuration the backward picks (it logs it; this asks it)."""
  seen = []
  original = mosaic_backward.common.launch

  def spy(body, **kwargs):
    seen.append(body.keywords["config"])
    return original(body, **kwargs)

  mosaic_backward.common.launch = spy
  try:
    jax.eval_shape(functools.partial(mosaic_backward.backward,
                                     scale_offset=0.0), x, dy, None, scale,
                   rstd)
  finally:
    mosaic_backward.common.launch = original
  return seen[0]


def _without_early_x():
  """A context in which the heuristic never releases x early."""
  class _Off:
    def __enter__(self):
      self.saved = mosaic_config.backward_early_x
      mosaic_config.backward_early_x = lambda *a, **k: False

    def __exit__(self, *exc):
      mosaic_config.backward_early_x = self.saved
  return _Off()


def run_shape(m: int, n: int, dtype: str, iterations: int) -> dict:
  x, scale = testing.random_inputs(1, (m, n), dtype)[:2]
  scale = scale.astype(jnp.float32)
  dy = testing.random_inputs(2, (m, n), dtype)[0]
  rstd = reference.forward(x, None, scale, epsilon=EPS, scale_offset=0.0,
                           save_rstd=True).rstd
  base = _default_config(x, dy, scale, rstd)
  variants = {}
  if base.early_x:
    variants["early_x"] = base
    variants["no_early_x"] = dataclasses.replace(base, early_x=False)
    if base.scale_in_smem:  # Does where the scale is read from matter?
      for name in ("early_x", "no_early_x"):
        variants[name + "_scale_gmem"] = dataclasses.replace(
            variants[name], scale_in_smem=False)
  else:
    variants["default"] = base
    variants["one_stage_early_x"] = dataclasses.replace(
        base, stages=1, early_x=True, scale_in_smem=False)
  for name, cfg in list(variants.items()):
    if cfg.warpgroups > 1 and not cfg.scale_in_smem:
      variants[name + "_scale_regs"] = dataclasses.replace(
          cfg, scale_in_registers=True)
  row = {"m": m, "n": n, "dtype": dtype,
         "configs": {k: str(v) for k, v in variants.items()}}
  grads = testing.oracle_grad(x, scale, dy, EPS, 0.0)
  bwd = {}
  for name, cfg in variants.items():
    fn = jax.jit(functools.partial(mosaic_backward.backward, scale_offset=0.0,
                                   config=cfg))
    dx, dscale = fn(x, dy, None, scale, rstd)
    worst = testing.grads_excess(dx, dscale, grads, dtype, "float32")
    row[f"{name}_excess"] = float(worst.excess)
    bwd[name] = fn
  step_auto = jax.jit(bench.step_fn())
  with _without_early_x():
    step_off = jax.jit(bench.step_fn())
    jax.block_until_ready(step_off(x, scale, dy))  # Traced without it.
  steps = {"xla": jax.jit(bench.step_fn(implementation="xla")),
           "auto": step_auto, "auto_no_early_x": step_off}
  times = {}
  for _ in range(ROUNDS):  # Alternate, so that drift hits every variant.
    for name, fn in bwd.items():
      times.setdefault(f"bwd_{name}", []).append(bench.measure_us(
          fn, x, dy, None, scale, rstd, iterations=iterations))
    for name, fn in steps.items():
      times.setdefault(f"step_{name}", []).append(bench.measure_us(
          fn, x, scale, dy, iterations=iterations))
  for key, values in times.items():
    row[key] = statistics.median(values)
    row[key + "_runs"] = values
  row["xla_over_auto_step"] = row["step_xla"] / row["step_auto"]
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.mosaic_early_x", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None)
  parser.add_argument("--iterations", type=int, default=30)
  parser.add_argument("--shape", nargs=3, action="append",
                      metavar=("M", "N", "DTYPE"),
                      help="a shape to run instead of the list (repeat)")
  args = parser.parse_args(argv)
  shapes = ([(int(m), int(n), d) for m, n, d in args.shape] if args.shape
            else SHAPES)
  result = {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
            "timer": bench.timer(), "rows": []}
  for m, n, dtype in shapes:
    row = run_shape(m, n, dtype, args.iterations)
    result["rows"].append(row)
    print(json.dumps({k: v for k, v in row.items()
                      if not k.endswith("_runs")}), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
