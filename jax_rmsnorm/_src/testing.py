"""The float64 oracle and the error bounds, shared by tests, benchmarks and
the self-check. The oracle is numpy in float64: it shares no code with the
implementations it judges.

Every check is elementwise: each element of y and dx, each column of
d(scale), gets its own bound, so that a wrong row or column cannot hide
behind the norm of the rest. One function per check (`worst_excess` for an
output of the forward, `dx_excess`, `dscale_excess`) returns the worst
element's excess over its bound as a fraction of the bound, and where it is:
<= 0 passes, and 1 + excess is "worst error / bound".

The bounds model float32 arithmetic. U = 2**-24 is float32's unit roundoff:
one rounding to nearest moves a result by at most U of its size. See
`sum_error` and `rstd_error` for the two reductions; every other float32
operation adds at most one U, counted where a bound is defined.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# float32's unit roundoff: the largest relative error of one rounding.
U = 2.0**-24

# The oracle and the checks work a block of rows at a time: about 2**18
# elements, 2 MiB of float64 a temporary, so that the benchmark's largest
# shapes (1.3e8 elements) neither fill the memory nor leave the cache.
_BLOCK_ELEMENTS = 1 << 18


def as_float64(a) -> np.ndarray:
  """`a` (a numpy or JAX array of any float dtype) as float64 numpy.
  bfloat16 is widened through its bits: ml_dtypes' own cast is ten times
  slower, which shows at the benchmark's 10**8 elements."""
  a = np.asarray(a)
  if a.dtype == jnp.bfloat16:
    a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return a.astype(np.float64)


def _row_blocks(rows: int, n: int):
  """Slices of about _BLOCK_ELEMENTS elements over `rows` rows of `n`."""
  step = max(1, _BLOCK_ELEMENTS // max(n, 1))
  for start in range(0, rows, step):
    yield slice(start, min(rows, start + step))


def oracle(x, scale=None, epsilon=1e-6, scale_offset=0.0) -> np.ndarray:
  """RMSNorm in float64 numpy."""
  x = np.asarray(x)
  n = x.shape[-1]
  x2 = x.reshape(-1, n)
  w = None if scale is None else scale_offset + as_float64(scale)
  if w is not None and w.ndim > 1:  # A batched scale (vmap's tests).
    xf = as_float64(x)
    return xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True)
                        + epsilon) * w
  y = np.empty(x2.shape)
  for rows in _row_blocks(x2.shape[0], n):
    xf = as_float64(x2[rows])
    y[rows] = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True)
                           + epsilon)
    if w is not None:
      y[rows] *= w
  return y.reshape(x.shape)


def sum_error(k: int) -> float:
  """Error of a float32 sum of k terms, relative to the sum of |terms|.

  Each of the k - 1 additions rounds its partial sum to nearest: an error
  spread evenly over +-half an ulp, at most U |partial sum| <= U sum|terms|,
  so of standard deviation at most U sum|terms| / sqrt(3). Independent
  errors walk to a standard deviation of at most sqrt(k / 3) U sum|terms|;
  3 sqrt(k) U is 5.2 of those, a 1-in-5-million event per sum, where a check
  covers at most 65536 sums (rows of dx, columns of d(scale)). The standard
  deviation itself is an overestimate (partial sums grow to the total, and
  terms of both signs cancel), and tree or blocked sums (the GPU's, XLA's)
  are more accurate still.
  """
  return 3 * math.sqrt(k) * U


def rstd_error(n: int) -> float:
  """Relative error of the float32 rstd = rsqrt(sum(x * x) / n + epsilon).

  The sum of n squares: sum_error(n) (its terms are positive, so relative to
  the sum itself), plus U from each square. The division by n and the
  addition of epsilon: U each. rsqrt halves the relative error of its
  argument and adds its own: at most 2 ulp on the GPU (CUDA's rsqrtf), 4 U.
  """
  return (sum_error(n) + 3 * U) / 2 + 4 * U


