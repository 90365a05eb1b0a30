"""The forward RMSNorm kernel (optionally fused with a residual add): Pallas
on the Mosaic GPU backend (`plgpu.kernel`, Hopper)."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_rmsnorm._src import avals
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import validation
from jax_rmsnorm._src.mosaic import common
from jax_rmsnorm._src.mosaic import config as mosaic_config
from jax_rmsnorm._src.reference import ForwardOutputs

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = "jax_rmsnorm_mosaic_fwd"


@dataclasses.dataclass(frozen=True)
class Quant:
  """y written as `dtype` codes (rms_norm_quantized; `mosaic/quantize.py`):
  y times the reciprocal of a static scale (`static`), an input of one
  float32 (read once a block) or, `per_channel`, of n float32 per column
  (staged in shared memory with the scale where config.scale_in_smem),
  or times that of each row's scale, amax / qmax, which is written where
  rstd would be."""
  dtype: jnp.dtype
  static: bool
  per_channel: bool = False


def _forward_kernel(*refs, m: int, n: int, config: mosaic_config.Config,
                    ctas: int, eps: float, offset: float, has_residual: bool,
                    has_scale: bool, save_rstd: bool, round_normalized: bool,
                    y_in_place: bool, quant: Quant | None, interpret: bool):
  """CTA c normalizes the row blocks c, c + ctas, ... (common.Blocks),
  `config.stages` of them in shared memory at once (common.pipeline).

  With W = config.warpgroups, a row's columns are split in W slices of
  n / W, one a warpgroup, as in the backward (`mosaic/backward.py`): every
  operand of n columns comes as (rows * W, n / W), the scale and the
  static quant scale's reciprocal as (W, n / W), and warpgroup w works on
  rows r * W + w with its own buffers and barriers; the row totals (the
  sum of squares, and a dynamic scale's amax) cross the warpgroups through
  common.RowTotals, and warpgroup 0 stores rstd or the row scale.

  Refs: x, [residual], [scale], [the static quant scale's reciprocal], y,
  [h], [rstd, or the dynamic quant scales] in GMEM; then the SMEM
  buffers x (W, stages, rows, n / W), [residual], [y], [scale (W, n / W)],
  [the per-channel reciprocal (W, n / W)] (these two when
  config.scale_in_smem: copied once per CTA), [for W > 1:
  common.RowTotals' scratch], the load barriers (W * stages) and [the
  barriers of the copies once per CTA (W)]. With a residual, h = x +
  residual rounded to residual's dtype is written over the residual's
  buffer, and that is the row normalized; y is written over x's buffer
  when it has x's dtype (`y_in_place`).

  A block is read from shared memory twice, chunk by chunk: the first pass
  sums the squares (elementwise over the chunks, then one reduction per
  row), the second writes y; with config.hold_chunks, once: the second
  pass takes the first's chunks from registers. With `quant`, y is scaled
  and saturated into codes (`quantize.saturate`, the cast on the store); a
  dynamic scale's amax is max |x * scale| from the first pass times rstd
  (`quantize.amax_from_scaled`), or, with a residual or in the "hf" cast
  order, a pass between the two over y. Every read of HBM happens once, by
  TMA.
  """
  refs = list(refs)
  slices = config.warpgroups
  wg = lax.axis_index("wg") if slices > 1 else 0
  x_gmem = refs.pop(0)
  r_gmem = refs.pop(0) if has_residual else None
  w_gmem = refs.pop(0) if has_scale else None
  inv_gmem = refs.pop(0) if quant is not None and quant.static else None
  y_gmem = refs.pop(0)
  h_gmem = refs.pop(0) if has_residual else None
  rstd_gmem = refs.pop(0) if save_rstd else None
  x_smem = refs.pop(0)
  r_smem = refs.pop(0) if has_residual else None
  y_smem = x_smem if y_in_place else refs.pop(0)
  per_channel = quant is not None and quant.per_channel
  w_smem = refs.pop(0) if has_scale and config.scale_in_smem else None
  inv_smem = refs.pop(0) if per_channel and config.scale_in_smem else None
  if slices > 1:
    row_totals = common.RowTotals(refs, slices, wg, config.vec, interpret)
  barrier = refs.pop(0)
  once_barrier = (refs.pop(0) if w_smem is not None or inv_smem is not None
                  else None)
  assert not refs, refs
  # Warpgroup wg's slice of every operand (the whole of it where W is 1).
  x_smem, y_smem = x_smem.at[wg], y_smem.at[wg]
  if r_smem is not None:
    r_smem = r_smem.at[wg]
  w_gmem, w_smem, inv_smem = (None if ref is None else ref.at[wg]
                              for ref in (w_gmem, w_smem, inv_smem))
  if per_channel:
    inv_gmem = inv_gmem.at[wg]
  # The per-column vectors copied into shared memory once per CTA.
  once = [(g, s) for g, s in ((w_gmem, w_smem), (inv_gmem, inv_smem))
          if s is not None]
  first_barrier = wg * config.stages

  rows, vec = config.block_rows, config.vec
  chunks = common.Chunks(n // slices, config.chunk_cols)
  cols = chunks.cols
  shape = (rows, cols)
  layout = common.chunk_layout(vec)
  io = common.ChunkIO(rows, cols, vec, interpret)
  f32 = jnp.float32
  norm_dtype = x_smem.dtype if r_smem is None else r_smem.dtype

  def columns_of(k, ref_gmem, ref_smem=None):
    """Chunk k of a per-column vector (the scale), float32, broadcast over
    the rows."""
    window = pl.ds(chunks.start(k), cols)
    if ref_smem is not None:
      w = common.load(ref_smem.at[window], common.column_layout(vec),
                      interpret)
    else:
      w = common.load_gmem(ref_gmem.at[window], common.column_layout(vec),
                           interpret)
    return common.with_layout(lax.broadcast_in_dim(w.astype(f32), shape, (1,)),
                              layout, interpret)

  def scale_of(k):
    """offset + scale of chunk k, float32, broadcast over the rows."""
    return jnp.float32(offset) + columns_of(k, w_gmem, w_smem)

  def splat(value):
    """A scalar broadcast over a chunk."""
    return common.with_layout(lax.broadcast_in_dim(value, shape, ()),
                              layout, interpret)

  def by_rows(values):
    """A (rows,) vector of per-row values (a scalar, where W > 1) broadcast
    over a chunk."""
    if slices > 1:
      return splat(values)
    return common.with_layout(lax.broadcast_in_dim(values, shape, (0,)),
                              layout, interpret)

  # A dynamic quant scale in the default cast order, without a residual,
  # takes its amax from max |x * scale|, reduced in the first pass beside
  # the sum of squares, times rstd (quantize.amax_from_scaled; on an H200
  # bf16 32768 x 4096 took 107.5 us against 124.4 with a pass for the amax,
  # 65536 x 896 64.6 against 69.2; with a residual 239.4 against 230.9);
  # otherwise a pass between the two reduces the amax of y.
  dynamic = quant is not None and not quant.static
  fold_amax = _folds_amax(quant, has_residual, round_normalized)
  # Where W > 1, whole-row totals cross the warpgroups (common.RowTotals):
  # the sum of squares (and max |x * scale|, folded), then the unfolded
  # amax of y.
  handovers = 1 + (dynamic and not fold_amax)

  def row_totals_of(parts, step, i):
    """[(op, (rows, cols) chunk-wise values)] -> per-row totals: (rows,)
    vectors, or scalars where W > 1."""
    reduce = lambda op, v, axis: common.RowTotals.REDUCE[op][1](v, axis=axis)
    if slices == 1:
      return [reduce(op, v, 1) for op, v in parts]
    # One row: the reduction over axis 0 takes none across warps.
    return row_totals([(op, reduce(op, v, 0)) for op, v in parts],
                      step * handovers + i)

  def store_rows(start, values):
    """rstd or the row scales of the block (warpgroup 0's, where W > 1)."""
    if slices == 1:
      common.store_rows(rstd_gmem, start, values)
      return

    @pl.when(wg == 0)
    def _():
      rstd_gmem[start] = values

  def tail_mask(value):
    """Zero the columns the tail shares with the chunk before it."""
    col = common.iota(shape, 1, layout, interpret)
    return jnp.where(col >= chunks.overlap, value, jnp.zeros_like(value))

  def compute(step, slot, start):
    x_s = x_smem.at[slot]
    r_s = r_smem.at[slot] if r_smem is not None else None
    y_s = y_smem.at[slot]
    # The tail (if any) is visited first and written last (common.Chunks):
    # `held` keeps its result meanwhile. Written in place, it is fenced on
    # both sides: its reads before the chunk it overlaps is overwritten (by
    # other threads), its write after every thread read that chunk.
    held = []
    y_over_x = y_in_place and r_s is None
    # With config.hold_chunks: chunk -> the value pass 1 read (x, or h
    # rounded), for the later passes.
    kept = {}

    # Pass 1: the sum of squares of each row (and h, with a residual),
    # elementwise over the chunks, then one reduction per row; with
    # fold_amax, also max |x * scale|.
    def squares(k, acc):
      v = io.get(x_s, chunks.start(k))
      if r_s is not None:
        h = v + io.get(r_s, chunks.start(k))
        if chunks.is_tail(k):
          held.append(h)
          common.sync()  # Read before the chunk it overlaps is overwritten.
        else:
          io.put(r_s, chunks.start(k), h)
        v = common.round_trip(h, norm_dtype, interpret)
      if config.hold_chunks:
        kept[k] = v
      sq = v * v
      if chunks.is_tail(k):
        sq = tail_mask(sq)
      if not fold_amax:
        return sq if acc is None else acc + sq
      a = quantize.abs_nan_as_inf(v if w_gmem is None else v * scale_of(k))
      return (sq, a) if acc is None else (acc[0] + sq, jnp.maximum(acc[1], a))

    acc = chunks.visit(squares)
    parts = [("sum", acc[0] if fold_amax else acc)]
    if fold_amax:
      parts.append(("max", acc[1]))
    if held:
      common.sync()
      io.put(r_s, chunks.tail_start, held.pop())
    totals = row_totals_of(parts, step, 0)
    rstd = lax.rsqrt(totals[0] / jnp.float32(n) + jnp.float32(eps))
    if rstd_gmem is not None and quant is None:
      store_rows(start, rstd)
    if fold_amax:
      row_scale = quantize.dynamic_scale(quantize.amax_from_scaled(
          totals[1], rstd), quant.dtype)
    if r_s is not None:
      common.sync()  # h, written by every thread, is read back below.
    rstd = by_rows(rstd)
    src = x_s if r_s is None else r_s

    def normalized(k):
      """y of chunk k, float32, as reference.forward computes it."""
      v = kept[k] if config.hold_chunks else io.get(src, chunks.start(k))
      y = v * rstd
      if round_normalized:
        y = common.round_trip(y, norm_dtype, interpret)
      if w_gmem is not None:
        y = y * scale_of(k)
      return y

    if dynamic:
      if not fold_amax:
        # Each row's amax (the tail's repeated columns change no maximum).
        def amax_of(k, acc):
          a = quantize.abs_nan_as_inf(normalized(k))
          return a if acc is None else jnp.maximum(acc, a)
        amax, = row_totals_of([("max", chunks.visit(amax_of))], step, 1)
        row_scale = quantize.dynamic_scale(amax, quant.dtype)
      store_rows(start, row_scale)
      inv = by_rows(jnp.float32(1) / row_scale)
    elif quant is not None and not per_channel:
      inv = splat(inv_gmem[0])  # A static scale's one reciprocal.

    def codes(k, y):
      """y of chunk k as the quantized output's values (cast on the store):
      scaled and saturated. Hopper's fp8 convert saturates (satfinite);
      interpret mode's (XLA's) does not, and int8 rounds after the clip."""
      inv_k = columns_of(k, inv_gmem, inv_smem) if per_channel else inv
      return quantize.saturate(y * inv_k, quant.dtype,
                               clip=interpret or quant.dtype == jnp.int8,
                               round_even=jnp.round)

    # Pass 2: y.
    def normalize(k, carry):
      y = normalized(k)
      if quant is not None:
        y = codes(k, y)
      if chunks.is_tail(k):
        held.append(y)
        if y_over_x:
          common.sync()
      else:
        io.put(y_s, chunks.start(k), y)
      return carry

    chunks.visit(normalize, ())
    if held:
      if y_over_x:
        common.sync()
      io.put(y_s, chunks.tail_start, held.pop())

  blocks = common.Blocks(m, rows, ctas)

  def gmem_rows(start):
    """This warpgroup's slices of rows [start, start + rows)."""
    return pl.ds(start * slices + wg, rows)

  def load_block(step, slot, start):
    del step
    block, arrive = gmem_rows(start), barrier.at[first_barrier + slot]
    common.copy_in(x_gmem.at[block], x_smem.at[slot], arrive)
    if r_gmem is not None:
      common.copy_in(r_gmem.at[block], r_smem.at[slot], arrive)

  def store_block(step, slot, start):
    del step
    block = gmem_rows(start)
    outs = [(y_smem, y_gmem)] + ([(r_smem, h_gmem)] if h_gmem is not None
                                 else [])
    for i, (src, dst) in enumerate(outs):
      common.store_out(src.at[slot], dst.at[block],
                       last=i == len(outs) - 1)

  cta = lax.axis_index("ctas")
  for src, dst in once:
    common.copy_in(src, dst, once_barrier.at[wg])
  common.pipeline(
      blocks, cta, config.stages, barrier, load=load_block, compute=compute,
      store=store_block, first_barrier=first_barrier,
      before_loop=(None if not once
                   else lambda: plgpu.barrier_wait(once_barrier.at[wg])))


def _folds_amax(quant: Quant | None, has_residual: bool,
                round_normalized: bool) -> bool:
  """Whether a dynamic quant scale's amax is max |x * scale| reduced in the
  first pass (`quantize.amax_from_scaled`): without a residual and in the
  default cast order."""
  return (quant is not None and not quant.static and not has_residual
          and not round_normalized)


def _row_totals(quant: Quant | None) -> int:
  """Totals a split row hands over at once (common.RowTotals): the sum of
  squares, and max |x * scale| for a dynamic quant scale (at most)."""
  return 1 + (quant is not None and not quant.static)


def forward(x: jax.Array, residual: jax.Array | None,
            scale: jax.Array | None, *, epsilon: float, scale_offset: float,
            out_dtype=None, cast_order: str = "float32",
            save_rstd: bool = False, interpret: bool = False,
            config: mosaic_config.Config | None = None,
            quant_dtype=None,
            quant_inv: jax.Array | None = None) -> ForwardOutputs:
  """RMSNorm of validated, non-empty `x` (plus `residual`) in one kernel.

  quant_dtype: y as quantized codes of this dtype (out_dtype and save_rstd
  are then ignored), times `quant_inv` (float32, 1 / a static scale: (1,)
  for one scale, (n,) for one a column) or, without it, times 1 / each
  row's scale (amax / qmax), which takes rstd's place in the outputs.
  Raises NotImplementedError past the kernel's limits
  (`common.check_supported`).
  """
  quant = None
  if quant_dtype is not None:
    quant = Quant(jnp.dtype(quant_dtype), static=quant_inv is not None,
                  per_channel=quant_inv is not None and quant_inv.size > 1)
    out_dtype, save_rstd = quant.dtype, not quant.static
  n = x.shape[-1]
  m = x.size // n
  validation.require_operand_shapes(x, residual, scale)
  common.check_supported(m, n, x.dtype)
  norm_dtype = x.dtype if residual is None else residual.dtype
  y_dtype = jnp.dtype(out_dtype or norm_dtype)
  y_in_place = y_dtype == x.dtype
  tiles = [x.dtype] + ([residual.dtype] if residual is not None else []) + (
      [] if y_in_place else [y_dtype])
  if residual is not None:
    common.check_supported(m, n, residual.dtype)
  if not y_in_place:
    common.check_supported(m, n, y_dtype)
  if scale is not None:
    scale = common.aligned_scale(scale)
  # The per-channel reciprocal goes where the scale goes (Quant).
  channel_inv = (common.aligned_scale(quant_inv)
                 if quant is not None and quant.per_channel else None)
  columns = [v for v in (scale, channel_inv) if v is not None]
  multiple = max(mosaic_config.row_multiple(n, jnp.dtype(d).itemsize)
                 for d in tiles[:1 + (residual is not None)])
  # The operands of n columns, read in chunks (the widest fixes vec: a
  # thread reads at most 16 bytes of each from shared memory) and cut in
  # slices where rows split.
  chunked = [jnp.dtype(d).itemsize for d in tiles] + [
      v.dtype.itemsize for v in columns]
  if config is None:
    slices, vec_itemsize = mosaic_config.row_slices(
        "forward" if quant is None else "quant", n, max(chunked),
        max(chunked[:1 + (residual is not None)]), chunked)
    chunk_cols = mosaic_config.THREADS * mosaic_config.pick_vec(
        n, vec_itemsize)
    config = mosaic_config.get_config(
        n, n * sum(jnp.dtype(d).itemsize for d in tiles), vec_itemsize,
        common.RowTotals.smem_bytes(_row_totals(quant), slices, chunk_cols),
        multiple, sum(v.size * v.dtype.itemsize for v in columns),
        ctas_first=_folds_amax(quant, residual is not None,
                               cast_order == "hf"),
        columns_first=channel_inv is not None,
        device_kind=platform.device_kind())
    if slices > 1:
      config = dataclasses.replace(config, block_rows=1, warpgroups=slices)
    row_chunks = common.Chunks(n // slices, config.chunk_cols)
    config = dataclasses.replace(config, hold_chunks=(
        mosaic_config.forward_holds_chunks(
            config, row_chunks.count + row_chunks.has_tail,
            row_chunks.count <= row_chunks.UNROLL)))
  slices = config.warpgroups
  if slices > 1:
    mosaic_config.check_slices(n, slices, config.chunk_cols, chunked)
  # Warpgroup w's slice of the per-column vectors is row w.
  columns = [v.reshape(slices, -1) for v in columns]
  columns_in_smem = bool(columns) and config.scale_in_smem
  row_chunks = common.Chunks(n // slices, config.chunk_cols)
  if config.hold_chunks and row_chunks.count > row_chunks.UNROLL:
    raise ValueError("Config.hold_chunks needs a row slice of at most "
                     f"{row_chunks.UNROLL} chunks (unrolled), got {config}")
  config = config.for_rows(m, multiple, platform.sm_count())
  ctas = config.num_ctas(m, platform.sm_count())
  logger.debug("rms_norm mosaic forward: rows=%d n=%d dtype=%s residual=%s "
               "ctas=%d %s", m, n, x.dtype, residual is not None, ctas, config)
  rows = config.block_rows
  # Warpgroup w works on rows r * slices + w: its slice of row r (the whole
  # row where slices is 1).
  width = n // slices
  args = [x.reshape(m * slices, width)]
  if residual is not None:
    args.append(residual.reshape(m * slices, width))
  if scale is not None:
    args.append(columns[0])
  if quant_inv is not None:
    args.append(columns[-1] if channel_inv is not None
                else quant_inv.reshape(1))
  like = (x, residual, scale)
  out_type = [avals.out_struct((m * slices, width), y_dtype, *like)]
  if residual is not None:
    out_type.append(avals.out_struct((m * slices, width), residual.dtype,
                                     *like))
  if save_rstd:
    out_type.append(avals.out_struct((m,), jnp.float32, *like))
  stage = (slices, config.stages, rows, width)
  scratch = [common.scratch(stage, x.dtype)]
  if residual is not None:
    scratch.append(common.scratch(stage, residual.dtype))
  if not y_in_place:
    scratch.append(common.scratch(stage, y_dtype))
  if columns_in_smem:
    scratch += [common.scratch(v.shape, v.dtype) for v in columns]
  if slices > 1:
    scratch += common.RowTotals.scratch_types(_row_totals(quant), slices,
                                              config.chunk_cols)
  scratch.append(common.barriers(slices * config.stages,
                                 1 + (residual is not None)))
  if columns_in_smem:
    scratch.append(common.barriers(slices, len(columns)))
  kernel = functools.partial(
      _forward_kernel, m=m, n=n, config=config, ctas=ctas, eps=epsilon,
      offset=scale_offset, has_residual=residual is not None,
      has_scale=scale is not None, save_rstd=save_rstd,
      round_normalized=cast_order == "hf", y_in_place=y_in_place,
      quant=quant, interpret=bool(interpret))
  outs = common.launch(kernel, name=KERNEL_NAME, out_type=out_type,
                       scratch_types=scratch, ctas=ctas, interpret=interpret,
                       warpgroups=slices)(*args)
  outs = list(outs)
  y = outs.pop(0).reshape(x.shape)
  h = outs.pop(0).reshape(x.shape) if residual is not None else None
  rstd = outs.pop(0).reshape(x.shape[:-1]) if save_rstd else None
  return ForwardOutputs(y, h, rstd)
