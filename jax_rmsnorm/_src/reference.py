"""Pure-jnp RMSNorm: the specification and the "xla" implementation.

Gradients of the "xla" implementation are JAX's own autodiff of this code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def rms_norm_reference(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
    out_dtype=None,
    cast_order: str = "float32",
) -> jax.Array:
  """Reference RMSNorm over the last axis, float32 inside.

  cast_order "float32" normalizes and scales in float32 and rounds once at
  the end (flax, Gemma, tokamax); "hf" is Hugging Face LlamaRMSNorm's order:
  normalize in float32, round to the input dtype, then multiply by the scale.
  Equivalent to::

    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
    if cast_order == "hf":
      y = round_to(y, x.dtype)   # y.astype(x.dtype).astype(jnp.float32)
    if scale is not None:
      y = y * (scale_offset + scale.astype(jnp.float32))
    return y.astype(out_dtype or x.dtype)

  This function does no validation; the public entry points validate first.
  """
  return _normalize(x.astype(jnp.float32), x.dtype, scale, epsilon=epsilon,
                    scale_offset=scale_offset, out_dtype=out_dtype,
                    cast_order=cast_order)


def _normalize(xf, dtype, scale, *, epsilon, scale_offset, out_dtype,
               cast_order):
  """rms_norm_reference of float32 `xf` holding values of `dtype`."""
  mean_sq = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(mean_sq + jnp.float32(epsilon))
  if cast_order == "hf":
    y = round_to(y, dtype)
  if scale is not None:
    y = y * (jnp.float32(scale_offset) + scale.astype(jnp.float32))
  return y.astype(out_dtype or dtype)


def add_rms_norm_reference(x, residual, scale=None, *, epsilon=1e-6,
                           scale_offset=0.0, out_dtype=None,
                           cast_order="float32"):
  """`(rms_norm_reference(h, scale, ...), h)` with `h = residual_add(x,
  residual)`: the normalization sees the rounded h, as unfused code means
  (`round_to` keeps XLA from normalizing the unrounded float32 sum)."""
  total = x.astype(jnp.float32) + residual.astype(jnp.float32)
  y = _normalize(round_to(total, residual.dtype), residual.dtype, scale,
                 epsilon=epsilon, scale_offset=scale_offset,
                 out_dtype=out_dtype, cast_order=cast_order)
  return y, total.astype(residual.dtype)
