"""The backward RMSNorm kernel: dx in one pass, and d(scale) either as
per-program float32 partials (many rows) or as column sums over every row
(few rows), in the same kernel; Pallas lowered through the Triton backend."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import avals
from jax_rmsnorm._src import platform
from jax_rmsnorm._src.triton import common
from jax_rmsnorm._src.triton import config as triton_config

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = "jax_rmsnorm_bwd"


def _backward_kernel(*refs, n: int, m: int, offset: float, has_dh: bool,
                     has_scale: bool, round_normalized: bool, block_rows: int,
                     block_cols: int, num_chunks: int, steps: int,
                     num_programs: int, prefetch: bool, hold_scale: bool,
                     column_tile: tuple[int, int, int] | None,
                     interpret: bool):
  """Program p handles the row blocks p, p + num_programs, ... (`steps` of
  them). d(scale) is either a float32 partial sum per program, kept in
  registers, or (`column_tile`, for few rows) summed by column slices after
  the rows are done (see _column_sums).

  Refs: x, dy, [dh], [scale], rstd, dx, [dscale_partials or dscale]. x, dy,
  dh, dx and rstd are whole arrays (padded in interpret mode, masked on the
  GPU). With xhat = x * rstd and g = dy * (offset + scale):

    dx = rstd * g - xhat * rstd * mean(g * xhat) [+ dh]
    dscale = sum over rows of dy * xhat

  xhat is rounded to x's dtype for dscale under the Hugging Face cast order
  (the rounding itself passes gradients straight through, as in autodiff).

  Registers decide the speed here. With hold_scale the scale is loaded
  once, before the loop: a gain where a thread holds few elements of a row,
  but at bf16 4096 x 14336 (64 elements a thread) ncu counted 235 MB of
  register spills and it ran 10% slower. Otherwise the scale is re-read every
  step (an L1/L2 hit), masked off in steps past the last row.
  """
  refs = list(refs)
  x_ref, dy_ref = refs.pop(0), refs.pop(0)
  dh_ref = refs.pop(0) if has_dh else None
  scale_ref = refs.pop(0) if has_scale else None
  rstd_ref, dx_ref = refs.pop(0), refs.pop(0)
  dw_ref = refs.pop(0) if has_scale else None
  shape = (block_rows, block_cols)
  pid = pl.program_id(0)

  def col_mask(k):
    if (k + 1) * block_cols <= n:
      return None
    return k * block_cols + jax.lax.broadcasted_iota(jnp.int32, shape, 1) < n

  def load_scale(k, live=None):
    """Chunk k of the scale, (block_cols,), in its own dtype; `live` masks
    the whole load (a step past the last row loads nothing)."""
    mask = None
    if (k + 1) * block_cols > n:
      mask = k * block_cols + jax.lax.iota(jnp.int32, block_cols) < n
    if live is not None:
      live = jnp.broadcast_to(live, (block_cols,))
      mask = live if mask is None else mask & live
    at = common.columns(scale_ref, k * block_cols, block_cols)
    if mask is None:
      return plgpu.load(at)
    return plgpu.load(at, mask=mask, other=0.0)

  held = ([load_scale(k) for k in range(num_chunks)]
          if hold_scale and scale_ref is not None else None)

  def scale_of(k, first_row):
    """offset + scale of chunk k as a float32 (1, block_cols) row."""
    w = held[k] if held is not None else load_scale(k, first_row < m)
    return jnp.float32(offset) + w.astype(jnp.float32)[None, :]

  def rows_of(t):
    """First row, row ids and per-chunk masks of step t's row block."""
    first_row = (t * num_programs + pid) * block_rows
    row_ids = first_row + jax.lax.iota(jnp.int32, block_rows)
    row_mask = (first_row + jax.lax.broadcasted_iota(jnp.int32, shape, 0)) < m
    masks = [row_mask if col_mask(k) is None else row_mask & col_mask(k)
             for k in range(num_chunks)]
    return first_row, row_ids, masks

  def at(ref, first_row, k):
    return ref.at[common.ds(first_row, block_rows),
                  common.ds(k * block_cols, block_cols)]

  def load_rows(ref, first_row, masks):
    return [plgpu.load(at(ref, first_row, k), mask=masks[k], other=0.0)
            for k in range(num_chunks)]

  def load_block(t):
    """x and dy (in their own dtypes) and rstd of step t's row block."""
    first_row, row_ids, masks = rows_of(t)
    xs = load_rows(x_ref, first_row, masks)
    dys = load_rows(dy_ref, first_row, masks)
    rstd = plgpu.load(rstd_ref.at[common.ds(first_row, block_rows)],
                      mask=row_ids < m, other=0.0)
    return xs, dys, rstd

  def compute(t, block, accs):
    """Writes dx of step t's row block; returns the updated accumulators."""
    first_row, _, masks = rows_of(t)
    xs, dys, rstd = block
    rstd = jax.lax.broadcast_in_dim(rstd, (block_rows, 1), (0,))
    xhats = [x.astype(jnp.float32) * rstd for x in xs]
    dys = [dy.astype(jnp.float32) for dy in dys]
    if scale_ref is None:
      gs = dys
    else:
      gs = [dy * scale_of(k, first_row) for k, dy in enumerate(dys)]
    # The chunks are summed elementwise, then reduced once: one reduction
    # across the warps a row instead of one per chunk.
    prod = gs[0] * xhats[0]
    for g, xhat in zip(gs[1:], xhats[1:]):
      prod = prod + g * xhat
    mean_gx = common.row_sum(prod, interpret) / jnp.float32(n)
    for k in range(num_chunks):
      dx = rstd * (gs[k] - xhats[k] * mean_gx)
      if dh_ref is not None:
        dx = dx + plgpu.load(at(dh_ref, first_row, k), mask=masks[k],
                             other=0.0).astype(jnp.float32)
      plgpu.store(at(dx_ref, first_row, k), dx.astype(dx_ref.dtype),
                  mask=masks[k])
    if not accs:
      return accs
    if round_normalized:
      xhats = [common.round_trip(xh, x_ref.dtype, interpret)
               for xh in xhats]
    return tuple(acc + dy * xh for acc, dy, xh in zip(accs, dys, xhats))

  by_rows = scale_ref is not None and column_tile is None
  accs = tuple(jnp.zeros(shape, jnp.float32)
               for _ in range(num_chunks if by_rows else 0))
  if prefetch:
    # The loads of step t + 1 are issued before step t's reductions and
    # stores, so a program keeps memory busy while it computes.
    def step(t, carry):
      accs, block = carry
      upcoming = load_block(t + 1)
      return compute(t, block, accs), upcoming
    accs, _ = jax.lax.fori_loop(jnp.int32(0), jnp.int32(steps), step,
                                (accs, load_block(jnp.int32(0))))
  else:
    accs = jax.lax.fori_loop(
        jnp.int32(0), jnp.int32(steps),
        lambda t, accs: compute(t, load_block(t), accs), accs)
  for k, acc in enumerate(accs):
    plgpu.store(common.columns(dw_ref, k * block_cols, block_cols),
                jnp.sum(acc, axis=0, keepdims=True))
  if scale_ref is not None and column_tile is not None:
    _column_sums(x_ref, dy_ref, rstd_ref, dw_ref, n=n, m=m, pid=pid,
                 num_programs=num_programs, tile=column_tile,
                 round_normalized=round_normalized, interpret=interpret)


