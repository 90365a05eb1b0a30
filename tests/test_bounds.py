"""The error bounds can fail: mutation tests at the large benchmark shapes.

Synthetic results, no kernel: the float64 oracle rounded to the output dtype
(and, for d(scale), a float32 computation with sequential column sums, the
least accurate order) must pass every check; corrupted ones must fail it:
d(scale) zeroed or halved, 1, 8 or 16 rows of dx zeroed, one element of y,
dx or d(scale) 2 ulps beyond its bound, a NaN. Norm-relative bounds let the
first three through at these sizes (d(scale)'s terms have both signs: their
rounding errors grow with sum|terms| ~ sqrt(M) |d(scale)|).

numpy only; each shape's inputs and oracle are built once (module fixtures).
"""

from __future__ import annotations

import contextlib
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jax_rmsnorm._src import testing

# (M, N, dtype): large benchmark shapes, where sums are longest: the most
# rows (65536, the longest d(scale) sums: the hardest case for catching a
# wrong d(scale)), and the most elements. The other large ones (32768 x
# 3072, 16384 x 8192, 4096 x 14336 bf16; 32768 x 4096 float32) behave alike
# and would double the file's time, most of it spent touching fresh memory.
SHAPES = [(65536, 896, "bfloat16"), (32768, 4096, "bfloat16"),
          (65536, 896, "float32")]
# The forward's bound depends on N and the dtype alone: its checks run at
# the first shape of each dtype.
FORWARD_SHAPES = [(65536, 896, "bfloat16"), (65536, 896, "float32")]


def _to(values: np.ndarray, dtype) -> np.ndarray:
  """float32/float64 values rounded to nearest-even in `dtype`, a block of
  rows at a time (few large temporaries). bfloat16 by its bits: ml_dtypes'
  cast takes seconds at 10**8 elements."""
  values = np.asarray(values)
  out = np.empty(values.shape, jnp.dtype(dtype))
  flat_in, flat_out = values.reshape(-1), out.reshape(-1)
  step = 1 << 20
  for start in range(0, values.size, step):
    block = flat_in[start:start + step].astype(np.float32)
    if jnp.dtype(dtype) == jnp.float32:
      flat_out[start:start + step] = block
      continue
    bits = block.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    bits >>= 16
    flat_out.view(np.uint16)[start:start + step] = bits
  return out


def _float32(values: np.ndarray) -> np.ndarray:
  if values.dtype == jnp.bfloat16:
    return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return values.astype(np.float32)


class Case:
  """Inputs, oracle and correctly rounded results at one shape."""

  def __init__(self, m, n, dtype):
    self.m, self.n, self.dtype = m, n, dtype
    rng = np.random.default_rng(m + n)
    self.x = _to(rng.standard_normal((m, n), np.float32), dtype)
    # dy: x's rows shifted by one, independent of the row they meet.
    self.dy = np.roll(self.x, 1, axis=0)
    self.scale = _to(1 + 0.1 * rng.standard_normal(n, np.float32), dtype)
    self.grads = testing.oracle_grad(self.x, self.scale, self.dy)
    self.dx = _to(self.grads.dx, dtype)
    self.dscale = _to(self.grads.dscale, dtype)

  @functools.cached_property
  def y_ref(self):
    return testing.oracle(self.x, self.scale)

  @functools.cached_property
  def y(self):
    return _to(self.y_ref, self.dtype)


@pytest.fixture(scope="module", params=SHAPES, ids=str)
def case(request):
  return Case(*request.param)


def _dx(case, dx):
  return testing.dx_excess(dx, case.grads, case.dtype)


def _dscale(case, dscale):
  return testing.dscale_excess(dscale, case.grads, case.dtype)


def _at_bound(ref: float, bound: float, dtype, ulps: int) -> np.ndarray:
  """The `dtype` number `ulps` ulps above ref + bound (ulps = 0: the
  largest one within it)."""
  dtype = jnp.dtype(dtype)
  inf = np.array(np.inf, dtype)
  value = np.array(ref + bound, np.float64).astype(np.float32).astype(dtype)
  while value.astype(np.float64) > ref + bound:
    value = np.nextafter(value, -inf)
  for _ in range(ulps):
    value = np.nextafter(value, inf)
  return value


