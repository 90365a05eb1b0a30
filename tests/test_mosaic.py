"""The Mosaic GPU kernels on a CPU machine: Mosaic GPU interpret mode against
the float64 oracle, and the CUDA lowering (which enforces the GPU's rules:
TMA sizes and alignment, shared memory, layouts) without a GPU.

Interpret mode emulates the TMA copies, barriers and shared memory of a
`plgpu.kernel`, one warpgroup as one thread: it proves indexing, pipelining
and arithmetic, not the absence of races between the threads of a
warpgroup (those were checked on an H200 with benchmarks/mosaic_smoke.py).
The lowering tests prove the kernels compile to a Mosaic GPU custom call
for every width claimed supported, with the kernel name once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_rmsnorm
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.mosaic import backward as mosaic_backward
from jax_rmsnorm._src.mosaic import common
from jax_rmsnorm._src.mosaic import config as mosaic_config
from jax_rmsnorm._src.mosaic import forward as mosaic_forward
from jax_rmsnorm._src.mosaic import quantize as mosaic_quantize
from benchmarks import sweep
from tests import test_quantize
from tests.conftest import interpreted
from tests.test_lowering import _abstract_h100

EPS = 1e-6
_interpret_available = pytest.mark.skipif(
    not common.interpret_available(),
    reason=f"JAX {jax.__version__} has no Mosaic GPU interpret mode")


def requires_interpret(test):
  """Marks a test that runs the kernels interpreted only: skipped where this
  JAX has no Mosaic GPU interpreter, run on the CPU device on a GPU host
  (conftest's `interpreted`)."""
  return interpreted(_interpret_available(test))


requires_hopper = pytest.mark.skipif(
    not platform.on_cuda_gpu() or (platform.compute_capability() or 0) < 9.0,
    reason="compiled Mosaic GPU kernels need a Hopper GPU")


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  yield
  # The interpreter keeps global state that a kernel that raised leaves
  # behind; reset it so one failure does not fail the tests after it.
  common.reset_interpreter()


def _inputs(seed, shape, dtype, scale_dtype=None, residual_dtype=None):
  x, scale = testing.random_inputs(seed, shape, dtype, scale_dtype)
  residual = None
  if residual_dtype is not None:
    residual = testing.random_inputs(seed + 1, shape, residual_dtype)[0]
  return x, scale, residual


def _f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _assert_close(y, ref, dtype, n):
  excess, where = testing.worst_excess(y, ref, dtype, n)
  assert excess <= 0, (excess, where)


def _assert_grads_close(dx, dscale, grads, dtype, n, rows):
  """dx against the oracle in x's dtype; float32 d(scale) (not yet rounded
  to scale's dtype) against its sum of `rows` terms."""
  if hasattr(testing, "grads_excess"):  # Elementwise bounds.
    worst = testing.grads_excess(dx, dscale, grads, dtype, jnp.float32)
    assert worst.excess <= 0, worst
    return
  err = testing.relative_error(dx, grads.dx, grads.dx_size)
  assert err <= testing.grad_tolerance(dtype, n), err
  if dscale is not None:
    err = testing.relative_error(dscale, grads.dscale, grads.dscale_size)
    assert err <= testing.scale_grad_tolerance(jnp.float32, rows, n), err


# (shape, x dtype, residual dtype, scale dtype, offset, out dtype, order).
FORWARD_CASES = [
    ((5, 896), "bfloat16", None, "bfloat16", 0.0, None, "float32"),
    ((3, 1152), "float16", None, "float32", 1.0, None, "hf"),
    ((13, 1000), "bfloat16", "bfloat16", "bfloat16", 0.0, None, "float32"),
    ((2, 5, 3072), "bfloat16", "float32", "bfloat16", 0.0, None, "hf"),
    ((9, 5120), "float32", "float32", "float32", 0.0, "bfloat16", "hf"),
    ((2, 14336), "bfloat16", None, None, 0.0, None, "float32"),
    ((1, 4096), "bfloat16", None, "bfloat16", 0.0, "float32", "float32"),
    ((4, 256), "float32", None, None, 0.0, None, "float32"),
]


@requires_interpret
@pytest.mark.parametrize("shape,dtype,res_dtype,scale_dtype,offset,out_dtype,"
                         "cast_order", FORWARD_CASES, ids=str)
def test_forward_matches_oracle(shape, dtype, res_dtype, scale_dtype, offset,
                                out_dtype, cast_order):
  _check_forward(shape, dtype, res_dtype, scale_dtype, offset, out_dtype,
                 cast_order)


def _check_forward(shape, dtype, res_dtype, scale_dtype, offset, out_dtype,
                   cast_order, interpret=True):
  x, scale, residual = _inputs(1, shape, dtype, scale_dtype, res_dtype)
  if scale_dtype is None:
    scale = None
  n = shape[-1]
  kwargs = dict(epsilon=EPS, scale_offset=offset, out_dtype=out_dtype,
                cast_order=cast_order, save_rstd=True)
  fn = jax.jit(functools.partial(mosaic_forward.forward,
                                 interpret=interpret, **kwargs))
  y, h, rstd = fn(x, residual, scale)
  norm_dtype = dtype if residual is None else res_dtype
  assert y.dtype == jnp.dtype(out_dtype or norm_dtype) and y.shape == shape
  assert rstd.dtype == jnp.float32 and rstd.shape == shape[:-1]
  if residual is None:
    assert h is None
    normed = x
  else:  # h is x + residual in float32, rounded once: exactly XLA's.
    np.testing.assert_array_equal(np.asarray(h),
                                  np.asarray(reference.residual_add(x,
                                                                    residual)))
    normed = h
  if cast_order == "hf":
    # The normalized value is rounded to norm_dtype before the scale: the
    # reference's contract, checked against it (one rounding more than the
    # oracle models).
    ref = reference.forward(x, residual, scale, **kwargs).y
    _assert_close(y, _f64(ref), y.dtype, n)
  else:
    ref = testing.oracle(_f64(normed), None if scale is None else _f64(scale),
                         EPS, offset)
    _assert_close(y, ref, y.dtype, n)
  xf = _f64(normed)
  rstd_ref = 1 / np.sqrt(np.mean(xf * xf, -1) + EPS)
  np.testing.assert_allclose(_f64(rstd), rstd_ref, rtol=testing.tolerance(
      jnp.float32, n))


@pytest.fixture
def _split_rows(monkeypatch):
  """Forces the forward's rows split between `warpgroups` warpgroups
  wherever they split (mosaic_config.row_slices), whatever the measured
  table picks."""
  launched = []
  launch = common.launch

  def recording_launch(*args, **kwargs):
    launched.append(kwargs.get("warpgroups", 1))
    return launch(*args, **kwargs)

  monkeypatch.setattr(common, "launch", recording_launch)

  @contextlib.contextmanager
  def force(warpgroups):
    for op in ("forward", "quant"):
      monkeypatch.setitem(mosaic_config.ROW_SLICES, op,
                          {2: ((0, warpgroups),), 4: ((0, warpgroups),)})
    yield
    assert launched and set(launched) == {warpgroups}, launched
  return force


# Rows split between warpgroups: (shape, warpgroups, x dtype, residual dtype,
# scale dtype, offset, out dtype, order). Tail chunks in every slice (9216 /
# 4 = 4 x 512 + 256), the residual, out_dtype, two slices.
SPLIT_FORWARD_CASES = [
    ((3, 9216), 4, "bfloat16", "float32", "float32", 0.0, None, "hf"),
    ((2, 12288), 4, "float32", None, "float32", 1.0, "bfloat16", "float32"),
    ((2, 2, 5120), 2, "bfloat16", None, "bfloat16", 0.0, None, "float32"),
]


@requires_interpret
@pytest.mark.parametrize("shape,warpgroups,dtype,res_dtype,scale_dtype,"
                         "offset,out_dtype,cast_order", SPLIT_FORWARD_CASES,
                         ids=str)
def test_forward_rows_split_between_warpgroups(
    _split_rows, shape, warpgroups, dtype, res_dtype, scale_dtype, offset,
    out_dtype, cast_order):
  """The forward with each row's columns split between warpgroups (the sum
  of squares handed over through shared memory, common.RowTotals): the
  same checks as test_forward_matches_oracle."""
  with _split_rows(warpgroups):
    _check_forward(shape, dtype, res_dtype, scale_dtype, offset, out_dtype,
                   cast_order)


# The quantized output: (shape, x dtype, residual dtype, quant dtype, scale
# mode, cast order). Every quant dtype and scale mode, a residual of x's
# dtype and of float32, a chunk tail (896 = 512 + tail, 1040), one row.
QUANT_CASES = [
    ((5, 896), "bfloat16", None, "float8_e4m3fn", "dynamic", "float32"),
    ((3, 1024), "bfloat16", "bfloat16", "int8", "channel", "float32"),
    ((4, 1040), "float32", None, "float8_e5m2", "scalar", "hf"),
    ((2, 4096), "bfloat16", "float32", "float8_e4m3fn", "dynamic", "float32"),
    ((1, 2048), "float16", None, "int8", "dynamic", "hf"),
    ((7, 512), "bfloat16", "bfloat16", "float8_e5m2", "channel", "float32"),
]


def _mosaic_quantized(quant_dtype, cast_order="float32", interpret=True):
  return jax.jit(functools.partial(
      mosaic_quantize.forward, epsilon=EPS, scale_offset=0.0,
      quant_dtype=quant_dtype, cast_order=cast_order, interpret=interpret))


@requires_interpret
@pytest.mark.parametrize("shape,dtype,res_dtype,quant_dtype,mode,cast_order",
                         QUANT_CASES, ids=str)
def test_quantized_matches_oracle(shape, dtype, res_dtype, quant_dtype, mode,
                                  cast_order):
  _check_quantized(shape, dtype, res_dtype, quant_dtype, mode, cast_order)


def _check_quantized(shape, dtype, res_dtype, quant_dtype, mode, cast_order,
                     interpret=True):
  """The Mosaic kernel's quantized output, judged as test_quantize judges
  every implementation: codes within their bound of the float64 y over the
  scale used, dynamic scales within tolerance of max|y| / qmax, h exact."""
  n = shape[-1]
  x, residual, scale = test_quantize._inputs(shape, dtype, res_dtype)
  quant_scale = (None if mode == "dynamic"
                 else test_quantize._static_scale(mode, n, quant_dtype))
  y_q, s, h = _mosaic_quantized(quant_dtype, cast_order, interpret)(
      x, residual, scale, quant_scale)
  assert y_q.shape == x.shape and y_q.dtype == jnp.dtype(quant_dtype)
  if residual is None:
    assert h is None
  else:
    np.testing.assert_array_equal(np.asarray(h),
                                  test_quantize.oracle_h(x, residual))
  norm_dtype = dtype if residual is None else res_dtype
  y64 = test_quantize.oracle_y(x, residual, scale, cast_order=cast_order)
  rel = test_quantize.relative_error_bound(n, cast_order, norm_dtype)
  if mode == "dynamic":
    assert s.shape == shape[:-1] + (1,) and s.dtype == jnp.float32
    test_quantize.assert_scales_close(s, y64, quant_dtype, n)
    test_quantize.assert_top_code(y_q, quant_dtype)
  else:
    assert s is None
    s = quant_scale
  test_quantize.assert_quantized_close(y_q, s, y64, quant_dtype, rel)


# Split rows (4 warpgroups): the dynamic scale's amax folded into the sum
# of squares' handover, or a handover of its own after it (a residual, the
# hf order); a static scale's reciprocal in slices.
SPLIT_QUANT_CASES = [
    ((3, 10240), "bfloat16", None, "int8", "dynamic", "float32"),
    ((2, 9216), "bfloat16", "bfloat16", "float8_e4m3fn", "dynamic", "float32"),
    ((2, 8704), "float32", None, "float8_e5m2", "dynamic", "hf"),
    ((2, 16384), "float32", None, "float8_e4m3fn", "channel", "float32"),
    ((2, 9216), "bfloat16", "bfloat16", "int8", "scalar", "float32"),
]


@requires_interpret
@pytest.mark.parametrize("shape,dtype,res_dtype,quant_dtype,mode,cast_order",
                         SPLIT_QUANT_CASES, ids=str)
def test_quantized_rows_split_between_warpgroups(
    _split_rows, shape, dtype, res_dtype, quant_dtype, mode, cast_order):
  with _split_rows(4):
    _check_quantized(shape, dtype, res_dtype, quant_dtype, mode, cast_order)


@requires_interpret
def test_quantized_saturates_and_contains_nan():
  """A static scale 100x too small clips to +-qmax (interpret mode clips
  as Hopper's satfinite convert does); a NaN stays in its row."""
  x, _, scale = test_quantize._inputs((4, 512), "bfloat16")
  x = x.at[2, 7].set(jnp.nan)
  y_q = _mosaic_quantized("float8_e4m3fn")(x, None, scale,
                                           jnp.float32(1e-4)).y_q
  codes = _f64(y_q)
  top = float(jnp.finfo(jnp.float8_e4m3fn).max)
  finite = np.delete(codes, 2, axis=0)
  assert np.all(np.abs(finite) <= top) and np.any(np.abs(finite) == top)
  assert np.isnan(codes[2]).any()
  y_q, s, _ = _mosaic_quantized("float8_e4m3fn")(x, None, scale, None)
  assert np.isfinite(_f64(s)[[0, 1, 3]]).all()
  assert np.isfinite(_f64(y_q)[[0, 1, 3]]).all()


@requires_interpret
def test_quantized_rows_do_not_depend_on_the_batch():
  """A row's codes and scale are the same bits alone, in a block of rows,
  or at another place in the batch."""
  x, residual, scale = test_quantize._inputs((9, 1024), "bfloat16",
                                             "bfloat16")
  fn = _mosaic_quantized("float8_e4m3fn")
  bits = lambda a: np.asarray(a).view(np.uint8 if a.dtype.itemsize == 1
                                      else np.uint32)
  full = fn(x, residual, scale, None)
  for rows in (slice(0, 1), np.array([8, 3, 5])):
    part = fn(x[rows], residual[rows], scale, None)
    for p, f in zip(part, full):
      np.testing.assert_array_equal(bits(p), bits(f)[rows])


# (shape, x dtype, dy dtype, dh, scale dtype, offset, cast order).
BACKWARD_CASES = [
    ((5, 896), "bfloat16", "bfloat16", False, "bfloat16", 0.0, "float32"),
    ((13, 1000), "bfloat16", "bfloat16", True, "float32", 0.0, "float32"),
    ((9, 5120), "float32", "float32", False, "float32", 1.0, "hf"),
    ((3, 4096), "float16", "float16", True, None, 0.0, "float32"),
    ((1, 8192), "bfloat16", "bfloat16", False, "bfloat16", 0.0, "hf"),
    ((6, 2048), "bfloat16", "float32", False, "bfloat16", 0.0, "float32"),
    # Rows split between warpgroups (mosaic_config.row_slices): two
    # slices with a tail chunk each, and dh; four (the float32 scale held in
    # registers); four in one stage (the scale in shared memory), and held
    # in registers again, with tail chunks and dh.
    ((3, 5248), "bfloat16", "bfloat16", True, "float32", 0.0, "hf"),
    ((2, 14336), "bfloat16", "bfloat16", False, "float32", 0.0, "float32"),
    ((2, 12288), "float32", "float32", True, "float32", 1.0, "float32"),
    ((3, 13312), "float32", "float32", True, "float32", 0.0, "hf"),
]


@requires_interpret
@pytest.mark.parametrize("shape,dtype,dy_dtype,has_dh,scale_dtype,offset,"
                         "cast_order", BACKWARD_CASES, ids=str)
def test_backward_matches_oracle(shape, dtype, dy_dtype, has_dh, scale_dtype,
                                 offset, cast_order):
  x, scale, _ = _inputs(2, shape, dtype, scale_dtype)
  if scale_dtype is None:
    scale = None
  dy = testing.random_inputs(3, shape, dy_dtype)[0]
  dh = testing.random_inputs(4, shape, dtype)[0] if has_dh else None
  rstd = reference.forward(x, None, scale, epsilon=EPS, scale_offset=offset,
                           save_rstd=True).rstd
  fn = jax.jit(functools.partial(mosaic_backward.backward, scale_offset=offset,
                                 cast_order=cast_order, interpret=True))
  dx, dscale = fn(x, dy, dh, scale, rstd)
  assert dx.dtype == x.dtype and dx.shape == shape
  if scale is None:
    assert dscale is None
  else:
    assert dscale.dtype == jnp.float32 and dscale.shape == shape[-1:]
  # The oracle's scale is offset + scale; its offset argument adds it.
  grads = testing.oracle_grad(
      x, scale, dy, EPS, offset,
      round_normalized_to=x.dtype if cast_order == "hf" else None, dh=dh)
  _assert_grads_close(dx, dscale, grads, dtype, shape[-1], x.size // shape[-1])


@requires_interpret
@pytest.mark.parametrize("n,dtype,rows", [
    (896, "bfloat16", 1),    # one row: the 1-D chunk path against 2-D
    (1000, "bfloat16", 8),   # the overlapping tail chunk
    (5120, "float32", 2),    # the chunk loop
    (5120, "bfloat16", 3),   # the backward's rows split in two slices
], ids=str)
def test_rows_do_not_depend_on_the_batch(n, dtype, rows):
  """A row's bits (y, rstd, dx) are the same alone as among others."""
  x, scale, _ = _inputs(5, (16, n), dtype)
  dy = testing.random_inputs(6, (16, n), dtype)[0]
  fwd = jax.jit(functools.partial(mosaic_forward.forward, epsilon=EPS,
                                  scale_offset=0.0, save_rstd=True,
                                  interpret=True))
  bwd = jax.jit(functools.partial(mosaic_backward.backward, scale_offset=0.0,
                                  interpret=True))
  y, _, rstd = fwd(x, None, scale)
  y_few, _, rstd_few = fwd(x[:rows], None, scale)
  np.testing.assert_array_equal(np.asarray(y_few), np.asarray(y[:rows]))
  np.testing.assert_array_equal(np.asarray(rstd_few), np.asarray(rstd[:rows]))
  dx = bwd(x, dy, None, scale, rstd)[0]
  dx_few = bwd(x[:rows], dy[:rows], None, scale, rstd[:rows])[0]
  np.testing.assert_array_equal(np.asarray(dx_few), np.asarray(dx[:rows]))


@requires_interpret
def test_public_api_runs_the_mosaic_kernels():
  """rms_norm / add_rms_norm with implementation='mosaic' under jit and
  grad, through dispatch and the custom_vjp. One row (a 1-D x): with
  leading axes the ops go through custom_partitioning, which cannot lower
  the interpreter's ordered io_callbacks (KeyError: OrderedIOEffect) where
  it is not bypassed (one device)."""
  x, scale, residual = _inputs(7, (1024,), "bfloat16", "float32", "bfloat16")
  norm = functools.partial(jax_rmsnorm.rms_norm, implementation="mosaic",
                           interpret=True)
  y = jax.jit(norm)(x, scale)
  _assert_close(y, testing.oracle(x, scale), "bfloat16", 1024)
  y2, h = jax.jit(functools.partial(jax_rmsnorm.add_rms_norm,
                                    implementation="mosaic",
                                    interpret=True))(x, residual, scale)
  _assert_close(y2, testing.oracle(h, scale), "bfloat16", 1024)

  dy = testing.random_inputs(8, x.shape, "float32")[0]

  def loss(x, scale):
    return jnp.sum(norm(x, scale).astype(jnp.float32) * dy)
  dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
  # y's cotangent is dy in y's dtype (bfloat16).
  grads = testing.oracle_grad(x, scale, dy.astype(jnp.bfloat16), EPS)
  dx_err = testing.relative_error(dx, grads.dx, np.linalg.norm(grads.dx))
  assert dx_err < 1e-2, dx_err  # bf16 dx: about an ulp in norm.
  dscale_err = testing.relative_error(dscale, grads.dscale,
                                      np.linalg.norm(grads.dscale))
  assert dscale_err < 1e-5, dscale_err  # float32 products, rounded once.


@requires_interpret
def test_kernel_under_vmap():
  """vmap of the forward: plgpu.kernel's own batching of the launch."""
  x, scale, _ = _inputs(9, (3, 2, 1024), "bfloat16")
  fwd = functools.partial(mosaic_forward.forward, epsilon=EPS,
                          scale_offset=0.0, interpret=True)
  y = jax.jit(jax.vmap(lambda x: fwd(x, None, scale).y))(x)
  _assert_close(y, testing.oracle(x, scale), "bfloat16", 1024)


# ---------------------------------------------------------------------------
# Limits.

HIDDEN_SIZES = [896, 1152, 2048, 3072, 4096, 5120, 8192, 14336, 16384]


@pytest.mark.parametrize("n", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_hidden_sizes_are_supported(n, dtype):
  for m in (1, 4096):
    common.check_supported(m, n, dtype)
    common.check_supported(m, n, dtype, backward=True)
  common.check_supported(1, n)  # Any dtype.


@pytest.mark.parametrize("m,n,dtype,reason", [
    (4, 4099, "bfloat16", "16-byte"),      # rows not 16-byte aligned
    (4, 4098, "float32", "16-byte"),
    (4, 64, "bfloat16", "chunk"),           # shorter than one chunk
    (3, 1000, "bfloat16", "multiple of 8"),  # 128-byte copies need 8 rows
    (2, 1 << 16, "float32", "shared memory"),
])
def test_unsupported_shapes_are_refused_with_a_reason(m, n, dtype, reason):
  with pytest.raises(NotImplementedError, match=reason):
    common.check_supported(m, n, dtype, backward=True)


def test_forward_refuses_what_check_supported_refuses():
  x = jnp.zeros((4, 4099), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="16-byte"):
    mosaic_forward.forward(x, None, None, epsilon=EPS, scale_offset=0.0)


def test_config_is_a_function_of_the_row():
  """Everything that shapes a row's arithmetic (vec, hence chunks and
  reduction order) depends on n and the dtypes; rows per block shrink for
  few rows only."""
  config = mosaic_config.get_config(4096, 8192, 2, 0, 1, 8192)
  assert config.vec == 8 and config.chunk_cols == 1024
  few = config.for_rows(3, 1, sm_count=132)
  assert few.vec == config.vec and few.block_rows == 1
  assert mosaic_config.pick_vec(896, 2) == 4    # 2 chunks, the 2nd a tail
  assert mosaic_config.pick_vec(5120, 4) == 4
  assert mosaic_config.row_multiple(4096) == 1
  assert mosaic_config.row_multiple(1000) == 8
  # Rows split between warpgroups where measured to win, if they split.
  # Split rows read chunks of float32 at least (the handed-over totals),
  # with or without a float32 operand.
  slices = functools.partial(mosaic_config.row_slices, "backward")
  assert slices(4096, 4, 2, [2, 2, 4]) == (1, 4)
  assert slices(5120, 4, 2, [2, 2, 4]) == (2, 4)
  assert slices(14336, 4, 2, [2, 2, 4]) == (4, 4)
  assert slices(14336, 2, 2, [2, 2]) == (4, 4)  # no scale: float32 chunks
  assert slices(4096, 2, 2, [2, 2]) == (1, 2)
  assert slices(8192, 4, 4, [4, 4, 4]) == (1, 4)
  assert slices(14336, 4, 4, [4, 4]) == (4, 4)
  assert slices(8200, 2, 2, [2, 2]) == (1, 2)  # no 128-byte slices
  # The forward's measured choices: wide rows only, fewer slices with
  # quantized codes out.
  assert mosaic_config.row_slices("forward", 14336, 2, 2, [2, 2]) == (4, 4)
  assert mosaic_config.row_slices("forward", 8192, 2, 2, [2, 2]) == (1, 2)
  assert mosaic_config.row_slices("forward", 8192, 4, 4, [4, 4]) == (4, 4)
  assert mosaic_config.row_slices("quant", 14336, 2, 2, [2, 1]) == (2, 4)
  with pytest.raises(ValueError, match="one row"):
    mosaic_config.Config(vec=4, block_rows=2, stages=1, warpgroups=2)
  # The scale held in registers where rows are split between warpgroups
  # and it is not in shared memory (and a slice's chunks are unrolled).
  split = mosaic_config.Config(vec=4, block_rows=1, stages=2, warpgroups=4,
                               scale_in_smem=False)
  held = mosaic_config.backward_scale_in_registers
  assert held(split, 7, 4)
  assert not held(split, 7, 0)  # no scale
  assert not held(split, 7, 2)  # a bf16 scale (measured to lose)
  assert not held(split, 9, 4)  # chunks in a loop
  assert not held(dataclasses.replace(split, scale_in_smem=True), 7, 4)
  assert not held(dataclasses.replace(split, warpgroups=1), 7, 4)


@pytest.mark.usefixtures("_sm90_grid")
def test_dynamic_quantized_output_launches_more_ctas():
  """The quantized output whose amax is folded into the first pass tries 4,
  then 3 CTAs an SM of two stages first (`mosaic_config._CTAS_FIRST`,
  measured faster); a static scale, a residual and the plain forward keep
  two CTAs of three stages."""
  x = jax.ShapeDtypeStruct((32768, 4096), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  launched = lambda fn, *args, **kw: sweep.launched_config(
      functools.partial(fn, epsilon=EPS, scale_offset=0.0, **kw), *args)
  quant = functools.partial(mosaic_quantize.forward,
                            quant_dtype=jnp.float8_e4m3fn)
  place = lambda c: (c.ctas_per_sm, c.block_rows, c.stages)
  assert place(launched(quant, x, None, scale, None)) == (3, 2, 2)
  narrow = jax.ShapeDtypeStruct((65536, 896), jnp.bfloat16)
  assert place(launched(quant, narrow, None,
                        jax.ShapeDtypeStruct((896,), jnp.bfloat16),
                        None)) == (4, 8, 2)
  static = jax.ShapeDtypeStruct((), jnp.float32)
  assert place(launched(quant, x, None, scale, static)) == (2, 2, 3)
  assert place(launched(quant, x, x, scale, None))[0] == 2
  assert place(launched(quant, x, None, scale, None, cast_order="hf"))[0] == 2
  assert place(launched(mosaic_forward.forward, x, None, scale)) == (2, 4, 3)


@pytest.mark.usefixtures("_sm90_grid")
def test_per_channel_reciprocal_goes_to_shared_memory_first():
  """A per-channel static scale's reciprocal and the scale go to shared
  memory on fewer CTAs or stages rather than stay in GMEM (`get_config`'s
  columns_first; measured faster); one static value leaves the launch
  alone."""
  launched = lambda m, n, dtype, quant_scale: sweep.launched_config(
      functools.partial(mosaic_quantize.forward, epsilon=EPS,
                        scale_offset=0.0, quant_dtype=jnp.float8_e4m3fn),
      jax.ShapeDtypeStruct((m, n), dtype), None,
      jax.ShapeDtypeStruct((n,), dtype), quant_scale)
  place = lambda c: (c.ctas_per_sm, c.stages, c.scale_in_smem)
  channel = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32)
  one = jax.ShapeDtypeStruct((), jnp.float32)
  assert place(launched(4096, 14336, jnp.bfloat16, channel(14336))) == (
      1, 3, True)
  assert place(launched(16384, 8192, jnp.bfloat16, channel(8192))) == (
      2, 2, True)
  assert place(launched(16384, 8192, jnp.float32, channel(8192))) == (
      1, 3, True)
  assert place(launched(4096, 14336, jnp.float32, channel(14336))) == (
      1, 1, True)
  assert place(launched(16384, 8192, jnp.bfloat16, one)) == (2, 3, True)


@requires_interpret
@pytest.mark.parametrize("shape,dtype,res_dtype,quant_dtype,cast_order", [
    ((6, 1024), "bfloat16", "float32", None, "hf"),        # h held, y
    ((5, 640), "bfloat16", None, "float8_e4m3fn", "float32"),  # folded amax
    ((4, 768), "float32", "float32", "int8", "float32"),   # the amax pass
], ids=str)
def test_held_chunks_and_chunks_read_again_agree(shape, dtype, res_dtype,
                                                 quant_dtype, cast_order):
  """Config.hold_chunks changes where pass 2 (and the amax pass) read a
  chunk, not its value: the outputs of both ways are identical bit for bit
  (and the held way's are checked against the oracle by the tests above,
  since the heuristic holds these)."""
  x, scale, residual = _inputs(1, shape, dtype, dtype, res_dtype)
  if quant_dtype is None:
    fn = functools.partial(mosaic_forward.forward, epsilon=EPS,
                           scale_offset=0.0, cast_order=cast_order,
                           save_rstd=True, interpret=True)
    args = (x, residual, scale)
  else:
    fn = functools.partial(mosaic_quantize.forward, epsilon=EPS,
                           scale_offset=0.0, quant_dtype=quant_dtype,
                           cast_order=cast_order, interpret=True)
    args = (x, residual, scale, None)
  config = sweep.launched_config(fn, *args)
  assert config.hold_chunks
  held = jax.jit(functools.partial(fn, config=config))(*args)
  again = jax.jit(functools.partial(
      fn, config=dataclasses.replace(config, hold_chunks=False)))(*args)
  for a, b in zip(held, again):
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32))


@requires_interpret
@pytest.mark.parametrize("shape,dtype,res_dtype", [
    ((5, 1024), "bfloat16", None),
    ((3, 2560), "float32", "float32"),      # a tail chunk
], ids=str)
def test_per_channel_reciprocal_in_shared_memory_or_not(shape, dtype,
                                                        res_dtype):
  """A per-channel static scale's reciprocal is copied into shared memory
  with the scale (Config.scale_in_smem) or read from GMEM chunk by chunk:
  the same codes bit for bit; where a scale of one value is given, its
  reciprocal is read once a block (checked against the oracle by the
  tests above)."""
  x, residual, scale = test_quantize._inputs(shape, dtype, res_dtype)
  quant_scale = test_quantize._static_scale("channel", shape[-1],
                                            "float8_e4m3fn")
  fn = functools.partial(mosaic_quantize.forward, epsilon=EPS,
                         scale_offset=0.0, quant_dtype="float8_e4m3fn",
                         interpret=True)
  args = (x, residual, scale, quant_scale)
  config = sweep.launched_config(fn, *args)
  assert config.scale_in_smem
  outs = [jax.jit(functools.partial(fn, config=dataclasses.replace(
      config, scale_in_smem=in_smem)))(*args) for in_smem in (True, False)]
  for a, b in zip(*outs):
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32))


