"""The forward RMSNorm kernel (optionally fused with a residual add): Pallas,
lowered through the Triton backend."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_rmsnorm._src import avals
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import validation
from jax_rmsnorm._src.reference import ForwardOutputs
from jax_rmsnorm._src.triton import common
from jax_rmsnorm._src.triton import config as triton_config

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = "jax_rmsnorm_fwd"


def _forward_kernel(*refs, n: int, m: int, eps: float, offset: float,
                    has_residual: bool, has_scale: bool, save_rstd: bool,
                    round_normalized: bool, config: triton_config.Config,
                    grid: common.RowGrid, interpret: bool):
  """Normalizes rows of `n` columns, `config.num_chunks(n)` chunks each.

  Refs: x, [residual], [scale], y, [h], [rstd]. With a residual the row that
  is normalized is h = x + residual rounded to residual's dtype, and h is
  written out too. The program's blocks of rows (one, or a persistent loop
  that may load the next block ahead and hold the scale):
  `common.each_row_block`.

  resident (or one chunk): every chunk is loaded once and kept in registers,
  one pass over HBM; the chunks let a row of 14336 be 7 x 2048 instead of a
  padded 16384. Otherwise: a loop sums squares, a second loop normalizes
  (rows too long for registers; the inputs are read twice).
  """
  refs = list(refs)
  x_ref = refs.pop(0)
  r_ref = refs.pop(0) if has_residual else None
  scale_ref = refs.pop(0) if has_scale else None
  y_ref = refs.pop(0)
  h_ref = refs.pop(0) if has_residual else None
  rstd_ref = refs.pop(0) if save_rstd else None
  num_chunks = config.num_chunks(n)
  round_to = ((x_ref.dtype if r_ref is None else r_ref.dtype)
              if round_normalized else None)

  def rows(block, loaded, held):
    load_row = block.row_loader(loaded, x_ref, r_ref, h_ref,
                                interpret=interpret)

    def write(k, x):
      y = block.normalized(k, x, rstd, round_to=round_to,
                           scale_ref=scale_ref, held=held, offset=offset,
                           interpret=interpret)
      block.store(y_ref, k, y, block.masks(k)[0])

    xs, sq, _ = block.sum_squares(load_row, num_chunks, config.resident(n),
                                  interpret=interpret)
    rstd = jax.lax.rsqrt(sq / jnp.float32(n) + jnp.float32(eps))
    if rstd_ref is not None:  # The same arithmetic, as a vector of rows.
      block.store_rows(rstd_ref, jax.lax.rsqrt(
          sq[:, 0] / jnp.float32(n) + jnp.float32(eps)))

    if xs is not None:
      for k, x in enumerate(xs):
        write(k, x)
    else:
      @pl.loop(jnp.int32(0), jnp.int32(num_chunks))
      def _(k):
        write(k, load_row(k, write_h=False))

  common.each_row_block(rows, grid=grid, config=config, m=m, n=n,
                        x_ref=x_ref, r_ref=r_ref, scale_ref=scale_ref,
                        offset=offset)


def forward(x: jax.Array, residual: jax.Array | None,
            scale: jax.Array | None, *, epsilon: float, scale_offset: float,
            out_dtype=None, cast_order: str = "float32",
            save_rstd: bool = False, interpret: bool = False,
            config: triton_config.Config | None = None) -> ForwardOutputs:
  """RMSNorm of validated, non-empty `x` (plus `residual`) in one kernel.

  Raises NotImplementedError past the kernel's limits
  (`common.check_supported`).
  """
  n = x.shape[-1]
  m = x.size // n
  validation.require_operand_shapes(x, residual, scale)
  common.check_supported(m, n)
  if config is None:
    config = triton_config.get_config(m, n, x.dtype, platform.device_kind(),
                                      residual=residual is not None)
  logger.debug("rms_norm triton forward: rows=%d n=%d dtype=%s residual=%s "
               "%s", m, n, x.dtype, residual is not None, config)
  norm_dtype = x.dtype if residual is None else residual.dtype
  grid = common.row_grid(config, m, n)
  args, in_specs, row_block = common.row_operands(
      x, residual, scale, block_rows=grid.block[0], block_cols=grid.block[1],
      whole=bool(grid.steps))
  like = (x, residual, scale)
  out_shape = [avals.out_struct((m, n), out_dtype or norm_dtype, *like)]
  out_specs = [row_block]
  if residual is not None:
    out_shape.append(avals.out_struct((m, n), residual.dtype, *like))
    out_specs.append(row_block)
  if save_rstd:
    out_shape.append(avals.out_struct((m,), jnp.float32, *like))
    out_specs.append(grid.row_spec())
  kernel = functools.partial(
      _forward_kernel, n=n, m=m, eps=epsilon, offset=scale_offset,
      has_residual=residual is not None, has_scale=scale is not None,
      save_rstd=save_rstd, round_normalized=cast_order == "hf",
      config=config, grid=grid, interpret=interpret)
  outs = common.launch(kernel, name=KERNEL_NAME, config=config,
                       grid=(grid.programs,),
                       in_specs=in_specs, out_specs=out_specs,
                       out_shape=out_shape, interpret=interpret)(*args)
  outs = list(outs)
  y = outs.pop(0).reshape(x.shape)
  h = outs.pop(0).reshape(x.shape) if residual is not None else None
  rstd = outs.pop(0).reshape(x.shape[:-1]) if save_rstd else None
  return ForwardOutputs(y, h, rstd)
