"""Sweeps launch configurations of the Triton kernels on one GPU.

Each (M, N, dtype) of the sweep is checked against the float64 oracle and
timed with CUPTI beside XLA (the fused reference, or its autodiff for the
backward) and the copy ceiling, in the same run. A configuration whose
result fails the oracle's bounds (worst error / bound > 1) is recorded but
never the best (the forward-h200 and quant sweeps time every candidate,
then check the fastest until three pass: the oracle is slow at large
shapes). The best configurations feed `triton_config.get_config` /
`get_backward_config` / `get_quant_config` by hand.

  python -m benchmarks.tune_triton --out /tmp/tune.json
  python -m benchmarks.tune_triton --sweep backward --out /tmp/tune_bwd.json
  python -m benchmarks.tune_triton --sweep quant --out /tmp/tune_quant.json
  python -m benchmarks.tune_triton --sweep quant-residual --out /tmp/r.json
  python -m benchmarks.tune_triton --sweep forward-persistent --out /tmp/f.json
  python -m benchmarks.tune_triton --sweep quant-static-residual-layouts-float32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys

import jax
import numpy as np
from jax.experimental import pallas as pl

from jax_rmsnorm._src import api
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import speed_table
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import backward as triton_backward
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import forward as triton_forward
from jax_rmsnorm._src.triton import quantize as triton_quantize

SWEEP = (
    (32768, 4096, "bfloat16"), (16384, 8192, "bfloat16"),
    (32768, 3072, "bfloat16"), (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"), (8192, 5120, "bfloat16"),
    (4096, 2048, "bfloat16"), (256, 4096, "bfloat16"),
    (16, 4096, "bfloat16"), (1, 8192, "bfloat16"),
    (32768, 4096, "float32"), (65536, 896, "float32"),
    (4096, 14336, "float32"), (8192, 5120, "float32"),
    (16, 4096, "float32"), (1024, 65536, "bfloat16"),
    (512, 65536, "float32"),
)

# Decode sizes and short rows, timed with more iterations.
SMALL_SWEEP = (
    (1, 4096, "bfloat16"), (16, 4096, "bfloat16"), (64, 4096, "bfloat16"),
    (16, 8192, "bfloat16"), (16, 4096, "float32"), (65536, 128, "bfloat16"),
    (65536, 256, "float32"), (32768, 512, "bfloat16"),
)

# Hidden sizes that are not powers of two (one pass, several chunks held in
# registers) and the power-of-two rows whose warps were in doubt.
CHUNK_SWEEP = (
    (32768, 3072, "bfloat16"), (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"), (8192, 5120, "bfloat16"),
    (65536, 896, "float32"), (4096, 14336, "float32"),
    (8192, 5120, "float32"), (16384, 8192, "float32"),
    (16384, 8192, "bfloat16"), (32768, 4096, "bfloat16"),
)
# The backward: the large shapes plus decode and mid sizes.
BACKWARD_SWEEP = (
    (16384, 8192, "bfloat16"), (4096, 14336, "bfloat16"),
    (16384, 8192, "float32"), (8192, 5120, "float32"),
    (32768, 4096, "bfloat16"), (8192, 5120, "bfloat16"),
    (65536, 896, "bfloat16"), (4096, 14336, "float32"),
    (2048, 4096, "bfloat16"), (16, 4096, "bfloat16"), (1, 8192, "bfloat16"),
)
# The backward at few rows, where the partials of d(scale) weigh.
BACKWARD_SMALL_SWEEP = (
    (128, 14336, "bfloat16"), (256, 4096, "bfloat16"), (16, 4096, "bfloat16"),
    (1, 8192, "bfloat16"), (256, 4096, "float32"), (16, 4096, "float32"),
    (2048, 4096, "bfloat16"), (4096, 2048, "bfloat16"),
    (512, 14336, "bfloat16"), (1024, 8192, "bfloat16"),
)
# The backward's register choices (chunks of wide rows, the scale held or
# re-read) on the large shapes, and how d(scale) is summed at few rows.
BACKWARD_REGISTERS_SWEEP = (
    (4096, 14336, "bfloat16"), (4096, 14336, "float32"),
    (16384, 8192, "bfloat16"), (32768, 4096, "float32"),
    (8192, 5120, "bfloat16"), (65536, 896, "bfloat16"),
) + tuple((m, n, dtype) for n, dtype in (
    (14336, "bfloat16"), (14336, "float32"), (8192, "bfloat16"),
    (4096, "bfloat16"), (4096, "float32"), (896, "bfloat16"))
          for m in (1, 16, 128, 256))
# Where the H200 forward ran under 97% of the copy ceiling or behind XLA
# with the H100's table (benchmarks/results/mosaic_notes.md), timed over
# the compact candidate set (`compact_candidates`).
FORWARD_H200_SWEEP = (
    (16384, 8192, "bfloat16"), (4096, 14336, "bfloat16"),
    (8192, 5120, "bfloat16"), (4096, 4099, "bfloat16"),
    (16, 4096, "bfloat16"), (32768, 4096, "float32"),
    (4096, 14336, "float32"),
)
# The quantized kernel (float8_e4m3fn, dynamic per-token scales): the large
# shapes, the unaligned row and a decode batch.
QUANT_SWEEP = (
    (32768, 4096, "bfloat16"), (16384, 8192, "bfloat16"),
    (32768, 3072, "bfloat16"), (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"), (8192, 5120, "bfloat16"),
    (4096, 4099, "bfloat16"), (16, 4096, "bfloat16"),
)
# Static scales, where they were slowest against XLA.
QUANT_STATIC_SWEEP = (
    (65536, 896, "bfloat16"), (32768, 3072, "bfloat16"),
    (4096, 4099, "bfloat16"), (16, 4096, "bfloat16"),
)
# With the fused residual add (x and the residual read, h written too),
# where the static variant was furthest from 1.5x XLA.
QUANT_RESIDUAL_SWEEP = (
    (65536, 896, "bfloat16"), (16384, 8192, "bfloat16"),
    (32768, 4096, "bfloat16"), (4096, 4099, "bfloat16"),
)
# The dynamic scale's amax folded into the first reduction or not
# (`quant_fold_candidates`): the list's large shapes and looped rows.
QUANT_FOLD_SWEEP = tuple(
    (m, n, dtype) for dtype in ("bfloat16", "float32")
    for m, n in ((32768, 4096), (16384, 8192), (32768, 3072), (65536, 896),
                 (4096, 14336), (8192, 5120), (2048, 4096), (4096, 4099),
                 (1024, 32768))
    if (m, n, dtype) != (32768, 3072, "float32"))
# Layouts with the amax folded (`quant_layout_candidates`), where the
# dynamic kernel ran under 90% of the byte floor: the bf16 rows whose
# layouts were tuned without the fold, and float32 rows, never put on a
# persistent grid before.
QUANT_LAYOUT_SWEEPS = {
    "bfloat16": ((4096, 14336), (8192, 5120), (32768, 3072), (65536, 896)),
    "float32": ((32768, 4096), (16384, 8192), (4096, 14336), (65536, 896),
                (8192, 5120)),
}
# The forward on a persistent grid (`forward_persistent_candidates`): the
# shapes of 8M elements or more, where it ran under 97% of the copy ceiling.
FORWARD_PERSISTENT_SWEEP = (
    (32768, 4096, "bfloat16"), (16384, 8192, "bfloat16"),
    (65536, 896, "bfloat16"), (4096, 14336, "bfloat16"),
    (8192, 5120, "bfloat16"), (4096, 2048, "bfloat16"),
    (2048, 4096, "bfloat16"), (32768, 4096, "float32"),
    (16384, 8192, "float32"), (4096, 14336, "float32"),
    (8192, 5120, "float32"), (32768, 3072, "bfloat16"),
)
# The quantized kernel's persistent grids holding the scale in registers
# across their loop or re-reading it each step (`quant_held_candidates`).
QUANT_HELD_SWEEP = (
    (4096, 4099, "bfloat16"), (32768, 4096, "bfloat16"),
    (16384, 8192, "bfloat16"), (65536, 896, "bfloat16"),
    (4096, 14336, "bfloat16"), (32768, 4096, "float32"),
    (4096, 14336, "float32"),
)
# The forward's layouts (`forward_layout_candidates`) on the shapes of 8M
# elements or more that ran under 97% of the copy ceiling.
FORWARD_LAYOUTS_SWEEP = (
    (4096, 14336, "bfloat16"), (65536, 896, "bfloat16"),
    (8192, 5120, "bfloat16"), (16384, 8192, "float32"),
    (8192, 5120, "float32"), (4096, 4099, "float32"),
    (4096, 4099, "bfloat16"),
)
# Float32 rows with the fused residual add (x, the residual and h of 4
# bytes a value): the layouts were tuned on bf16 rows only, and ran under
# 80% of the byte floor at these shapes with a static or a dynamic scale
# (`residual_layout_candidates`).
QUANT_RESIDUAL_FLOAT32_SWEEP = (
    (4096, 4099, "float32"), (16384, 8192, "float32"),
    (32768, 4096, "float32"), (2048, 4096, "float32"),
    (4096, 14336, "float32"),
)
# Short rows whose reduction crosses warps in the layouts above (a block of
# rows padded to 1024 spreads each row over several warps): chunks of 128
# or 256 columns with at least one whole row a warp
# (`warp_rows_candidates`), for the forward and every quantized variant.
WARP_ROWS_SWEEP = (
    (65536, 896, "bfloat16"), (65536, 896, "float32"),
    (4096, 2048, "bfloat16"),
)
# The quantized kernel with the forward's L2 hints (Config.cache_hints) or
# without (`quant_hint_candidates`), where a bar is a few percent away: the
# dynamic scale's 90% of the byte floor (bf16 896, 14336, the 8M shapes) and
# 1.8x XLA (bf16 4099), the static scale's 1.1x (float32 4099).
QUANT_HINTS_SWEEP = (
    (65536, 896, "bfloat16"), (4096, 4099, "bfloat16"),
    (4096, 14336, "bfloat16"), (2048, 4096, "bfloat16"),
    (4096, 2048, "bfloat16"),
)
QUANT_STATIC_HINTS_SWEEP = ((4096, 4099, "float32"), (4096, 4099, "bfloat16"))
# Where the hints were not adopted: float32 rows, and rows with a residual
# (where float32 4099 is at 1.48x XLA's unfused add, norm and quantize).
QUANT_FLOAT32_HINTS_SWEEP = (
    (65536, 896, "float32"), (4096, 4099, "float32"), (2048, 4096, "float32"))
QUANT_RESIDUAL_HINTS_SWEEP = (
    (4096, 4099, "float32"), (4096, 4099, "bfloat16"),
    (16384, 8192, "float32"), (65536, 896, "bfloat16"))
# Rows that end in a mostly masked chunk: the columns past the last whole
# chunk held in a narrower one (Config.split_tail; `split_tail_candidates`;
# when tune_triton_tail_h200.json was run, in descending powers of two).
TAIL_SWEEP = ((4096, 4099, "bfloat16"), (4096, 4099, "float32"),
              (4096, 14336, "bfloat16"))
SWEEPS = {"large": SWEEP, "small": SMALL_SWEEP, "chunks": CHUNK_SWEEP,
          "backward": BACKWARD_SWEEP, "backward-small": BACKWARD_SMALL_SWEEP,
          "backward-registers": BACKWARD_REGISTERS_SWEEP,
          "forward-h200": FORWARD_H200_SWEEP,
          "forward-persistent": FORWARD_PERSISTENT_SWEEP,
          "quant": QUANT_SWEEP,
          "quant-static": QUANT_STATIC_SWEEP,
          "quant-residual": QUANT_RESIDUAL_SWEEP,
          "quant-static-residual": QUANT_RESIDUAL_SWEEP,
          "quant-fold": QUANT_FOLD_SWEEP,
          "quant-fold-hints": WARP_ROWS_SWEEP[:1],
          "quant-hints": QUANT_HINTS_SWEEP,
          "quant-static-hints": QUANT_STATIC_HINTS_SWEEP,
          "quant-float32-hints": QUANT_FLOAT32_HINTS_SWEEP,
          "quant-residual-hints": QUANT_RESIDUAL_HINTS_SWEEP,
          "quant-static-residual-hints": QUANT_RESIDUAL_HINTS_SWEEP,
          "forward-layouts": FORWARD_LAYOUTS_SWEEP,
          **{f"{op}-tail": TAIL_SWEEP
             for op in ("forward", "quant", "quant-static")},
          **{f"{op}-tail": TAIL_SWEEP[:2]
             for op in ("quant-residual", "quant-static-residual",
                        "quant-channel", "quant-channel-residual")},
          **{f"{op}-tail-layouts": TAIL_SWEEP[:2]
             for op in ("forward", "quant", "quant-static")},
          "quant-held": QUANT_HELD_SWEEP,
          "quant-static-held": QUANT_HELD_SWEEP[:5],   # bf16 rows
          "quant-residual-layouts-float32": QUANT_RESIDUAL_FLOAT32_SWEEP,
          "quant-static-residual-layouts-float32":
              QUANT_RESIDUAL_FLOAT32_SWEEP,
          **{f"{op}-warp-rows": WARP_ROWS_SWEEP
             for op in ("forward", "quant", "quant-static", "quant-residual",
                        "quant-static-residual")},
          **{f"{op}-warp-rows": WARP_ROWS_SWEEP[:2]
             for op in ("quant-channel", "quant-channel-residual",
                        "backward")},
          **{f"quant-layouts-{dtype}": tuple((m, n, dtype) for m, n in shapes)
             for dtype, shapes in QUANT_LAYOUT_SWEEPS.items()}}


def candidates(n: int):
  cols = pl.next_power_of_2(n)
  if cols > triton_config.MAX_ONE_PASS_COLS:
    for chunk, warps, stages in itertools.product(
        (1024, 2048, 4096, 8192), (4, 8, 16), (1, 2, 3)):
      yield triton_config.Config(1, chunk, warps, stages)
    return
  for rows, warps in itertools.product((1, 2, 4, 8, 16, 32), (2, 4, 8, 16, 32)):
    if rows * cols <= 32768 and rows * cols >= 32 * warps:
      yield triton_config.Config(rows, cols, warps, 1)
  # One row held in registers as up to 16 chunks: less padding for widths
  # such as 896 = 7 x 128 or 14336 = 7 x 2048.
  chunk = max(128, pl.next_power_of_2(-(-n // 16)))
  while chunk < cols:
    for warps in (2, 4, 8, 16, 32):
      yield triton_config.Config(1, chunk, warps, 1)
    chunk *= 2


def compact_candidates(n: int):
  """The heuristic's neighbours at one row's width: one program holding 1,
  2 or 4 whole rows with 4 to 64 elements a thread, and, for widths that
  are not a power of two, one row held as 2 to 8 chunks (less padding)."""
  cols = pl.next_power_of_2(n)
  if cols > triton_config.MAX_ONE_PASS_COLS:
    yield from candidates(n)
    return
  for rows, warps in itertools.product((1, 2, 4), (2, 4, 8, 16, 32)):
    per_thread = rows * cols // (32 * warps)
    if rows * cols <= 32768 and 4 <= per_thread <= 64 and (
        rows == 1 or warps >= 8):
      yield triton_config.Config(rows, cols, warps, 1)
  if cols != n:
    chunk = max(128, pl.next_power_of_2(-(-n // 8)))
    while chunk < cols:
      for warps in (4, 8, 16):
        if chunk * pl.cdiv(n, chunk) >= 4 * 32 * warps:
          yield triton_config.Config(1, chunk, warps, 1)
      chunk *= 2


def forward_persistent_candidates(n: int, dtype: str):
  """The heuristic's choice; the layout it gives with a residual (one block
  of rows a program) and, for rows of 8192 or more, chunks of 2048 and
  4096, at half, the same and twice that layout's warps, on persistent
  grids: 1, 2 or 4 programs an SM loading the next rows ahead with the
  scale held, or 2 re-reading it without loading ahead."""
  yield triton_config.get_config(1, n, dtype)
  base = triton_config.get_config(1, n, dtype, residual=True)
  yield base
  if not base.resident(n):
    return
  layouts = {(base.block_rows, base.block_cols)}
  if base.block_rows == 1 and n >= 8192:
    layouts |= {(1, 2048), (1, 4096)}
  for (rows, cols), warps in itertools.product(
      sorted(layouts), (base.num_warps // 2, base.num_warps,
                        base.num_warps * 2)):
    if not 1 <= warps <= 32 or rows * cols < 32 * warps:
      continue
    one = triton_config.Config(rows, cols, warps)
    for per_sm in (1, 2, 4):
      yield dataclasses.replace(one, programs_per_sm=per_sm, prefetch=True,
                                hold_scale=True)
    yield dataclasses.replace(one, programs_per_sm=2)


def quant_candidates(n: int, dtype: str, residual: bool = False,
                     static: bool = False):
  """The heuristic's choice, compact_candidates, and the heuristic's layout
  (one block a program) at half, the same and twice its warps as persistent
  grids of 2, 4 or 8 programs an SM, each holding the scale, with and
  without loading the next rows ahead."""
  base = triton_config.get_quant_config(1, n, dtype, residual=residual,
                                        static=static)
  yield base
  yield from compact_candidates(n)
  if not base.resident(n):
    return
  base = dataclasses.replace(base, programs_per_sm=0, prefetch=False,
                             hold_scale=False)
  for warps in (base.num_warps // 2, base.num_warps, base.num_warps * 2):
    if not 1 <= warps <= 32:
      continue
    for per_sm, prefetch in itertools.product((2, 4, 8), (True, False)):
      yield dataclasses.replace(base, num_warps=warps, programs_per_sm=per_sm,
                                prefetch=prefetch, hold_scale=True)


def quant_fold_candidates(n: int, dtype: str):
  """The heuristic's layout with the amax folded into the first reduction
  and without (Config.fold_amax); folded, on persistent grids of 2 to 16
  programs an SM where the layout is persistent."""
  base = triton_config.get_quant_config(1, n, dtype)
  for fold in (False, True):
    yield dataclasses.replace(base, fold_amax=fold)
  if base.programs_per_sm:
    for per_sm in (2, 4, 8, 16):
      yield dataclasses.replace(base, fold_amax=True, programs_per_sm=per_sm)


def layout_candidates(n: int, dtype: str, **fields):
  """Rows held as chunks of 1024 to their padded width (1 to 8 rows a
  block up to 1024), at 8 to 64 elements a thread (32 for float32), one
  block a program or on a persistent grid of 1, 2 or 4 programs an SM
  loading the next rows ahead with the scale held (at most 64 warps an
  SM); `fields` set on every one."""
  itemsize = np.dtype(dtype).itemsize
  cols = pl.next_power_of_2(n)
  if cols <= 1024:
    layouts = [(rows, cols) for rows in (1, 2, 4, 8)]
  else:
    layouts = [(1, chunk) for chunk in (1024, 2048, 4096, 8192, 16384)
               if chunk <= cols and chunk * pl.cdiv(n, chunk)
               <= triton_config.MAX_ONE_PASS_COLS]
  max_per_thread = 64 // (itemsize // 2)
  for (rows, chunk), warps in itertools.product(layouts, (2, 4, 8, 16, 32)):
    per_thread = rows * chunk * pl.cdiv(n, chunk) // (32 * warps)
    if not 8 <= per_thread <= max_per_thread:
      continue
    one = triton_config.Config(rows, chunk, warps, **fields)
    yield one
    for per_sm in (1, 2, 4):
      if warps * per_sm <= 64:
        yield dataclasses.replace(one, programs_per_sm=per_sm, prefetch=True,
                                  hold_scale=True)


def warp_rows_candidates(n: int, dtype: str, *, base: triton_config.Config,
                         **fields):
  """`base` (the heuristic's choice), then rows held as chunks of 128 or 256
  columns that divide n (896 = 7 x 128), a block of 2 to 32 rows on as
  many warps or half as many, so that Triton's layout (16 bytes a thread
  along the chunk, warps stacked down the rows) keeps each row's reduction
  inside a warp; 8 to 64 elements a thread (32 for float32); one block a
  program, or on a persistent grid of 4 or 8 programs an SM loading the
  next block ahead with the scale held (at most 64 warps an SM). `fields`
  set on every one."""
  yield base
  itemsize = np.dtype(dtype).itemsize
  max_per_thread = 64 // (itemsize // 2)
  for chunk, rows, per_warp in itertools.product(
      (128, 256), (2, 4, 8, 16, 32), (1, 2)):
    warps = rows // per_warp
    per_thread = rows * n // (32 * warps)
    if n % chunk or warps > 16 or not 8 <= per_thread <= max_per_thread:
      continue
    one = triton_config.Config(rows, chunk, warps, **fields)
    yield one
    for per_sm in (4, 8):
      if warps * per_sm <= 64:
        yield dataclasses.replace(one, programs_per_sm=per_sm, prefetch=True,
                                  hold_scale=True)


def quant_fold_hint_candidates(n: int, dtype: str):
  """The heuristic's layout and blocks of 2 rows a warp (4, 8 or 16 rows),
  each with the amax folded or not and with the forward's cache hints or
  not: where the dynamic kernel is a few percent under 90% of the byte
  floor (bf16 65536 x 896)."""
  base = triton_config.get_quant_config(1, n, dtype)
  layouts = [base] + [dataclasses.replace(base, block_rows=rows,
                                          num_warps=rows // 2)
                      for rows in (4, 8, 16)]
  for layout, fold, hints in itertools.product(layouts, (False, True),
                                               (False, True)):
    yield dataclasses.replace(layout, fold_amax=fold, cache_hints=hints)


def quant_hint_candidates(n: int, dtype: str, static: bool = False,
                          residual: bool = False):
  """The heuristic's layout with and without the forward's cache hints."""
  base = triton_config.get_quant_config(1, n, dtype, static=static,
                                        residual=residual)
  yield base
  yield dataclasses.replace(base, cache_hints=not base.cache_hints)


def split_tail_candidates(n: int, dtype: str, base=None, *,
                          static: bool = False, residual: bool = False):
  """The heuristic's layout (the quantized kernel's, unless `base`), then
  the same with the columns past the last whole chunk in a narrower one
  (Config.split_tail), and so with chunks as wide as the largest power of
  two in n, where those differ."""
  if base is None:
    base = triton_config.get_quant_config(1, n, dtype, static=static,
                                          residual=residual)
  yield base
  split = dataclasses.replace(base, split_tail=True)
  if split.chunk_widths(n) != base.chunk_widths(n):
    yield split
  widest = 1 << (n.bit_length() - 1)
  if widest != base.block_cols and widest % (32 * base.num_warps) == 0:
    yield dataclasses.replace(split, block_cols=widest)


def tail_layout_candidates(n: int, dtype: str, base=None, *,
                           static: bool = False):
  """The heuristic's layout (the quantized kernel's, unless `base`), then
  `layout_candidates` with a narrow last chunk (Config.split_tail) and the
  L2 hints: where a row is a power of two and a few columns (4099), the
  launches that the narrow chunk's sweep (`split_tail_candidates`) kept."""
  if base is None:
    base = triton_config.get_quant_config(1, n, dtype, static=static)
  yield base
  yield from layout_candidates(n, dtype, split_tail=True, cache_hints=True,
                               fold_amax=base.fold_amax)