def tolerance(dtype, n: int, roundings: int = 1) -> float:
  """Relative error bound of one output element of the forward.

  y = (x * rstd) * (offset + scale) in float32: rstd's error and 3 more
  roundings (two products, the offset's sum), then one rounding to `dtype`:
  half an ulp, at most finfo(dtype).eps / 2 of |y|; finfo.eps leaves a factor
  2 to spare (and 2 U for float32 results, which are not rounded again).
  `roundings` counts the roundings to `dtype` on the way: 2 under the
  Hugging Face cast order, which rounds xhat before the scale (the oracle
  rounds the exact xhat, the kernel its float32 one: where they straddle a
  rounding boundary they differ by one ulp, at most eps of |xhat|).
  """
  return roundings * float(jnp.finfo(dtype).eps) + rstd_error(n) + 3 * U


class Worst(NamedTuple):
  """The worst element of a check: its excess over its bound, as a fraction
  of the bound (<= 0: every element passed; NaN or Inf give +inf), and its
  index."""
  excess: float
  where: tuple

  @property
  def ratio(self) -> float:
    """Worst |error| / bound: <= 1 passes."""
    return 1.0 + self.excess


def _worst(got, ref: np.ndarray, bound_of) -> Worst:
  """The worst |got - ref| / bound, a block of rows at a time (`bound_of`
  maps a slice of rows of the (rows, n) views to that block's bound)."""
  got = np.asarray(got)
  if got.shape != ref.shape:
    raise ValueError(f"{got.shape=} != {ref.shape=}")
  if got.size == 0:
    return Worst(-np.inf, ())
  n = ref.shape[-1] if ref.ndim else 1
  got2, ref2 = got.reshape(-1, n), ref.reshape(-1, n)
  worst, where = -np.inf, (0, 0)
  for rows in _row_blocks(got2.shape[0], n):
    block = as_float64(got2[rows])
    ratio = np.abs(block - ref2[rows])
    ratio /= bound_of(rows)
    ratio[~np.isfinite(block)] = np.inf
    i = np.unravel_index(np.argmax(ratio), ratio.shape)
    if not ratio[i] <= worst:  # NaN (a NaN oracle) is the worst too.
      worst, where = float(ratio[i]), (rows.start + int(i[0]), int(i[1]))
      if np.isnan(worst):
        break
  where = np.unravel_index(where[0] * n + where[1], ref.shape)
  return Worst(worst - 1.0, tuple(int(i) for i in where))


def _eps_and_tiny(dtype) -> tuple[float, float]:
  info = jnp.finfo(dtype)
  return float(info.eps), float(info.tiny)


def worst_excess(y, ref: np.ndarray, dtype, n: int,
                 roundings: int = 1) -> Worst:
  """The forward's check: y (or h) against its float64 `ref`, per element.

  bound = tolerance(dtype, n, roundings) * |ref| + finfo(dtype).tiny: below
  the smallest normal number the spacing of `dtype` is absolute.
  """
  tiny = float(jnp.finfo(dtype).tiny)
  tol = tolerance(dtype, n, roundings)
  ref2 = ref.reshape(-1, ref.shape[-1] if ref.ndim else 1)
  return _worst(y, ref, lambda rows: tol * np.abs(ref2[rows]) + tiny)


def random_inputs(seed: int, shape, dtype, scale_dtype=None):
  """x ~ N(0, 1) and scale ~ 1 + 0.1 N(0, 1), fresh per seed."""
  kx, ks = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(ks, tuple(shape[-1:]), jnp.float32)
  return x, scale.astype(scale_dtype or dtype)


class Grads(NamedTuple):
  """The float64 gradients and the sizes their bounds scale with."""
  dx: np.ndarray
  dscale: np.ndarray | None
  # Per element of dx: the sum of the magnitudes of what float32 adds up to
  # it, rstd * (|g| + |xhat| * mean(|g * xhat|)) [+ |dh|] (see dx_excess);
  # float32.
  dx_size: np.ndarray
  # Per column of d(scale): the sum over rows of |dy * xhat|.
  dscale_size: np.ndarray | None = None
  # Per column of d(scale), under the Hugging Face cast order: how far the
  # rounding of xhat to x's dtype may move the sum, where float32's xhat can
  # fall on either side of a rounding boundary (see oracle_grad).
  dscale_slack: np.ndarray | None = None
  # Per element of dx, with `round_norm_grad_to`: the same for the rounding
  # of the gradient through y.
  dx_slack: np.ndarray | None = None


