"""Benchmarks the RMSNorm kernels against XLA on this machine's GPU.

For every (M, N, dtype) of the shared shape list and every op (forward:
rms_norm; backward: its dx and d(scale), from the saved residuals, against
XLA's autodiff of the reference; add: add_rms_norm against XLA's unfused
add then normalize): CUPTI median kernel time of the Pallas kernels, XLA's
and XLA's copy (x * 2, the practical bandwidth ceiling), all in the same run
on the same card; GB/s from an explicit byte count, % of the copy bandwidth,
and time(XLA) / time(Pallas). Each output is also checked against the
float64 oracle.

  python -m benchmarks.benchmark_rmsnorm                 # full sweep
  python -m benchmarks.benchmark_rmsnorm --ops backward --max-elements 1e7

Writes <out>/<op>_<card>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys

import jax

from jax_rmsnorm._src import bench
from jax_rmsnorm._src import shapes


def _progress(items, **kwargs):
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return items
  return tqdm(items, **kwargs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ops", nargs="+", choices=bench.OPS,
                      default=list(bench.OPS))
  parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
  parser.add_argument("--max-elements", type=float, default=math.inf,
                      help="skip shapes with more elements (quick runs)")
  parser.add_argument("--iterations", type=int, default=50)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)
  card = jax.devices()[0].device_kind
  todo = [s for s in shapes.BENCHMARK_SHAPES
          if s[2] in args.dtypes and s[0] * s[1] <= args.max_elements]
  os.makedirs(args.out, exist_ok=True)
  ok = True
  for op in args.ops:
    rows = [bench.bench_op(op, m, n, dtype, iterations=args.iterations)
            for m, n, dtype in _progress(todo, desc=f"{op} on {card}")]
    summary = bench.summarize(rows)
    ok = ok and summary["all_numerics_ok"]
    print(f"{op}   card: {card}   jax {jax.__version__}   "
          f"CUPTI median of {args.iterations}")
    print(bench.format_table(rows))
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in summary.items()))
    stem = os.path.join(args.out,
                        f"{op}_" + re.sub(r"\W+", "_", card).strip("_"))
    with open(stem + ".json", "w") as f:
      json.dump(dict(op=op, card=card, jax=jax.__version__,
                     iterations=args.iterations, summary=summary, rows=rows),
                f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    try:
      from benchmarks import plot  # pylint: disable=g-import-not-at-top
      plot.plot_op(stem + ".json", stem + ".png")
    except ImportError as e:
      print(f"no plot ({e}); run python -m benchmarks.plot {stem}.json")
    print(f"wrote {stem}.{{json,csv,png}}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
