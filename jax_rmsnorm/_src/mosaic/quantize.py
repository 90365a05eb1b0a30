"""RMSNorm (optionally fused with a residual add) straight to float8/int8 on
the Mosaic GPU backend: the forward kernel (`mosaic/forward.py`) writing
quantized codes (its `Quant`), with the arithmetic of `quantize.reference`.
The sibling of `triton/quantize.py`, for when Pallas's Triton backend is
gone; Hopper (sm_90) and newer, as every Mosaic kernel here.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import validation
from jax_rmsnorm._src.mosaic import common
from jax_rmsnorm._src.mosaic import forward as mosaic_forward

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = mosaic_forward.KERNEL_NAME


def check_supported(m: int, n: int, quant_dtype) -> None:
  """Raises NotImplementedError where the quantized kernel cannot run (any
  `quant_dtype`): the Mosaic kernels' limits (`common.check_supported`, for
  any input dtype), and rows of 1-byte codes that start on 16-byte
  boundaries (n a multiple of 16), which the bulk TMA copies of the output
  need."""
  del quant_dtype
  common.check_supported(m, n)
  if n % 16:
    raise NotImplementedError(
        f"rows of {n} one-byte codes do not start on 16-byte boundaries, "
        "which the Mosaic kernels' TMA copies need (n a multiple of 16)")


def forward(x: jax.Array, residual: jax.Array | None,
            scale: jax.Array | None, quant_scale: jax.Array | None, *,
            epsilon: float, scale_offset: float, quant_dtype,
            cast_order: str = "float32", interpret: bool = False,
            config=None) -> quantize.QuantizedOutputs:
  """RMSNorm of validated, non-empty `x` (plus `residual`), quantized to
  `quant_dtype`, in one kernel: `quantize.reference`'s arithmetic.

  quant_scale: None for dynamic per-row scales (returned as row_scales, of
  shape x.shape[:-1] + (1,), float32), or a validated static float32 scale
  of shape () or (N,); its reciprocal is computed here by XLA, as in the
  reference: one value read once a block, or N read per column (from
  shared memory where it fits; `mosaic_forward.Quant`).

  Returns (y_q, row_scales or None, h or None). Raises NotImplementedError
  where `check_supported` does (or the forward kernel's limits for these
  dtypes).
  """
  n = x.shape[-1]
  m = x.size // n
  quant_dtype = quantize.canonicalize_quant_dtype(quant_dtype)
  validation.require_operand_shapes(x, residual, scale)
  check_supported(m, n, quant_dtype)
  static = quant_scale is not None
  inv = None
  if static:
    inv = jnp.float32(1) / quant_scale.astype(jnp.float32).reshape(-1)
  logger.debug("rms_norm mosaic quantized forward: rows=%d n=%d dtype=%s "
               "quant_dtype=%s scale=%s residual=%s", m, n, x.dtype,
               quant_dtype, "static" if static else "dynamic",
               residual is not None)
  out = mosaic_forward.forward(
      x, residual, scale, epsilon=epsilon, scale_offset=scale_offset,
      cast_order=cast_order, interpret=interpret, config=config,
      quant_dtype=quant_dtype, quant_inv=inv)
  row_scales = (None if static
                else out.rstd.reshape(x.shape[:-1] + (1,)))
  return quantize.QuantizedOutputs(out.y, row_scales, out.h)