def quant_held_candidates(n: int, dtype: str, static: bool = False):
  """The heuristic's choice and, where it is persistent, the same with the
  scale re-read each step rather than held (Config.hold_scale), on 2, 4
  and 8 programs an SM."""
  base = triton_config.get_quant_config(1, n, dtype, static=static)
  yield base
  if not base.programs_per_sm:
    return
  for per_sm in dict.fromkeys((base.programs_per_sm, 2, 4, 8)):
    yield dataclasses.replace(base, programs_per_sm=per_sm, hold_scale=False)


def quant_layout_candidates(n: int, dtype: str):
  """The heuristic's choice, then `layout_candidates` with the amax folded
  (Config.fold_amax)."""
  yield triton_config.get_quant_config(1, n, dtype)
  yield from layout_candidates(n, dtype, fold_amax=True)


def residual_layout_candidates(n: int, dtype: str):
  """The heuristic's choice with a residual, then `layout_candidates`."""
  yield triton_config.get_quant_config(1, n, dtype, residual=True)
  yield from layout_candidates(n, dtype)


def forward_layout_candidates(n: int, dtype: str):
  """The heuristic's choice, then `layout_candidates` with the forward's
  cache hints."""
  yield triton_config.get_config(1, n, dtype)
  yield from layout_candidates(n, dtype, cache_hints=True)


