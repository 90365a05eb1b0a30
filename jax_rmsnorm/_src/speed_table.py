"""The automatic choice's table: which implementation is fastest per GPU
generation, op, dtype and shape class, as the benchmark suite measured it.

The table is data (`data/speed_table.json`), written by
`python -m benchmarks.benchmark_rmsnorm --write-table` from one run on one
card and shipped with the package. Looking it up is a pure function of its
arguments: no autotuning at call time. Classes the table does not name
take `DEFAULT`.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

TABLE_PATH = pathlib.Path(__file__).parent / "data" / "speed_table.json"
DEFAULT = "triton"
# The quantized output is four ops: a static scale lets XLA fuse the
# quantization into its norm, a residual adds a tensor each way, and the
# faster kernel differs between them.
OPS = ("forward", "backward", "quant", "quant-static", "quant-residual",
       "quant-static-residual")


def shape_class(m: int, n: int, dtype) -> str:
  """'<dtype>/<rows>/<width>': rows 'decode' (up to 16), 'small' (under 8M
  elements) or 'large'; width 'aligned' (N a multiple of 128) or
  'unaligned'."""
  if m <= 16:
    rows = "decode"
  elif m * n < 8 * 1024 * 1024:
    rows = "small"
  else:
    rows = "large"
  width = "aligned" if n % 128 == 0 else "unaligned"
  return f"{np.dtype(dtype).name}/{rows}/{width}"


@functools.cache
def _table() -> dict:
  with open(TABLE_PATH) as f:
    return json.load(f)


def choose(op: str, generation: str | None, m: int, n: int, dtype) -> str:
  """The implementation to run `op` (one of OPS) on a GPU
  of `generation` (e.g. 'sm90'; None: not known here, as when exporting for
  CUDA from a CPU host)."""
  entries = _table().get("generations", {}).get(generation or "", {})
  return entries.get(op, {}).get(shape_class(m, n, dtype), DEFAULT)