def _round_to(value: np.ndarray, dtype) -> np.ndarray:
  """float64 `value` rounded to float32, then to `dtype` (as a float32
  computation rounds its results), back in float64."""
  return value.astype(np.float32).astype(jnp.dtype(dtype)).astype(np.float64)


def _rounding_spread(value: np.ndarray, error, dtype) -> np.ndarray:
  """|round(value + error) - round(value - error)| in `dtype`: how far apart
  the roundings of two numbers within `error` of `value` can fall (0 unless
  a rounding boundary lies between them, then an ulp or so)."""
  return np.abs(_round_to(value + error, dtype) - _round_to(value - error,
                                                            dtype))


def _narrow(dtype) -> bool:
  return dtype is not None and jnp.dtype(dtype).itemsize < 4


def oracle_grad(x, scale, dy, epsilon=1e-6, scale_offset=0.0,
                round_normalized_to=None, dh=None, *,
                round_cotangent_to=None, round_norm_grad_to=None) -> Grads:
  """Gradients of `sum(oracle(x, scale) * dy) [+ sum(x * dh)]` in float64.

  With xhat = x * rstd and g = dy * (offset + scale):
    dx = rstd * (g - xhat * mean(g * xhat)) [+ dh],
    dscale = sum over rows of dy * xhat.
  dscale is None without a scale. The sizes (`Grads`) are what the bounds of
  `dx_excess` and `dscale_excess` scale with.

  The kernels round once, at the end. XLA's autodiff of the reference also
  rounds where the forward rounds: the transpose of a rounding (a convert
  pair, `reduce_precision`) is the same rounding of the cotangent, as in
  PyTorch's autograd. The options model those roundings (each a dtype):
    round_normalized_to: the Hugging Face cast order rounds xhat; dscale
      sums dy * rounded xhat. The kernels pass the rounding straight through
      to dx.
    round_cotangent_to: XLA's autodiff of that order rounds g on the way
      back (exactly as here: g is one float32 product of the inputs).
    round_norm_grad_to: XLA's autodiff of add_rms_norm rounds the gradient
      through y to h's dtype before it adds dh (float32: no rounding).
  Where the float32 value being rounded (xhat, the gradient through y) is
  within its error bound of a rounding boundary, an implementation may round
  it the other way: `dscale_slack` and `dx_slack` hold how far that moves
  the result.
  """
  n = np.shape(x)[-1]
  x2 = np.asarray(x).reshape(-1, n)
  dy2 = np.asarray(dy).reshape(-1, n)
  dh2 = None if dh is None else np.asarray(dh).reshape(-1, n)
  m = x2.shape[0]
  w = None if scale is None else scale_offset + as_float64(scale)
  # dx_size only scales a bound: float32 is precise enough, at half the
  # memory.
  dx, dx_size = np.empty((m, n)), np.empty((m, n), np.float32)
  dx_slack = np.zeros((m, n)) if _narrow(round_norm_grad_to) else None
  dscale = dscale_size = dscale_slack = None
  if scale is not None:
    dscale, dscale_size = np.zeros(n), np.zeros(n)
    if _narrow(round_normalized_to):
      dscale_slack = np.zeros(n)
  for rows in _row_blocks(m, n):
    xf, dyf = as_float64(x2[rows]), as_float64(dy2[rows])
    rstd = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
    xhat = xf * rstd
    g = dyf if w is None else dyf * w
    if round_cotangent_to is not None:
      g = _round_to(g, round_cotangent_to)
    gx = g * xhat
    grad = rstd * (g - xhat * np.mean(gx, axis=-1, keepdims=True))
    np.abs(gx, out=gx)
    size = rstd * (np.abs(g) + np.abs(xhat)
                   * np.mean(gx, axis=-1, keepdims=True))
    if dx_slack is not None:
      dx_slack[rows] = _rounding_spread(
          grad, dx_bound_coefficient(n) * size, round_norm_grad_to)
      grad = _round_to(grad, round_norm_grad_to)
    if dh2 is not None:
      dhf = as_float64(dh2[rows])
      grad += dhf
      size += np.abs(dhf)
    dx[rows], dx_size[rows] = grad, size
    if scale is None:
      continue
    if round_normalized_to is not None:
      if dscale_slack is not None:
        # float32's xhat is within this relative distance of the exact one.
        error = (rstd_error(n) + U) * np.abs(xhat)
        dscale_slack += np.sum(
            np.abs(dyf) * _rounding_spread(xhat, error, round_normalized_to),
            axis=0)
      xhat = _round_to(xhat, round_normalized_to)
    terms = dyf * xhat
    dscale += np.sum(terms, axis=0)
    dscale_size += np.sum(np.abs(terms), axis=0)
  shape = np.shape(x)
  return Grads(dx.reshape(shape), dscale, dx_size.reshape(shape), dscale_size,
               dscale_slack,
               None if dx_slack is None else dx_slack.reshape(shape))


