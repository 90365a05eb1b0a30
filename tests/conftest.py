"""Shared test helpers: the float64 oracle, tolerances and implementations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_rmsnorm._src import platform

ON_GPU = platform.on_cuda_gpu()
requires_gpu = pytest.mark.skipif(
    not ON_GPU, reason="compiled Pallas kernels need an NVIDIA GPU")

# (implementation, interpret): the interpreted kernel and the reference run
# everywhere; the compiled kernel runs, and is declared to run, on a GPU only.
IMPLEMENTATIONS = [
    pytest.param(("xla", False), id="xla"),
    pytest.param(("triton", True), id="triton-interpret"),
    pytest.param(("triton", False), id="triton-gpu", marks=requires_gpu),
]


def oracle(x, scale=None, epsilon=1e-6, scale_offset=0.0) -> np.ndarray:
  """RMSNorm in float64 numpy: shares no code with the implementations."""
  xf = np.asarray(x, np.float64)
  y = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
  if scale is not None:
    y = y * (scale_offset + np.asarray(scale, np.float64))
  return y


def tolerance(dtype, n: int) -> float:
  """Relative error bound of one output element.

  The result is rounded once to `dtype` at the end: at most half an ulp, so
  finfo(dtype).eps covers it with a factor 2 to spare for float32 results that
  sit next to a rounding boundary. Before that, float32 sums n squares: its
  relative error is a random walk of about sqrt(n) roundings of 2**-24
  (halved by the square root); 4 of those is a 4-sigma bound.
  """
  return float(jnp.finfo(dtype).eps) + 4 * math.sqrt(n) * 2.0**-24


def assert_close(y, ref: np.ndarray, dtype, n: int) -> None:
  """|y - ref| <= tol * |ref| + tiny, elementwise; NaN or Inf fail."""
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape, (y.shape, ref.shape)
  assert np.isfinite(y).all(), "non-finite output"
  # Below the smallest normal number the spacing of `dtype` is absolute.
  bound = tolerance(dtype, n) * np.abs(ref) + float(jnp.finfo(dtype).tiny)
  excess = np.abs(y - ref) - bound
  worst = np.unravel_index(np.argmax(excess), excess.shape) if y.size else ()
  assert (excess <= 0).all(), (
      f"max excess {excess[worst]:.3g} at {worst}: got {y[worst]!r}, "
      f"want {ref[worst]!r} (tol {tolerance(dtype, n):.3g})")


def random_inputs(seed, shape, dtype, scale_dtype=None):
  """x ~ N(0, 1); scale ~ 1 + 0.1 N(0, 1); fresh for every seed."""
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, "float32").astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(ks, shape[-1:], "float32")
  return x, scale.astype(scale_dtype or dtype)