@pytest.mark.usefixtures("_sm90_grid")
def test_forward_holds_its_chunks_where_they_are_unrolled_and_fit():
  """Config.hold_chunks: pass 1's chunks kept in registers for pass 2
  where a row slice's chunks are unrolled and a block's fit in 128
  float32 values a thread (`forward_holds_chunks`)."""
  launched = lambda m, n, dtype: sweep.launched_config(
      functools.partial(mosaic_forward.forward, epsilon=EPS,
                        scale_offset=0.0),
      jax.ShapeDtypeStruct((m, n), dtype), None, None)
  assert launched(32768, 4096, jnp.bfloat16).hold_chunks  # 4 x 8 x 4
  assert launched(65536, 896, jnp.bfloat16).hold_chunks   # a tail chunk
  assert launched(4096, 14336, jnp.float32).hold_chunks   # 7 a slice
  holds = mosaic_config.forward_holds_chunks
  config = mosaic_config.Config(vec=8, block_rows=4, stages=3)
  assert holds(config, 4, True) and not holds(config, 5, True)
  assert not holds(config, 2, False)  # chunks in a loop
  with pytest.raises(ValueError, match="hold_chunks"):
    mosaic_forward.forward(
        jnp.zeros((4, 128 * 8 * 9), jnp.bfloat16), None, None, epsilon=EPS,
        scale_offset=0.0, interpret=True,
        config=mosaic_config.Config(vec=8, block_rows=1, stages=1,
                                    hold_chunks=True))


