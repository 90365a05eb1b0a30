"""The float64 oracle and the error bounds, shared by tests, benchmarks and
the self-check. The oracle is numpy in float64: it shares no code with the
implementations it judges."""

from __future__ import annotations

import math
from typing import NamedTuple

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


class Grads(NamedTuple):
  dx: np.ndarray
  dscale: np.ndarray | None
  dx_size: float  # ||rstd * g||: the size of dx's terms before they cancel.
  # ||sum over rows of |dy * xhat| ||: the size of dscale's terms; the sum of
  # terms of both signs can cancel far below it.
  dscale_size: float = 0.0


def oracle_grad(x, scale, dy, epsilon=1e-6, scale_offset=0.0,
                round_normalized_to=None, dh=None) -> Grads:
  """Gradients of `sum(oracle(x, scale) * dy) [+ sum(x * dh)]` in float64.

  With xhat = x * rstd and g = dy * (offset + scale):
    dx = rstd * (g - xhat * mean(g * xhat)) [+ dh],
    dscale = sum over rows of dy * xhat.
  `round_normalized_to` (a dtype) rounds xhat for dscale, as the Hugging Face
  cast order does in the forward; gradients pass the rounding straight
  through. dscale is None without a scale. dx_size measures dx's error
  against: for N = 1, dx is the difference of two nearly equal terms and
  float32 can only get it right relative to their size.
  """
  xf = np.asarray(x, np.float64)
  dyf = np.asarray(dy, np.float64)
  rstd = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
  xhat = xf * rstd
  g = dyf if scale is None else dyf * (scale_offset
                                       + np.asarray(scale, np.float64))
  dx = rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
  size = np.linalg.norm((rstd * g).ravel())
  if dh is not None:
    dx = dx + np.asarray(dh, np.float64)
    size = math.hypot(size, np.linalg.norm(np.asarray(dh, np.float64)))
  if scale is None:
    return Grads(dx, None, float(size))
  if round_normalized_to is not None:
    xhat = np.asarray(jnp.asarray(xhat, jnp.float32).astype(
        round_normalized_to), np.float64)
  terms = (dyf * xhat).reshape(-1, xf.shape[-1])
  dscale = np.sum(terms, axis=0)
  return Grads(dx, dscale, float(size),
               float(np.linalg.norm(np.sum(np.abs(terms), axis=0))))


def grad_tolerance(dtype, n: int) -> float:
  """Bound on ||dx - dx_ref|| / ||dx_ref||.

  dx is rounded once to `dtype` (finfo.eps covers half an ulp per element, so
  also the norm), after float32 dot products of n terms (4 sqrt(n) 2**-24, as
  in `tolerance`); the factor 2 covers the second reduction (mean(g * xhat))
  and the subtraction, which cancels where g is parallel to xhat.
  """
  return 2 * (float(jnp.finfo(dtype).eps) + 4 * math.sqrt(n) * 2.0**-24)


def scale_grad_tolerance(scale_dtype, rows: int, n: int) -> float:
  """Bound on ||dscale - ref|| / max(||ref||, dscale_size), looser than dx's:
  each element sums `rows` float32 products of both signs; the rounding
  errors of the partial sums are a random walk of relative size
  sqrt(rows) 2**-24 of the terms' total size (`Grads.dscale_size`), which the
  sum itself can fall far below. xhat carries tolerance(n)'s per-row error
  into every term. Rounded once to scale's dtype at the end.
  """
  return (float(jnp.finfo(scale_dtype).eps)
          + 4 * (math.sqrt(n) + math.sqrt(rows)) * 2.0**-24)


def relative_error(got, ref: np.ndarray, size: float = 0.0) -> float:
  """||got - ref|| / max(||ref||, size) in float64 (inf when got is not
  finite)."""
  got = np.asarray(got, np.float64)
  if got.shape != ref.shape:
    raise ValueError(f"{got.shape=} != {ref.shape=}")
  if not np.all(np.isfinite(got)):
    return np.inf
  denom = max(np.linalg.norm(ref.ravel()), size)
  return float(np.linalg.norm((got - ref).ravel()) / max(denom, 1e-300))
