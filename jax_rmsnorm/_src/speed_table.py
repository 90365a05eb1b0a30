"""The automatic choice's table: which implementation is fastest per GPU
generation, op, dtype and shape class, as the benchmark suite measured it.

The table is data (`data/speed_table.json`), written by
`python -m benchmarks.speed_table` from the benchmark records of one card
and shipped with the package. Looking it up is a pure function of its
arguments: no autotuning at call time. Classes the table does not name
take `DEFAULT` (a 'mid' class first takes the 'large' one's: `choose`).
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

TABLE_PATH = pathlib.Path(__file__).parent / "data" / "speed_table.json"
DEFAULT = "triton"
# The quantized output is six ops: a static scale lets XLA fuse the
# quantization into its norm, a static scale of one value a column is one
# more vector for the kernels to hold (the Mosaic kernel's shared memory),
# a residual adds a tensor each way, and the faster kernel differs between
# them.
OPS = ("forward", "backward", "quant", "quant-static", "quant-residual",
       "quant-static-residual", "quant-channel", "quant-channel-residual")


def quant_op(*, static: bool, residual: bool, per_channel: bool = False
             ) -> str:
  """The op of OPS a quantized output is: with a `static` scale (of one
  value a column where `per_channel`) or a dynamic one, with a `residual`
  or without."""
  kind = "-channel" if per_channel else "-static" if static else ""
  return "quant" + kind + ("-residual" if residual else "")


# Widths of aligned rows (N a multiple of 128) that are classes of their
# own: the kernels hold rows differently by width (several short rows a
# block; the widest split between warpgroups or chunks), and which kernel
# wins changes with it. One class for every aligned width sent the bf16
# quantized output of rows of 896 and 14336 to the Mosaic kernel, 6% and
# 12% slower there than Triton's (H200 records, speed_table_h200.log).
NARROW_MAX_COLS = 1024
MEDIUM_MAX_COLS = 8192
# Sizes that are classes of their own. From 8M to 32M elements (16 to 64
# MiB of bf16, about the L2 cache of an H100 or H200) a kernel's launch,
# pipeline start and tail weigh more than on the streams of 32M and more,
# and the kernel that wins differs: with one class from 8M up, the bf16
# quantized output of 2048 x 4096 ran the Mosaic kernel, 15% slower there
# than Triton's (H200 records, speed_table_h200.log).
SMALL_MAX_ELEMENTS = 8 * 1024 * 1024
MID_MAX_ELEMENTS = 32 * 1024 * 1024


def shape_class(m: int, n: int, dtype) -> str:
  """'<dtype>/<rows>/<width>': rows 'decode' (up to 16), 'small' (under
  SMALL_MAX_ELEMENTS elements), 'mid' (under MID_MAX_ELEMENTS) or 'large';
  width 'unaligned' (N not a multiple of 128), else 'narrow' (N up to
  NARROW_MAX_COLS), 'medium' (up to MEDIUM_MAX_COLS) or 'wide'."""
  if m <= 16:
    rows = "decode"
  elif m * n < SMALL_MAX_ELEMENTS:
    rows = "small"
  elif m * n < MID_MAX_ELEMENTS:
    rows = "mid"
  else:
    rows = "large"
  if n % 128:
    width = "unaligned"
  elif n <= NARROW_MAX_COLS:
    width = "narrow"
  elif n <= MEDIUM_MAX_COLS:
    width = "medium"
  else:
    width = "wide"
  return f"{np.dtype(dtype).name}/{rows}/{width}"


@functools.cache
def _table() -> dict:
  with open(TABLE_PATH) as f:
    return json.load(f)


def choose(op: str, generation: str | None, m: int, n: int, dtype) -> str:
  """The implementation to run `op` (one of OPS) on a GPU
  of `generation` (e.g. 'sm90'; None: not known here, as when exporting for
  CUDA from a CPU host). A 'mid' class the records did not measure (no
  shape of its width among them, e.g. 2048 x 14336) takes the 'large'
  class's choice: the nearest sizes measured, rather than DEFAULT."""
  entries = _table().get("generations", {}).get(generation or "", {})
  entries = entries.get(op, {})
  cls = shape_class(m, n, dtype)
  if cls not in entries and "/mid/" in cls:
    cls = cls.replace("/mid/", "/large/")
  return entries.get(cls, DEFAULT)
