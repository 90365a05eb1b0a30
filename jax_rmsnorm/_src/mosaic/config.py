"""Launch configuration of the Mosaic GPU kernels and its heuristics
(`get_config`, and `row_slices` for the warpgroups a row is split
between).

Every kernel here is a persistent grid of CTAs of one warpgroup (128
threads; 2 or 4 for wide rows, each taking a slice of every row's
columns: `row_slices`). A CTA walks over blocks of `block_rows`
rows: each block is copied whole into shared memory by one bulk TMA copy
per operand, `stages` blocks deep, and the row is read from shared memory
in chunks of `128 * vec` columns (every thread holds `vec` contiguous
elements of each row of a chunk). Rows are never split across CTAs.
"""

from __future__ import annotations

import dataclasses
import math

from jax.experimental import pallas as pl

# Threads of a CTA (one warpgroup), and so columns of a chunk per `vec`.
THREADS = 128
# Shared memory of one Hopper SM (228 KiB), of which one CTA may take
# 227 KiB (pallas-notes.md: 232448 bytes), and what the CUDA runtime keeps
# per CTA.
SMEM_PER_SM = 233472
SMEM_PER_CTA = 232448
_SMEM_SYSTEM_PER_CTA = 1024
# What Pallas adds to the scratch we ask for: the cross-warp reduction
# scratch (CompilerParams.reduction_scratch_bytes, 2 KiB by default), the
# barriers, alignment.
SMEM_RESERVED = 4096
# Rows shorter than one chunk of 128 columns have no configuration.
MIN_COLS = THREADS
# Rows of at most this many elements are supported for every combination of
# dtypes (three float32 rows of 16384 in one stage fit; see
# `common.check_supported`).
ALWAYS_SUPPORTED_COLS = 16384

# Bytes of one block of rows in one stage, summed over the operands held in
# shared memory. Large enough that the TMA copies in flight (stages - 1 of
# them ahead of the block being computed) cover the memory latency; small
# enough that three stages of two CTAs fit in an SM.
_TARGET_BLOCK_BYTES = 32 * 1024
# Elements of one row block a thread holds per chunk (block_rows * vec):
# the float32 sums of a chunk take this many registers, the loaded values as
# many again.
_MAX_ELEMENTS_PER_THREAD = 32
_MAX_STAGES = 3


