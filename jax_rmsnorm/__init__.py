"""jax_rmsnorm: a fused Pallas RMSNorm for JAX."""

from jax_rmsnorm._src.api import add_rms_norm as add_rms_norm
from jax_rmsnorm._src.api import rms_norm as rms_norm
from jax_rmsnorm._src.api import rms_norm_reference as rms_norm_reference

__version__ = "0.1.0"
