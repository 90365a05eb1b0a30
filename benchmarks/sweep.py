"""What the H200 variant sweeps share (`mosaic_forward_slices`,
`mosaic_backward_variants`): the configuration a Mosaic kernel launches
with, and the command line: a list of shapes or --shape, one row per
shape printed as JSON as it lands, and the whole run in --out."""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable
from unittest import mock

import jax

from jax_rmsnorm._src import bench
from jax_rmsnorm._src.mosaic import common

# Rounds of `time_alternated`.
ROUNDS = 3


def main(argv, *, prog: str, doc: str, shapes, run_shape: Callable[..., dict],
         add_arguments: Callable[[argparse.ArgumentParser], None] = None,
         options: Callable[[argparse.Namespace], dict] = None) -> int:
  """run_shape(m, n, dtype, iterations=..., **options(args)) -> a row, for
  each shape; `add_arguments` adds the sweep's own flags."""
  parser = argparse.ArgumentParser(
      prog=prog, description=doc,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None)
  parser.add_argument("--iterations", type=int, default=30)
  parser.add_argument("--shape", nargs=3, action="append",
                      metavar=("M", "N", "DTYPE"),
                      help="a shape to run instead of the list (repeat)")
  if add_arguments is not None:
    add_arguments(parser)
  args = parser.parse_args(argv)
  todo = ([(int(m), int(n), d) for m, n, d in args.shape] if args.shape
          else shapes)
  kwargs = options(args) if options is not None else {}
  result = {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
            "timer": bench.timer(), "rows": []}
  for m, n, dtype in todo:
    row = run_shape(m, n, dtype, iterations=args.iterations, **kwargs)
    result["rows"].append(row)
    print(json.dumps({k: v for k, v in row.items()
                      if not k.endswith("_runs")}), flush=True)
    if args.out:  # After every shape, so a run cut short keeps its rows.
      with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
  return 0


def launched_config(fn, *args):
  """The Mosaic configuration `fn(*args)` launches its kernel with (traced
  only, nothing runs)."""
  with mock.patch.object(common, "launch", wraps=common.launch) as launch:
    jax.eval_shape(fn, *args)
  return launch.call_args.args[0].keywords["config"]


def time_alternated(row: dict, timed: dict, *, iterations: int,
                    suffix: str = "_us", rounds: int = ROUNDS) -> None:
  """Times each `timed` entry, key -> (fn, args), in `rounds` rounds that
  alternate between them (so that drift in the card's clocks hits every
  one alike); row[key + suffix] = the median over rounds of
  bench.measure_us, row[key + "_runs"] = every round's."""
  times = {key: [] for key in timed}
  for _ in range(rounds):
    for key, (fn, args) in timed.items():
      times[key].append(bench.measure_us(fn, *args, iterations=iterations))
  for key, values in times.items():
    row[key + suffix] = statistics.median(values)
    row[key + "_runs"] = values