# ---------------------------------------------------------------------------
# CUDA lowering without a GPU.

def _lower_for_cuda(fn, *args) -> str:
  with _abstract_h100():
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def _sm90_grid(monkeypatch):
  # A GPU's grid (132 SMs, not interpret mode's 2): the real launch.
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)


def _assert_one_kernel(text: str, name: str) -> None:
  """One Mosaic GPU custom call, and it is the named kernel (a silent
  fallback to XLA, or a second launch, fails)."""
  calls = [l for l in text.splitlines() if "custom_call" in l]
  assert len(calls) == 1, [c[:200] for c in calls]
  assert "mosaic_gpu" in calls[0] and name in calls[0], calls[0][:200]


def _struct(shape, dtype):
  return None if dtype is None else jax.ShapeDtypeStruct(shape, dtype)


# (m, n, x dtype, residual dtype, scale dtype, out dtype): every hidden size
# claimed, both dtypes, the residual, a scale of another dtype, out_dtype.
LOWERING_CASES = [
    (32768, 896, "bfloat16", None, "bfloat16", None),
    (4096, 1152, "float16", "float16", "float32", None),
    (8192, 3072, "bfloat16", "bfloat16", "bfloat16", None),
    (32768, 4096, "bfloat16", None, "bfloat16", None),
    (8192, 5120, "float32", None, "float32", "bfloat16"),
    (16384, 8192, "bfloat16", "float32", "bfloat16", None),
    (4096, 14336, "bfloat16", None, "float32", None),
    (4096, 14336, "bfloat16", None, None, None),   # split rows, no scale
    (8192, 5120, "bfloat16", "bfloat16", None, None),
    (4096, 14336, "float32", "float32", "float32", None),
    (64, 16384, "float32", "float32", "float32", "bfloat16"),
    (1, 8192, "bfloat16", None, "bfloat16", None),
    (16, 1000, "bfloat16", None, "bfloat16", None),
]


