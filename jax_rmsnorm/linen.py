"""`flax.linen.RMSNorm`, computed by jax_rmsnorm's kernels.

  from jax_rmsnorm.linen import RMSNorm    # instead of flax.linen.RMSNorm

Same fields, defaults and parameters (`{"scale": (N,)}`) as
`flax.linen.RMSNorm` (it is a subclass), plus `implementation` and
`interpret` for `jax_rmsnorm.rms_norm`. Outputs follow flax's dtype rules:
the result has `dtype`, or without it x's and the scale's promoted dtype.
Statistics are float32 (`force_float32_reductions=False` changes nothing).

Options the kernel cannot honour raise NotImplementedError naming them:
`reduction_axes`/`feature_axes` other than the last axis, `axis_name`,
`axis_index_groups`, `mask`. `use_fast_variance` has no effect on an RMS
norm.
"""

from __future__ import annotations

from typing import Any

from flax import linen as _nn

from jax_rmsnorm._src import api
from jax_rmsnorm._src import flax_common


class RMSNorm(_nn.RMSNorm):
  """flax.linen.RMSNorm, drop-in; see the module docstring."""
  implementation: Any = None
  interpret: bool = False

  def _scale_and_dtype(self, x, mask):
    flax_common.check_supported_options(
        x, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask)
    scale = None
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (x.shape[-1],),
                         self.param_dtype)
    return scale, flax_common.result_dtype(x, scale, self.dtype)

  @_nn.compact
  def __call__(self, x, *, mask=None):
    scale, out_dtype = self._scale_and_dtype(x, mask)
    return api.rms_norm(x, scale, epsilon=self.epsilon, out_dtype=out_dtype,
                        implementation=self.implementation,
                        interpret=self.interpret)
