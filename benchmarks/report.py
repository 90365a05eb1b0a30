"""Prints recorded benchmark JSONs as Markdown tables (for the README): one
column group per implementation in the record, beside XLA and the copy
ceiling.

  python -m benchmarks.report benchmarks/results/backward_NVIDIA_H100_80GB_HBM3.json
  python -m benchmarks.report benchmarks/results/*_NVIDIA_H200.json
"""

from __future__ import annotations

import argparse
import json
import sys

from jax_rmsnorm._src import bench

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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.report", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("json_paths", nargs="+", metavar="JSON",
                      help="records written by benchmarks.benchmark_rmsnorm")
  args = parser.parse_args(argv)
  for path in args.json_paths:
    print(markdown(path))
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