@pytest.mark.usefixtures("_sm90_grid")
@pytest.mark.parametrize("m,n,dtype,res_dtype,scale_dtype,out_dtype",
                         LOWERING_CASES, ids=str)
def test_kernels_lower_for_cuda(m, n, dtype, res_dtype, scale_dtype,
                                out_dtype):
  x = _struct((m, n), dtype)
  residual = _struct((m, n), res_dtype)
  scale = _struct((n,), scale_dtype)
  fwd = functools.partial(mosaic_forward.forward, epsilon=EPS,
                          scale_offset=0.0, out_dtype=out_dtype,
                          cast_order="hf", save_rstd=True)
  _assert_one_kernel(_lower_for_cuda(fwd, x, residual, scale),
                     mosaic_forward.KERNEL_NAME)

  normed = residual if residual is not None else x
  dy = _struct((m, n), out_dtype or normed.dtype)
  dh = None if residual is None else normed
  rstd = _struct((m,), "float32")
  bwd = functools.partial(mosaic_backward.backward, scale_offset=1.0,
                          cast_order="hf")
  _assert_one_kernel(_lower_for_cuda(bwd, normed, dy, dh, scale, rstd),
                     mosaic_backward.KERNEL_NAME)


# The quantized kernel: every quant dtype and scale mode, the residual, the
# widths of the large shapes (896 with a tail), a scale of x's dtype (the
# per-channel reciprocal, float32, then fixes vec: at most 16 bytes a
# thread from shared memory).
QUANT_LOWERING_CASES = [
    (32768, 896, "bfloat16", None, "float8_e4m3fn", "dynamic", "float32"),
    (32768, 4096, "bfloat16", "bfloat16", "float8_e4m3fn", "dynamic",
     "float32"),
    (8192, 5120, "bfloat16", None, "int8", "channel", "float32"),
    (4096, 14336, "bfloat16", "bfloat16", "float8_e5m2", "scalar", "float32"),
    (16, 4096, "float32", None, "int8", "dynamic", "float32"),
    (32768, 4096, "float32", "float32", "float8_e4m3fn", "channel",
     "float32"),
    (65536, 896, "bfloat16", None, "float8_e4m3fn", "scalar", "bfloat16"),
    (32768, 4096, "bfloat16", None, "float8_e4m3fn", "channel", "bfloat16"),
]


