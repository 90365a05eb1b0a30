"""Gradients of rms_norm and add_rms_norm, every implementation, against the
float64 oracle; transforms; the backward kernel's paths and limits."""

from __future__ import annotations

import dataclasses
import functools
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_rmsnorm
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import backward as triton_backward
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import forward as triton_forward
from tests.conftest import (IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, ON_GPU,
                            random_inputs)

DTYPES = ["float32", "bfloat16", "float16"]
# M = 1 and 13, N = 1 (dx is a difference of nearly equal terms), a prime N,
# Qwen's 896, N = 5120 (padded to 8192), several leading axes.
SHAPES = [(1, 1), (13, 1), (1, 5120), (13, 5120), (5, 1009), (2, 3, 896)]


def _seed(*key) -> int:
  return zlib.crc32(repr(key).encode())


def _grads(impl, x, scale, dy, residual=None, dh=None, **kwargs):
  """Gradients of <y, dy> (+ <h, dh>) in every array argument, under jit."""
  name, interpret = impl
  kwargs.update(implementation=name, interpret=interpret)

  def loss(x, residual, scale):
    if residual is None:
      y = jax_rmsnorm.rms_norm(x, scale, **kwargs)
      return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    y, h = jax_rmsnorm.add_rms_norm(x, residual, scale, **kwargs)
    return (jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
            + jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, residual, scale)


def _message(name, worst, got, want) -> str:
  got = np.asarray(got, np.float64).reshape(want.shape)
  return (f"{name}: error / bound {worst.ratio:.3g} at {worst.where}: got "
          f"{got[worst.where]!r}, want {want[worst.where]!r}")


def assert_grads_close(dx, dscale, ref: testing.Grads, dtype, scale_dtype):
  """dx per element, d(scale) per column, within testing's bounds."""
  assert dx.dtype == jnp.dtype(dtype)
  worst = testing.dx_excess(dx, ref, dtype)
  assert worst.excess <= 0, _message("dx", worst, dx, ref.dx)
  if ref.dscale is None:
    assert dscale is None
    return
  assert dscale.dtype == jnp.dtype(scale_dtype)
  worst = testing.dscale_excess(dscale, ref, scale_dtype)
  assert worst.excess <= 0, _message("dscale", worst, dscale, ref.dscale)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_grads_match_float64(impl, dtype, shape):
  x, scale = random_inputs(_seed(shape, dtype), shape, dtype)
  dy, _ = random_inputs(_seed(shape, dtype, "dy"), shape, dtype)
  dx, _, dscale = _grads(impl, x, scale, dy)
  assert_grads_close(dx, dscale, testing.oracle_grad(x, scale, dy), dtype,
                     dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grad_options(impl, dtype):
  """No scale; a float32 scale with low-precision x (Flax's param_dtype);
  Gemma's offset; float32 out_dtype; the Hugging Face cast order."""
  shape = (7, 1000)
  x, scale32 = random_inputs(_seed("opt", dtype), shape, dtype, "float32")
  dy, _ = random_inputs(_seed("opt-dy", dtype), shape, dtype)
  dx, _, dscale = _grads(impl, x, None, dy)
  assert_grads_close(dx, dscale, testing.oracle_grad(x, None, dy), dtype, None)

  dx, _, dscale = _grads(impl, x, scale32, dy)
  assert_grads_close(dx, dscale, testing.oracle_grad(x, scale32, dy), dtype,
                     "float32")

  dx, _, dscale = _grads(impl, x, scale32 - 1.0, dy, scale_offset=1.0,
                         epsilon=1e-2)
  ref = testing.oracle_grad(x, scale32 - 1.0, dy, epsilon=1e-2,
                            scale_offset=1.0)
  assert_grads_close(dx, dscale, ref, dtype, "float32")

  dy32, _ = random_inputs(_seed("opt-dy32", dtype), shape, "float32")
  dx, _, dscale = _grads(impl, x, scale32, dy32, out_dtype=jnp.float32)
  assert_grads_close(dx, dscale, testing.oracle_grad(x, scale32, dy32),
                     dtype, "float32")

  dx, _, dscale = _grads(impl, x, scale32, dy, cast_order="hf")
  # The kernels pass the rounding of xhat straight through; XLA's autodiff
  # of the reference rounds g = dy * scale to x's dtype on the way back (the
  # transpose of a rounding is that rounding), as PyTorch's autograd of
  # Hugging Face's code does.
  ref = testing.oracle_grad(
      x, scale32, dy, round_normalized_to=dtype,
      round_cotangent_to=dtype if impl[0] == "xla" else None)
  assert_grads_close(dx, dscale, ref, dtype, "float32")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,res_dtype", [
    ("bfloat16", "bfloat16"), ("float32", "float32"), ("float16", "float16"),
    ("bfloat16", "float32")], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (13, 5120), (2, 3, 896)], ids=str)
