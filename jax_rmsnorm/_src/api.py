"""Public entry points: validate, then hand to dispatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jax_rmsnorm._src import dispatch
from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import validation

ImplementationName = Literal["mosaic", "triton", "xla"]
Implementation = ImplementationName | Sequence[ImplementationName] | None
CastOrder = Literal["float32", "hf"]


def _run(x, residual, scale, *, epsilon, scale_offset, out_dtype, cast_order,
         implementation, interpret):
  x, residual, scale, opts = validation.check_args(
      x, residual, scale, epsilon, scale_offset, out_dtype, cast_order)
  names = validation.canonicalize_implementation(
      implementation, interpret)
  if x.size == 0:
    out = reference.forward(x, residual, scale, **opts.forward_kwargs())
    return out.y, out.h
  return dispatch.run(x, residual, scale, opts, names=names,
                      interpret=bool(interpret))


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
    out_dtype: DTypeLike | None = None,
    cast_order: CastOrder = "float32",
    implementation: Implementation = None,
    interpret: bool = False,
) -> jax.Array:
  """Root-mean-square normalization over the last axis of `x`.

  Computes, in float32 with one rounding at the end::

    y = x * rsqrt(mean(x**2, axis=-1) + epsilon) * (scale_offset + scale)

  Equivalent to `rms_norm_reference`, that is to this jnp code::

    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
    if cast_order == "hf":
      y = y.astype(x.dtype).astype(jnp.float32)
    if scale is not None:
      y = y * (scale_offset + scale.astype(jnp.float32))
    y = y.astype(out_dtype or x.dtype)

  Args:
    x: array of shape `(..., N)`, any number of leading axes (none included),
      dtype float16, bfloat16 or float32. Zero rows give an empty result.
      Sharded arrays work under `jax.jit` (any mesh, Auto or Explicit axes,
      the hidden axis included) and inside `shard_map`.
    scale: `(N,)` array of float16, bfloat16 or float32 (it may differ from
      x's dtype, e.g. bfloat16 x with a float32 parameter; a float64 one, x64
      mode's default, is cast to float32), or None.
    epsilon: added to the mean square; a static Python number, finite, > 0.
    scale_offset: added to `scale` in float32; 1.0 gives Gemma's `(1 + scale)`.
    out_dtype: dtype of y; None (the default) keeps x's.
    cast_order: "float32" (default): normalize and scale in float32, round
      once. "hf": Hugging Face LlamaRMSNorm's order, bit for bit: normalize in
      float32, round to the input dtype, multiply by the scale, round again.
    implementation: None (default) decides at lowering time: on CUDA the
      fastest of the kernels and XLA for this GPU, dtype and shape (a table
      the benchmarks measured), falling back to XLA with one WARNING where a
      kernel cannot run; on any other platform the reference. `"triton"`,
      `"mosaic"` (Pallas kernels, Triton or Mosaic GPU backend) or `"xla"`
      (the reference) run that one and fail loudly otherwise; a sequence is
      tried in order, the forward and the backward each taking the first
      that can run.
    interpret: run the Pallas kernels in Pallas interpret mode (any backend,
      CPU included). Slow; for testing.

  Returns:
    y, an array of `x.shape` and dtype `out_dtype or x.dtype`.

  Gradients: differentiable in every array argument (jit, vmap, remat,
  second order). With a kernel, the forward saves a float32 rstd per row
  and one backward kernel computes dx and d(scale); second derivatives use
  the reference's arithmetic. The "xla" implementation is differentiated by
  JAX's autodiff.

  Raises:
    TypeError, ValueError: invalid arguments, before anything is compiled.
    NotImplementedError: the implementation(s) asked for cannot run here.
  """
  return _run(x, None, scale, epsilon=epsilon, scale_offset=scale_offset,
              out_dtype=out_dtype, cast_order=cast_order,
              implementation=implementation, interpret=interpret)[0]


def add_rms_norm(
    x: jax.Array,
    residual: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
    out_dtype: DTypeLike | None = None,
    cast_order: CastOrder = "float32",
    implementation: Implementation = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Residual add fused with RMSNorm: returns `(y, h)`.

  One kernel reads x and residual once and writes y and h. Equivalent to::

    h = (x.astype(jnp.float32) + residual.astype(jnp.float32)
         ).astype(residual.dtype)      # the new residual stream
    y = rms_norm(h, scale, ...)        # normalizes the rounded h

  which is what the unfused `h = x + residual; y = rms_norm(h, scale)` computes
  when x and residual share a dtype.

  Args:
    x, scale, epsilon, scale_offset, cast_order, implementation, interpret:
      as for `rms_norm`.
    residual: the residual stream, x's shape, float16/bfloat16/float32; h has
      its dtype.
    out_dtype: dtype of y; None (the default) keeps residual's.

  Returns:
    (y, h): y of dtype `out_dtype or residual.dtype`, h of residual's dtype,
    both of `x.shape`.

  Gradients: d(residual) = d(x) = dh plus the gradient through y, in
  residual's and x's dtypes; an unused y or h costs the backward nothing.
  """
  if residual is None:
    raise TypeError("residual must be a jax.Array or numpy.ndarray, got None;"
                    " use rms_norm to normalize without a residual")
  return _run(x, residual, scale, epsilon=epsilon, scale_offset=scale_offset,
              out_dtype=out_dtype, cast_order=cast_order,
              implementation=implementation, interpret=interpret)


def rms_norm_reference(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
    out_dtype: DTypeLike | None = None,
    cast_order: CastOrder = "float32",
) -> jax.Array:
  """The specification of `rms_norm` in plain jnp (its "xla" implementation).

  Same arguments, validation and result as `rms_norm(..., implementation=
  "xla")`, differentiated by JAX's autodiff.
  """
  return rms_norm(x, scale, epsilon=epsilon, scale_offset=scale_offset,
                  out_dtype=out_dtype, cast_order=cast_order,
                  implementation="xla")


def rms_norm_quantized(
    x: jax.Array,
    scale: jax.Array | None = None,
    *,
    epsilon: float = 1e-6,
    scale_offset: float = 0.0,
    quant_dtype: DTypeLike = jnp.float8_e4m3fn,
    quant_scale: jax.Array | float | None = None,
    residual: jax.Array | None = None,
    cast_order: CastOrder = "float32",
    implementation: Implementation = None,
    interpret: bool = False,
):
  """RMSNorm straight to float8 or int8, for an fp8/int8 matmul: one kernel
  reads x (and the residual) once and writes the quantized y.

  With y = rms_norm(x, scale, ...) in float32 (before any rounding) and
  qmax = 448 (float8_e4m3fn), 57344 (float8_e5m2) or 127 (int8):

  - static, `quant_scale` given (a scalar or a per-channel `(N,)` array,
    finite, > 0): `y_q = saturate(y / quant_scale)`; returns y_q.
  - dynamic per token, `quant_scale=None`: `row_scales = max(|y_row|) /
    qmax` in float32, shape `(..., 1)` (a zero row gets the smallest normal
    float32, and y_q = 0); `y_q = saturate(y / row_scales)`, so that
    `y ~= y_q * row_scales`; returns (y_q, row_scales).

  saturate clips to [-qmax, qmax] before the cast (a finite input never
  gives NaN or Inf; NaN and Inf stay in their row); int8 is symmetric and
  rounds half to even. The division is a multiplication by the float32
  reciprocal. With `residual`, h = x + residual (rounded to residual's
  dtype) is normalized and returned last, as in `add_rms_norm`. Equivalent
  to `jax_rmsnorm._src.quantize.reference`.

  y_q feeds `jax.lax.dot_general` with fp8 operands and
  `preferred_element_type=jnp.float32` directly; multiply the result by
  row_scales (and the weight's scale): see examples/fp8_matmul.py.

  Args:
    x, scale, epsilon, scale_offset, cast_order, implementation, interpret:
      as for `rms_norm` (the implementations: "triton", "mosaic" (Hopper;
      N a multiple of 16) and "xla"; the automatic choice runs Mosaic's
      only where Triton's cannot run, as with a JAX without it).
    quant_dtype: float8_e4m3fn (default), float8_e5m2 or int8.
    quant_scale: None (dynamic), or the static scale. A concrete value is
      checked for > 0 (read back to the host); a traced one only for shape.
    residual: None, or the residual stream (x's shape).

  Returns:
    y_q (static) or (y_q, row_scales) (dynamic), with h appended when a
    residual is given. Not differentiable (an inference op).
  """
  x, residual, scale, opts = validation.check_args(
      x, residual, scale, epsilon, scale_offset, None, cast_order)
  quant_dtype, quant_scale = quantize.check_args(x, quant_dtype, quant_scale)
  names = validation.canonicalize_implementation(
      implementation, interpret)
  if quant_scale is not None and quant_scale.ndim == 0:
    quant_scale = quant_scale.reshape(1)
  kwargs = dict(epsilon=opts.epsilon, scale_offset=opts.scale_offset,
                cast_order=opts.cast_order, quant_dtype=quant_dtype)
  if x.size == 0:
    y_q, row_scales, h = quantize.reference(x, residual, scale, quant_scale,
                                            **kwargs)
  else:
    y_q, row_scales, h = dispatch.run_quantized(
        x, residual, scale, quant_scale, opts, quant_dtype, names=names,
        interpret=bool(interpret))
  out = (y_q,) if quant_scale is not None else (y_q, row_scales)
  if residual is not None:
    out += (h,)
  return out[0] if len(out) == 1 else out