def dx_bound_coefficient(n: int) -> float:
  """dx's error per unit of `Grads.dx_size`, before its final rounding.

  dx = rstd * g - rstd * xhat * mean(g * xhat) [+ dh]. rstd enters the first
  term once and the second three times (its own factor, xhat, and xhat again
  inside the mean): 3 rstd_error(n). The mean sums n products:
  sum_error(n) of the sum of their magnitudes, which dx_size's second term
  holds (rstd |xhat| mean|g * xhat|). The other float32 operations round at
  most 10 times along either term (g: 2; xhat, the products, the division
  by n, the subtraction, the outer product, the + dh: one each); 12 U also
  covers XLA's autodiff of the reference, which computes rstd**3 as
  rstd / (mean square + epsilon).
  """
  return 3 * rstd_error(n) + sum_error(n) + 12 * U


def dx_excess(dx, ref: Grads, dtype) -> Worst:
  """dx's check, per element (`Worst`).

  bound = eps(dtype) |dx_ref| + dx_bound_coefficient(n) dx_size
          [+ dx_slack] + finfo(dtype).tiny,
  eps for the final rounding to `dtype` (half an ulp, a factor 2 to spare),
  tiny for results below the smallest normal number.
  """
  n = ref.dx.shape[-1]
  eps, tiny = _eps_and_tiny(dtype)
  coefficient = dx_bound_coefficient(n)
  dx2, size2 = ref.dx.reshape(-1, n), ref.dx_size.reshape(-1, n)
  slack2 = None if ref.dx_slack is None else ref.dx_slack.reshape(-1, n)

  def bound_of(rows):
    bound = eps * np.abs(dx2[rows])
    bound += coefficient * size2[rows]
    if slack2 is not None:
      bound += slack2[rows]
    bound += tiny
    return bound
  return _worst(dx, ref.dx, bound_of)


def dscale_bound_coefficient(rows: int, n: int) -> float:
  """d(scale)'s error per unit of `Grads.dscale_size`, before its final
  rounding: each column sums `rows` float32 terms dy * xhat (sum_error);
  each term carries its row's rstd error and 2 roundings (xhat, the
  product)."""
  return sum_error(rows) + rstd_error(n) + 2 * U


def dscale_excess(dscale, ref: Grads, scale_dtype) -> Worst:
  """d(scale)'s check, per column (`Worst`).

  bound = eps(scale_dtype) |ref| + dscale_bound_coefficient(M, n) dscale_size
          [+ dscale_slack] + finfo(scale_dtype).tiny,
  with M the number of rows summed. The terms have both signs, so the sum
  can fall far below dscale_size (about sqrt(M) times for random data): the
  bound is per column, where a wrong column cannot hide.
  """
  n = ref.dx.shape[-1]
  rows = ref.dx.size // max(n, 1)
  eps, tiny = _eps_and_tiny(scale_dtype)
  bound = eps * np.abs(ref.dscale)
  bound += dscale_bound_coefficient(rows, n) * ref.dscale_size
  if ref.dscale_slack is not None:
    bound += ref.dscale_slack
  bound += tiny
  return _worst(dscale, ref.dscale, lambda _: bound[None, :])


def worst_of(*worsts: Worst) -> Worst:
  """The worst of several checks' results (NaN counts as the worst)."""
  def key(w):
    return np.inf if np.isnan(w.excess) else w.excess
  return max(worsts, key=key)


def grads_excess(dx, dscale, ref: Grads, dtype, scale_dtype) -> Worst:
  """The worse of dx_excess and dscale_excess (dx's alone without a scale);
  `where` starts with "dx" or "dscale"."""
  worst = dx_excess(dx, ref, dtype)
  worst = Worst(worst.excess, ("dx",) + worst.where)
  if ref.dscale is None:
    return worst
  other = dscale_excess(dscale, ref, scale_dtype)
  return worst_of(worst, Worst(other.excess, ("dscale",) + other.where))