def test_add_rms_norm_grads_match_float64(impl, dtype, res_dtype, shape):
  """d(x) = d(residual) = dh + the gradient through y, at h's value."""
  x, scale = random_inputs(_seed("add", shape, dtype), shape, dtype, "float32")
  residual, _ = random_inputs(_seed("res", shape), shape, res_dtype)
  dy, _ = random_inputs(_seed("dy", shape), shape, res_dtype)
  dh, _ = random_inputs(_seed("dh", shape), shape, res_dtype)
  dx, dres, dscale = _grads(impl, x, scale, dy, residual=residual, dh=dh)
  h = jax_rmsnorm.add_rms_norm(x, residual, implementation="xla")[1]
  # XLA's autodiff rounds the gradient through y to h's dtype before adding
  # dh (h is an array of that dtype); the kernel adds in float32.
  ref = testing.oracle_grad(
      h, scale, dy, dh=dh,
      round_norm_grad_to=res_dtype if impl[0] == "xla" else None)
  assert_grads_close(dres, dscale, ref, res_dtype, "float32")
  assert_grads_close(dx, dscale, ref, dtype, "float32")


def test_oracle_matches_jax_grad_in_float64():
  """The numpy oracle's formulas agree with JAX's autodiff in float64."""
  x, scale = random_inputs(11, (5, 300), "float32")
  dy, _ = random_inputs(12, (5, 300), "float32")
  dh, _ = random_inputs(13, (5, 300), "float32")
  x, scale, dy, dh = (np.asarray(a, np.float64) for a in (x, scale, dy, dh))
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    def loss(x, w):
      xhat = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
      return jnp.sum(xhat * (0.5 + w) * dy) + jnp.sum(x * dh)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, scale)
    dx, dw = np.asarray(dx), np.asarray(dw)
  finally:
    jax.config.update("jax_enable_x64", previous)
  ref = testing.oracle_grad(x, scale, dy, scale_offset=0.5, dh=dh)
  np.testing.assert_allclose(ref.dx, dx, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ref.dscale, dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transforms(impl):
  """jit of grad, grad of jit, vmap of grad (batched scale too), remat."""
  name, interpret = impl
  norm = functools.partial(jax_rmsnorm.rms_norm, implementation=name,
                           interpret=interpret)
  x, scale = random_inputs(21, (3, 4, 896), "bfloat16", "float32")
  dy, _ = random_inputs(22, (3, 4, 896), "bfloat16")

  def loss(x, scale, dy):
    return jnp.sum(norm(x, scale).astype(jnp.float32) * dy)

  ref = testing.oracle_grad(x, scale, dy)
  dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale, dy)
  assert_grads_close(dx, dscale, ref, "bfloat16", "float32")
  dx2, dscale2 = jax.grad(jax.jit(loss), argnums=(0, 1))(x, scale, dy)
  np.testing.assert_array_equal(np.asarray(dx2), np.asarray(dx))
  np.testing.assert_array_equal(np.asarray(dscale2), np.asarray(dscale))
  dx3, dscale3 = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(
      x, scale, dy)
  np.testing.assert_array_equal(np.asarray(dx3), np.asarray(dx))
  np.testing.assert_array_equal(np.asarray(dscale3), np.asarray(dscale))

  # vmap of grad, one scale per batch entry.
  scales = jnp.stack([scale, 2 * scale, scale - 1])
  dxs, dscales = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(
      x, scales, dy)
  for i in range(3):
    ref = testing.oracle_grad(x[i], scales[i], dy[i])
    assert_grads_close(dxs[i], dscales[i], ref, "bfloat16", "float32")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_grad_batch_invariance_and_determinism(impl):
  """dx of a row does not depend on the batch around it; reruns agree
  bitwise, d(scale) included (fixed programs, no atomics)."""
  # 150 rows sum d(scale) in partials, their sub-batches by columns.
  x, scale = random_inputs(31, (150, 5120), "bfloat16")
  dy, _ = random_inputs(32, (150, 5120), "bfloat16")
  dx, _, dscale = _grads(impl, x, scale, dy)
  again = _grads(impl, x, scale, dy)
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(dx))
  np.testing.assert_array_equal(np.asarray(again[2]), np.asarray(dscale))
  for rows in (slice(0, 1), slice(20, 23), slice(140, 150)):
    part = _grads(impl, x[rows], scale, dy[rows])[0]
    np.testing.assert_array_equal(np.asarray(part), np.asarray(dx[rows]))