@pytest.mark.usefixtures("_sm90_grid")
@pytest.mark.parametrize("m,n,dtype,res_dtype,quant_dtype,mode,scale_dtype",
                         QUANT_LOWERING_CASES, ids=str)
def test_quantized_kernel_lowers_for_cuda(m, n, dtype, res_dtype, quant_dtype,
                                          mode, scale_dtype):
  x = _struct((m, n), dtype)
  residual = _struct((m, n), res_dtype)
  scale = _struct((n,), scale_dtype)
  quant_scale = {"dynamic": None, "scalar": _struct((), "float32"),
                 "channel": _struct((n,), "float32")}[mode]
  fn = functools.partial(mosaic_quantize.forward, epsilon=EPS,
                         scale_offset=0.0, quant_dtype=quant_dtype)
  _assert_one_kernel(_lower_for_cuda(fn, x, residual, scale, quant_scale),
                     mosaic_quantize.KERNEL_NAME)


@pytest.mark.usefixtures("_sm90_grid")
@pytest.mark.parametrize("warpgroups", [2, 4])
def test_split_rows_lower_for_cuda(_split_rows, warpgroups):
  """The forward with rows split between warpgroups, for CUDA: plain (y
  not in place, a residual), and quantized with one handover (the amax
  folded in) and two (a residual)."""
  x = _struct((4096, 14336), "bfloat16")
  scale = _struct((14336,), "float32")
  with _split_rows(warpgroups):
    fwd = functools.partial(mosaic_forward.forward, epsilon=EPS,
                            scale_offset=0.0, out_dtype="float32",
                            save_rstd=True)
    _assert_one_kernel(_lower_for_cuda(fwd, x, x, scale),
                       mosaic_forward.KERNEL_NAME)
    for residual in (None, x):
      fn = functools.partial(mosaic_quantize.forward, epsilon=EPS,
                             scale_offset=0.0, quant_dtype="float8_e4m3fn")
      _assert_one_kernel(_lower_for_cuda(fn, x, residual, scale, None),
                         mosaic_quantize.KERNEL_NAME)


