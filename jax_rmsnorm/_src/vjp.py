"""custom_vjp wiring of the Pallas kernels.

The primal function is the plain forward kernel: under jit without a gradient
nothing else runs. Under differentiation the forward also writes a float32
rstd per row, and the backward kernel computes dx and d(scale) from x (h, for
add_rms_norm), dy and rstd.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import reference
from jax_rmsnorm._src import triton_backward
from jax_rmsnorm._src import triton_forward

logger = logging.getLogger("jax_rmsnorm")


@dataclasses.dataclass(frozen=True)
class Options:
  """Static arguments of one call (hashable: a nondiff argument)."""
  epsilon: float
  scale_offset: float
  out_dtype: jnp.dtype | None
  cast_order: str
  interpret: bool
  x_dtype: jnp.dtype  # dx is returned in x's dtype (h's is residual's).
  # Whether the backward may fall back to the reference's gradient where the
  # kernel cannot run (implementation None or a sequence), or must raise.
  fallback: bool = True


def _forward(x, residual, scale, opts: Options, save_rstd: bool):
  return triton_forward.forward(
      x, residual, scale, epsilon=opts.epsilon,
      scale_offset=opts.scale_offset, out_dtype=opts.out_dtype,
      cast_order=opts.cast_order, save_rstd=save_rstd,
      interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def rms_norm_triton(x, residual, scale, opts: Options):
  """(y, h): the forward kernel; h is None without a residual."""
  out = _forward(x, residual, scale, opts, save_rstd=False)
  return out.y, out.h


def _fwd(x, residual, scale, opts):
  out = _forward(x, residual, scale, opts, save_rstd=True)
  normalized = x if residual is None else out.h
  return (out.y, out.h), (normalized, scale, out.rstd)


def _reference_backward(normalized, dy, dh, scale, opts):
  """The reference's autodiff: the backward for rows the kernel can't hold."""
  def f(h, s):
    return reference.rms_norm_reference(
        h, s, epsilon=opts.epsilon, scale_offset=opts.scale_offset,
        out_dtype=opts.out_dtype, cast_order=opts.cast_order)
  _, vjp = jax.vjp(f, normalized, scale)
  dx, dscale = vjp(dy)
  if dh is not None:
    dx = (dx.astype(jnp.float32) + dh.astype(jnp.float32)).astype(dx.dtype)
  return dx, dscale


def _bwd(opts, saved, cotangents):
  normalized, scale, rstd = saved
  dy, dh = cotangents
  try:
    dx, dscale = triton_backward.backward(
        normalized, dy, dh, scale, rstd, scale_offset=opts.scale_offset,
        cast_order=opts.cast_order, interpret=opts.interpret)
  except NotImplementedError as e:
    if not opts.fallback:
      raise
    logger.debug("rms_norm backward: kernel cannot run (%s); using the "
                 "reference's gradient", e)
    dx, dscale = _reference_backward(normalized, dy, dh, scale, opts)
  if dh is None:
    return dx.astype(opts.x_dtype), None, dscale
  return dx.astype(opts.x_dtype), dx, dscale


rms_norm_triton.defvjp(_fwd, _bwd)
