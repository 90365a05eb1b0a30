"""The forward RMSNorm kernel: Pallas, lowered through the Triton backend."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import platform
from jax_rmsnorm._src import triton_config

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = "jax_rmsnorm_fwd"


def _forward_kernel(*refs, n: int, m: int, eps: float, offset: float,
                    has_scale: bool, num_chunks: int):
  """Normalizes `block_rows` rows; loops over column chunks if num_chunks>1."""
  if has_scale:
    x_ref, scale_ref, y_ref = refs
  else:
    (x_ref, y_ref), scale_ref = refs, None
  block_rows = x_ref.shape[0]
  block_cols = x_ref.shape[1] // num_chunks
  shape = (block_rows, block_cols)
  rows = (pl.program_id(0) * block_rows
          + jax.lax.broadcasted_iota(jnp.int32, shape, 0))
  row_mask = rows < m

  def chunk(k):
    """Column slice, and mask of the valid elements, of chunk `k`."""
    cols = k * block_cols + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return pl.ds(k * block_cols, block_cols), row_mask & (cols < n)

  def load_x(k):
    cols, mask = chunk(k)
    return plgpu.load(x_ref.at[:, cols], mask=mask, other=0.0
                      ).astype(jnp.float32)

  def sum_squares(k, acc):
    x = load_x(k)
    return acc + x * x

  if num_chunks == 1:
    x = load_x(0)
    sq = x * x
  else:
    sq = jax.lax.fori_loop(0, num_chunks, sum_squares,
                           jnp.zeros(shape, jnp.float32))
  mean_sq = jnp.sum(sq, axis=1, keepdims=True) / jnp.float32(n)
  rstd = jax.lax.rsqrt(mean_sq + jnp.float32(eps))

  def write(k, x):
    cols, mask = chunk(k)
    y = x * rstd
    if scale_ref is not None:
      w_cols = k * block_cols + jax.lax.iota(jnp.int32, block_cols)
      w = plgpu.load(scale_ref.at[cols], mask=w_cols < n, other=0.0)
      y = y * (jnp.float32(offset) + w.astype(jnp.float32))[None, :]
    plgpu.store(y_ref.at[:, cols], y.astype(y_ref.dtype), mask=mask)

  if num_chunks == 1:
    write(0, x)
  else:
    @pl.loop(0, num_chunks)
    def _(k):
      write(k, load_x(k))


def _check_supported(m: int, n: int, interpret: bool) -> None:
  if n > triton_config.MAX_COLS:
    raise NotImplementedError(
        f"rows of {n} elements exceed the kernel's limit of "
        f"{triton_config.MAX_COLS}")
  if m * n > triton_config.MAX_ELEMENTS:
    raise NotImplementedError(
        f"{m * n} elements exceed the kernel's int32 indexing "
        f"({triton_config.MAX_ELEMENTS})")
  if not interpret and not platform.on_cuda_gpu():
    raise NotImplementedError(
        "the 'triton' implementation needs an NVIDIA GPU (default backend is "
        f"{jax.default_backend()!r}); pass interpret=True to run it in Pallas "
        "interpret mode, or use implementation='xla'")


def rms_norm_triton(x: jax.Array, scale: jax.Array | None, *, epsilon: float,
                    scale_offset: float, interpret: bool = False,
                    config: triton_config.Config | None = None) -> jax.Array:
  """RMSNorm of validated, non-empty `x` over its last axis in one kernel.

  Raises NotImplementedError where the kernel cannot run (no CUDA GPU and no
  interpret mode, rows or arrays past the kernel's limits).
  """
  n = x.shape[-1]
  m = x.size // n
  if scale is not None and scale.shape != (n,):  # Guards the kernel even
    raise ValueError(f"{scale.shape=} must be ({n},)")  # with chex disabled.
  _check_supported(m, n, interpret)
  if config is None:
    config = triton_config.get_config(m, n, x.dtype, platform.device_kind())
  num_chunks = config.num_chunks(n)
  logger.debug("rms_norm triton forward: rows=%d n=%d dtype=%s %s", m, n,
               x.dtype, config)
  block = (config.block_rows, config.block_cols * num_chunks)
  in_specs = [pl.BlockSpec(block, lambda i: (i, 0))]
  args = [x.reshape(m, n)]
  if scale is not None:
    in_specs.append(pl.BlockSpec(block[1:], lambda i: (0,)))
    args.append(scale)
  kernel = functools.partial(
      _forward_kernel, n=n, m=m, eps=epsilon, offset=scale_offset,
      has_scale=scale is not None, num_chunks=num_chunks)
  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(m, config.block_rows),),
      in_specs=in_specs,
      out_specs=pl.BlockSpec(block, lambda i: (i, 0)),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=KERNEL_NAME,
  )
  return call(*args).reshape(x.shape)