@pytest.mark.parametrize("interpret", [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="gpu", marks=pytest.mark.skipif(
        not ON_GPU, reason="compiled Pallas kernels need an NVIDIA GPU"))])
@pytest.mark.parametrize("config", [
    # Several rows a block, the last block partial; programs loop 3 times.
    triton_config.Config(block_rows=4, block_cols=1024, num_warps=4,
                         programs_per_sm=1),
    triton_config.Config(block_rows=4, block_cols=1024, num_warps=4,
                         programs_per_sm=1, prefetch=True),
    # A row as 4 chunks of 256, the last one partial.
    triton_config.Config(block_rows=2, block_cols=256, num_warps=2,
                         programs_per_sm=2, prefetch=True),
    # More programs than row blocks.
    triton_config.Config(block_rows=1, block_cols=1024, num_warps=4,
                         programs_per_sm=64),
    # The scale held across the loop, with and without prefetch.
    triton_config.Config(block_rows=4, block_cols=1024, num_warps=4,
                         programs_per_sm=1, prefetch=True, hold_scale=True),
    triton_config.Config(block_rows=2, block_cols=256, num_warps=2,
                         programs_per_sm=1, hold_scale=True),
    # d(scale) by column slices, a program summing one slice or several.
    triton_config.Config(block_rows=1, block_cols=1024, num_warps=4,
                         programs_per_sm=1, min_blocks_per_program=64,
                         dscale_by_columns=True),
    triton_config.Config(block_rows=2, block_cols=256, num_warps=2,
                         programs_per_sm=8, prefetch=True,
                         dscale_by_columns=True),
], ids=str)
def test_backward_kernel_configs(config, interpret):
  """Each path of the backward kernel at a non-power-of-two width, with the
  row count not a multiple of the rows a step covers, with and without dh."""
  x, scale = random_inputs(41, (23, 1000), "float32")
  dy, _ = random_inputs(42, (23, 1000), "float32")
  dh, _ = random_inputs(43, (23, 1000), "float32")
  rstd = triton_forward.forward(x, None, scale, epsilon=1e-6,
                                scale_offset=0.0, save_rstd=True,
                                interpret=True).rstd
  for extra in (None, dh):
    dx, dscale = jax.jit(functools.partial(
        triton_backward.backward, scale_offset=0.0, interpret=interpret,
        config=config))(x, dy, extra, scale, rstd)
    ref = testing.oracle_grad(x, scale, dy, dh=extra)
    assert_grads_close(dx, dscale, ref, "float32", "float32")


def test_backward_heuristic_is_pure_and_batch_independent():
  """Only how d(scale) is summed may change with the row count; all that
  shapes a row's arithmetic depends on n and dtype alone."""
  for n in (1, 7, 896, 5120, 14336, 16384):
    for dtype in DTYPES:
      configs = {m: triton_config.get_backward_config(m, n, dtype)
                 for m in (1, 13, 128, 129, 4096, 1 << 20)}
      assert configs[1] == triton_config.get_backward_config(1, n, dtype)
      assert configs[1].dscale_by_columns
      assert not configs[1 << 20].dscale_by_columns
      rows_free = {dataclasses.replace(c, dscale_by_columns=False)
                   for c in configs.values()}
      assert len(rows_free) == 1, (n, dtype, configs)
      (config,) = rows_free
      assert config.programs_per_sm > 0 and config.resident(n)


