"""Launch configuration of the Pallas-Triton kernels and its one heuristic."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from jax.experimental import pallas as pl

# Rows longer than this (after padding to a power of two) are not held in
# registers in one piece; the kernel loops over them in chunks (two passes).
MAX_ONE_PASS_COLS = 16384
# Beyond this the reference is used: a single row of 1M+ elements is not an
# RMSNorm workload, and the chunked kernel is untested there.
MAX_COLS = 1 << 20
# Triton computes element offsets in int32.
MAX_ELEMENTS = (1 << 31) - 1


@dataclasses.dataclass(frozen=True)
class Config:
  """How one pallas_call is launched.

  Attributes:
    block_rows: rows handled by one program (a power of two).
    block_cols: columns loaded at once (a power of two): the row is split in
      cdiv(n, block_cols) chunks. While those fit in MAX_ONE_PASS_COLS they
      stay in registers (one pass over HBM); past that the kernel loops over
      the chunks twice (two passes).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth (matters for loops).
    programs_per_sm: 0 launches one program per block of rows. Otherwise a
      persistent grid of about this many programs per SM, each looping over
      every grid-th block of rows (the backward, whose programs each keep a
      float32 partial sum of d(scale); the forward and the quantized kernel
      where it was measured to win).
    prefetch: the persistent loop loads the next block of rows before it
      computes the current one.
    min_blocks_per_program: fewer programs for few rows, so that the float32
      partials (one row of n per program) stay small next to the input.
    hold_scale: a persistent program loads the scale once and holds it in
      registers across its loop, rather than re-reading it every step.
    dscale_by_columns: the backward sums d(scale) by column slices over all
      rows (for few rows) rather than in per-program partials.
    cache_hints: rows are loaded with L2 priority evict_last and outputs
      stored evict_first (`common.RowBlock`; the forward, where it was
      measured to win: the comments at _FORWARD_CACHE_HINTS).
    fold_amax: the quantized kernel with a dynamic scale (default cast
      order) reduces max |x * scale| beside the sum of squares and takes
      the amax as its product with rstd (`quantize.amax_from_scaled`): no
      row reduction after rstd, one more accumulator in registers (where
      measured to win: the comments at _QUANT_FOLD_AMAX_WIDE_BYTES).
    split_tail: the columns past a row's last whole chunk are held in one
      narrower chunk (`chunk_widths`) rather than in one more chunk of
      block_cols that is mostly masked; rows held in registers only (the
      comments at _NARROW_TAIL_BELOW).
  """
  block_rows: int
  block_cols: int
  num_warps: int
  num_stages: int = 1
  programs_per_sm: int = 0
  prefetch: bool = False
  min_blocks_per_program: int = 1
  hold_scale: bool = False
  dscale_by_columns: bool = False
  cache_hints: bool = False
  fold_amax: bool = False
  split_tail: bool = False

  def __post_init__(self):
    for field in ("block_rows", "block_cols", "num_warps"):
      value = getattr(self, field)
      if value < 1 or value & (value - 1):
        raise ValueError(f"Config.{field} must be a power of two, got {value}")

  def chunk_widths(self, n: int) -> tuple[int, ...]:
    """The widths of a row's chunks, in order: block_cols each, the last
    padded past n; with split_tail the columns past the last whole chunk
    in one chunk of the next power of two, at least _NARROW_TAIL_MIN_COLS
    (4099 in chunks of 4096: (4096, 4); in chunks of 2048: (2048, 2048,
    4); 4097: (4096, 4))."""
    whole, rest = divmod(n, self.block_cols)
    if not (self.split_tail and whole and rest):
      return (self.block_cols,) * pl.cdiv(n, self.block_cols)
    tail = min(max(pl.next_power_of_2(rest), _NARROW_TAIL_MIN_COLS),
               self.block_cols)
    return (self.block_cols,) * whole + (tail,)

  def num_chunks(self, n: int) -> int:
    return len(self.chunk_widths(n))

  def num_programs(self, rows: int, sm_count: int) -> int:
    """Programs to launch for `rows` rows on `sm_count` SMs."""
    row_blocks = pl.cdiv(rows, self.block_rows)
    if not self.programs_per_sm:
      return row_blocks
    # At least min_blocks_per_program blocks each, but not fewer programs
    # than SMs; then as few programs as give the same number of steps (the
    # steps even out, and the partials shrink).
    programs = max(min(row_blocks, sm_count),
                   row_blocks // self.min_blocks_per_program)
    programs = min(programs, self.programs_per_sm * sm_count)
    steps = pl.cdiv(row_blocks, programs)
    return pl.cdiv(row_blocks, steps)

  def resident(self, n: int) -> bool:
    """Whether a row is held in registers (one pass) rather than re-read."""
    return sum(self.chunk_widths(n)) <= MAX_ONE_PASS_COLS


def column_tile(rows: int, n: int, programs: int, itemsize: int
                ) -> tuple[int, int, int]:
  """(tile_rows, tile_cols, slices per program) of the backward's column
  sums of d(scale): about one slice of columns per program, each at least
  128 bytes wide, walked down the rows in tiles of up to _COLUMN_TILE
  elements."""
  tile_cols = max(128 // itemsize, pl.next_power_of_2(pl.cdiv(n, programs)))
  tile_cols = min(tile_cols, pl.next_power_of_2(n))
  tile_rows = min(pl.next_power_of_2(rows), max(1, _COLUMN_TILE // tile_cols))
  slices = pl.cdiv(n, tile_cols)
  return tile_rows, tile_cols, pl.cdiv(slices, programs)


# Warps per program by the bytes a program loads (rounded to the nearest power
# of two), tuned on an H100 with `python -m benchmarks.tune_triton` (results in
# benchmarks/results/tune_triton_*h100.json). One row per program won
# everywhere. 4 warps up to 8 KiB keeps decode sizes (M <= 256) at or under
# XLA's time; 16 warps from 16 KiB keeps large-M rows at the copy ceiling.
_WARPS_BY_BYTES = ((1024, 1), (2048, 2), (8192, 4), (32768, 16))
# Rows padded past 32 KiB (float32 rows of 8193..16384) are held in registers
# as chunks of 2048 elements with 32 warps: 14336 = 7 x 2048 ran at 98% of the
# copy bandwidth, the padded 16384 at 96% at best.
_WIDE_CHUNK_COLS, _WIDE_WARPS = 2048, 32
# Chunk width of the two-pass kernel for rows past MAX_ONE_PASS_COLS.
_LOOP_CHUNK_COLS_BY_ITEMSIZE = {2: 8192, 4: 2048}
# A row that fills less than this share of its padded width is held as two
# chunks of half that width, one program a row: on an H200, bf16 4096 x 4099
# in 24.9 us against 29.1 as one padded block of 8192 (XLA: 27.2); 8192 x
# 5120 44.5 against 45.1 (`python -m benchmarks.tune_triton --sweep
# forward-h200`, benchmarks/results/tune_triton_forward_h200.json).
_HALVE_BELOW_FILL = 0.75
# Without a residual, rows of 8 KiB or more held in registers run on a
# persistent grid that holds the scale and loads the next row while it
# reduces the current one (H200, `python -m benchmarks.tune_triton --sweep
# forward-persistent`, benchmarks/results/tune_triton_forward_persistent_
# h200.json; us against one row a program). Power-of-two rows by their
# bytes, (warps, programs an SM): 8 KiB (bf16 4096) 8 warps, 4 an SM:
# 32768 x 4096 134.3 against 135.3, 2048 x 4096 7.3 against 7.8; 16 and 32
# KiB (bf16 8192, f32 4096 and 8192) 16 warps, 2 an SM: 16384 x 8192 135.3
# against 135.8, f32 268.6 against 268.9 and 269.0 against 274.0. (32 warps
# ran the bf16 forward alone in 133.6 but the training step, whose forward
# also writes rstd, in 364 us against 343 with 16:
# benchmarks/results/step_forward_launch_h200.json.)
# Rows held as halves keep their warps, 4 an SM (8192 x 5120: bf16 43.4
# against 44.0, f32 84.7 against 86.0; 4096 x 4099: bf16 23.6 against
# 24.8, f32 41.0 against 41.7, tune_triton_forward_persistent_4099_h200.
# json). Rows past 8192 as chunks of 8 KiB on 32 warps, one program an SM
# (4096 x 14336: bf16 62.3 against 64.6 as one padded 16384, f32 117.2
# against 124.5). Rows padded to one block (32768 x 3072: 102.6 against
# 100.9) and shorter rows (65536 x 896: 88.4 against 59.6, 4096 x 2048:
# 8.0 against 7.7) lost. Untried: the forward with a residual (two inputs
# loaded ahead), and an H100 (its records predate this grid).
_PERSISTENT_MIN_ROW_BYTES = 8192
_PERSISTENT_BY_ROW_BYTES = {8192: (8, 4), 16384: (16, 2), 32768: (16, 2)}
_PERSISTENT_HALVES_PER_SM = 4
_PERSISTENT_WIDE = dict(num_warps=32, programs_per_sm=1)
_PERSISTENT_WIDE_CHUNK_BYTES = 8192
# The forward's rows (x, the residual) are loaded with L2 eviction priority
# evict_last and its outputs (y, h) stored evict_first. On an H200 (JAX
# 0.11.2, CUPTI; benchmarks/results/cache_hints_h200.json) the loads' hint
# alone ran f32 32768 x 4096 in 258.8 us against 270.1, bf16 32768 x 4096
# 129.7 against 134.9, 16384 x 8192 130.6 against 136.4, add_rms_norm bf16
# 32768 x 4096 266.1 against 274.5; the stores' hint 2048 x 4096 in 6.7
# against 7.4 (every other shape within 1% of the loads' hint alone). The
# same hints on a Pallas copy sped it up alike (f32 264 -> 254 us), and the
# benchmarks' copy ceiling includes that copy. The backward (within +-2%
# either way, 14336 slower) keeps none.
_FORWARD_CACHE_HINTS = True
# The quantized kernel takes the same hints on every row. The loads' hint
# alone, with the layouts of the time, had changed nothing
# (cache_hints_h200.json); both, three passes alternated (H200, `python -m
# benchmarks.tune_triton --sweep {quant,quant-static}-hints`,
# benchmarks/results/tune_triton_quant_hints_h200.json), bf16, us without
# -> with: dynamic 65536 x 896 47.8 -> 47.2, 4096 x 4099 24.5 -> 23.9,
# 2048 x 4096 7.2 -> 6.9, 4096 x 2048 7.9 -> 7.6, 4096 x 14336 53.8 ->
# 54.0 (a tie); static 4096 x 4099 21.3 -> 19.9. Float32 rows and rows
# with a residual, one pass (`--sweep quant-float32-hints`,
# `quant-residual-hints`, `quant-static-residual-hints`;
# tune_triton_quant_hints_more_h200.json), faster in every row by 0.3% to
# 14%: float32 2048 x 4096 10.8 -> 9.3, 4096 x 4099 with a residual 69.6
# -> 68.0, 16384 x 8192 with a residual 444.0 -> 434.6 (static 438.4 ->
# 424.4), bf16 65536 x 896 with a residual and a static scale 100.8 ->
# 99.0.
_QUANT_CACHE_HINTS = True
# Rows a power of two and a few columns long (4099 = 4096 + 3) ended in a
# chunk that held the few columns and masked the rest (2048 lanes of 2048
# but 3, or of 4096 but 3): every masked lane still costs its load and
# store instructions, and these rows, not on 16 bytes, load element by
# element. Held as chunks of that power of two and one narrow chunk of
# the rest (Config.split_tail; `_narrow_tail`), the launch otherwise kept,
# they ran faster in every kernel without a residual and in every
# quantized one with (H200, one pass, `python -m benchmarks.tune_triton
# --sweep {forward,quant,quant-static,quant-residual,quant-static-residual,
# quant-channel,quant-channel-residual}-tail`,
# benchmarks/results/tune_triton_tail_h200.json; 4096 x 4099, us): the
# forward bf16 23.7 -> 23.5, float32 40.4 -> 38.5; dynamic codes bf16 23.9
# -> 22.0, float32 30.1 -> 28.4; static bf16 20.0 -> 19.5, float32 29.8 ->
# 28.7; with a residual bf16 41.3 -> 39.1, float32 67.4 -> 65.7; static
# with a residual bf16 40.7 -> 40.8 (a tie), float32 65.9 -> 65.0; a scale
# a column bf16 33.2 -> 31.0, float32 41.8 -> 39.6, with a residual bf16
# 49.0 -> 47.1, float32 70.9 -> 67.5. Wider remainders held in narrower
# chunks lost (4096 x 14336: the forward as 3 x 4096 and 2048, 61.5 ->
# 72.6 us; dynamic codes as 8192, 4096 and 2048, 53.7 -> 76.2; static as
# 3 x 4096 and 2048, 49.8 -> 59.6), so only remainders under an eighth
# of that power of two take a narrow chunk. Rows that start on
# 16 bytes (4104) keep their launch: the forward tied there (2 x 4096:
# 20.0 us, (4096, 8): 20.1, one row a program, in a standalone kernel not
# kept here), the quantized kernel is untimed.
_NARROW_TAIL_BELOW = 8
# With the narrow chunk, the launch that won at 4096 x 4099 without a
# residual, by kernel and itemsize (H200, JAX 0.11.2, CUPTI, us; the
# heuristic's launch -> this one; `python -m benchmarks.tune_triton --sweep
# {forward,quant,quant-static}-tail-layouts`, then every (warps 4, 8, 16) x
# (programs an SM 2, 4, 8) x (chunks 2048, 4096) in three interleaved
# rounds, benchmarks/results/tune_triton_tail_layouts_h200.json; both
# passes agreed): the forward bf16 (4 warps, 4 an SM) 23.4 -> 22.9,
# float32 (16, 4) 38.5 -> 38.0; dynamic codes bf16 (chunks of 4096, 8 an
# SM) 22.0 -> 20.9; static bf16 (8 an SM) 19.4 -> 17.9, float32 (8 warps)
# 28.6 -> 27.5. Dynamic float32 kept its launch (28.5, the fastest). A
# scale a column on the static scale's launches (the records,
# `benchmark_rmsnorm --ops quant-channel --shapes 4096x4099`): float32 36.6
# -> 34.3, taken; bf16 31.4 -> 34.6 on 4 an SM, so it keeps 8. Only rows of
# 4096 and a few columns were measured; other widths, and rows with a
# residual, keep their launch. Keyed by itemsize: float16 rows take bf16's
# launch, untimed.
_NARROW_TAIL_LAUNCH_WIDEST = 4096
_NARROW_TAIL_LAUNCH = {
    ("forward", 2): dict(num_warps=16, programs_per_sm=2),
    ("forward", 4): dict(num_warps=16, programs_per_sm=2),
    ("dynamic", 2): dict(block_cols=2048, programs_per_sm=4),
    ("static", 2): dict(programs_per_sm=4),
    ("static", 4): dict(num_warps=16),
    ("channel", 4): dict(num_warps=16),
}
# The narrowest last chunk: 4, which ran compiled on the H200 (4099);
# narrower ones (257 = 256 + 1) lower for CUDA but never ran.
_NARROW_TAIL_MIN_COLS = 4
# Rows of at most 1024 that are a multiple of 128 but not a power of two
# (896 = 7 x 128): a block padded to the next power of two spreads each row
# over several warps (the sums cross them through shared memory) and masks
# an eighth of its lanes. Without a residual they are held as chunks of
# 128 instead, no padding, each row inside one warp: bf16 2 rows on 1 warp
# (16 lanes a row), float32 8 rows on 8 warps (32 lanes a row). On an H200
# (JAX 0.11.2, CUPTI, 65536 x 896, us, against the layouts they replace;
# `python -m benchmarks.tune_triton --sweep forward-warp-rows`, and the
# quant-, quant-static-, quant-channel-, quant-residual-,
# quant-static-residual- and quant-channel-residual-warp-rows sweeps, 12
# to 26 layouts a shape; benchmarks/results/tune_triton_warp_rows_h200.json):
# the forward bf16 57.1 against 58.7 (the best, 8 rows on 8 warps, 56.9),
# float32 111.2 against 111.9; the quantized kernel with a dynamic scale
# bf16 48.5 against 50.3 (the best), float32 on 4 programs an SM, the amax
# not folded, 75.7 against 78.9 (the best); with a static scale bf16 43.8
# against 46.5 (the best), float32 70.7 against 78.9 (one block a program
# 69.3). With a residual and a static scale, one value or one a column,
# 8 rows on 8 warps in both dtypes, 8 programs an SM loading the next rows
# ahead: bf16 100.7 against 103.0, per-channel 103.1 against 108.3;
# float32 182.1 against 194.6, per-channel 184.0 against 201.2. With a
# residual and a dynamic scale they lost or tied (bf16 at best 103.6
# against 104.6; float32 196.4 against 195.9): not taken. Rows of 2048
# (4096 x 2048) gained nothing but the static scale's 6.4 against 6.9 (not
# taken). 384, 640 and 768 take the rule untimed. The backward keeps one
# padded row a program: held a warp a row it tied or lost (`--sweep
# backward-warp-rows`: bf16 94.7 against 94.2 us, float32 193.0 against
# 181.6; it holds x, dy and the d(scale) sums). The dynamic bf16 kernel
# with the amax folded lost (57.3 against 48.5), with the forward's cache
# hints gained 2% (47.4; `--sweep quant-fold-hints`; taken since, after
# three passes: _QUANT_CACHE_HINTS).
_WARP_ROWS_COLS = 128
_WARP_ROWS_MAX_N = 1024
_WARP_ROWS_BY_ITEMSIZE = {2: dict(block_rows=2, num_warps=1),
                          4: dict(block_rows=8, num_warps=8)}
_WARP_ROWS_STATIC_RESIDUAL = dict(block_rows=8, num_warps=8,
                                  programs_per_sm=8, prefetch=True,
                                  hold_scale=True)
# A later sweep of 38 to 55 layouts at each shape of 8M+ elements under 97%
# of the copy ceiling (`python -m benchmarks.tune_triton --sweep
# forward-layouts`, tune_triton_forward_layouts_h200.json) changed nothing
# here: bf16 65536 x 896 ran 56.8 us two rows a block on 4 warps against
# 58.7 in the sweep, but 58.2 in a full record run with that layout
# against 58.1 before; 4096 x 14336, 8192 x 5120 and float32 16384 x 8192
# and 8192 x 5120 within 1%; the unaligned 4096 x 4099 3-5% faster as
# halves on twice the warps, 2 programs an SM (bf16 23.8 -> 23.1, float32
# 40.0 -> 38.3), which lost 10% at 8192 x 5120 (not taken).

# The quantized kernel, tuned on an H200 (`python -m benchmarks.tune_triton
# --sweep quant` and `--sweep quant-static`; benchmarks/results/
# tune_triton_quant_h200.json, tune_triton_quant_static_h200.json; bf16 to
# float8_e4m3fn). It writes 1 byte an element and reduces a row twice (sum
# of squares, then amax): one row a program on 4 warps (8 for bf16 8192)
# beat the forward's 16, 32 to 128 elements a thread. Short rows (up to
# 2 KiB): 8 KiB a program, 16 elements a thread (65536 x 896: 63.3 us, the
# forward's 1 row on 2 warps 65.4). Widths that are not a power of two are
# held as chunks: multiples of 1024 below 8192 as chunks of 1024, no padding
# (32768 x 3072: 91.4 us against 110.5 as one padded 4096; 8192 x 5120:
# 40.0 against 48.4); past 8192 two halves of the padded width (4096 x
# 14336: 64.7 against 76.4 on 16 warps); other widths quarters of it (4096
# x 4099: 27.2 against 31.5).
_QUANT_SHORT_ROW_BYTES = 2048
_QUANT_SHORT_BLOCK_BYTES = 8192
# Rows held as one block of at most this many elements a thread, of 2-byte
# inputs, run on a persistent grid of 4 programs an SM that hold the scale
# and load the next rows while they reduce the current ones (a second
# sweep, with the fp8 clip left to the hardware's saturating convert): bf16
# 32768 x 4096 in 107.2 us against 115.0 one block a program, 16384 x 8192
# 111.1 against 122.6, 65536 x 896 50.0 against 57.5 (static: 46.8 against
# 50.3). Rows held as several chunks gained nothing or lost (32768 x 3072
# static: 82.0 against 78.5; 4096 x 14336: 85.8 against 59.3, loading ahead
# doubles the registers of 128 elements a thread); float32 is untried.
# Holding the scale in registers across the loop won at every persistent
# shape tried against re-reading it each step on 2 to 8 programs an SM
# (`python -m benchmarks.tune_triton --sweep quant-held` and
# quant-static-held, tune_triton_quant*_held_h200.json): the re-read ran
# 7% to 82% slower (dynamic bf16 4096 x 4099 31.4 us against 24.7, 4096 x
# 14336 99.3 against 54.4; float32 32768 x 4096 187.0 against 174.1).
_QUANT_PERSISTENT_MAX_PER_THREAD = 32
_QUANT_PROGRAMS_PER_SM = 4
# Other widths below 8192 (`python -m benchmarks.unaligned_rows`,
# benchmarks/results/unaligned_rows_h200.log, bf16 4096 rows, dynamic /
# static): rows of 2-byte elements that start on 16 bytes are held as chunks
# of 1024 too (4224: 19.2 / 15.9 us against 21.9 / 19.2 as quarters of the
# padded width; 4104: 19.0 / 16.3 either way). Rows that do not (4099: the
# kernel loads and stores one element at a time; 4104, the same layouts
# aligned, ran 29% / 28% faster) are held as quarters, on a persistent grid
# of 8 programs an SM loading the next row ahead: 25.3 / 21.4 against 26.9
# / 23.1 one row a program, 29.1 / 24.9 as chunks of 1024. Float32 widths
# keep quarters, one row a program (untimed).
_QUANT_UNALIGNED_PROGRAMS_PER_SM = 8
# With a residual (x and the residual read, h written too) the persistent
# grid lost: loading ahead doubles the registers of two inputs. One block a
# program instead (bf16 65536 x 896 static: 104.4 us against 127.3 on the
# persistent grid), and a row held as one block spread at 8 elements a
# thread: static 2048 x 4096 in 16.7 us on 16 warps against 18.1 on 4,
# 32768 x 4096 235.6 against 244.3, 4096 x 2048 16.2 on 8 warps against
# 17.2 (dynamic alike; 16384 x 8192 within 2% either way). `python -m
# benchmarks.tune_triton --sweep quant-static-residual` and quant-residual;
# tune_triton_quant*residual_h200.json. Measured on bf16 rows of 2048 to
# 8192; float32 and wider rows keep the one-block layout's warps.
_QUANT_RESIDUAL_PER_THREAD = 8
_QUANT_RESIDUAL_SPREAD_MAX_COLS = 8192
# With a static scale (no amax), bf16 rows past 8192 held as chunks of 4096
# on 16 warps, one persistent program an SM loading the next row ahead: 4096
# x 14336 in 50.7 us against 65.9 as two halves on 4 warps; the dynamic
# kernel gained nothing there (60.0 against 60.2).
# tune_triton_quant_wide_h200.json.
_QUANT_STATIC_WIDE = dict(block_cols=4096, num_warps=16, programs_per_sm=1,
                          prefetch=True, hold_scale=True)
# A dynamic scale's amax folded into the first reduction (Config.fold_amax),
# where it won on an H200 (`python -m benchmarks.tune_triton --sweep
# quant-fold`, tune_triton_quant_fold_h200.json; folded against not, us):
# rows past 32 KiB padded, float32 4096 x 14336 (135.7 / 174.1) and looped
# rows (1024 x 32768: bf16 45.7 / 58.0, float32 87.4 / 114.7); one padded
# row a program (bf16 32768 x 4096 on the persistent grid 105.5 / 106.8,
# 16384 x 8192 108.6 / 111.2; float32 32768 x 4096 209.2 / 213.0, 16384 x
# 8192 243.4 / 258.9); bf16 4096 x 4099 on its persistent grid (24.6 /
# 25.3). It lost where a row is held as chunks of 1024 or halves, or a
# block holds several rows (bf16 32768 x 3072 89.2 / 86.0, 8192 x 5120 44.5
# / 36.8, 4096 x 14336 88.8 / 59.7, 65536 x 896 52.0 / 50.0; float32 8192 x
# 5120 63.8 / 60.7, 4096 x 4099 37.2 / 35.7, 65536 x 896 96.9 / 93.8): the
# extra accumulator costs registers those layouts were tuned without. With
# a residual it was within noise either way (untaken).
_QUANT_FOLD_AMAX_WIDE_BYTES = 32768
# With the amax folded, wider layouts won where the dynamic kernel still
# ran under 90% of its byte floor (`python -m benchmarks.tune_triton
# --sweep quant-layouts-bfloat16` and `quant-layouts-float32`,
# tune_triton_quant_layouts_*_h200.json; us against the layouts above).
# bf16 rows past 8192: the two halves on 16 warps, one persistent program
# an SM loading the next row ahead (4096 x 14336 53.8 against 60.0 on 4
# warps; the padded row as one block 53.7, chunks of 4096 55.2; in the
# record 128 x 14336 lost, 3.4 to 3.7, still 1.58x XLA). Float32
# rows, every one on a persistent grid loading ahead with the scale held
# (never tried before): rows of up to 1024 as the bf16 short rows, 8 KiB
# a block, 4 programs an SM (65536 x 896: 79.5 against 94.6); up to 8192
# as chunks of 1024 on 8 warps, 2 an SM (32768 x 4096: 174.0 against
# 211.2, 16384 x 8192 177.0 against 246.5, 8192 x 5120 55.1 against 61.7;
# the best of 40 layouts within 1.5% at each); past 8192 as chunks of 2048
# on 16 warps, 1 an SM (4096 x 14336: 80.6 against 136.5; in the record,
# quant_NVIDIA_H200.json, 4096 x 4099, not swept, 35.7 to 30.4). Nothing beat
# bf16 32768 x 3072 or 65536 x 896 as they were (86.3, 50.6); bf16 8192 x
# 5120 on 4 programs an SM, folded, ran 36.1 against 37.3 (not taken).
# Residuals keep the layouts above (untimed here; float32 rows with a
# residual: _QUANT_FLOAT32_RESIDUAL_CHUNK). Static scales keep them
# for bf16; float32 rows with a static scale take the dynamic scale's
# layouts (NVIDIA H200, JAX 0.11.2, CUPTI, us, quant-static records, the
# layouts above / these: 32768 x 4096 203.1 / 172.1, 16384 x 8192 238.9 /
# 169.9, where XLA's fused kernel takes 215.8; 4096 x 14336 83.2 / 76.9,
# 2048 x 4096 13.4 / 8.0, 16 x 4096 1.9 / 1.3).
_QUANT_DYNAMIC_WIDE = dict(block_cols=8192, num_warps=16, programs_per_sm=1,
                           prefetch=True, hold_scale=True)
_QUANT_FLOAT32_SHORT_COLS = 1024
_QUANT_FLOAT32_CHUNKS = ((8192, dict(block_cols=1024, num_warps=8,
                                     programs_per_sm=2)),
                         (16384, dict(block_cols=2048, num_warps=16,
                                      programs_per_sm=1)))
# Float32 rows with a residual (x, the residual and h of 4 bytes a value)
# whose n is a multiple of 2048 from 4096 to 14336: chunks of 2048 on 16
# warps (8 to 28 elements a thread), one row a program up to 8192 and past
# it on a persistent grid of 2 programs an SM loading the next row ahead.
# The layouts above were tuned on bf16 rows; on an H200 (JAX 0.11.2, CUPTI,
# us, static / dynamic scale, those -> these; byte floor in brackets;
# `python -m benchmarks.tune_triton --sweep
# quant-static-residual-layouts-float32` and
# quant-residual-layouts-float32, tune_triton_quant_*residual_float32_
# h200.json): 16384 x 8192 594.7 / 593.9 -> 434.4 / 440.3 (408), 32768 x
# 4096 496.5 / 505.5 -> 431.1 / 438.3 (408), 2048 x 4096 35.5 / 36.2 ->
# 29.2 / 30.5 (27.2), 4096 x 14336 206.4 / 290.6 -> 198.9 / 221.1 (180).
# The best of 35 to 44 layouts at each was at most 4% faster (2048 x 4096
# on 2 programs an SM 28.4 / 29.4, which lost 2% at 32768 x 4096). 4096 x
# 4099 gained nothing beyond 2% (static 67.3, best 66.1; dynamic 68.7,
# best 68.4): other widths keep the layouts above. 6144, 10240 and 12288
# take the rule untimed, as the measured widths on either side of them.
_QUANT_FLOAT32_RESIDUAL_CHUNK = 2048
_QUANT_FLOAT32_RESIDUAL_MIN_COLS = 4096
_QUANT_FLOAT32_RESIDUAL_MAX_COLS = 14336
_QUANT_FLOAT32_RESIDUAL_ONE_ROW_COLS = 8192
_QUANT_FLOAT32_RESIDUAL_PROGRAMS_PER_SM = 2


def get_config(rows: int, n: int, dtype, device_kind: str | None = None,
               *, residual: bool = False) -> Config:
  """Picks the launch configuration for an (rows, n) RMSNorm (`residual`:
  fused with a residual add).

  Pure function of its arguments. The per-row arithmetic (and so the
  reduction order) depends only on `n` and `dtype`, never on `rows`: a row's
  result does not change with the batch size (batch invariance); the
  persistent grid (`_forward_persistent`) changes no row's arithmetic.
  `rows` and `device_kind` are part of the signature so that callers need
  not change when a GPU gets its own table; neither is used today.
  """
  del rows, device_kind
  itemsize = np.dtype(dtype).itemsize
  layout = _row_layout(n, itemsize)
  if not residual:
    layout = _narrow_tail(_warp_rows(n, itemsize)
                          or _forward_persistent(layout, n, itemsize), n,
                          itemsize, kernel="forward")
  return dataclasses.replace(layout, cache_hints=_FORWARD_CACHE_HINTS)


def _warp_rows(n: int, itemsize: int, *, residual: bool = False,
               static: bool = False) -> Config | None:
  """Rows of n held as chunks of _WARP_ROWS_COLS with each row inside one
  warp, where that was measured to win: without a residual, or with one
  and a `static` scale (the comments at _WARP_ROWS_COLS); None elsewhere."""
  if (n > _WARP_ROWS_MAX_N or n % _WARP_ROWS_COLS
      or n == pl.next_power_of_2(n)):
    return None
  if residual:
    return (Config(block_cols=_WARP_ROWS_COLS, **_WARP_ROWS_STATIC_RESIDUAL)
            if static else None)
  return Config(block_cols=_WARP_ROWS_COLS,
                **_WARP_ROWS_BY_ITEMSIZE[itemsize])


def _row_layout(n: int, itemsize: int) -> Config:
  """One block of rows a program: how rows of n are held (or looped)."""
  cols = pl.next_power_of_2(n)
  if cols > MAX_ONE_PASS_COLS:
    return Config(block_rows=1,
                  block_cols=_LOOP_CHUNK_COLS_BY_ITEMSIZE[itemsize],
                  num_warps=16, num_stages=3)
  if cols * itemsize > _WARPS_BY_BYTES[-1][0]:
    return Config(block_rows=1, block_cols=_WIDE_CHUNK_COLS,
                  num_warps=_WIDE_WARPS)
  # Short rows: several rows per program, so that a program moves >= 1 KiB.
  block_rows = max(1, 1024 // (cols * itemsize))
  load_bytes = 1 << round(math.log2(block_rows * n * itemsize))
  num_warps = next(w for limit, w in _WARPS_BY_BYTES if load_bytes <= limit)
  if block_rows == 1 and n < _HALVE_BELOW_FILL * cols:
    # Same padded width, held as two chunks.
    return Config(block_rows=1, block_cols=cols // 2, num_warps=num_warps)
  return Config(block_rows=block_rows, block_cols=cols, num_warps=num_warps)


def _forward_persistent(layout: Config, n: int, itemsize: int) -> Config:
  """`layout` on the persistent grid where that was measured to win
  (the comments at _PERSISTENT_MIN_ROW_BYTES)."""
  cols = pl.next_power_of_2(n)
  if not layout.resident(n) or cols * itemsize < _PERSISTENT_MIN_ROW_BYTES:
    return layout
  persistent = functools.partial(dataclasses.replace, layout, prefetch=True,
                                 hold_scale=True)
  if n > 8192:
    return persistent(block_cols=_PERSISTENT_WIDE_CHUNK_BYTES // itemsize,
                      **_PERSISTENT_WIDE)
  if layout.block_cols < cols:   # halves
    return persistent(programs_per_sm=_PERSISTENT_HALVES_PER_SM)
  if n != cols:                  # one padded block
    return layout
  num_warps, per_sm = _PERSISTENT_BY_ROW_BYTES[cols * itemsize]
  return persistent(num_warps=num_warps, programs_per_sm=per_sm)


def get_quant_config(rows: int, n: int, dtype, device_kind: str | None = None,
                     *, residual: bool = False, static: bool = False,
                     per_channel: bool = False) -> Config:
  """Picks the quantized kernel's launch configuration; pure, and like
  get_config a function of n and dtype alone (a row's arithmetic, and so
  its scale, does not depend on the batch). Its table is its own: with
  1-byte outputs and a second row reduction (the amax), fewer warps holding
  more of a row each won (the comments at _QUANT_SHORT_ROW_BYTES). Without
  a residual, bf16 rows held as one block, bf16 rows that do not start on
  16 bytes, bf16 rows past 8192 and every float32 row held in registers
  run on a persistent grid (`_quant_persistent`, _QUANT_STATIC_WIDE,
  _QUANT_DYNAMIC_WIDE, `_quant_float32_held`; the grid changes no row's
  arithmetic); with a `residual` (a fused add) rows run one block a
  program, spread over more warps, but for float32 rows past 8192
  (`_quant_float32_residual`). Rows such as 896 are held a warp a row,
  with a residual only with a static scale (`_warp_rows`). Every row
  streams with the forward's L2 hints (_QUANT_CACHE_HINTS). A static scale
  a column (`per_channel`, which implies `static`) takes the scalar's
  layout but for a narrow last chunk's launch (_NARROW_TAIL_LAUNCH)."""
  del rows, device_kind
  static = static or per_channel
  itemsize = np.dtype(dtype).itemsize
  dynamic = not (static or residual)
  if not residual and itemsize == 4 and n <= MAX_ONE_PASS_COLS:
    config = _quant_float32_held(n)
  elif residual and itemsize == 4 and _quant_float32_residual_chunks(n):
    config = _quant_float32_residual(n)
  else:
    config = _quant_layout(n, itemsize, residual=residual, static=static)
  if dynamic and _quant_folds_amax(config, n, itemsize):
    config = dataclasses.replace(config, fold_amax=True)
  kernel = (None if residual else "channel" if per_channel
            else "static" if static else "dynamic")
  return dataclasses.replace(_narrow_tail(config, n, itemsize, kernel=kernel),
                             cache_hints=_QUANT_CACHE_HINTS)


