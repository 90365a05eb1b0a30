"""Prints a recorded benchmark JSON as a Markdown table (for the README).

  python -m benchmarks.report benchmarks/results/backward_NVIDIA_H100_80GB_HBM3.json
"""

from __future__ import annotations

import json
import sys


def markdown(json_path: str) -> str:
  with open(json_path) as f:
    data = json.load(f)
  lines = ["| dtype | M x N | copy us | XLA us | jax_rmsnorm us | GB/s | "
           "% of copy | XLA / ours |", "|---|---|---|---|---|---|---|---|"]
  for r in data["rows"]:
    lines.append(
        f"| {r['dtype']} | {r['m']} x {r['n']} | {r['copy_us']:.1f} | "
        f"{r['xla_us']:.1f} | {r['triton_us']:.1f} | {r['triton_gbps']:.0f} "
        f"| {r['triton_pct_copy']:.1f} | {r['triton_xla_ratio']:.3f} |")
  s = data["summary"]
  lines.append("")
  lines.append(
      f"{data.get('op', 'forward')} on {data['card']}, JAX {data['jax']}, "
      f"CUPTI median of {data['iterations']}: geomean XLA/ours "
      f"{s['geomean_xla_over_impl']:.3f}; worst ours/XLA "
      f"{s['worst_impl_over_xla']:.3f}; numerics ok: {s['all_numerics_ok']}")
  return "\n".join(lines)


if __name__ == "__main__":
  for path in sys.argv[1:]:
    print(markdown(path))
    print()
