"""jax_rmsnorm: a fused Pallas RMSNorm for JAX.

`rms_norm`, `add_rms_norm` (residual add fused with the norm),
`rms_norm_quantized` (the norm straight to fp8/int8, for inference) and
`rms_norm_reference` (the specification, in jnp). Flax layers live in
`jax_rmsnorm.nnx` and `jax_rmsnorm.linen`.
"""

from jax_rmsnorm._src.api import add_rms_norm as add_rms_norm
from jax_rmsnorm._src.api import rms_norm as rms_norm
from jax_rmsnorm._src.api import rms_norm_quantized as rms_norm_quantized
from jax_rmsnorm._src.api import rms_norm_reference as rms_norm_reference

__all__ = ["add_rms_norm", "rms_norm", "rms_norm_quantized",
           "rms_norm_reference"]
__version__ = "0.2.0"
