"""What the default device is, asked in one place."""

from __future__ import annotations

import jax


def on_cuda_gpu() -> bool:
  """True when JAX's default backend is an NVIDIA GPU."""
  if jax.default_backend() != "gpu":
    return False
  return "cuda" in jax.devices()[0].client.platform_version.lower()


def device_kind() -> str | None:
  """The default device's kind, e.g. 'NVIDIA H100 80GB HBM3'; None on CPU."""
  if jax.default_backend() == "cpu":
    return None
  return jax.devices()[0].device_kind
