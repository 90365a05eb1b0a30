"""`flax.nnx.RMSNorm`, computed by jax_rmsnorm's kernels.

  from jax_rmsnorm.nnx import RMSNorm      # instead of flax.nnx.RMSNorm

Same constructor arguments, defaults, parameter (`scale`) and state as
`flax.nnx.RMSNorm` (it is a subclass), plus `implementation=` and
`interpret=` for `jax_rmsnorm.rms_norm`. Outputs follow flax's dtype rules:
with `dtype` set, x and the scale are computed in `dtype`; without, the
result has x's and the scale's promoted dtype (bf16 x with a float32 scale
gives float32, as in flax). Statistics are float32 either way.

`quantize(x, quant_dtype=..., quant_scale=None, residual=None)` gives the
output straight in fp8/int8 for inference; a method rather than a
constructor flag, so that the same layer (and checkpoint) serves training
and quantized inference, and `__call__` keeps flax's return type.

Options the kernel cannot honour raise NotImplementedError naming them:
`reduction_axes`/`feature_axes` other than the last axis, `axis_name`,
`axis_index_groups`, `mask`. `use_fast_variance` has no effect on an RMS
norm (no mean is subtracted). A custom `promote_dtype` is applied as flax
applies it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx as _nnx

from jax_rmsnorm._src import api
from jax_rmsnorm._src import flax_common


class RMSNorm(_nnx.RMSNorm):
  """flax.nnx.RMSNorm, drop-in; see the module docstring."""

  def __init__(self, num_features: int, *, implementation=None,
               interpret: bool = False, **kwargs):
    super().__init__(num_features, **kwargs)
    self.implementation = implementation
    self.interpret = interpret

  def _scale_and_dtype(self, x, mask):
    flax_common.check_supported_options(
        x, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask)
    scale = self.scale[...] if self.scale is not None else None
    out_dtype = flax_common.result_dtype(x, scale, self.dtype)
    if self.dtype is not None and scale is not None:
      scale = scale.astype(out_dtype)  # flax multiplies in `dtype`.
    return scale, out_dtype

  def __call__(self, x, mask=None):
    if self.promote_dtype is not _nnx.nn.dtypes.promote_dtype:
      x, _ = self.promote_dtype((x, None), dtype=self.dtype)
    scale, out_dtype = self._scale_and_dtype(x, mask)
    if self.dtype is not None:
      x = flax_common.narrowed(x, out_dtype)
    return api.rms_norm(x, scale, epsilon=self.epsilon, out_dtype=out_dtype,
                        implementation=self.implementation,
                        interpret=self.interpret)

  def quantize(self, x, *, quant_dtype=jnp.float8_e4m3fn, quant_scale=None,
               residual=None):
    """The layer's output straight to fp8/int8, for an fp8/int8 matmul
    (`jax_rmsnorm.rms_norm_quantized`, one kernel): y_q with a static
    `quant_scale`, or (y_q, row_scales) with per-token scales; h appended
    with a residual. The normalization is computed as by `__call__` (in
    float32), then quantized instead of rounded to the layer's dtype."""
    scale, _ = self._scale_and_dtype(x if residual is None else residual,
                                     None)
    return api.rms_norm_quantized(
        x, scale, epsilon=self.epsilon, quant_dtype=quant_dtype,
        quant_scale=quant_scale, residual=residual,
        implementation=self.implementation, interpret=self.interpret)

  def add_and_normalize(self, x, residual):
    """`(self(h), h)` with `h = x + residual` in residual's dtype, in one
    kernel (`jax_rmsnorm.add_rms_norm`): the pre-norm residual stream. h is
    normalized in its own dtype (flax would first round it to `dtype`)."""
    scale, out_dtype = self._scale_and_dtype(residual, None)
    return api.add_rms_norm(x, residual, scale, epsilon=self.epsilon,
                            out_dtype=out_dtype,
                            implementation=self.implementation,
                            interpret=self.interpret)