@pytest.mark.usefixtures("_sm90_grid")
def test_default_quantized_output_runs_the_tables_kernel(
    monkeypatch):
  """The speed table runs the Mosaic kernel for the dynamic scale of large
  aligned rows of medium width without a residual (with one, Triton's
  since the quantized kernel's L2 hints), Triton's for unaligned and small
  ones, without a residual for bf16 rows of 14336 and for bf16 rows of 8M
  to 32M elements (the 'mid' class; a mid class without records of its
  own, 1024 x 14336, takes the large one's choice;
  benchmarks/results/speed_table_h200.log): one custom call, the chosen
  kernel's."""
  monkeypatch.setattr(platform, "compute_capability", lambda: 9.0)
  fn = functools.partial(jax_rmsnorm.rms_norm_quantized,
                         quant_dtype="float8_e4m3fn")
  # (shape, dtype, kernel without a residual, with one)
  for shape, dtype, names in [((8192, 4096), "float32",
                               ("mosaic", "triton")),
                              ((4096, 4099), "float32", ("triton",) * 2),
                              ((8192, 4096), "bfloat16",
                               ("mosaic", "triton")),
                              ((2048, 4096), "bfloat16",
                               ("triton", "mosaic")),
                              ((1024, 4096), "bfloat16", ("triton",) * 2),
                              ((1024, 14336), "bfloat16",
                               ("triton", "mosaic"))]:
    x = _struct(shape, dtype)
    scale = _struct(shape[-1:], dtype)
    for residual, name in zip((None, x), names):
      text = _lower_for_cuda(lambda x, r, s: fn(x, s, residual=r), x,
                             residual, scale)
      calls = [l for l in text.splitlines() if "custom_call" in l]
      assert len(calls) == 1, (shape, dtype, calls)
      kernel = (mosaic_quantize.KERNEL_NAME if name == "mosaic"
                else "jax_rmsnorm")
      assert kernel in calls[0] and (
          ("mosaic_gpu" in calls[0]) == (name == "mosaic")), calls[0][:200]


