"""Public entry points: validate, then dispatch to an implementation."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import reference
from jax_rmsnorm._src import triton_forward
from jax_rmsnorm._src import validation

logger = logging.getLogger("jax_rmsnorm")

Implementation = str | Sequence[str] | None


def _run(name: str, x, scale, *, epsilon, scale_offset, interpret):
  if name == "xla":
    return reference.rms_norm_reference(
        x, scale, epsilon=epsilon, scale_offset=scale_offset)
  return triton_forward.rms_norm_triton(
      x, scale, epsilon=epsilon, scale_offset=scale_offset,
      interpret=interpret)


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
    implementation: Implementation = None,
    interpret: bool = False,
) -> jax.Array:
  """Root-mean-square normalization over the last axis of `x`.

  Computes, in float32 with one rounding at the end::

    y = x * rsqrt(mean(x**2, axis=-1) + epsilon) * (scale_offset + scale)

  Equivalent to `rms_norm_reference`, that is to this jnp code::

    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
    y = y * (scale_offset + scale.astype(jnp.float32))   # if scale is given
    y = y.astype(x.dtype)

  Args:
    x: array of shape `(..., N)`, any number of leading axes (none included),
      dtype float16, bfloat16 or float32. Zero rows give an empty result.
    scale: `(N,)` array of float16, bfloat16 or float32 (it may differ from
      x's dtype), or None for no scaling.
    epsilon: added to the mean square; a static Python number, finite, > 0.
    scale_offset: added to `scale` in float32; 1.0 gives Gemma's `(1 + scale)`.
    implementation: None picks the Pallas kernel on an NVIDIA GPU and the
      reference elsewhere, falling back to the reference where the kernel
      cannot run. `"triton"` (the Pallas kernel, Triton backend) or `"xla"`
      (the reference) run that one and fail loudly otherwise; a sequence is
      tried in order.
    interpret: run the Pallas kernel in Pallas interpret mode (any backend,
      CPU included). Slow; for testing.

  Returns:
    An array of `x.shape` and `x.dtype`.

  Raises:
    TypeError, ValueError: invalid arguments, before anything is compiled.
    NotImplementedError: the implementation(s) asked for cannot run here.
  """
  x, scale, epsilon, scale_offset = validation.check_rms_norm_args(
      x, scale, epsilon, scale_offset)
  names, fallback = validation.canonicalize_implementation(
      implementation, interpret)
  if x.size == 0:
    return jnp.zeros(x.shape, x.dtype)
  for i, name in enumerate(names):
    try:
      return _run(name, x, scale, epsilon=epsilon, scale_offset=scale_offset,
                  interpret=interpret)
    except NotImplementedError as e:
      if not fallback or i == len(names) - 1:
        raise
      logger.debug("rms_norm: %r cannot run (%s); trying %r", name, e,
                   names[i + 1])
  raise AssertionError("unreachable")


def rms_norm_reference(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
) -> jax.Array:
  """The specification of `rms_norm` in plain jnp (its "xla" implementation).

  Same arguments, validation and result as `rms_norm(..., implementation=
  "xla")`.
  """
  return rms_norm(x, scale, epsilon=epsilon, scale_offset=scale_offset,
                  implementation="xla")
