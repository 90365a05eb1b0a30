"""RMSNorm with a quantized output (float8_e4m3fn, float8_e5m2, int8): the
specification (`reference`, pure jnp, also the "xla" implementation), the
argument checks, and the per-element helpers the kernels share with it.

Semantics, everything in float32:

  y = the RMSNorm forward as `reference.forward` computes it before its final
      cast (rows of x, or of h = x + residual rounded to residual's dtype;
      either cast order).
  s = quant_scale                                   (static: a scalar or (N,))
    | max(amax(y_row), qmax * tiny) / qmax          (dynamic: per row, (..., 1))
  y_q = saturate(y * (1 / s)) in quant_dtype, so that y ~= y_q * s.

- Both cases multiply by the reciprocal of the scale: a product is rounded
  the same way everywhere, and the reciprocal is one division per row (or per
  tensor / channel, computed by XLA outside any kernel for a static scale).
- amax(y_row) = max |y| over the row, a NaN counting as +inf. The floor
  `qmax * tiny` (tiny = finfo(float32).tiny) keeps s >= tiny, a normal
  float32 whose reciprocal is finite: a row of zeros gets s = tiny and y_q = 0.
- saturate: clip to [-qmax, qmax] (448, 57344, 127), so a finite input never
  gives NaN or Inf; a NaN stays NaN (in fp8). int8 rounds half to even after
  the clip; int8 has no NaN, so a NaN element becomes 0.
- Containment: a NaN or Inf in x makes that row's y NaN (all of it for NaN;
  at the Inf's positions for Inf, the rest 0), so with a dynamic scale that
  row's s is +inf and its dequantized values are NaN; other rows are untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_rmsnorm._src import reference as norm_reference

QUANT_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2),
                jnp.dtype(jnp.int8))
_QMAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0,
         jnp.dtype(jnp.float8_e5m2): 57344.0,
         jnp.dtype(jnp.int8): 127.0}
# The smallest scale: a normal float32, so that 1 / scale is finite.
MIN_SCALE = float(np.finfo(np.float32).tiny)


class QuantizedOutputs(NamedTuple):
  """What a quantized forward computes, by any implementation."""
  y_q: jax.Array                # x.shape, quant_dtype
  row_scales: jax.Array | None  # x.shape[:-1] + (1,), float32 (dynamic only)
  h: jax.Array | None           # x + residual, with a residual


def qmax(quant_dtype) -> float:
  """The largest magnitude `quant_dtype` holds after saturation."""
  return _QMAX[jnp.dtype(quant_dtype)]


# --- argument checks ---------------------------------------------------------

def canonicalize_quant_dtype(quant_dtype) -> jnp.dtype:
  """`quant_dtype` as a numpy dtype, one of QUANT_DTYPES, or TypeError."""
  try:
    dtype = jnp.dtype(quant_dtype)
  except TypeError as e:
    raise TypeError(f"quant_dtype must be a dtype, got {quant_dtype=}") from e
  if dtype not in QUANT_DTYPES:
    raise TypeError(
        f"quant_dtype={dtype} is not supported; use one of "
        f"{', '.join(str(d) for d in QUANT_DTYPES)}")
  return dtype


def check_quant_scale(quant_scale, n: int) -> jax.Array | None:
  """A static scale as a float32 array of shape () or (n,) (a (1,) scale
  becomes ()); None (dynamic per-row scales) passes through.

  Raises TypeError for a non-array or non-float value, ValueError for another
  shape, and, when the value is concrete, for a scale that is not finite or
  below MIN_SCALE (zero, negative, or so small that its reciprocal
  overflows). A traced scale (under jit) cannot be checked: there a zero gives
  +-qmax (or NaN where y is 0), a negative one flips the signs, and a NaN
  gives NaN everywhere. A concrete jax.Array is read back to the host for the
  check.
  """
  if quant_scale is None:
    return None
  if isinstance(quant_scale, (bool, np.bool_)):
    raise TypeError(f"quant_scale must be a float or a float array, got "
                    f"{quant_scale!r}")
  if isinstance(quant_scale, (int, float, np.floating, np.integer)):
    quant_scale = np.asarray(quant_scale, np.float32)
  if not isinstance(quant_scale, (jax.Array, np.ndarray)):
    raise TypeError(f"quant_scale must be None, a Python float or a float "
                    f"array, got {type(quant_scale).__name__} "
                    f"({quant_scale!r:.80})")
  if not jnp.issubdtype(quant_scale.dtype, jnp.floating):
    raise TypeError(f"quant_scale must be a floating-point array, got "
                    f"{quant_scale.dtype=}")
  if quant_scale.shape not in ((), (1,), (n,)):
    raise ValueError(
        f"quant_scale must be a scalar (shape () or (1,)) or per channel "
        f"(shape ({n},), the last axis of x), got {quant_scale.shape=}")
  if not isinstance(quant_scale, jax.core.Tracer):
    value = np.asarray(quant_scale).astype(np.float32)
    bad = ~np.isfinite(value) | (value < MIN_SCALE)
    if np.any(bad):
      raise ValueError(
          f"quant_scale must be finite and >= {MIN_SCALE:.3g} (the smallest "
          f"normal float32; 1 / quant_scale must be finite), got "
          f"{value[bad].ravel()[:4]} among quant_scale={value.ravel()[:8]}")
  quant_scale = jnp.asarray(quant_scale, jnp.float32)
  return quant_scale.reshape(()) if quant_scale.shape == (1,) else quant_scale


def check_args(x, quant_dtype, quant_scale
               ) -> tuple[jnp.dtype, jax.Array | None]:
  """Validates the quantization arguments of a call whose `x` (an array of
  shape (..., N)) was already checked by `validation.check_args`; returns
  (quant_dtype, quant_scale) canonicalized (see `check_quant_scale`)."""
  return (canonicalize_quant_dtype(quant_dtype),
          check_quant_scale(quant_scale, x.shape[-1]))


# --- per-element helpers, shared by the reference and the kernels ------------
# They lower through Pallas's Triton backend: no lax.round (it has no Triton
# lowering), no min/max on values that may be NaN (Triton's maxnumf drops
# NaN, XLA's max keeps it).

def abs_nan_as_inf(y: jax.Array) -> jax.Array:
  """|y| with NaN mapped to +inf: what amax reduces (with the same result
  whether the max drops NaN, as Triton's does, or keeps it, as XLA's)."""
  return jnp.where(y == y, jnp.abs(y), jnp.float32(jnp.inf))


def amax_from_scaled(max_scaled: jax.Array, rstd: jax.Array) -> jax.Array:
  """A row's amax from its rstd and max_scaled = max |x * w| over the row
  (`abs_nan_as_inf` of x times w = offset + scale, or of x without a
  scale), which a kernel reduces beside the sum of squares instead of
  reducing |y| after it: rstd >= 0, so max |x * rstd * w| = rstd *
  max |x * w| but for roundings (a few ulps, within the scales'
  tolerance). The default cast order only: "hf" rounds x * rstd before the
  scale. An Inf or NaN in the row makes the product 0 * inf or NaN: +inf,
  as the reference's amax. Needs |x * w| finite where y is (|w| < 1e19)."""
  return abs_nan_as_inf(max_scaled * rstd)