def _column_sums(x_ref, dy_ref, rstd_ref, dw_ref, *, n, m, pid, num_programs,
                 tile, round_normalized, interpret):
  """d(scale) = sum over rows of dy * xhat, by column slices: program p sums
  the slices p, p + num_programs, ... over every row, and writes d(scale)
  itself (no partials). For few rows, x and dy are then still in L2."""
  tile_rows, tile_cols, slice_steps = tile
  shape = (tile_rows, tile_cols)

  def slice_step(s, carry):
    first_col = (s * num_programs + pid) * tile_cols
    col_ok = first_col + jax.lax.broadcasted_iota(jnp.int32, shape, 1) < n

    def row_step(r, acc):
      first_row = r * tile_rows
      row_ids = first_row + jax.lax.iota(jnp.int32, tile_rows)
      mask = col_ok & (
          first_row + jax.lax.broadcasted_iota(jnp.int32, shape, 0) < m)
      at = lambda ref: ref.at[common.ds(first_row, tile_rows),
                              common.ds(first_col, tile_cols)]
      x = plgpu.load(at(x_ref), mask=mask, other=0.0)
      dy = plgpu.load(at(dy_ref), mask=mask, other=0.0)
      rstd = plgpu.load(rstd_ref.at[common.ds(first_row, tile_rows)],
                        mask=row_ids < m, other=0.0)
      xhat = x.astype(jnp.float32) * jax.lax.broadcast_in_dim(
          rstd, shape, (0,))
      if round_normalized:
        xhat = common.round_trip(xhat, x_ref.dtype, interpret)
      return acc + dy.astype(jnp.float32) * xhat

    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(pl.cdiv(m, tile_rows)),
                            row_step, jnp.zeros(shape, jnp.float32))
    cols = first_col + jax.lax.iota(jnp.int32, tile_cols)
    plgpu.store(dw_ref.at[common.ds(first_col, tile_cols)],
                jnp.sum(acc, axis=0).astype(dw_ref.dtype), mask=cols < n)
    return carry

  jax.lax.fori_loop(jnp.int32(0), jnp.int32(slice_steps), slice_step, 0)