def _narrow_tail(config: Config, n: int, itemsize: int,
                 kernel: str | None = None) -> Config:
  """Rows a power of two and a few columns long (under an eighth more)
  that do not start on 16 bytes, held in registers: chunks as wide as
  that power of two and the few columns in one narrow chunk
  (Config.split_tail; the comments at _NARROW_TAIL_BELOW), on the launch
  measured for `kernel` ("forward", "dynamic", "static" or "channel";
  None: a fused residual) where there is one (_NARROW_TAIL_LAUNCH), else
  `config`'s; `config` elsewhere."""
  widest = 1 << (n.bit_length() - 1)
  if not (0 < n - widest < widest // _NARROW_TAIL_BELOW
          and (n * itemsize) % 16
          and widest % (32 * config.num_warps) == 0):
    return config
  narrow = dataclasses.replace(config, block_cols=widest, split_tail=True)
  if widest == _NARROW_TAIL_LAUNCH_WIDEST:
    narrow = dataclasses.replace(
        narrow, **_NARROW_TAIL_LAUNCH.get((kernel, itemsize), {}))
  return narrow if narrow.resident(n) else config


def _quant_folds_amax(config: Config, n: int, itemsize: int) -> bool:
  """Whether the dynamic scale's amax is folded into the first reduction
  (Config.fold_amax) in `config`'s layout: the comments at
  _QUANT_FOLD_AMAX_WIDE_BYTES and _QUANT_DYNAMIC_WIDE."""
  cols = pl.next_power_of_2(n)
  if _warp_rows(n, itemsize):
    return False                        # measured unfolded
  if itemsize == 4 or cols * itemsize > _QUANT_FOLD_AMAX_WIDE_BYTES:
    return True                         # float32 rows, looped rows
  if config.block_rows != 1:
    return False                        # several rows a block
  # One padded row a program, or bf16 chunks on the persistent grid (4099,
  # rows past 8192).
  return n == cols or config.programs_per_sm > 0


