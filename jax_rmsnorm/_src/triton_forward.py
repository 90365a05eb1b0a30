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
                    has_scale: bool, num_chunks: int, resident: bool):
  """Normalizes `block_rows` rows of `n` columns, `num_chunks` chunks each.

  resident (or one chunk): every chunk is loaded once and kept in registers,
  one pass over HBM; the chunks let a row of 14336 be 7 x 2048 instead of a
  padded 16384. Otherwise: a loop sums squares, a second loop normalizes
  (rows too long for registers; x is read twice).
  """
  if has_scale:
    x_ref, scale_ref, y_ref = refs
  else:
    (x_ref, y_ref), scale_ref = refs, None
  block_rows = x_ref.shape[0]
  block_cols = x_ref.shape[1] // num_chunks
  shape = (block_rows, block_cols)
  rows = (pl.program_id(0) * block_rows
          + jax.lax.broadcasted_iota(jnp.int32, shape, 0))

  def masks(k):
    """Element and scale masks of chunk `k`; None where nothing is out of
    bounds (known statically for a Python int `k`), so loads stay unmasked."""
    static = isinstance(k, int)
    need_cols = not static or (k + 1) * block_cols > n
    need_rows = m % block_rows != 0
    cols = k * block_cols + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    scale_cols = k * block_cols + jax.lax.iota(jnp.int32, block_cols)
    mask = None
    if need_rows:
      mask = rows < m
    if need_cols:
      mask = cols < n if mask is None else mask & (cols < n)
    return mask, (scale_cols < n) if need_cols else None

  def load(ref, k, mask):
    at = ref.at[:, pl.ds(k * block_cols, block_cols)] if ref.ndim == 2 else (
        ref.at[pl.ds(k * block_cols, block_cols)])
    if mask is None:
      return plgpu.load(at).astype(jnp.float32)
    return plgpu.load(at, mask=mask, other=0.0).astype(jnp.float32)

  def write(k, x):
    mask, scale_mask = masks(k)
    y = x * rstd
    if scale_ref is not None:
      w = load(scale_ref, k, scale_mask)
      y = y * (jnp.float32(offset) + w)[None, :]
    y = y.astype(y_ref.dtype)
    at = y_ref.at[:, pl.ds(k * block_cols, block_cols)]
    if mask is None:
      plgpu.store(at, y)
    else:
      plgpu.store(at, y, mask=mask)

  if num_chunks == 1 or resident:
    xs = [load(x_ref, k, masks(k)[0]) for k in range(num_chunks)]
    sq = xs[0] * xs[0]
    for x in xs[1:]:
      sq = sq + x * x
  else:
    def sum_squares(k, acc):
      x = load(x_ref, k, masks(k)[0])
      return acc + x * x
    sq = jax.lax.fori_loop(0, num_chunks, sum_squares,
                           jnp.zeros(shape, jnp.float32))
  mean_sq = jnp.sum(sq, axis=1, keepdims=True) / jnp.float32(n)
  rstd = jax.lax.rsqrt(mean_sq + jnp.float32(eps))

  if num_chunks == 1 or resident:
    for k, x in enumerate(xs):
      write(k, x)
  else:
    @pl.loop(0, num_chunks)
    def _(k):
      write(k, load(x_ref, k, masks(k)[0]))


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
      has_scale=scale is not None, num_chunks=num_chunks,
      resident=config.resident(n))
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