def _bounds(case, i, j):
  """dx's bound at (i, j) and d(scale)'s at column j, from their formulas."""
  eps, tiny = (float(v) for v in (jnp.finfo(case.dtype).eps,
                                  jnp.finfo(case.dtype).tiny))
  g = case.grads
  dx_bound = (eps * abs(g.dx[i, j])
              + testing.dx_bound_coefficient(case.n) * g.dx_size[i, j] + tiny)
  dscale_bound = (eps * abs(g.dscale[j])
                  + testing.dscale_bound_coefficient(case.m, case.n)
                  * g.dscale_size[j] + tiny)
  return dx_bound, dscale_bound


@contextlib.contextmanager
def _changed(array: np.ndarray, index, value):
  """array[index] = value for a while (no copy of a large array)."""
  saved = array[index].copy()
  array[index] = value
  try:
    yield array
  finally:
    array[index] = saved


def _forward(case):
  if (case.m, case.n, case.dtype) not in FORWARD_SHAPES:
    pytest.skip("the forward's bound is checked at another shape of this N")


def test_correct_results_pass(case):
  # One rounding is at most half of the bound's eps: error / bound <= 0.5.
  dx, dscale = _dx(case, case.dx), _dscale(case, case.dscale)
  assert dx.ratio <= 0.5 and dscale.ratio <= 0.5, (dx, dscale)
  _forward(case)
  y = testing.worst_excess(case.y, case.y_ref, case.dtype, case.n)
  assert y.ratio <= 0.5, y


def test_float32_dscale_with_sequential_sums_passes(case):
  """d(scale) as float32 computes it, rows added one after another (the
  least accurate order), then rounded once."""
  dscale = np.zeros(case.n, np.float32)
  for start in range(0, case.m, 256):
    x, dy = (_float32(a[start:start + 256]) for a in (case.x, case.dy))
    rstd = 1 / np.sqrt(np.mean(x * x, axis=1, keepdims=True,
                               dtype=np.float32) + np.float32(1e-6))
    for term in dy * (x * rstd):
      dscale += term
  worst = _dscale(case, _to(dscale, case.dtype))
  assert worst.excess <= 0, worst


def test_dscale_zeroed_or_halved_fails(case):
  assert _dscale(case, np.zeros_like(case.dscale)).ratio > 10
  halved = _to(case.grads.dscale / 2, case.dtype)
  assert _dscale(case, halved).ratio > 10


@pytest.mark.parametrize("rows", [1, 8, 16])
def test_dx_rows_zeroed_fail(case, rows):
  start = case.m // 3
  with _changed(case.dx, slice(start, start + rows), 0) as dx:
    worst = _dx(case, dx)
  assert worst.ratio > 10, worst
  assert start <= worst.where[0] < start + rows


def test_one_element_two_ulps_beyond_its_bound_fails(case):
  i, j = case.m // 2, case.n // 2
  dx_bound, dscale_bound = _bounds(case, i, j)
  for ulps, passes in ((0, True), (2, False)):
    value = _at_bound(case.grads.dx[i, j], dx_bound, case.dtype, ulps)
    with _changed(case.dx, (i, j), value) as dx:
      worst = _dx(case, dx)
    assert (worst.excess <= 0) == passes, (ulps, worst)
    dscale = case.dscale.copy()
    dscale[j] = _at_bound(case.grads.dscale[j], dscale_bound, case.dtype,
                          ulps)
    worst = _dscale(case, dscale)
    assert (worst.excess <= 0) == passes, (ulps, worst)
    if not passes:
      assert worst.where == (j,)


def test_one_forward_element_beyond_its_bound_fails(case):
  _forward(case)
  i, j = case.m - 1, case.n - 1
  ref = case.y_ref[i, j]
  bound = (testing.tolerance(case.dtype, case.n) * abs(ref)
           + float(jnp.finfo(case.dtype).tiny))
  for ulps, passes in ((0, True), (2, False)):
    with _changed(case.y, (i, j), _at_bound(ref, bound, case.dtype,
                                            ulps)) as y:
      worst = testing.worst_excess(y, case.y_ref, case.dtype, case.n)
    assert (worst.excess <= 0) == passes, (ulps, worst)
  assert worst.where == (i, j)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_element_fails(case, value):
  with _changed(case.dx, (9, 3), value) as dx:
    worst = _dx(case, dx)
  assert worst.excess == np.inf and worst.where == (9, 3)
  with _changed(case.dscale, 11, value) as dscale:
    assert _dscale(case, dscale).excess == np.inf
  _forward(case)
  with _changed(case.y, (7, 5), value) as y:
    worst = testing.worst_excess(y, case.y_ref, case.dtype, case.n)
  assert worst.excess == np.inf and worst.where == (7, 5)