def test_quantized_refuses_unaligned_codes():
  with pytest.raises(NotImplementedError, match="multiple of 16"):
    mosaic_quantize.check_supported(64, 1000, "float8_e4m3fn")
  mosaic_quantize.check_supported(64, 1008, "int8")


@requires_hopper
@pytest.mark.parametrize("m,n,dtype", [
    (2048, 4096, "bfloat16"), (256, 4096, "bfloat16"), (16, 4096, "bfloat16"),
    (13, 5120, "bfloat16"), (128, 14336, "bfloat16"), (600, 896, "bfloat16"),
    (2048, 4096, "float32"), (97, 1152, "float16"),
    # The backward's rows split in slices (2, 4, 4 warpgroups).
    (4096, 8192, "bfloat16"), (4096, 14336, "bfloat16"),
    (1024, 14336, "float32")], ids=str)
def test_compiled_kernels_match_oracle(m, n, dtype):
  """The compiled Mosaic forward (with a residual) and backward through the
  public API, against the float64 oracle, on the GPU."""
  x, scale, residual = _inputs(m + n, (m, n), dtype, "float32", dtype)
  dy = testing.random_inputs(m + n + 7, (m, n), dtype)[0]
  kernel = dict(implementation="mosaic")
  y = jax.jit(lambda x, s: jax_rmsnorm.rms_norm(x, s, **kernel))(x, scale)
  _assert_close(y, testing.oracle(x, scale), dtype, n)
  y, h = jax.jit(lambda x, r, s: jax_rmsnorm.add_rms_norm(x, r, s, **kernel))(
      x, residual, scale)
  _assert_close(y, testing.oracle(h, scale), dtype, n)

  def loss(x, s):
    return jnp.sum(jax_rmsnorm.rms_norm(x, s, **kernel).astype(jnp.float32)
                   * dy.astype(jnp.float32))

  dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
  worst = testing.grads_excess(dx, dscale, testing.oracle_grad(x, scale, dy),
                               dtype, "float32")
  assert worst.excess <= 0, worst