def _quant_float32_held(n: int) -> Config:
  """get_quant_config's layout for float32 rows held in registers without a
  residual, dynamic or static scale: on persistent grids loading the next
  rows ahead with the scale held (the comments at _QUANT_DYNAMIC_WIDE and
  _QUANT_FLOAT32_CHUNKS)."""
  cols = pl.next_power_of_2(n)
  if cols <= _QUANT_FLOAT32_SHORT_COLS:
    layout = dataclasses.replace(
        _warp_rows(n, 4) or _quant_short_rows(cols, 4),
        programs_per_sm=_QUANT_PROGRAMS_PER_SM)
  else:
    layout = Config(block_rows=1, **next(
        chunks for limit, chunks in _QUANT_FLOAT32_CHUNKS if cols <= limit))
  return dataclasses.replace(layout, prefetch=True, hold_scale=True)


def _quant_float32_residual_chunks(n: int) -> bool:
  """Whether float32 rows of n with a residual take
  `_quant_float32_residual` (the comments at
  _QUANT_FLOAT32_RESIDUAL_CHUNK)."""
  return (n % _QUANT_FLOAT32_RESIDUAL_CHUNK == 0
          and _QUANT_FLOAT32_RESIDUAL_MIN_COLS <= n
          <= _QUANT_FLOAT32_RESIDUAL_MAX_COLS)


