"""Inputs, byte counts and CUPTI timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np


def make_inputs(m: int, n: int, dtype: str, seed: int = 0):
  """x ~ N(0, 1) in `dtype`; scale ~ 1 + 0.1 N(0, 1) in float32 (anchors.md)."""
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, n), jnp.float32).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(ks, (n,), jnp.float32)
  return x, scale.astype(dtype)


def forward_bytes(m: int, n: int, dtype: str) -> int:
  """Fewest bytes a forward moves: read x and scale once, write y once."""
  itemsize = np.dtype(dtype).itemsize
  return (2 * m * n + n) * itemsize


def copy_bytes(m: int, n: int, dtype: str) -> int:
  return 2 * m * n * np.dtype(dtype).itemsize


def median_us(fn, *args, iterations: int = 20) -> float:
  """Median kernel time of jitted `fn(*args)` in microseconds, from CUPTI.

  The sum of all kernels `fn` launches per call counts, so a fallback to
  several XLA kernels is timed honestly.
  """
  from jax.experimental.mosaic.gpu import profiler  # GPU-only import.
  fn(*args)  # Compile and warm up outside the measurement.
  _, times_ms = profiler.measure(fn, iterations=iterations)(*args)
  return 1e3 * statistics.median(times_ms)


def max_rel_error(y, ref64: np.ndarray) -> float:
  """Largest |y - ref| / max(|ref|, 1) in float64 (NaN counts as infinite)."""
  err = np.abs(np.asarray(y, np.float64) - ref64) / np.maximum(np.abs(ref64), 1)
  return float(np.inf) if np.isnan(err).any() else float(err.max())


def oracle(x, scale, epsilon: float = 1e-6) -> np.ndarray:
  """Float64 RMSNorm on the host: independent of every implementation."""
  xf = np.asarray(x, np.float64)
  rstd = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
  return xf * rstd * np.asarray(scale, np.float64)


def card_name() -> str:
  return jax.devices()[0].device_kind
