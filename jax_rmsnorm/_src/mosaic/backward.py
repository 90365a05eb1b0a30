"""The backward RMSNorm kernel: dx in one pass over HBM, and d(scale) as
per-CTA float32 partial sums in shared memory (summed over the CTAs by one
small XLA reduction); Pallas on the Mosaic GPU backend (`plgpu.kernel`,
Hopper)."""

from __future__ import annotations

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

  Refs: x, dy, [dh], [scale], rstd in GMEM, dx and [the d(scale) partials
  (ctas, chunk slots * chunk)] in GMEM; then the SMEM buffers x and dy
  (stages, rows, n), [dh (when config.dh_in_smem)], [scale (when
  config.scale_in_smem)], [d(scale) sums (chunk slots * chunk,) float32],
  the load barriers (one a stage) and [the scale's barrier]. dx is written
  over x's buffer.

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
  barrier = refs.pop(0)
  w_barrier = refs.pop(0) if w_smem is not None else None
  assert not refs, refs

  rows, vec = config.block_rows, config.vec
  chunks = common.Chunks(n, config.chunk_cols)
  cols = chunks.cols
  shape = (rows, cols)
  layout = common.chunk_layout(vec)
  column_layout = common.column_layout(vec)
  load = functools.partial(common.load, interpret=interpret)
  io = common.ChunkIO(rows, cols, vec, interpret)
  f32 = jnp.float32
  blocks = common.Blocks(m, rows, ctas)
  cta = lax.axis_index("ctas")

  def slot_of(k):
    """The d(scale) sums of chunk k: its own slot (the tail's is last)."""
    return dw_smem.at[pl.ds(k * cols, cols)]

  def broadcast_rows(value):
    return common.with_layout(lax.broadcast_in_dim(value, shape, (0,)),
                              layout, interpret)

  def scale_of(k):
    """offset + scale of chunk k, float32, broadcast over the rows."""
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

  if dw_smem is not None:  # Zero this CTA's d(scale) sums.
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
    mean_gx = broadcast_rows(jnp.sum(acc, axis=1) / jnp.float32(n))

    # Pass 2: dx, written over x.
    held = []

    def gradient(k, carry):
      xhat, _, g = terms(k)
      dx = rstd * (g - xhat * mean_gx)
      if dh_gmem is not None:
        if dh_smem is not None:
          dx = dx + io.get(dh_smem.at[slot], chunks.start(k))
        else:
          dx = dx + io.get(dh_gmem.at[pl.ds(start, rows)], chunks.start(k),
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
    block = pl.ds(start, rows)
    common.copy_in(x_gmem.at[block], x_smem.at[slot], barrier.at[slot])
    common.copy_in(dy_gmem.at[block], dy_smem.at[slot], barrier.at[slot])
    if dh_smem is not None:
      common.copy_in(dh_gmem.at[block], dh_smem.at[slot], barrier.at[slot])

  def store_block(step, slot, start):
    del step
    common.store_out(x_smem.at[slot], dx_gmem.at[pl.ds(start, rows)],
                     last=True)

  if w_smem is not None:
    common.copy_in(w_gmem, w_smem, w_barrier.at[0])
  common.pipeline(
      blocks, cta, config.stages, barrier, load=load_block, compute=compute,
      store=store_block,
      before_loop=(None if w_smem is None
                   else lambda: plgpu.barrier_wait(w_barrier.at[0])))
  if dw_smem is not None:
    common.sync()
    common.store_out(dw_smem, dw_gmem.at[cta], last=True)
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
  tiles = [x.dtype, dy.dtype]
  multiple = max(mosaic_config.row_multiple(n, jnp.dtype(d).itemsize)
                 for d in chunk_dtypes)
  if config is None:
    # With a scale, the float32 d(scale) sums are read in chunks too.
    max_itemsize = max(jnp.dtype(d).itemsize for d in chunk_dtypes + (
        [] if scale is None else [scale.dtype, jnp.float32]))
    probe = mosaic_config.Config(
        vec=mosaic_config.pick_vec(n, max_itemsize), block_rows=1, stages=1)
    padded = common.Chunks(n, probe.chunk_cols).padded_cols
    config = mosaic_config.get_config(
        n, n * sum(jnp.dtype(d).itemsize for d in tiles), max_itemsize,
        0 if scale is None else 4 * padded, multiple,
        0 if scale is None else scale.size * scale.dtype.itemsize,
        0 if dh is None else n * dh.dtype.itemsize,
        device_kind=platform.device_kind())
  config = config.for_rows(m, multiple, platform.sm_count())
  ctas = config.num_ctas(m, platform.sm_count())
  chunks = common.Chunks(n, config.chunk_cols)
  logger.debug("rms_norm mosaic backward: rows=%d n=%d dtype=%s dh=%s "
               "ctas=%d %s", m, n, x.dtype, dh is not None, ctas, config)
  rows = config.block_rows
  args = [x.reshape(m, n), dy.reshape(m, n)]
  if dh is not None:
    args.append(dh.reshape(m, n))
  if scale is not None:
    args.append(scale)
  args.append(rstd.reshape(m).astype(jnp.float32))
  like = (x, dy, dh, scale, rstd)
  out_type = [avals.out_struct((m, n), x.dtype, *like)]
  if scale is not None:
    out_type.append(avals.out_struct((ctas, chunks.padded_cols), jnp.float32,
                                     *like))
  stage = (config.stages, rows, n)
  scratch = [common.scratch(stage, x.dtype), common.scratch(stage, dy.dtype)]
  if dh is not None and config.dh_in_smem:
    scratch.append(common.scratch(stage, dh.dtype))
  if scale is not None and config.scale_in_smem:
    scratch.append(common.scratch(scale.shape, scale.dtype))
  if scale is not None:
    scratch.append(common.scratch((chunks.padded_cols,), jnp.float32))
  scratch.append(common.barriers(
      config.stages, 2 + (dh is not None and config.dh_in_smem)))
  if scale is not None and config.scale_in_smem:
    scratch.append(common.barriers(1, 1))
  kernel = functools.partial(
      _backward_kernel, m=m, n=n, config=config, ctas=ctas,
      offset=scale_offset, has_dh=dh is not None,
      has_scale=scale is not None, round_normalized=cast_order == "hf",
      interpret=bool(interpret))
  outs = common.launch(kernel, name=KERNEL_NAME, out_type=out_type,
                       scratch_types=scratch, ctas=ctas,
                       interpret=interpret)(*args)
  dx = outs[0].reshape(x.shape)
  if scale is None:
    return dx, None
  return dx, chunks.fold(jnp.sum(outs[1], axis=0))