def test_rows_too_long_for_the_backward_use_the_reference_gradient(caplog):
  shape = (2, triton_config.MAX_ONE_PASS_COLS + 3)
  x, scale = random_inputs(51, shape, "float32")
  dy, _ = random_inputs(52, shape, "float32")
  # A sequence may fall back: the kernel's forward, the reference's gradient.
  with caplog.at_level(logging.DEBUG, logger="jax_rmsnorm"):
    dx, _, dscale = _grads((("triton", "xla"), True), x, scale, dy)
  assert "running 'xla'" in caplog.text
  assert_grads_close(dx, dscale, testing.oracle_grad(x, scale, dy), "float32",
                     "float32")
  # The kernel named alone fails loudly.
  with pytest.raises(NotImplementedError, match="limit"):
    _grads(("triton", True), x, scale, dy)
  with pytest.raises(NotImplementedError, match="limit"):
    triton_backward.backward(x, dy, None, scale, jnp.ones(shape[:1]),
                             scale_offset=0.0, interpret=True)


@pytest.mark.skipif(not ON_GPU, reason="compiled Pallas kernels need an "
                    "NVIDIA GPU")
@pytest.mark.parametrize("m,n,dtype", shapes.BENCHMARK_SHAPES,
                         ids=lambda v: str(v))
def test_benchmark_shapes_compiled_backward(m, n, dtype):
  x, scale = random_inputs(m * 7 + n, (m, n), dtype)
  dy, _ = random_inputs(m * 7 + n + 1, (m, n), dtype)
  dx, _, dscale = _grads(("triton", False), x, scale, dy)
  assert_grads_close(dx, dscale, testing.oracle_grad(x, scale, dy), dtype,
                     dtype)


