"""Plots a benchmark JSON (forward, backward, add or step): achieved GB/s per
shape, XLA and each implementation in the record, against the measured copy
ceiling.

  python -m benchmarks.plot benchmarks/results/forward_NVIDIA_H100_80GB_HBM3.json

Writes the PNG beside the JSON (or to --out).
"""

from __future__ import annotations

import argparse
import json
import sys

from jax_rmsnorm._src import bench

_TITLES = {"forward": "RMSNorm forward",
           "backward": "RMSNorm backward (dx, d(scale))",
           "add": "residual add + RMSNorm",
           "step": "RMSNorm forward + backward, one jit (y, dx, d(scale))"}
_COLORS = ("#dd8452", "#55a868", "#c44e52", "#8172b2")


def plot_op(json_path: str, png_path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with open(json_path) as f:
    data = json.load(f)
  rows = data["rows"]
  impls = bench.implementations_of(rows)
  short = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
  labels = [f"{short.get(r['dtype'], r['dtype'])} {r['m']}x{r['n']}"
            for r in rows]
  xs = list(range(len(rows)))
  bars = 2 + len(impls)
  width = 0.8 / bars
  fig, ax = plt.subplots(figsize=(max(8, 0.18 * bars * len(rows)), 4.5))

  def offset(k):
    return [x + (k - (bars - 1) / 2) * width for x in xs]

  copy = ("copy ceiling (faster of x*2, Pallas copy)"
          if rows and "pallas_copy_us" in rows[0] else "copy (x*2), ceiling")
  ax.bar(offset(0), [r["copy_gbps"] for r in rows], width, label=copy,
         color="#bbbbbb")
  ax.bar(offset(1), [r["xla_gbps"] for r in rows], width, label="XLA",
         color="#4c72b0")
  for k, impl in enumerate(impls):
    # A refused shape gets no bar.
    ax.bar(offset(2 + k), [r.get(f"{impl}_gbps") or 0 for r in rows], width,
           label=f"jax_rmsnorm ({impl})", color=_COLORS[k % len(_COLORS)])
  ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
  op = data.get("op", "forward")
  ax.set_ylabel(f"GB/s ({data.get('bytes_moved', bench.BYTES_MOVED[op])})",
                fontsize=8)
  geomeans = ", ".join(
      f"XLA/{impl} {sum_['geomean_xla_over_impl']:.3f}"
      for impl, sum_ in data.get("summaries", {
          impls[0]: data["summary"]} if impls else {}).items()
      if "geomean_xla_over_impl" in sum_)
  ax.set_title(f"{_TITLES.get(op, op)} on {data['card']} (JAX {data['jax']})"
               f": geomean {geomeans}", fontsize=9)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.plot", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("json_path", metavar="JSON",
                      help="a record written by benchmarks.benchmark_rmsnorm")
  parser.add_argument("--out", help="the PNG to write (default: the JSON's "
                      "name with .png)")
  args = parser.parse_args(argv)
  plot_op(args.json_path, args.out or args.json_path.rsplit(".", 1)[0]
          + ".png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