@dataclasses.dataclass(frozen=True)
class Config:
  """How one Mosaic GPU kernel is launched.

  Attributes:
    vec: contiguous elements a thread loads from a row (a power of two, at
      most 16 bytes of the widest dtype); a chunk is 128 * vec columns. A
      row's reduction order depends on vec and n only.
    block_rows: rows of one block (one TMA copy per operand).
    stages: blocks of rows held in shared memory at once: the copy of the
      next stages - 1 blocks runs while one is computed.
    ctas_per_sm: CTAs launched per SM (the grid is persistent).
    scale_in_smem: the scale (and the forward's per-channel static
      reciprocal) is copied into shared memory once per CTA; otherwise
      every chunk reads it from GMEM (L1/L2), where shared memory is short.
    dh_in_smem: the backward's extra gradient dh comes in by TMA with x and
      dy; otherwise its chunks are loaded from GMEM straight into registers
      (it is read once), where shared memory is short.
    warpgroups: warpgroups of a CTA. With more than one, each takes an
      equal slice of every row's columns, with its own shared memory
      buffers, copies and (the backward's) d(scale) sums; warpgroup 0 takes
      the row totals (sums of squares, of g * xhat; amaxes) from the
      slices' chunk sums, handed over through shared memory and combined in
      a fixed order (common.RowTotals); a block is then one row. A row's
      arithmetic depends on warpgroups, which depends on n and the dtypes
      only.
    scale_in_registers: the backward, where the scale is not in shared
      memory and a row slice's chunks are unrolled (warpgroups > 1), loads
      its chunks of the scale from GMEM once and holds them in registers
      across its rows (`backward_scale_in_registers`).
    hold_chunks: the forward keeps the chunks its first pass read from
      shared memory (as float32, in registers) for its later passes rather
      than read them again (`forward_holds_chunks`); the chunks must be
      unrolled.
  """
  vec: int
  block_rows: int
  stages: int
  ctas_per_sm: int = 1
  scale_in_smem: bool = True
  dh_in_smem: bool = True
  warpgroups: int = 1
  scale_in_registers: bool = False
  hold_chunks: bool = False

  def __post_init__(self):
    for field in ("vec", "warpgroups"):
      value = getattr(self, field)
      if value < 1 or value & (value - 1):
        raise ValueError(f"Config.{field} must be a power of two, got {value}")
    if self.warpgroups > 1 and self.block_rows != 1:
      raise ValueError("Config.warpgroups > 1 splits one row a block, got "
                       f"block_rows={self.block_rows}")
    for field in ("block_rows", "stages", "ctas_per_sm"):
      if getattr(self, field) < 1:
        raise ValueError(f"Config.{field} must be positive, got "
                         f"{getattr(self, field)}")

  @property
  def chunk_cols(self) -> int:
    return THREADS * self.vec

  def for_rows(self, rows: int, row_multiple: int = 1,
               sm_count: int | None = None) -> "Config":
    """This configuration for `rows` rows in all: a block has at most that
    many, and few enough that every CTA the SMs hold gets one where rows are
    few (decode sizes: latency, not bandwidth); a multiple of
    `row_multiple` (see `row_multiple`). The arithmetic of a row does not
    depend on block_rows."""
    if rows < row_multiple:
      raise NotImplementedError(
          f"{rows} rows are fewer than a block needs ({row_multiple}: the "
          "TMA copies move multiples of 128 bytes)")
    block_rows = min(self.block_rows, rows)
    if sm_count:
      block_rows = min(block_rows, pl.cdiv(rows, sm_count * self.ctas_per_sm))
    block_rows = max(row_multiple, block_rows // row_multiple * row_multiple)
    if block_rows == self.block_rows:
      return self
    return dataclasses.replace(self, block_rows=block_rows)

  def num_ctas(self, rows: int, sm_count: int) -> int:
    return max(1, min(pl.cdiv(rows, self.block_rows),
                      self.ctas_per_sm * sm_count))


def pick_vec(n: int, max_itemsize: int) -> int:
  """The elements a thread loads at once (at most 16 bytes of the widest
  dtype): the width that reads a row in the fewest chunks of 128 * vec
  columns, the widest among equals. A chunk that does not tile n ends in a
  tail chunk overlapping the one before (common.Chunks), which needs
  n % vec == 0. A function of n and the dtypes only: it fixes a row's
  reduction order."""
  best, best_chunks = 1, None
  vec = max(1, 16 // max_itemsize)
  while vec >= 1:
    cols = THREADS * vec
    if cols <= n and n % vec == 0:
      chunks = -(-n // cols)
      if best_chunks is None or chunks < best_chunks:
        best, best_chunks = vec, chunks
    vec //= 2
  return best


def row_multiple(n: int, itemsize: int = 2) -> int:
  """Rows whose bytes are a multiple of 128, which Pallas needs of a TMA
  copy into shared memory (one arrival of bytes / 128 per thread): a block
  has a multiple of this many rows. Hidden sizes that are multiples of 64
  need 1. The default itemsize is the smallest, the worst case."""
  return 128 // math.gcd(128, n * itemsize)


# Warpgroups a CTA splits a row between, per op, by the widest itemsize of
# the row operands (the backward's x and dy, the forward's x and residual):
# (rows longer than this, warpgroups), the first that applies and splits n
# (`check_slices`).
#
# The backward's, on an H200 (JAX 0.11.2, CUPTI,
# benchmarks/results/mosaic_warpgroups_h200.json; backward alone, us, 1 /
# 2 / 4 warpgroups, Triton): bf16 4096 x 14336 121 / 99 / 96 (136); 16384
# x 8192 226 / 201 / 241 (211); 8192 x 5120 72 / 69 / 83 (77); 32768 x
# 4096 197 / 216 / 231; 32768 x 3072 148 / 183 / 247. float32 4096 x 14336
# 304 / 246 / 208 (225); 16384 x 8192 380 / 389 / 390 (404); 8192 x 5120
# 128 / 130 / 127 (132); 32768 x 4096 399 / 400 / 401 (404). One
# warpgroup holds a wide row's chunks alone (one CTA an SM: shared memory
# is short), latency bound; several share its columns.
#
# The forward's, plain ("forward") and with quantized codes out ("quant"),
# by the widest of x's and the residual's itemsizes, on the same H200
# (benchmarks/results/mosaic_forward_slices_h200.json, x alone with a scale
# of its dtype, us, 1 / 2 / 4 warpgroups, Triton, the copy): bf16 4096 x
# 14336 74.6 (68.1 with the unsplit row's 16-byte loads) / 69.5 / 63.7
# (62.2, 57.0); 16384 x 8192 148 / 147 / 148; 8192 x 5120 44.2 / 45.3 /
# 50.4; float32 4096 x 14336 129.6 / 127.0 / 126.8 (114.3); 16384 x 8192
# 386.7 / 301.2 / 273.3 (261.5); 8192 x 5120 88.4 / 89.2 / 92.2. Dynamic
# float8 codes: bf16 4096 x 14336 68.4 / 61.8 / 62.6; 16384 x 8192 131.9 /
# 135.8 / 153.9; float32 4096 x 14336 84.7 / 72.7 / 72.7 (Triton 79.9);
# 16384 x 8192 164.4 / 160.9 / 174.4 (177.2); 8192 x 5120 51.2 / 51.3 /
# 64.3 (54.1).
ROW_SLICES = {
    "backward": {2: ((8192, 4), (4096, 2)), 4: ((8192, 4),)},
    "forward": {2: ((8192, 4),), 4: ((5120, 4),)},
    "quant": {2: ((8192, 2),), 4: ((5120, 2),)},
}
# The row totals split rows hand over between warpgroups are float32
# vectors laid out as chunk rows (common.RowTotals): a kernel that splits
# reads chunks of at least this itemsize (Mosaic cannot load more than 16
# bytes a thread of them: "Failed to prove that vector transfers don't
# cross swizzle tile boundaries").
HANDOVER_ITEMSIZE = 4


def row_slices(op: str, n: int, chunk_itemsize: int, row_itemsize: int,
               itemsizes) -> tuple[int, int]:
  """(warpgroups, vec itemsize) of a CTA of `op` (a key of ROW_SLICES)
  over rows of n: the warpgroups each row is split between
  (Config.warpgroups, from ROW_SLICES), and the itemsize that fixes the
  chunk's vec (`pick_vec`): the widest read in chunks (`chunk_itemsize`),
  HANDOVER_ITEMSIZE too where rows split. `row_itemsize` picks the table's
  entry; every operand's `itemsizes` must split in whole 128-byte copies.
  A function of n and the dtypes only, so a row's arithmetic does not
  depend on the batch."""
  split_itemsize = max(chunk_itemsize, HANDOVER_ITEMSIZE)
  for past, slices in ROW_SLICES[op].get(row_itemsize, ()):
    if n > past:
      try:
        check_slices(n, slices, THREADS * pick_vec(n, split_itemsize),
                     itemsizes)
      except ValueError:
        continue
      return slices, split_itemsize
  return 1, chunk_itemsize


# Measured on an H200 (JAX 0.11.2, CUPTI, backward alone, us, the scale
# from GMEM chunk by chunk / held; a float32 scale, as Flax's param_dtype
# default gives; benchmarks/results/mosaic_scale_regs_h200.json): bf16 4096
# x 14336 118.5 / 91.6, bf16 16384 x 8192 264.2 / 211.2, float32 4096 x
# 14336 210.9 / 177.8, float32 2048 x 16384 130.8 / 105.9. Where a row
# slice is more chunks than this, they run in a loop (common.Chunks.UNROLL)
# and are not held.
_SCALE_IN_REGISTERS_MAX_CHUNKS = 8
# A bf16 scale held lost: bf16 16384 x 8192, 209.7 us held against 199.9
# (`variants_bf16_scale_h200.json`); the float32 scale only is held.
_SCALE_IN_REGISTERS_ITEMSIZE = 4


def backward_scale_in_registers(config: Config, chunks: int,
                                scale_itemsize: int) -> bool:
  """Whether the backward holds its chunks of the scale in registers
  (Config.scale_in_registers): where its rows are split between
  warpgroups (a slice of `chunks` chunks, unrolled) and the scale did not
  fit in shared memory, rather than read it from GMEM (L1/L2) in every
  chunk of both passes; a float32 scale only (`scale_itemsize`, 0 for
  none), where that was measured to win. Changes where the scale is read from, not a
  row's arithmetic."""
  return (scale_itemsize == _SCALE_IN_REGISTERS_ITEMSIZE
          and config.warpgroups > 1 and not config.scale_in_smem
          and chunks <= _SCALE_IN_REGISTERS_MAX_CHUNKS)


# Float32 values of a block's row slice a thread of the forward may hold
# across its passes (block_rows * vec * chunks; the tail counts as a
# chunk). On an H200 (JAX 0.11.2, CUPTI, us, read again / held;
# `python -m benchmarks.mosaic_forward_configs --hold-only`,
# mosaic_hold_chunks_h200.json): dynamic float8 codes bf16 16384 x 8192
# 107.9 / 102.0, 65536 x 896 59.1 / 53.4, the others 0.3-1.6% faster;
# the forward bf16 8192 x 5120 44.2 / 43.0, the others within 1%; with a
# residual within 1.5% either way (bf16 32768 x 4096 230.0 / 232.3, 16384
# x 8192 250.5 / 247.1). Outputs identical bit for bit.
_MAX_HELD_VALUES = 128


def forward_holds_chunks(config: Config, chunks: int, unrolled: bool) -> bool:
  """Whether the forward holds its first pass's chunks for the later ones
  (Config.hold_chunks): where its `chunks` chunks of a row slice are
  unrolled and a block's fit in _MAX_HELD_VALUES float32 registers a
  thread. Changes where a value is read from, not a row's arithmetic."""
  return unrolled and (config.block_rows * config.vec * chunks
                       <= _MAX_HELD_VALUES)


def check_slices(n: int, slices: int, chunk_cols: int,
                 itemsizes) -> None:
  """Raises ValueError unless rows of n split in `slices` column slices,
  one a warpgroup (Config.warpgroups): equal slices of at least one chunk,
  each a multiple of 128 bytes in every operand's dtype (`itemsizes`), as
  the TMA copy of one slice into shared memory must be."""
  width = n // slices
  if n % slices or width < chunk_cols or any(
      width * size % 128 for size in itemsizes):
    raise ValueError(
        f"rows of {n} do not split in {slices} slices of whole 128-byte "
        f"copies of at least {chunk_cols} columns")


def smem_budget(ctas_per_sm: int) -> int:
  """Scratch bytes one of `ctas_per_sm` CTAs may ask for."""
  per_cta = SMEM_PER_SM // ctas_per_sm - _SMEM_SYSTEM_PER_CTA
  return min(per_cta, SMEM_PER_CTA) - SMEM_RESERVED


# (ctas_per_sm, min_stages, scale_in_smem, dh_in_smem) that get_config tries
# first where asked (`ctas_first`): the quantized output with a dynamic
# scale whose amax is folded into the first pass. On an H200 (JAX 0.11.2,
# CUPTI, bf16 to float8_e4m3fn, us; `python -m
# benchmarks.mosaic_forward_configs`, mosaic_forward_configs_h200.json)
# it chose the fastest of 10 to 17 launches, or one within 2%: bf16 32768
# x 4096 99.6 (the two-CTA, three-stage choice before: 108.1; Triton
# 104.9), 16384 x 8192 108.0 (118.7; 108.1), 8192 x 5120 32.7 (34.9;
# 36.2), 32768 x 3072 76.6 (81.4; 85.8; the fastest, 75.2, two CTAs of 4
# rows), 65536 x 896 59.1 (64.4; 50.0), float32 32768 x 4096 156.7 (158.8;
# 173.5). With a static scale or a residual it lost (static bf16 16384 x
# 8192 154.4 against 103.1; residual bf16 32768 x 4096 252.4 against
# 230.6): those keep the order below.
_CTAS_FIRST = ((4, 2, True, True), (3, 2, True, True))
# A static scale's reciprocal of one value a column comes with the scale
# (`mosaic_forward.Quant`): read from GMEM in every chunk, the two vectors
# (as many bytes a row as x, or more) ran far slower than from shared
# memory, on fewer CTAs or stages if need be. On an H200 (JAX 0.11.2,
# CUPTI, bf16 and float32 to float8_e4m3fn, us, GMEM -> shared memory;
# `python -m benchmarks.mosaic_forward_configs --kinds channel
# --columns-in-smem`, mosaic_forward_configs_channel_h200.json): bf16 4096
# x 14336 83.6 -> 57.5 (one CTA, three stages; Triton 66.3), 16384 x 8192
# 264.4 -> 107.0 (two CTAs, two stages; Triton 169.3), float32 16384 x
# 8192 203.8 -> 162.6 (one CTA, three stages; Triton 210.0); and where
# only one stage fits beside them, float32 4096 x 14336: 149.6 on three
# stages from GMEM, 93.9 on one (the quant-channel record; Triton 96.4).
# So every launch with them in shared memory is tried first
# (`columns_first`).


def get_config(n: int, row_bytes: int, max_itemsize: int,
               fixed_bytes: int = 0, rows_multiple: int = 1,
               scale_bytes: int = 0, dh_row_bytes: int = 0,
               ctas_first: bool = False, columns_first: bool = False,
               device_kind: str | None = None) -> Config:
  """Picks the launch configuration of a kernel over rows of `n` elements.

  Pure function of its arguments. `row_bytes` is the shared memory one row
  takes in one stage (its operands summed, dh's excluded), `max_itemsize`
  the widest dtype a thread loads, `fixed_bytes` shared memory the kernel
  keeps besides the stages (the backward's d(scale) sums), `rows_multiple`
  what block_rows must be a multiple of (`row_multiple`). Two kinds of
  operand go through shared memory only where it has room: the per-column
  vectors (`scale_bytes`: the scale, and the forward's per-channel static
  reciprocal; once per CTA; Config.scale_in_smem) and the backward's dh
  (`dh_row_bytes` a row and stage).
  `ctas_first`: first try 4, then 3 CTAs an SM of two stages each with
  the scale in shared memory (`_CTAS_FIRST`; the quantized output with its
  amax folded into the first pass). `columns_first`: first try every
  launch with the per-column vectors in shared memory (a per-channel
  static reciprocal beside the scale: the comments after _CTAS_FIRST).
  The row count is not an argument: a block never holds more rows than
  there are (`Config.for_rows`), and nothing else depends on it.
  `device_kind` is accepted so that callers need not change when a card
  gets its own table; the H100 and H200 share this one.

  Raises NotImplementedError when not even one row in one stage fits in
  shared memory.
  """
  del device_kind
  vec = pick_vec(n, max_itemsize)
  by_registers = max(1, _MAX_ELEMENTS_PER_THREAD // vec)
  by_bytes = max(1, _TARGET_BLOCK_BYTES // (row_bytes + dh_row_bytes))
  block_rows = min(by_registers, by_bytes)
  block_rows = max(rows_multiple, block_rows // rows_multiple * rows_multiple)
  # Two CTAs an SM (one computes while the other waits), then pipelining,
  # then dh and the scale in shared memory.
  candidates = [(ctas, min_stages, scale, dh)
                for ctas, min_stages in ((2, 3), (2, 2), (1, 2), (1, 1))
                for dh in (True, False) for scale in (True, False)]
  if ctas_first:
    candidates = list(_CTAS_FIRST) + candidates
  if columns_first:
    candidates.sort(key=lambda candidate: not candidate[2])
  for ctas_per_sm, min_stages, scale_in_smem, dh_in_smem in candidates:
    room = smem_budget(ctas_per_sm) - fixed_bytes - (
        scale_bytes if scale_in_smem else 0)
    per_stage = block_rows * (row_bytes + (dh_row_bytes if dh_in_smem
                                           else 0))
    stages = min(_MAX_STAGES, room // per_stage)
    if stages >= min_stages:
      return Config(vec=vec, block_rows=block_rows, stages=stages,
                    ctas_per_sm=ctas_per_sm,
                    scale_in_smem=scale_in_smem or not scale_bytes,
                    dh_in_smem=dh_in_smem or not dh_row_bytes)
  raise NotImplementedError(
      f"a row of {n} elements ({row_bytes} bytes of operands in shared "
      f"memory, plus {fixed_bytes}) does not fit in the "
      f"{smem_budget(1)} bytes of shared memory of one CTA")