def backward(x: jax.Array, dy: jax.Array, dh: jax.Array | None,
             scale: jax.Array | None, rstd: jax.Array, *,
             scale_offset: float, cast_order: str = "float32",
             interpret: bool = False,
             config: triton_config.Config | None = None
             ) -> tuple[jax.Array, jax.Array | None]:
  """Returns (dx in x's dtype, float32 d(scale) or None) in one kernel (plus
  a sum over the programs' float32 partials, for many rows).

  `x` is the normalized input (h for add_rms_norm), `rstd` its float32
  statistics (x.shape[:-1]) from the forward, `dh` an extra gradient added to dx.
  d(scale) stays float32 so that a caller can sum it across devices before
  the one rounding to scale's dtype. Raises NotImplementedError past the
  kernel's limits (`common.check_supported`).
  """
  n = x.shape[-1]
  m = x.size // n
  common.check_supported(m, n, backward=True)
  if config is None:
    config = triton_config.get_backward_config(m, n, x.dtype,
                                               platform.device_kind())
  num_chunks = config.num_chunks(n)
  if not config.resident(n):
    raise NotImplementedError(f"{config} does not hold rows of {n} in "
                              "registers, which the backward kernel needs")
  if not config.programs_per_sm:
    raise ValueError(f"{config} needs programs_per_sm > 0 (persistent grid)")
  if config.split_tail:
    raise ValueError(f"{config}: the backward holds chunks of block_cols "
                     "only (no split_tail)")
  num_programs = config.num_programs(m, platform.sm_count())
  steps = pl.cdiv(pl.cdiv(m, config.block_rows), num_programs)
  logger.debug("rms_norm triton backward: rows=%d n=%d dtype=%s programs=%d "
               "%s", m, n, x.dtype, num_programs, config)
  padded = (steps * num_programs * config.block_rows,
            num_chunks * config.block_cols)
  column_tile = None
  if scale is not None and config.dscale_by_columns:
    column_tile = triton_config.column_tile(m, n, num_programs,
                                           x.dtype.itemsize)
    tile_rows, tile_cols, slice_steps = column_tile
    # Column blocks stay powers of two, which the Triton lowering needs.
    padded = (max(padded[0], pl.cdiv(m, tile_rows) * tile_rows),
              pl.next_power_of_2(
                  max(padded[1], slice_steps * num_programs * tile_cols)))
  whole = pl.BlockSpec(padded, lambda p: (0, 0))
  args, in_specs = [x.reshape(m, n), dy.reshape(m, n)], [whole, whole]
  if dh is not None:
    args.append(dh.reshape(m, n))
    in_specs.append(whole)
  if scale is not None:
    args.append(scale)
    in_specs.append(pl.BlockSpec(padded[1:], lambda p: (0,)))
  args.append(rstd.reshape(m))
  in_specs.append(pl.BlockSpec(padded[:1], lambda p: (0,)))
  like = (x, dy, dh, scale, rstd)
  out_shape = [avals.out_struct((m, n), x.dtype, *like)]
  out_specs = [whole]
  if column_tile is not None:
    out_shape.append(avals.out_struct((n,), jnp.float32, *like))
    out_specs.append(pl.BlockSpec(padded[1:], lambda p: (0,)))
  elif scale is not None:
    out_shape.append(avals.out_struct((num_programs, padded[1]), jnp.float32,
                                      *like))
    out_specs.append(pl.BlockSpec((1, padded[1]), lambda p: (p, 0)))
  kernel = functools.partial(
      _backward_kernel, n=n, m=m, offset=scale_offset, has_dh=dh is not None,
      has_scale=scale is not None, round_normalized=cast_order == "hf",
      block_rows=config.block_rows, block_cols=config.block_cols,
      num_chunks=num_chunks, steps=steps,
      num_programs=num_programs, prefetch=config.prefetch,
      hold_scale=config.hold_scale,
      column_tile=column_tile, interpret=interpret)
  outs = common.launch(
      kernel, name=KERNEL_NAME, config=config, grid=(num_programs,),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret)(*args)
  dx = outs[0].reshape(x.shape)
  if scale is None:
    return dx, None
  if column_tile is not None:
    return dx, outs[1]
  return dx, jnp.sum(outs[1], axis=0)[:n]