def relative_error(got, ref: np.ndarray, size: float = 0.0) -> float:
  """||got - ref|| / max(||ref||, size) in float64 (inf when got is not
  finite). For comparing two implementations' results, where no oracle
  gives per-element sizes (the Flax layers and block tests)."""
  got = np.asarray(got, np.float64)
  if got.shape != ref.shape:
    raise ValueError(f"{got.shape=} != {ref.shape=}")
  if not np.all(np.isfinite(got)):
    return np.inf
  denom = max(np.linalg.norm(ref.ravel()), size)
  return float(np.linalg.norm((got - ref).ravel()) / max(denom, 1e-300))


# The quantized output ------------------------------------------------------

def half_step(v: np.ndarray, quant_dtype) -> np.ndarray:
  """Half the spacing of `quant_dtype` at magnitude |v|: the largest error of
  a correct round-to-nearest. fp8: spacing 2**(e - nmant) in v's binade
  (e >= the smallest normal's exponent: subnormals are evenly spaced);
  int8: 1."""
  if jnp.dtype(quant_dtype) == jnp.int8:
    return np.full_like(v, 0.5)
  info = ml_dtypes.finfo(quant_dtype)
  e = np.floor(np.log2(np.maximum(np.abs(v), float(info.tiny))))
  return 0.5 * np.exp2(e - info.nmant)


def quantized_relative_error(n: int, cast_order="float32",
                             norm_dtype=None) -> float:
  """Relative error of the float32 y * (1/s) against float64's y / s: y in
  float32 is off by tolerance(float32, n); the reciprocal and the product
  add two roundings of U: twice that tolerance covers both. The Hugging
  Face order rounds xhat to the input dtype, where float32's error can tip
  the rounding by one ulp of that dtype: eps of it more."""
  rel = 2 * tolerance("float32", n)
  if cast_order == "hf":
    rel += float(jnp.finfo(norm_dtype).eps)
  return rel


def quantized_excess(y_q, s, y64: np.ndarray, quant_dtype, rel: float
                     ) -> Worst:
  """y_q against float64's y64 / s, per element (`Worst`), s the scale the
  implementation used (only the quantization is judged).

  With v = y64 / s, a correctly rounded q of clip(v) is within half_step(v)
  of it; float32's y * (1/s) is v (1 + d), |d| <= rel, which moves the
  result by at most min(|v|, qmax) rel before rounding: q is then one of v's
  two neighbours, the farther one only within rel of a tie. Elements past
  qmax (beyond the error) must be exactly +-qmax.
  """
  top = float(quantize_qmax(quant_dtype))
  q = np.asarray(y_q).astype(np.float64)
  v = y64 / np.asarray(s).astype(np.float64)
  clipped = np.clip(v, -top, top)
  bound = half_step(clipped, quant_dtype) + np.minimum(np.abs(v), top) * rel
  saturated = np.abs(v) * (1 - rel) > top
  bound[saturated] = 0.0
  return _worst(q, clipped, lambda rows: bound.reshape(
      -1, bound.shape[-1])[rows] + 1e-300)


def scales_excess(s, y64: np.ndarray, quant_dtype, n: int) -> Worst:
  """Dynamic per-row scales against max|y64| / qmax (floored as the spec
  says), per row (`Worst`). amax is a max of float32 y, each within
  tolerance(float32, n) of float64's, and the division by qmax adds half an
  ulp: the tolerance (which counts a whole ulp) covers both."""
  top = float(quantize_qmax(quant_dtype))
  amax = np.max(np.abs(y64), axis=-1, keepdims=True)
  want = np.maximum(amax, top * float(np.finfo(np.float32).tiny)) / top
  bound = tolerance("float32", n) * want
  return _worst(np.asarray(s), want, lambda rows: bound.reshape(-1, 1)[rows])


def quantize_qmax(quant_dtype) -> float:
  """The largest code of `quant_dtype` (448, 57344 or 127)."""
  quant_dtype = jnp.dtype(quant_dtype)
  if quant_dtype == jnp.int8:
    return 127.0
  return float(ml_dtypes.finfo(quant_dtype).max)
