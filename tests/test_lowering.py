"""The kernels lower for CUDA, checked on a CPU machine.

Interpret mode proves indexing and arithmetic but not the Triton lowering's
own rules (power-of-two arrays, for one). `jax.export` for the "cuda"
platform runs that lowering without a GPU; JAX 0.11+ also needs an abstract
H100 to pick the compute capability.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import pytest

from jax_rmsnorm._src import triton_forward

TRITON_CALL = "__gpu$xla.gpu.triton"


def _abstract_h100():
  if not hasattr(jax.sharding, "AbstractDevice"):  # JAX 0.10
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("d",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def export_for_cuda(fn, *args) -> str:
  """The StableHLO text of `fn(*args)` lowered for CUDA."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  with _abstract_h100():
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=checks)(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("shape,dtype,scale_dtype,offset", [
    ((3, 896), "bfloat16", "bfloat16", 0.0),
    ((2, 7, 1536), "float16", "float32", 1.0),
    ((5, 5120), "float32", "float32", 0.0),
    ((2, 14336), "bfloat16", "float32", 0.0),
    ((3, 14336), "float32", "float32", 0.0),     # 7 chunks in registers
    ((4, 16384), "float32", "bfloat16", 0.0),
    ((2, 16411), "float32", "float32", 0.0),      # chunked, prime N
    ((2, 65536), "bfloat16", "bfloat16", 0.0),    # chunked
    ((9, 1), "float16", None, 0.0),
    ((1, 7), "bfloat16", None, 0.0),
    ((300, 96), "float32", "float32", 1.0),       # several rows per program
], ids=str)
def test_lowers_for_cuda_with_one_named_kernel(shape, dtype, scale_dtype,
                                               offset):
  x = jnp.zeros(shape, dtype)
  scale = None if scale_dtype is None else jnp.zeros(shape[-1:], scale_dtype)
  fn = functools.partial(triton_forward.rms_norm_triton, epsilon=1e-6,
                         scale_offset=offset, interpret=False)
  # The CPU test machine has no GPU, so the platform check is bypassed here;
  # everything else (configs, masks, the Triton lowering) is the real path.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(triton_forward.platform, "on_cuda_gpu", lambda: True)
    text = export_for_cuda(fn, x, scale)
  calls = [l for l in text.splitlines() if TRITON_CALL in l]
  assert len(calls) == 1, calls
  assert triton_forward.KERNEL_NAME in calls[0]
