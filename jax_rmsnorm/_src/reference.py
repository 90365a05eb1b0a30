"""Pure-jnp RMSNorm: the specification and the "xla" implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
) -> jax.Array:
  """Reference RMSNorm over the last axis, float32 inside, ``x.dtype`` out.

  Equivalent to::

    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
    if scale is not None:
      y = y * (scale_offset + scale.astype(jnp.float32))
    return y.astype(x.dtype)

  This function does no validation; the public entry points validate first.
  """
  xf = x.astype(jnp.float32)
  mean_sq = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(mean_sq + jnp.float32(epsilon))
  if scale is not None:
    y = y * (jnp.float32(scale_offset) + scale.astype(jnp.float32))
  return y.astype(x.dtype)
