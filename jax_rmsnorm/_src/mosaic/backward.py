"""The backward RMSNorm kernel: dx in one pass over HBM, and d(scale) as
per-CTA float32 partial sums in shared memory (summed over the CTAs by one
small XLA reduction); Pallas on the Mosaic GPU backend (`plgpu.kernel`,
Hopper)."""

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
from jax_rmsnorm._src.mosaic import common
from jax_rmsnorm._src.mosaic import config as mosaic_config

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = "jax_rmsnorm_mosaic_bwd"


def _backward_kernel(*refs, m: int, n: int, config: mosaic_config.Config,
                     ctas: int, offset: float, has_dh: bool, has_scale: bool,
                     round_normalized: bool, interpret: bool):
  """CTA c computes dx of the row blocks c, c + ctas, ... (common.Blocks),
  `config.stages` of them in shared memory at once (common.pipeline), and
  sums d(scale) over its own rows.

  With W = config.warpgroups, a row's columns are split in W slices of
  n / W, one a warpgroup: every operand of n columns comes as (rows * W,
  n / W) (the scale as (W, n / W)), and warpgroup w works on rows r * W + w
  (its slice of row r) with its own buffers, barriers and d(scale) sums,
  exactly as one warpgroup works on whole rows, except that the row sum of
  g * xhat is taken by warpgroup 0 from the W slices' chunk sums, handed
  over through shared memory and added in the order of w (row_means,
  common.RowTotals).

  Refs: x, dy, [dh], [scale], rstd in GMEM, dx and [the d(scale) partials
  (ctas, W, chunk slots * chunk)] in GMEM; then the SMEM buffers x and dy
  (W, stages, rows, n / W), [dh (when config.dh_in_smem)], [scale (W,
  n / W) (when config.scale_in_smem)], [d(scale) sums (W, chunk slots *
  chunk) float32], [for W > 1: common.RowTotals' scratch], the load
  barriers (W * stages) and [the scale's barriers (W)]. dx
  is written over x's buffer. With config.scale_in_registers, the
  warpgroup's chunks of the scale are read from GMEM once, before its
  first row, and held.

  With xhat = x * rstd and g = dy * (offset + scale):

    dx = rstd * (g - xhat * mean(g * xhat)) [+ dh]
    dscale = sum over rows of dy * xhat

  xhat is rounded to x's dtype for dscale under the Hugging Face cast order.
  A block is read from shared memory twice, chunk by chunk: the first pass
  sums g * xhat (elementwise over the chunks, then one reduction per row) and
  adds dy * xhat of its rows into the CTA's d(scale) sums, one slot per chunk
  (the tail's own, so that no two threads add to one column); the second
  writes dx. A row's arithmetic depends on n and the dtypes only.
  """
  refs = list(refs)
  x_gmem, dy_gmem = refs.pop(0), refs.pop(0)
  dh_gmem = refs.pop(0) if has_dh else None
  w_gmem = refs.pop(0) if has_scale else None
  rstd_gmem = refs.pop(0)
  dx_gmem = refs.pop(0)
  dw_gmem = refs.pop(0) if has_scale else None
  x_smem, dy_smem = refs.pop(0), refs.pop(0)
  dh_smem = refs.pop(0) if has_dh and config.dh_in_smem else None
  w_smem = refs.pop(0) if has_scale and config.scale_in_smem else None
  dw_smem = refs.pop(0) if has_scale else None
  slices = config.warpgroups
  wg = lax.axis_index("wg") if slices > 1 else 0
  if slices > 1:
    row_totals = common.RowTotals(refs, slices, wg, config.vec, interpret)
  barrier = refs.pop(0)
  w_barrier = refs.pop(0) if w_smem is not None else None
  assert not refs, refs

  x_smem, dy_smem = x_smem.at[wg], dy_smem.at[wg]
  if dh_smem is not None:
    dh_smem = dh_smem.at[wg]
  if w_smem is not None:
    w_smem = w_smem.at[wg]
  if w_gmem is not None:
    w_gmem = w_gmem.at[wg]
  if dw_smem is not None:
    dw_smem = dw_smem.at[wg]
  first_barrier = wg * config.stages

  rows, vec = config.block_rows, config.vec
  chunks = common.Chunks(n // slices, config.chunk_cols)
  cols = chunks.cols
  shape = (rows, cols)
  layout = common.chunk_layout(vec)
  column_layout = common.column_layout(vec)
  load = functools.partial(common.load, interpret=interpret)
  io = common.ChunkIO(rows, cols, vec, interpret)
  f32 = jnp.float32
  blocks = common.Blocks(m, rows, ctas)
  cta = lax.axis_index("ctas")

  def gmem_rows(start):
    """This warpgroup's slices of rows [start, start + rows)."""
    return pl.ds(start * slices + wg, rows)

  def slot_of(k):
    """The d(scale) sums of chunk k: its own slot (the tail's is last)."""
    return dw_smem.at[pl.ds(k * cols, cols)]

  def broadcast_rows(value):
    return common.with_layout(lax.broadcast_in_dim(value, shape, (0,)),
                              layout, interpret)

  def row_means(acc, step):
    """The (rows, cols) chunk sums `acc` of g * xhat -> their mean over the
    whole row, broadcast over the columns (with several slices, one row a
    block, summed across the warpgroups by `row_totals`)."""
    if slices == 1:
      return broadcast_rows(jnp.sum(acc, axis=1) / jnp.float32(n))
    # One row: the sum over axis 0 takes no reduction across warps.
    total, = row_totals([("sum", jnp.sum(acc, axis=0))], step)
    return common.with_layout(lax.broadcast_in_dim(
        total / jnp.float32(n), shape, ()), layout, interpret)

  held_scale = {}  # With config.scale_in_registers: chunk -> its scale.

  def scale_of(k):
    """offset + scale of chunk k, float32, broadcast over the rows."""
    if config.scale_in_registers and k in held_scale:
      return held_scale[k]
    if w_smem is not None:
      w = load(w_smem.at[pl.ds(chunks.start(k), cols)], column_layout)
    else:
      w = common.load_gmem(w_gmem.at[pl.ds(chunks.start(k), cols)],
                           column_layout, interpret)
    w = jnp.float32(offset) + w.astype(f32)
    return common.with_layout(lax.broadcast_in_dim(w, shape, (1,)), layout,
                              interpret)

  def tail_mask(value):
    col = common.iota(shape, 1, layout, interpret)
    return jnp.where(col >= chunks.overlap, value, jnp.zeros_like(value))

  if dw_smem is not None:  # Zero this warpgroup's d(scale) sums.
    zeros = common.iota((cols,), 0, column_layout, interpret).astype(f32)
    zeros = zeros * jnp.float32(0)
    for k in range(chunks.count + chunks.has_tail):
      slot_of(k)[...] = zeros

  def compute(step, slot, start):
    x_s, dy_s = x_smem.at[slot], dy_smem.at[slot]
    rstd = broadcast_rows(common.load_rows(rstd_gmem, start, rows,
                                           common.row_layout(vec), interpret))
    keep_row = None
    if dw_smem is not None and blocks.ragged:
      # The rows a shifted last block shares with the block before it
      # count once in d(scale).
      row = common.iota(shape, 0, layout, interpret)
      keep_row = row >= blocks.first_new_row(cta, step)

    def terms(k):
      x = io.get(x_s, chunks.start(k))
      dy = io.get(dy_s, chunks.start(k))
      xhat = x * rstd
      g = dy if w_gmem is None else dy * scale_of(k)
      return xhat, dy, g

    # Pass 1: sum of g * xhat per row; d(scale) sums.
    def products(k, acc):
      xhat, dy, g = terms(k)
      prod = g * xhat
      if chunks.is_tail(k):
        prod = tail_mask(prod)
      if dw_smem is not None:
        xh = (common.round_trip(xhat, x_smem.dtype, interpret)
              if round_normalized else xhat)
        dw = dy * xh
        if keep_row is not None:
          dw = jnp.where(keep_row, dw, jnp.zeros_like(dw))
        dw_k = slot_of(k)
        dw_k[...] = load(dw_k, column_layout) + jnp.sum(dw, axis=0)
      return prod if acc is None else acc + prod

    acc = chunks.visit(products)
    mean_gx = row_means(acc, step)

    # Pass 2: dx, written over x.
    held = []

    def gradient(k, carry):
      xhat, _, g = terms(k)
      dx = rstd * (g - xhat * mean_gx)
      if dh_gmem is not None:
        if dh_smem is not None:
          dx = dx + io.get(dh_smem.at[slot], chunks.start(k))
        else:
          dx = dx + io.get(dh_gmem.at[gmem_rows(start)], chunks.start(k),
                           gmem=True)
      if chunks.is_tail(k):
        held.append(dx)
        common.sync()  # Read before the chunk it overlaps is overwritten.
      else:
        io.put(x_s, chunks.start(k), dx)
      return carry

    chunks.visit(gradient, ())
    if held:
      common.sync()  # Every thread read the chunk the tail overlaps.
      io.put(x_s, chunks.tail_start, held.pop())

  def load_block(step, slot, start):
    del step
    block, arrive = gmem_rows(start), barrier.at[first_barrier + slot]
    common.copy_in(x_gmem.at[block], x_smem.at[slot], arrive)
    common.copy_in(dy_gmem.at[block], dy_smem.at[slot], arrive)
    if dh_smem is not None:
      common.copy_in(dh_gmem.at[block], dh_smem.at[slot], arrive)

  def store_block(step, slot, start):
    del step
    common.store_out(x_smem.at[slot], dx_gmem.at[gmem_rows(start)],
                     last=True)

  if w_smem is not None:
    common.copy_in(w_gmem, w_smem, w_barrier.at[wg])
  if config.scale_in_registers:
    def hold(k, carry):
      held_scale[k] = scale_of(k)
      return carry
    chunks.visit(hold, ())
  common.pipeline(
      blocks, cta, config.stages, barrier, load=load_block, compute=compute,
      store=store_block, first_barrier=first_barrier,
      before_loop=(None if w_smem is None
                   else lambda: plgpu.barrier_wait(w_barrier.at[wg])))
  if dw_smem is not None:
    common.sync()
    common.store_out(dw_smem, dw_gmem.at[cta, wg], last=True)
    plgpu.wait_smem_to_gmem(0)


def backward(x: jax.Array, dy: jax.Array, dh: jax.Array | None,
             scale: jax.Array | None, rstd: jax.Array, *,
             scale_offset: float, cast_order: str = "float32",
             interpret: bool = False,
             config: mosaic_config.Config | None = None
             ) -> tuple[jax.Array, jax.Array | None]:
  """Returns (dx in x's dtype, float32 d(scale) or None): one kernel, plus a
  sum over the CTAs' float32 partials of d(scale).

  `x` is the normalized input (h for add_rms_norm), `rstd` its float32
  statistics (x.shape[:-1]) from the forward, `dh` an extra gradient added to
  dx. d(scale) stays float32 so that a caller can sum it across devices
  before the one rounding to scale's dtype. Raises NotImplementedError past
  the kernel's limits (`common.check_supported`).
  """
  n = x.shape[-1]
  m = x.size // n
  for name, a in (("dy", dy), ("dh", dh)):
    if a is not None and a.shape != x.shape:
      raise ValueError(f"{name}.shape={a.shape} must equal {x.shape=}")
  if scale is not None and scale.shape != (n,):
    raise ValueError(f"{scale.shape=} must be ({n},)")
  if rstd.size != m:
    raise ValueError(f"{rstd.shape=} must hold {m} rows")
  for a in (x, dy, dh):
    if a is not None:
      common.check_supported(m, n, a.dtype, backward=True)
  if scale is not None:
    scale = common.aligned_scale(scale)
  chunk_dtypes = [x.dtype, dy.dtype] + ([dh.dtype] if dh is not None else [])
  tile_sizes = [x.dtype.itemsize, dy.dtype.itemsize]
  itemsizes = tile_sizes + [a.dtype.itemsize for a in (dh, scale)
                            if a is not None]
  multiple = max(mosaic_config.row_multiple(n, jnp.dtype(d).itemsize)
                 for d in chunk_dtypes)
  if config is None:
    # With a scale, the float32 d(scale) sums are read in chunks too.
    slices, max_itemsize = mosaic_config.row_slices(
        "backward", n, max(itemsizes + ([4] if scale is not None else [])),
        max(tile_sizes), itemsizes)
    chunk_cols = mosaic_config.THREADS * mosaic_config.pick_vec(
        n, max_itemsize)
    padded = slices * common.Chunks(n // slices, chunk_cols).padded_cols
    fixed = (0 if scale is None else 4 * padded) + (
        common.RowTotals.smem_bytes(1, slices, chunk_cols))
    config = mosaic_config.get_config(
        n, n * sum(tile_sizes), max_itemsize, fixed,
        multiple, 0 if scale is None else scale.size * scale.dtype.itemsize,
        0 if dh is None else n * dh.dtype.itemsize,
        device_kind=platform.device_kind())
    if slices > 1:
      config = dataclasses.replace(config, block_rows=1, warpgroups=slices)
    held = mosaic_config.backward_scale_in_registers(
        config, common.Chunks(n // slices, chunk_cols).count,
        0 if scale is None else scale.dtype.itemsize)
    config = dataclasses.replace(config, scale_in_registers=held)
  slices = config.warpgroups
  if slices > 1:
    mosaic_config.check_slices(n, slices, config.chunk_cols, itemsizes)
  config = config.for_rows(m, multiple, platform.sm_count())
  ctas = config.num_ctas(m, platform.sm_count())
  width = n // slices
  chunks = common.Chunks(width, config.chunk_cols)
  if config.scale_in_registers and (scale is None or config.scale_in_smem
                                    or chunks.count > chunks.UNROLL):
    raise ValueError(
        "Config.scale_in_registers needs a scale in GMEM and a row slice "
        f"of at most {chunks.UNROLL} chunks (unrolled), got {config}")
  logger.debug("rms_norm mosaic backward: rows=%d n=%d dtype=%s dh=%s "
               "ctas=%d %s", m, n, x.dtype, dh is not None, ctas, config)
  rows = config.block_rows
  # Warpgroup w works on rows r * slices + w: its slice of row r.
  args = [x.reshape(m * slices, width), dy.reshape(m * slices, width)]
  if dh is not None:
    args.append(dh.reshape(m * slices, width))
  if scale is not None:
    args.append(scale.reshape(slices, -1))
  args.append(rstd.reshape(m).astype(jnp.float32))
  like = (x, dy, dh, scale, rstd)
  out_type = [avals.out_struct((m * slices, width), x.dtype, *like)]
  if scale is not None:
    out_type.append(avals.out_struct((ctas, slices, chunks.padded_cols),
                                     jnp.float32, *like))
  stage = (slices, config.stages, rows, width)
  scratch = [common.scratch(stage, x.dtype), common.scratch(stage, dy.dtype)]
  if dh is not None and config.dh_in_smem:
    scratch.append(common.scratch(stage, dh.dtype))
  if scale is not None and config.scale_in_smem:
    scratch.append(common.scratch(args[-2].shape, scale.dtype))
  if scale is not None:
    scratch.append(common.scratch((slices, chunks.padded_cols), jnp.float32))
  if slices > 1:
    scratch += common.RowTotals.scratch_types(1, slices, config.chunk_cols)
  scratch.append(common.barriers(
      slices * config.stages, 2 + (dh is not None and config.dh_in_smem)))
  if scale is not None and config.scale_in_smem:
    scratch.append(common.barriers(slices, 1))
  kernel = functools.partial(
      _backward_kernel, m=m, n=n, config=config, ctas=ctas,
      offset=scale_offset, has_dh=dh is not None,
      has_scale=scale is not None, round_normalized=cast_order == "hf",
      interpret=bool(interpret))
  outs = common.launch(kernel, name=KERNEL_NAME, out_type=out_type,
                       scratch_types=scratch, ctas=ctas, interpret=interpret,
                       warpgroups=slices)(*args)
  dx = outs[0].reshape(x.shape)
  if scale is None:
    return dx, None
  return dx, chunks.fold(jnp.sum(outs[1], axis=0)).reshape(n)