# The quantized sweeps whose candidates are not `quant_candidates`.
QUANT_CANDIDATES = {
    "quant-fold": quant_fold_candidates,
    "quant-fold-hints": quant_fold_hint_candidates,
    "quant-held": quant_held_candidates,
    "quant-hints": quant_hint_candidates,
    "quant-static-hints": functools.partial(quant_hint_candidates,
                                            static=True),
    "quant-float32-hints": quant_hint_candidates,
    "quant-residual-hints": functools.partial(quant_hint_candidates,
                                              residual=True),
    "quant-static-residual-hints": functools.partial(
        quant_hint_candidates, static=True, residual=True),
    "quant-static-held": functools.partial(quant_held_candidates,
                                           static=True),
    **{f"{op}-tail": functools.partial(
        split_tail_candidates, static="static" in op or "channel" in op,
        residual="residual" in op)
       for op in ("quant", "quant-static", "quant-residual",
                  "quant-static-residual", "quant-channel",
                  "quant-channel-residual")},
    "quant-tail-layouts": tail_layout_candidates,
    "quant-static-tail-layouts": functools.partial(tail_layout_candidates,
                                                   static=True),
    **{f"quant-layouts-{dtype}": quant_layout_candidates
       for dtype in QUANT_LAYOUT_SWEEPS},
    "quant-residual-layouts-float32": residual_layout_candidates,
    "quant-static-residual-layouts-float32": residual_layout_candidates,
}


