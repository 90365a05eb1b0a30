"""This directory's tests need 8 CPU devices: tests/test_sharding.py runs
them in a process of its own, with JAX_RMSNORM_MULTIDEVICE=1, which makes
tests/conftest.py ask for 8 devices before JAX starts. By hand:

  JAX_RMSNORM_MULTIDEVICE=1 python -m pytest tests/multidevice
"""

import jax

if jax.device_count() < 8:
  raise RuntimeError(
      f"tests/multidevice needs 8 devices, got {jax.device_count()}: run it "
      "with JAX_RMSNORM_MULTIDEVICE=1 (see this file)")