def dynamic_scale(amax: jax.Array, quant_dtype) -> jax.Array:
  """Per-row scale from the row's float32 amax (never NaN; >= MIN_SCALE)."""
  top = qmax(quant_dtype)
  return jnp.maximum(amax, jnp.float32(top * MIN_SCALE)) / jnp.float32(top)


def round_half_even(v: jax.Array) -> jax.Array:
  """jnp.round(v) (half to even) for float32 |v| < 2**23, from floor:
  v - floor(v) is exact, so no double rounding. NaN stays NaN."""
  f = jnp.floor(v)
  d = v - f
  odd = (f - jnp.float32(2) * jnp.floor(f * jnp.float32(0.5))) == 1
  up = (d > jnp.float32(0.5)) | ((d == jnp.float32(0.5)) & odd)
  return jnp.where(up, f + jnp.float32(1), f)


def saturate_cast(v: jax.Array, quant_dtype, *, clip: bool = True
                  ) -> jax.Array:
  """float32 `v` clipped to +-qmax and cast to `quant_dtype`: fp8 rounds to
  nearest even, NaN stays NaN; int8 rounds half to even, NaN becomes 0.

  clip=False leaves the clip to the cast itself: for fp8 in a kernel on a
  GPU whose conversion saturates (Hopper's cvt.rn.satfinite, which Triton
  emits), where the two compares and selects an element cost time (bf16
  4096 x 14336 on an H200, launch unchanged: 64.3 us with them, 59.3
  without). Never for int8, nor for XLA's convert, which turns an fp8
  overflow into NaN.

  Equivalent to `jnp.clip(v, -qmax, qmax).astype(quant_dtype)` for fp8 and
  `jnp.where(jnp.isnan(v), 0, jnp.round(jnp.clip(v, -127, 127)))
  .astype(jnp.int8)`; written with comparisons and selects so that NaN
  survives the clip in Triton too.
  """
  return saturate(v, quant_dtype, clip=clip).astype(quant_dtype)


