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


def compute_capability() -> float | None:
  """The default NVIDIA GPU's compute capability (9.0 for Hopper), or None."""
  if not on_cuda_gpu():
    return None
  value = getattr(jax.devices()[0], "compute_capability", None)
  return float(value) if value else None


def generation() -> str | None:
  """The speed table's key for the default GPU: 'sm90' for the H100 and
  H200; None without an NVIDIA GPU."""
  capability = compute_capability()
  if capability is None:
    return None
  return f"sm{int(round(capability * 10))}"


# Grid size assumed for persistent kernels off the GPU (interpret mode): a few
# programs, so that tests exercise several programs sharing the rows.
_INTERPRET_SM_COUNT = 2


def sm_count() -> int:
  """Streaming multiprocessors of the default GPU (a small stand-in on CPU)."""
  if not on_cuda_gpu():
    return _INTERPRET_SM_COUNT
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)
