"""Pure-jnp RMSNorm: the specification and the "xla" implementation.

`rms_norm_reference` and `add_rms_norm_reference` are the specification;
the "xla" implementation named alone is that code under JAX's own autodiff.
`forward` and `backward` are the same arithmetic in the kernels' form (the
forward saves a float32 rstd per row; the backward computes dx and a float32
d(scale) from it): the CPU side of the automatic choice, and the
computation on a row sharded across devices (`hidden_axes`: one psum of a
float32 vector of rows).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ForwardOutputs(NamedTuple):
  """What a forward computes, by any implementation."""
  y: jax.Array
  h: jax.Array | None     # x + residual, with a residual
  rstd: jax.Array | None  # (rows,) float32, when asked for


def round_to(value: jax.Array, dtype) -> jax.Array:
  """float32 `value` rounded to `dtype`'s precision, kept as float32.

  `value.astype(dtype).astype(float32)` says the same, but XLA may drop such
  a convert pair (xla_allow_excess_precision, on by default); it keeps
  reduce_precision. One difference: float16 subnormals (|value| < 6.1e-5)
  flush to zero here. bfloat16 shares float32's exponent range: exact.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return value
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(value, exponent_bits=info.nexp,
                                  mantissa_bits=info.nmant)


def residual_add(x: jax.Array, residual: jax.Array) -> jax.Array:
  """`x + residual` in float32, rounded once to `residual.dtype`.

  This is what XLA computes for `(x + residual).astype(residual.dtype)` on
  float16/bfloat16/float32 operands (sub-float32 adds run in float32).
  """
  return (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(
      residual.dtype)


def _row_sum(value: jax.Array, hidden_axes: tuple[str, ...]) -> jax.Array:
  """Sum over the last axis, across devices too when the row is sharded."""
  total = jnp.sum(value, axis=-1, keepdims=True)
  return jax.lax.psum(total, hidden_axes) if hidden_axes else total


def _row_length(n: int, hidden_axes: tuple[str, ...]) -> int:
  return n * jax.lax.psum(1, hidden_axes) if hidden_axes else n


def forward(x, residual, scale, *, epsilon, scale_offset, out_dtype=None,
            cast_order="float32", save_rstd=False, hidden_axes=(),
            interpret=False) -> ForwardOutputs:
  """The forward kernels' contract in jnp (rows of x, or of h = x +
  residual). With `hidden_axes` the rows are sharded over those mesh axes:
  each device sums its part of each row's squares and one psum of a
  float32 (rows, 1) vector completes them. `interpret` is accepted for the
  kernels' signature and ignored."""
  del interpret
  if residual is None:
    h, norm_dtype = None, x.dtype
    xf = x.astype(jnp.float32)
  else:
    total = x.astype(jnp.float32) + residual.astype(jnp.float32)
    h, norm_dtype = total.astype(residual.dtype), residual.dtype
    xf = round_to(total, residual.dtype)
  n = _row_length(x.shape[-1], hidden_axes)
  rstd = jax.lax.rsqrt(_row_sum(xf * xf, hidden_axes) / jnp.float32(n)
                       + jnp.float32(epsilon))
  y = xf * rstd
  if cast_order == "hf":
    y = round_to(y, norm_dtype)
  if scale is not None:
    y = y * (jnp.float32(scale_offset) + scale.astype(jnp.float32))
  return ForwardOutputs(y.astype(out_dtype or norm_dtype), h,
                        rstd[..., 0] if save_rstd else None)


def backward(x, dy, dh, scale, rstd, *, scale_offset, cast_order="float32",
             hidden_axes=(), interpret=False):
  """The backward kernels' contract in jnp: (dx in x's dtype, float32
  d(scale) summed over the local rows, or None).

  x is the normalized input (h), rstd its float32 statistics. With
  xhat = x * rstd and g = dy * (offset + scale):
    dx = rstd * (g - xhat * mean(g * xhat)) [+ dh]
    d(scale) = sum over rows of dy * xhat   (xhat rounded to x's dtype under
                                             the Hugging Face cast order)
  The mean is over the whole row: one psum over `hidden_axes`.
  """
  del interpret
  rstd = rstd.astype(jnp.float32)[..., None]
  xhat = x.astype(jnp.float32) * rstd
  dyf = dy.astype(jnp.float32)
  g = dyf if scale is None else dyf * (jnp.float32(scale_offset)
                                       + scale.astype(jnp.float32))
  n = _row_length(x.shape[-1], hidden_axes)
  mean_gx = _row_sum(g * xhat, hidden_axes) / jnp.float32(n)
  dx = rstd * (g - xhat * mean_gx)
  if dh is not None:
    dx = dx + dh.astype(jnp.float32)
  dscale = None
  if scale is not None:
    if cast_order == "hf":
      xhat = round_to(xhat, x.dtype)
    dscale = jnp.sum((dyf * xhat).reshape(-1, x.shape[-1]), axis=0)
  return dx.astype(x.dtype), dscale