def backward_candidates(m: int, n: int, dtype: str):
  base = triton_config.get_backward_config(m, n, dtype)
  cols = pl.next_power_of_2(n)
  widths = sorted({cols} | {w for w in (2048,) if n >= 4096 and w < cols})
  warps = (4, 8) if cols <= 1024 else (8, 16, 32)
  per_sm = (4, 8) if cols <= 1024 else (1, 2)
  for width, w, p, prefetch in itertools.product(widths, warps, per_sm,
                                                 (False, True)):
    if base.block_rows * width >= 32 * w:
      yield dataclasses.replace(base, block_cols=width, num_warps=w,
                                programs_per_sm=p, prefetch=prefetch)


def backward_warp_rows_candidates(m: int, n: int, dtype: str):
  """The heuristic's choice, then rows held as chunks of 128 columns that
  divide n, each row inside one warp (a block of 2 to 16 rows on as many
  warps or half as many, at most 64 elements of a row a thread, 32 for
  float32: x, dy and the d(scale) sums take three times that), on 4 or 8
  programs an SM, loading the next block ahead or not."""
  base = triton_config.get_backward_config(m, n, dtype)
  yield base
  max_per_thread = 64 // (np.dtype(dtype).itemsize // 2)
  for rows, per_warp, per_sm, prefetch in itertools.product(
      (2, 4, 8, 16), (1, 2), (4, 8), (False, True)):
    warps = rows // per_warp
    if (n % 128 or warps > 16
        or rows * n // (32 * warps) > max_per_thread):
      continue
    yield dataclasses.replace(base, block_rows=rows, block_cols=128,
                              num_warps=warps, programs_per_sm=per_sm,
                              prefetch=prefetch, hold_scale=False)


def backward_small_candidates(m: int, n: int, dtype: str):
  base = triton_config.get_backward_config(m, n, dtype)
  for blocks, prefetch in itertools.product((1, 2, 4, 8), (False, True)):
    yield dataclasses.replace(base, min_blocks_per_program=blocks,
                              prefetch=prefetch)


def backward_register_candidates(m: int, n: int, dtype: str):
  """The heuristic's choice, then each of its register choices flipped."""
  base = triton_config.get_backward_config(m, n, dtype)
  yield base
  yield dataclasses.replace(base, dscale_by_columns=not base.dscale_by_columns)
  if m <= 256:
    return
  yield dataclasses.replace(base, hold_scale=not base.hold_scale)
  cols = pl.next_power_of_2(n)
  if cols > 8192:
    for width, warps in ((cols, 8), (cols, 16), (2048, 8), (2048, 16)):
      yield dataclasses.replace(base, block_cols=width, num_warps=warps)


def _backward_row(m, n, dtype, iterations, candidates=backward_candidates):
  x, scale = testing.random_inputs(0, (m, n), dtype)
  dy, _ = testing.random_inputs(1, (m, n), dtype)
  ref = testing.oracle_grad(x, scale, dy)
  rstd = jax.jit(lambda a, s: triton_forward.forward(
      a, None, s, epsilon=1e-6, scale_offset=0.0, save_rstd=True).rstd)(
          x, scale)
  row = dict(m=m, n=n, dtype=dtype,
             copy_us=bench.copy_ceiling(m, n, dtype)["copy_us"],
             xla_us=bench.measure_us(jax.jit(bench.xla_backward), x, scale, dy),
             default=str(triton_config.get_backward_config(m, n, dtype)),
             configs=[])
  for cfg in candidates(m, n, dtype):
    fn = jax.jit(functools.partial(triton_backward.backward, scale_offset=0.0,
                                   config=cfg))
    try:
      dx, ds = fn(x, dy, None, scale, rstd)
      # The kernel's d(scale) is float32 (the vjp rounds it afterwards).
      worst = testing.grads_excess(dx, ds, ref, dtype, "float32")
      us = bench.measure_us(fn, x, dy, None, scale, rstd,
                            iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      row["configs"].append(dict(config=str(cfg), error=repr(e)[:300]))
      continue
    row["configs"].append(dict(config=str(cfg), us=us,
                               error_over_bound=worst.ratio))
  return row


def _short(config: str) -> str:
  """A Config's repr without its defaults, for the printed summary."""
  fields = dataclasses.fields(triton_config.Config)
  for f in fields:
    if f.default is not dataclasses.MISSING:
      config = config.replace(f", {f.name}={f.default!r}", "")
  return config.replace("Config(", "(")


def passed(config_row: dict) -> bool:
  """The gate: timed, and within the oracle's bounds."""
  return ("us" in config_row
          and config_row.get("error_over_bound", float("inf")) <= 1)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.tune_triton", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="tune.json")
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--sweep", choices=tuple(SWEEPS), default="large")
  args = parser.parse_args(argv)
  results = []
  for m, n, dtype in SWEEPS[args.sweep]:
    if args.sweep == "backward":
      row = _backward_row(m, n, dtype, args.iterations)
    elif args.sweep == "backward-small":
      row = _backward_row(m, n, dtype, args.iterations,
                          backward_small_candidates)
    elif args.sweep == "backward-warp-rows":
      row = _backward_row(m, n, dtype, args.iterations,
                          backward_warp_rows_candidates)
    elif args.sweep == "backward-registers":
      row = _backward_row(m, n, dtype, args.iterations,
                          backward_register_candidates)
    elif args.sweep == "forward-tail-layouts":
      row = _forward_row(m, n, dtype, args.iterations, tuple(dict.fromkeys(
          tail_layout_candidates(
              n, dtype, base=triton_config.get_config(1, n, dtype)))))
    elif args.sweep == "forward-tail":
      row = _forward_row(m, n, dtype, args.iterations, tuple(
          split_tail_candidates(n, dtype,
                                base=triton_config.get_config(1, n, dtype))))
    elif args.sweep == "forward-layouts":
      row = _forward_row(m, n, dtype, args.iterations,
                         dict.fromkeys(forward_layout_candidates(n, dtype)))
    elif args.sweep == "forward-warp-rows":
      row = _forward_row(m, n, dtype, args.iterations, dict.fromkeys(
          warp_rows_candidates(n, dtype,
                               base=triton_config.get_config(1, n, dtype),
                               cache_hints=True)))
    elif args.sweep == "forward-persistent":
      row = _forward_row(m, n, dtype, args.iterations,
                         dict.fromkeys(
                             forward_persistent_candidates(n, dtype)))
    elif args.sweep.startswith("quant"):
      per_channel = "channel" in args.sweep
      static = "static" in args.sweep or per_channel
      residual = "residual" in args.sweep
      candidates = QUANT_CANDIDATES.get(args.sweep)
      if args.sweep.endswith("warp-rows"):
        candidates = functools.partial(
            warp_rows_candidates, base=triton_config.get_quant_config(
                1, n, dtype, residual=residual, static=static))
      row = _quant_row(m, n, dtype, args.iterations, static=static,
                       residual=residual, per_channel=per_channel,
                       candidates=candidates)
    else:
      row = _forward_row(m, n, dtype, args.iterations,
                         (compact_candidates if args.sweep == "forward-h200"
                          else candidates)(n))
    ok = sorted(filter(passed, row["configs"]), key=lambda c: c["us"])
    failed = sum("error_over_bound" in c and not passed(c)
                 for c in row["configs"])
    best = ok[0] if ok else None
    default = [c.get("us") for c in row["configs"]
               if c["config"] == row["default"]]
    floor = f" floor {row['floor_us']:7.1f}" if "floor_us" in row else ""
    runners_up = [(_short(c["config"]), round(c["us"], 1)) for c in ok[1:4]]
    print(f"{dtype:9s} {m:6d}x{n:<6d} copy {row['copy_us']:8.1f}{floor} xla "
          f"{row['xla_us']:8.1f} default {_short(row['default'])} "
          f"{default[0] if default else None}"
          " best "
          + (f"{best['us']:8.1f} {_short(best['config'])} error/bound "
             f"{best['error_over_bound']:.2f}" if best else "none passed")
          + f" | failed the bounds: {failed}"
          f" | next: {runners_up}",
          flush=True)
    results.append(row)
    with open(args.out, "w") as f:
      json.dump(dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                     results=results), f, indent=1)
  return 0


def _timed_row(row, make, args, check, configs, iterations, checked=3):
  """Times every configuration (`make(cfg)` -> jitted function of `args`),
  then checks the fastest against the oracle (`check(output)` -> Worst)
  until `checked` of them passed: the oracle is slow at large shapes."""
  timed = []
  for cfg in configs:
    fn = make(cfg)
    try:
      us = bench.measure_us(fn, *args, iterations=iterations)
    except Exception as e:  # pylint: disable=broad-except
      row["configs"].append(dict(config=str(cfg), error=repr(e)[:300]))
      continue
    timed.append((us, cfg, fn))
  passed_count = 0
  for us, cfg, fn in sorted(timed, key=lambda t: t[0]):
    entry = dict(config=str(cfg), us=us)
    if passed_count < checked:
      entry["error_over_bound"] = check(fn(*args)).ratio
      passed_count += entry["error_over_bound"] <= 1
    row["configs"].append(entry)
  return row


def _forward_row(m, n, dtype, iterations, configs):
  x, scale = testing.random_inputs(0, (m, n), dtype)
  ref64 = testing.oracle(x, scale)
  xla = jax.jit(functools.partial(api.rms_norm_reference, epsilon=1e-6))
  row = dict(m=m, n=n, dtype=dtype,
             copy_us=bench.copy_ceiling(m, n, dtype)["copy_us"],
             xla_us=bench.measure_us(xla, x, scale),
             default=str(triton_config.get_config(m, n, dtype)),
             configs=[])
  make = lambda cfg: jax.jit(lambda a, s: triton_forward.forward(
      a, None, s, epsilon=1e-6, scale_offset=0.0, config=cfg).y)
  return _timed_row(
      row, make, (x, scale),
      lambda y: testing.worst_excess(y, ref64, dtype, n),
      configs, iterations)


def _quant_row(m, n, dtype, iterations, static: bool, residual: bool,
               per_channel: bool = False, candidates=None):
  """The quantized kernel to float8_e4m3fn: dynamic per-token scales, or a
  static scale (one value, or one a column where `per_channel`), with or
  without the fused residual add (h checked bit for bit); XLA's time is the
  reference's (its fusion). `candidates`: a generator of (n, dtype) ->
  Configs instead of `quant_candidates`."""
  x, scale = testing.random_inputs(0, (m, n), dtype)
  r = testing.random_inputs(1, (m, n), dtype)[0] if residual else None
  h = None if r is None else np.asarray(reference.residual_add(x, r))
  y64 = testing.oracle(x if h is None else h, scale)
  quant_scale = (bench.channel_scale(n) if per_channel
                 else jax.numpy.float32(bench.QUANT_STATIC_SCALE) if static
                 else None)
  rel = testing.quantized_relative_error(n)

  def check(out):
    y_q, row_scales, h_out = out
    s = quant_scale if static else row_scales
    worst = [testing.quantized_excess(y_q, s, y64, bench.QUANT_DTYPE, rel)]
    if not static:
      worst.append(testing.scales_excess(row_scales, y64, bench.QUANT_DTYPE,
                                         n))
    if h is not None:
      worst.append(testing.Worst(
          -np.inf if np.array_equal(np.asarray(h_out), h) else np.inf,
          ("h",)))
    return testing.worst_of(*worst)

  op = speed_table.quant_op(static=static, residual=residual,
                            per_channel=per_channel)
  xla = jax.jit(lambda a, s, res: api.rms_norm_quantized(
      a, s, quant_dtype=bench.QUANT_DTYPE, quant_scale=quant_scale,
      residual=res, implementation="xla"))
  # Bytes read and written over the copy speed: the quantized output's
  # byte floor (bench.quant_bytes).
  nbytes = bench.OP_BYTES[op](m, n, dtype, scale.dtype)
  ceiling = bench.copy_ceiling(m, n, dtype)
  row = dict(m=m, n=n, dtype=dtype, op=op, copy_us=ceiling["copy_us"],
             floor_us=nbytes / ceiling["copy_gbps"] / 1e3,
             xla_us=bench.measure_us(xla, x, scale, r),
             default=str(triton_config.get_quant_config(
                 m, n, dtype, residual=residual, static=static,
                 per_channel=per_channel)),
             configs=[])
  make = lambda cfg: jax.jit(lambda a, s, res: triton_quantize.forward(
      a, res, s, quant_scale, epsilon=1e-6, scale_offset=0.0,
      quant_dtype=bench.QUANT_DTYPE, config=cfg))
  configs = (candidates(n, dtype) if candidates
             else quant_candidates(n, dtype, residual, static))
  return _timed_row(row, make, (x, scale, r), check, dict.fromkeys(configs),
                    iterations)


if __name__ == "__main__":
  sys.exit(main())
