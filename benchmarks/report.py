"""Prints recorded benchmark JSONs as Markdown tables (for the README): one
column group per implementation in the record, beside XLA and the copy
ceiling; or, with --summary, one line a record: what its first
implementation (the default's, in the auto records) gives against XLA.

  python -m benchmarks.report benchmarks/results/backward_NVIDIA_H100_80GB_HBM3.json
  python -m benchmarks.report benchmarks/results/*_NVIDIA_H200.json
  python -m benchmarks.report --summary benchmarks/results/auto/*_NVIDIA_H200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from jax_rmsnorm._src import bench
from jax_rmsnorm._src import shapes

_NAMES = {"triton": "Pallas Triton", "mosaic": "Pallas Mosaic GPU"}


def _summaries(data: dict) -> dict:
  """Per implementation; older records hold one flat summary of 'triton'."""
  if "summaries" in data:
    return data["summaries"]
  impls = bench.implementations_of(data["rows"])
  return {impls[0]: data["summary"]} if impls else {}


def markdown(json_path: str) -> str:
  with open(json_path) as f:
    data = json.load(f)
  rows = data["rows"]
  impls = bench.implementations_of(rows)
  checked = bool(rows) and all(
      any(f"{i}_error_over_bound" in r for r in rows) for i in impls)
  head = ["dtype", "M x N", "copy us", "XLA us"]
  for impl in impls:
    name = _NAMES.get(impl, impl)
    head += [f"{name} us", "GB/s", "% of copy", f"XLA / {impl}"]
    if checked:
      head.append("error / bound")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["dtype"], f"{r['m']} x {r['n']}", f"{r['copy_us']:.1f}",
             f"{r['xla_us']:.1f}"]
    for impl in impls:
      if r.get(impl + "_us") is None:
        ran = impl in bench.row_implementations(r)
        cells += ["refused" if ran else "not run", "", "", ""] + (
            [""] if checked else [])
        continue
      cells += [f"{r[impl + '_us']:.1f}", f"{r[impl + '_gbps']:.0f}",
                f"{r[impl + '_pct_copy']:.1f}",
                f"{r[impl + '_xla_ratio']:.3f}"]
      if checked:
        cells.append(f"{r[impl + '_error_over_bound']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  copy = ("the faster of XLA's x * 2 and a Pallas copy"
          if rows and "pallas_copy_us" in rows[0] else "XLA's x * 2")
  lines.append(
      f"{data.get('op', 'forward')} on {data['card']}, JAX {data['jax']}, "
      f"{data.get('timer', 'CUPTI')} median of {data['iterations']}; copy: "
      f"{copy}; bytes: {data.get('bytes_moved', 'see bench.py')}.")
  if data.get("merged"):
    lines.append(f"Rows merged from two runs: {data['merged']}.")
  for impl, s in _summaries(data).items():
    lines.append(
        f"{impl}: geomean XLA/{impl} {s['geomean_xla_over_impl']:.3f}; "
        f"worst {impl}/XLA {s['worst_impl_over_xla']:.3f}; numerics ok: "
        f"{s['all_numerics_ok']}")
  return "\n".join(lines)


def summary_row(data: dict, impl: str | None = None) -> dict:
  """What `impl` (default: the record's first implementation) gives in one
  record: the geometric mean of XLA's time over its own on every row; over
  the rows of shapes.LARGE_ELEMENTS or more, that mean, the least and
  greatest of the ratio and of its % of the copy ceiling (for the quantized
  ops, of the byte floor), each with its row; its worst row against XLA."""
  rows = data["rows"]
  impl = impl or bench.implementations_of(rows)[0]
  ran = [r for r in rows if r.get(impl + "_us") is not None]
  large = [r for r in ran if r["m"] * r["n"] >= shapes.LARGE_ELEMENTS]
  ratio = lambda r: r[impl + "_xla_ratio"]
  pct = lambda r: r[impl + "_pct_copy"]
  name = lambda r: f"{r['dtype']} {r['m']} x {r['n']}"
  geomean = lambda rs: math.exp(sum(math.log(ratio(r)) for r in rs) / len(rs))
  return dict(
      op=data.get("op", "forward"), impl=impl, rows=len(ran),
      geomean=geomean(ran), large=len(large), large_geomean=geomean(large),
      large_ratio=[(ratio(r), name(r)) for r in (min(large, key=ratio),
                                                 max(large, key=ratio))],
      large_pct=[(pct(r), name(r)) for r in (min(large, key=pct),
                                             max(large, key=pct))],
      slowest=(1 / ratio(min(ran, key=ratio)), name(min(ran, key=ratio))))


def summary(json_paths) -> str:
  """A Markdown table of `summary_row` a record, in bench.OPS's order."""
  records = []
  for path in json_paths:
    with open(path) as f:
      records.append(json.load(f))
  records.sort(key=lambda d: bench.OPS.index(d.get("op", "forward")))
  head = ["op", "XLA / ours, geomean", "large: geomean", "large: least",
          "large: most", "large: least % of copy", "large: most",
          "worst: ours / XLA"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  card = set()
  for data in records:
    s = summary_row(data)
    card.add(f"{data['card']}, JAX {data['jax']}, {s['impl']}")
    (lo, lo_at), (hi, hi_at) = s["large_ratio"]
    (plo, plo_at), (phi, phi_at) = s["large_pct"]
    lines.append(
        f"| {s['op']} | {s['geomean']:.2f}x ({s['rows']} shapes) | "
        f"{s['large_geomean']:.2f}x ({s['large']}) | {lo:.2f}x ({lo_at}) | "
        f"{hi:.2f}x ({hi_at}) | {plo:.1f} ({plo_at}) | {phi:.1f} ({phi_at}) "
        f"| {s['slowest'][0]:.3f} ({s['slowest'][1]}) |")
  lines.append("")
  lines.append(f"{'; '.join(sorted(card))}; large: "
               f"{shapes.LARGE_ELEMENTS // 2**20}"
               "Mi elements or more; worst: the row where ours is slowest "
               "against XLA (under 1: faster there too).")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.report", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("json_paths", nargs="+", metavar="JSON",
                      help="records written by benchmarks.benchmark_rmsnorm")
  parser.add_argument("--summary", action="store_true",
                      help="one line a record (summary_row)")
  args = parser.parse_args(argv)
  if args.summary:
    print(summary(args.json_paths))
    return 0
  for path in args.json_paths:
    print(markdown(path))
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