def _quant_float32_residual(n: int) -> Config:
  """get_quant_config's layout for float32 rows with a residual, where
  `_quant_float32_residual_chunks`: chunks of 2048 on 16 warps, on a
  persistent grid past 8192."""
  layout = Config(block_rows=1, block_cols=_QUANT_FLOAT32_RESIDUAL_CHUNK,
                  num_warps=16)
  if n <= _QUANT_FLOAT32_RESIDUAL_ONE_ROW_COLS:
    return layout
  return dataclasses.replace(
      layout, programs_per_sm=_QUANT_FLOAT32_RESIDUAL_PROGRAMS_PER_SM,
      prefetch=True, hold_scale=True)


def _quant_short_rows(cols: int, itemsize: int) -> Config:
  """Rows of `cols` (padded) as blocks of _QUANT_SHORT_BLOCK_BYTES, 16
  elements a thread."""
  block_rows = _QUANT_SHORT_BLOCK_BYTES // (cols * itemsize)
  return Config(block_rows=block_rows, block_cols=cols,
                num_warps=max(1, block_rows * cols // (32 * 16)))


def _quant_layout(n: int, itemsize: int, *, residual: bool, static: bool
                  ) -> Config:
  """get_quant_config's launch layout (but float32 rows held in registers
  without a residual: `_quant_float32_held`)."""
  cols = pl.next_power_of_2(n)
  if cols > MAX_ONE_PASS_COLS or cols * itemsize > _WARPS_BY_BYTES[-1][0]:
    # Looped, or float32 rows past 8192: the forward's chunked layouts.
    return _row_layout(n, itemsize)
  warp_rows = _warp_rows(n, itemsize, residual=residual, static=static)
  if warp_rows:
    return warp_rows
  persistent = functools.partial(_quant_persistent, itemsize=itemsize,
                                 residual=residual)
  if cols * itemsize <= _QUANT_SHORT_ROW_BYTES:
    return persistent(_quant_short_rows(cols, itemsize))
  one_block = Config(block_rows=1, block_cols=cols,
                     num_warps=max(4, cols * itemsize // 2048))
  if n == cols:
    if residual and itemsize == 2 and cols <= _QUANT_RESIDUAL_SPREAD_MAX_COLS:
      return dataclasses.replace(one_block, num_warps=max(
          one_block.num_warps, cols // (32 * _QUANT_RESIDUAL_PER_THREAD)))
    return persistent(one_block)
  quarters = False
  if n < 8192 and (n % 1024 == 0 or (itemsize == 2 and n % 8 == 0)):
    chunk = 1024
  elif n > 8192:
    if not residual and itemsize == 2:
      return Config(block_rows=1, **(_QUANT_STATIC_WIDE if static
                                     else _QUANT_DYNAMIC_WIDE))
    chunk = cols // 2
  else:
    chunk, quarters = cols // 4, True
  if chunk < 1024:
    return persistent(one_block)
  chunked = Config(block_rows=1, block_cols=chunk, num_warps=2 * itemsize)
  if quarters:
    return persistent(chunked,
                      programs_per_sm=_QUANT_UNALIGNED_PROGRAMS_PER_SM)
  return chunked


def _quant_persistent(config: Config, itemsize: int, residual: bool,
                      programs_per_sm: int = _QUANT_PROGRAMS_PER_SM
                      ) -> Config:
  """`config` on a persistent grid where that was measured to win: 2-byte
  inputs, no residual, at most _QUANT_PERSISTENT_MAX_PER_THREAD elements a
  thread in a block (or chunk) of rows."""
  per_thread = config.block_rows * config.block_cols // (32 * config.num_warps)
  if itemsize != 2 or residual or (
      per_thread > _QUANT_PERSISTENT_MAX_PER_THREAD):
    return config
  return dataclasses.replace(config, programs_per_sm=programs_per_sm,
                             prefetch=True, hold_scale=True)


# The backward's (warps, programs per SM) by the bytes of a padded row, per
# itemsize, tuned on an H100 with `python -m benchmarks.tune_triton --sweep
# backward` (benchmarks/results/tune_triton_backward*_h100.json). A program
# holds its row (x, dy, the d(scale) accumulator) in registers, so wide rows
# get one program per SM; short rows get several, to keep memory busy.
_BACKWARD_BY_BYTES = {
    2: ((4096, 4, 8), (8192, 16, 2), (16384, 32, 1), (32768, 16, 1)),
    4: ((4096, 4, 8), (8192, 16, 2), (16384, 32, 1), (32768, 16, 1),
        (65536, 16, 1)),
}
# Rows past 8192 elements are held as chunks of 2048 whose products are
# summed before one reduction: bf16 4096 x 14336 (7 chunks, 16 warps) in 155
# to 157 us against 157 to 159 for one padded chunk of 16384 on 8 warps, the
# best before; float32 the same either way (on an H200 the padded chunk was
# 1% faster). benchmarks/results/backward_registers_h100.md and
# tune_triton_backward_registers_{h100,h200}.json.
_BACKWARD_CHUNK_PAST, _BACKWARD_CHUNK_COLS = 8192, 2048
# From 2048 rows on, 8 rows a program at least: fewer float32 partials of
# d(scale) to write and sum (4096 x 2048 bf16: 21.2 us instead of 24.8;
# benchmarks/results/tune_triton_backward_small_h100.json).
_BACKWARD_MIN_BLOCKS_PER_PROGRAM = 8
# Loading the next rows ahead doubles the registers x and dy take; it paid
# off wherever a thread holds at most this many elements of a row. There,
# programs that are few per SM also hold the scale in registers across their
# loop (2 to 5% faster on the large shapes; slower at 8 programs per SM).
_PREFETCH_MAX_PER_THREAD = 16
_HOLD_SCALE_MAX_PROGRAMS_PER_SM = 2
# Up to this many row blocks (about one per SM), d(scale) is summed by
# column slices in the same kernel, re-reading x and dy from L2, rather than
# as one float32 partial row per program plus a sum: 5.8 instead of 8.3 us
# at bf16 128 x 14336, and faster at every shape of 1 to 128 rows tried but
# two float32 single rows (tune_triton_backward_registers_h100.json).
_COLUMN_MAX_ROW_BLOCKS = 128
# Elements of one tile of those column sums.
_COLUMN_TILE = 8192


def get_backward_config(rows: int, n: int, dtype, device_kind: str | None = None
                        ) -> Config:
  """Picks the backward kernel's launch configuration; pure, like get_config.

  A row is one padded block, and everything that shapes a row's arithmetic
  depends only on n and dtype (dx is batch invariant); `rows` only picks how
  d(scale) is summed. The backward holds x, dy and a d(scale) accumulator per
  row in registers, so rows past MAX_ONE_PASS_COLS have no configuration (the
  caller falls back to the reference's gradient).
  """
  del device_kind
  itemsize = np.dtype(dtype).itemsize
  cols = pl.next_power_of_2(n)
  if cols > MAX_ONE_PASS_COLS:
    raise NotImplementedError(
        f"the backward kernel holds a row in registers; rows of {n} elements "
        f"exceed its limit of {MAX_ONE_PASS_COLS}")
  row_bytes = cols * itemsize
  block_rows = max(1, 1024 // row_bytes)
  num_warps, per_sm = next((w, p) for limit, w, p in
                           _BACKWARD_BY_BYTES[itemsize] if row_bytes <= limit)
  num_warps = min(num_warps, max(1, block_rows * cols // 32))
  prefetch = cols <= _PREFETCH_MAX_PER_THREAD * 32 * num_warps
  return Config(
      block_rows=block_rows,
      block_cols=(_BACKWARD_CHUNK_COLS if cols > _BACKWARD_CHUNK_PAST
                  else cols),
      num_warps=num_warps, programs_per_sm=per_sm, prefetch=prefetch,
      min_blocks_per_program=_BACKWARD_MIN_BLOCKS_PER_PROGRAM,
      hold_scale=prefetch and per_sm <= _HOLD_SCALE_MAX_PROGRAMS_PER_SM,
      dscale_by_columns=pl.cdiv(rows, block_rows) <= _COLUMN_MAX_ROW_BLOCKS)