@requires_hopper
@pytest.mark.parametrize("m,n,dtype,res_dtype,quant_dtype,mode", [
    (2048, 4096, "bfloat16", None, "float8_e4m3fn", "dynamic"),
    (600, 896, "bfloat16", "bfloat16", "float8_e4m3fn", "dynamic"),
    (13, 5120, "bfloat16", None, "float8_e5m2", "scalar"),
    (128, 14336, "bfloat16", "bfloat16", "int8", "channel"),
    (97, 1152, "float16", None, "int8", "dynamic"),
    (256, 4096, "float32", "float32", "float8_e4m3fn", "channel")], ids=str)
def test_compiled_quantized_matches_oracle(m, n, dtype, res_dtype,
                                           quant_dtype, mode):
  """The compiled Mosaic quantized kernel through the public API, against
  the float64 oracle, on the GPU (fp8 saturation by the hardware's
  convert: the interpret-mode tests clip in software)."""
  x, residual, scale = test_quantize._inputs((m, n), dtype, res_dtype)
  quant_scale = (None if mode == "dynamic"
                 else test_quantize._static_scale(mode, n, quant_dtype))
  fn = jax.jit(lambda x, r, s, q: jax_rmsnorm.rms_norm_quantized(
      x, s, quant_dtype=quant_dtype, quant_scale=q, residual=r,
      implementation="mosaic"))
  out = fn(x, residual, scale, quant_scale)
  out = out if isinstance(out, tuple) else (out,)
  y_q, s = out[0], (out[1] if mode == "dynamic" else quant_scale)
  if residual is not None:
    np.testing.assert_array_equal(np.asarray(out[-1]),
                                  test_quantize.oracle_h(x, residual))
  norm_dtype = dtype if residual is None else res_dtype
  y64 = test_quantize.oracle_y(x, residual, scale)
  if mode == "dynamic":
    test_quantize.assert_scales_close(s, y64, quant_dtype, n)
  test_quantize.assert_quantized_close(
      y_q, s, y64, quant_dtype,
      test_quantize.relative_error_bound(n, "float32", norm_dtype))
  # Saturation by the convert: a static scale 100x too small for the
  # largest |y| gives +-qmax, never NaN or Inf.
  top = float(quantize.qmax(quant_dtype))
  tiny = jnp.float32(np.max(np.abs(y64)) / (100 * top))
  y_q = fn(x, residual, scale, tiny)
  y_q = (y_q if not isinstance(y_q, tuple) else y_q[0])
  assert np.all(np.abs(_f64(y_q)) <= top) and np.any(np.abs(_f64(y_q)) == top)


@requires_hopper
@pytest.mark.parametrize("warpgroups", [2, 4])
def test_compiled_split_rows_match_oracle(_split_rows, warpgroups):
  """The compiled forward with rows split between warpgroups, whatever the
  measured table picks: plain (a residual, out_dtype) and quantized (the
  amax folded into the first handover, and in a second one)."""
  with _split_rows(warpgroups):
    _check_forward((512, 14336), "bfloat16", "bfloat16", "float32", 0.0,
                   None, "float32", interpret=False)
    _check_forward((256, 9216), "float32", None, "float32", 1.0, "bfloat16",
                   "hf", interpret=False)
    for res_dtype in (None, "bfloat16"):
      _check_quantized((512, 14336), "bfloat16", res_dtype, "float8_e4m3fn",
                       "dynamic", "float32", interpret=False)
    _check_quantized((256, 9216), "float32", None, "int8", "channel", "hf",
                     interpret=False)


@requires_hopper
@pytest.mark.parametrize("n", [5120, 14336])
def test_compiled_backward_without_scale(n):
  """bf16 rows split between warpgroups with no scale: the chunks are read
  as float32 for the handed-over totals (mosaic_config.HANDOVER_ITEMSIZE;
  with bf16 ones the kernel did not lower)."""
  x = testing.random_inputs(n, (1024, n), "bfloat16")[0]
  dy = testing.random_inputs(n + 1, (1024, n), "bfloat16")[0]
  norm = functools.partial(jax_rmsnorm.rms_norm, implementation="mosaic")
  dx = jax.jit(jax.grad(lambda x: jnp.sum(
      norm(x, None).astype(jnp.float32) * dy.astype(jnp.float32))))(x)
  worst = testing.grads_excess(dx, None, testing.oracle_grad(x, None, dy),
                               "bfloat16", "float32")
  assert worst.excess <= 0, worst


@requires_interpret
def test_triton_forward_with_mosaic_backward():
  """The automatic choice may pair one family's forward with another's
  backward (the speed table picks each per op): they share the residuals'
  contract (x or h, scale, a float32 rstd of x.shape[:-1])."""
  from jax_rmsnorm._src import dispatch
  from jax_rmsnorm._src import validation
  x, scale, residual = _inputs(3, (2, 8, 512), "bfloat16", "float32",
                               "bfloat16")
  dy = testing.random_inputs(4, (2, 8, 512), "bfloat16")[0]
  opts = validation.Options(EPS, 0.0, None, "float32")
  plan = dispatch.Plan((("forward", "triton"), ("backward", "mosaic")),
                       auto=False, interpret=True)

  def loss(x, r, s):
    y, h = dispatch.execute(plan, x, r, s, opts)
    return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)
                   + h.astype(jnp.float32))

  dx, dres, dscale = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
      x, residual, scale)
  h = np.asarray(reference.residual_add(x, residual))
  ref = testing.oracle_grad(h, scale, dy, dh=np.ones(h.shape))
  for d in (dx, dres):
    worst = testing.grads_excess(d, dscale, ref, "bfloat16", "float32")
    assert worst.excess <= 0, worst
