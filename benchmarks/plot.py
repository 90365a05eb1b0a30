"""Plots a benchmark JSON (forward, backward or add): achieved GB/s per
shape, ours vs XLA, against the measured copy bandwidth.

  python -m benchmarks.plot benchmarks/results/forward_NVIDIA_H100_80GB_HBM3.json
"""

from __future__ import annotations

import json
import sys


_TITLES = {"forward": "RMSNorm forward",
           "backward": "RMSNorm backward (dx, d(scale))",
           "add": "residual add + RMSNorm"}
_BYTES = {"forward": "x, scale, y", "backward": "x, dy, dx, scale, d(scale)",
          "add": "x, residual, y, h, scale"}


def plot_op(json_path: str, png_path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with open(json_path) as f:
    data = json.load(f)
  rows = data["rows"]
  short = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
  labels = [f"{short.get(r['dtype'], r['dtype'])} {r['m']}x{r['n']}" for r in rows]
  xs = range(len(rows))
  fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows)), 4.5))
  width = 0.27
  ax.bar([x - width for x in xs], [r["copy_gbps"] for r in rows], width,
         label="copy (x*2), ceiling", color="#bbbbbb")
  op = data.get("op", "forward")
  ax.bar(list(xs), [r["xla_gbps"] for r in rows], width, label="XLA",
         color="#4c72b0")
  ax.bar([x + width for x in xs], [r["triton_gbps"] for r in rows], width,
         label="jax_rmsnorm (Pallas)", color="#dd8452")
  ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel(f"GB/s (bytes of {_BYTES[op]})")
  s = data["summary"]
  ax.set_title(f"{_TITLES[op]} on {data['card']} (JAX {data['jax']}): "
               f"geomean XLA/ours {s['geomean_xla_over_impl']:.3f}")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  path = sys.argv[1]
  plot_op(path, path.rsplit(".", 1)[0] + ".png")
