"""The float64 oracle and the error bounds, shared by tests, benchmarks and
the self-check. The oracle is numpy in float64: it shares no code with the
implementations it judges."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def oracle(x, scale=None, epsilon=1e-6, scale_offset=0.0) -> np.ndarray:
  """RMSNorm in float64 numpy."""
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


def worst_excess(y, ref: np.ndarray, dtype, n: int):
  """(max of |y - ref| - bound, its index); <= 0 means every element passed.

  bound = tolerance * |ref| + finfo(dtype).tiny: below the smallest normal
  number the spacing of `dtype` is absolute. NaN and Inf give +inf.
  """
  y = np.asarray(y, np.float64)
  if y.shape != ref.shape:
    raise ValueError(f"{y.shape=} != {ref.shape=}")
  if y.size == 0:
    return -np.inf, ()
  bound = tolerance(dtype, n) * np.abs(ref) + float(jnp.finfo(dtype).tiny)
  excess = np.abs(y - ref) - bound
  excess[~np.isfinite(y)] = np.inf
  worst = np.unravel_index(np.argmax(excess), excess.shape)
  return float(excess[worst]), worst


def random_inputs(seed: int, shape, dtype, scale_dtype=None):
  """x ~ N(0, 1) and scale ~ 1 + 0.1 N(0, 1) (anchors.md), fresh per seed."""
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(ks, tuple(shape[-1:]), jnp.float32)
  return x, scale.astype(scale_dtype or dtype)