def saturate(v: jax.Array, quant_dtype, *, clip: bool = True,
             round_even=round_half_even) -> jax.Array:
  """`saturate_cast` before its final cast, still float32 (a kernel that
  casts on its store). round_even: int8's rounding of float32 to the
  nearest integer, ties to even (`round_half_even` is built on floor for
  Triton; `jnp.round` where the lowering has it, as Mosaic GPU's does and
  its floor does not)."""
  dtype = jnp.dtype(quant_dtype)
  hi, lo = jnp.float32(qmax(dtype)), jnp.float32(-qmax(dtype))
  if clip or dtype == jnp.int8:
    v = jnp.where(v > hi, hi, jnp.where(v < lo, lo, v))
  if dtype == jnp.int8:
    v = round_even(v)
    v = jnp.where(v == v, v, jnp.float32(0))
  return v


# --- the specification -------------------------------------------------------

def reference(x, residual, scale, quant_scale=None, *, epsilon, scale_offset,
              quant_dtype, cast_order="float32", hidden_axes=(),
              interpret=False) -> QuantizedOutputs:
  """RMSNorm of rows of x (or of h = x + residual) quantized to quant_dtype.

  Equivalent to this jnp code (y in float32, before the forward's final
  cast; `saturate_cast` clips to +-qmax and casts, int8 rounding half to
  even)::

    y, h, _ = reference.forward(x, residual, scale, epsilon=epsilon,
                                scale_offset=scale_offset,
                                out_dtype=jnp.float32, cast_order=cast_order)
    if quant_scale is None:                      # dynamic, per row
      amax = jnp.max(abs_nan_as_inf(y), axis=-1, keepdims=True)
      s = jnp.maximum(amax, qmax * tiny) / qmax  # (..., 1) float32
    else:                                        # static, () or (N,)
      s = quant_scale.astype(jnp.float32)
    y_q = saturate_cast(y * (1 / s), quant_dtype)
    return y_q, (s if quant_scale is None else None), h

  Arguments are validated (`validation.check_args`, then `check_args`).
  With `hidden_axes` the rows are sharded over those mesh axes: the sum of
  squares is psum'ed (as in `reference.forward`) and amax pmax'ed, so every
  shard gets the whole row's scale. `interpret` is accepted for the kernels'
  signature and ignored.
  """
  del interpret
  quant_dtype = jnp.dtype(quant_dtype)
  out = norm_reference.forward(x, residual, scale, epsilon=epsilon,
                               scale_offset=scale_offset,
                               out_dtype=jnp.float32, cast_order=cast_order,
                               hidden_axes=hidden_axes)
  y = out.y
  if quant_scale is None:
    amax = jnp.max(abs_nan_as_inf(y), axis=-1, keepdims=True)
    if hidden_axes:
      amax = jax.lax.pmax(amax, hidden_axes)
    row_scales = dynamic_scale(amax, quant_dtype)
    inv = jnp.float32(1) / row_scales
  else:
    row_scales = None
    inv = jnp.float32(1) / jnp.asarray(quant_scale, jnp.float32)
  return QuantizedOutputs(saturate_cast(y * inv, quant_dtype), row_scales,
                          out.h)