def _in_float64(fn, *args):
  """`fn` of `args` in float64 (x64 mode, restored after)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    return jax.tree.map(np.asarray, fn(*(np.asarray(a, np.float64)
                                         for a in args)))
  finally:
    jax.config.update("jax_enable_x64", previous)


def _spec_loss(x, w, dy):
  """<rms_norm(x, w), dy>, written independently of the library."""
  xhat = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  return jnp.sum(xhat * w * dy)


def _second_order(loss):
  """(grad of <grad loss, v>, jvp of grad loss along v) w.r.t. (x, w)."""
  def hvp(x, w, dy, vx, vw):
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w, dy)
    return jnp.sum(gx.astype(jnp.float32) * vx) + jnp.sum(gw * vw)

  def both(x, w, dy, vx, vw):
    grad_of_grad = jax.grad(hvp, argnums=(0, 1))(x, w, dy, vx, vw)
    jvp_of_grad = jax.jvp(
        lambda x, w: jax.grad(loss, argnums=(0, 1))(x, w, dy), (x, w),
        (vx.astype(x.dtype), vw))[1]
    return (*grad_of_grad, *jvp_of_grad)
  return both


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape,dtype", [((5, 64), "float32"),
                                         ((13, 896), "float32"),
                                         ((7, 1000), "bfloat16")], ids=str)
def test_second_order_matches_float64(impl, shape, dtype):
  """grad of grad and jvp of grad: the kernels run the first order, the
  reference's arithmetic its derivative. Against JAX's float64 autodiff of
  an independent formula, by relative norm (no per-element sizes for a
  second derivative): each result is a derivative of the first order's
  float32 reductions, rounded once to its dtype, so the first order's
  budget (eps(dtype) + dx_bound_coefficient(n)) twice over, for the two
  derivatives chained."""
  name, interpret = impl
  x, w = random_inputs(_seed("2nd", shape), shape, dtype, "float32")
  dy, _ = random_inputs(_seed("2nd-dy", shape), shape, dtype)
  vx, vw = random_inputs(_seed("2nd-v", shape), shape, "float32")

  def loss(x, w, dy):
    y = jax_rmsnorm.rms_norm(x, w, implementation=name, interpret=interpret)
    return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

  got = jax.jit(_second_order(loss))(x, w, dy, vx, vw)
  ref = _in_float64(_second_order(_spec_loss), x, w, dy, vx, vw)
  bound = 2 * (float(jnp.finfo(dtype).eps)
               + testing.dx_bound_coefficient(shape[-1]))
  for g, r in zip(got, ref):
    err = testing.relative_error(g, r)
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_x64_mode(impl):
  """With jax_enable_x64: a float64 scale (x64's default dtype) is cast to
  float32 inside and its gradient comes back in float64; forward, gradients,
  add_rms_norm and the quantized output work in interpret mode and
  compiled, with the bits they have without x64."""
  name, interpret = impl
  norm = functools.partial(jax_rmsnorm.rms_norm, implementation=name,
                           interpret=interpret)
  x, scale = random_inputs(61, (6, 520), "bfloat16", "float32")
  dy, _ = random_inputs(62, (6, 520), "bfloat16")
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    scale64 = jnp.asarray(np.asarray(scale, np.float64))
    assert scale64.dtype == jnp.float64
    y = jax.jit(norm)(x, scale64)

    def loss(x, s):
      return jnp.sum(norm(x, s).astype(jnp.float32) * dy.astype(jnp.float32))

    dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale64)
    _, h = jax.jit(functools.partial(jax_rmsnorm.add_rms_norm,
                                     implementation=name,
                                     interpret=interpret))(x, x, scale64)
    y_q, row_scales = jax_rmsnorm.rms_norm_quantized(
        x, scale64, implementation=name, interpret=interpret)
  finally:
    jax.config.update("jax_enable_x64", previous)
  want_q, want_scales = jax_rmsnorm.rms_norm_quantized(
      x, scale, implementation=name, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(y_q), np.asarray(want_q))
  np.testing.assert_array_equal(np.asarray(row_scales),
                                np.asarray(want_scales))
  assert y.dtype == jnp.bfloat16 and dscale.dtype == jnp.float64
  testing_close = testing.worst_excess(y, testing.oracle(x, scale),
                                       "bfloat16", 520)[0]
  assert testing_close <= 0, testing_close
  assert_grads_close(dx, dscale.astype(jnp.float32),
                     testing.oracle_grad(x, scale, dy), "bfloat16", "float32")
  np.testing.assert_array_equal(np.asarray(h), np.asarray(x + x))


def _kernel_inputs(jaxpr, name: str) -> list[int]:
  """Number of operands of each pallas_call named `name` in a jaxpr."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call" and name in str(
        eqn.params.get("name_and_src_info", eqn.params.get("name", ""))):
      found.append(len(eqn.invars))
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        found += _kernel_inputs(inner, name)
  return found


def test_unused_outputs_cost_nothing_in_the_backward():
  """add_rms_norm with only y used: the backward kernel gets no dh (no zeros
  materialized); with only h used: no backward kernel, d(x) = d(residual) =
  dh passes straight through."""
  x, scale = random_inputs(71, (9, 256), "float32")
  res, _ = random_inputs(72, (9, 256), "float32")
  kernel = dict(implementation="triton", interpret=True)

  def y_only(x, r, s):
    return jnp.sum(jax_rmsnorm.add_rms_norm(x, r, s, **kernel)[0] ** 2)

  def h_only(x, r, s):
    return jnp.sum(jax_rmsnorm.add_rms_norm(x, r, s, **kernel)[1] * 3.0)

  grad = jax.grad(y_only, argnums=(0, 1, 2))
  def both(x, r, s):
    y, h = jax_rmsnorm.add_rms_norm(x, r, s, **kernel)
    return jnp.sum(y ** 2) + jnp.sum(h * 3.0)

  with_dh = jax.grad(both, argnums=(0, 1, 2))
  name = triton_backward.KERNEL_NAME
  # x (here h), dy, scale, rstd; dh only where h is used.
  assert _kernel_inputs(jax.make_jaxpr(grad)(x, res, scale).jaxpr,
                        name) == [4]
  assert _kernel_inputs(jax.make_jaxpr(with_dh)(x, res, scale).jaxpr,
                        name) == [5]
  dx, dres, dscale = jax.jit(jax.grad(h_only, argnums=(0, 1, 2)))(
      x, res, scale)
  assert not _kernel_inputs(
      jax.make_jaxpr(jax.grad(h_only, argnums=(0, 1, 2)))(
          x, res, scale).jaxpr, name)
  np.testing.assert_array_equal(np.asarray(dx), np.full(x.shape, 3.0))
  np.testing.assert_array_equal(np.asarray(dres), np.full(x.shape, 3.0))
  np.testing.assert_array_equal(np.asarray(dscale), np.zeros(256))
