"""RMSNorm straight to float8/int8: one test body for the reference ("xla")
and the Pallas-Triton kernel, judged by an independent float64 numpy oracle.

Interpret mode runs on CPU; the compiled kernel on an NVIDIA GPU only
(`requires_gpu`). The CUDA lowering of every variant is checked on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jax_rmsnorm._src import platform
from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import quantize as triton_quantize
from tests.conftest import IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS
from tests.test_lowering import _kernel_calls, export_for_cuda

QUANT_DTYPES = ["float8_e4m3fn", "float8_e5m2", "int8"]
EPS = 1e-6


# --- running an implementation ----------------------------------------------

def _quantized(impl, *, quant_dtype, epsilon=EPS, scale_offset=0.0,
               cast_order="float32", config=None):
  """jit(fn)(x, residual, scale, quant_scale) -> (y_q, row_scales, h)."""
  name, interpret = impl
  kw = dict(epsilon=epsilon, scale_offset=scale_offset,
            quant_dtype=quant_dtype, cast_order=cast_order)
  if name == "xla":
    return jax.jit(lambda x, r, w, q: quantize.reference(
        x, r, w, quant_scale=q, **kw))
  return jax.jit(lambda x, r, w, q: triton_quantize.forward(
      x, r, w, q, interpret=interpret, config=config, **kw))


def _inputs(shape, dtype, res_dtype=None, scale_dtype="float32"):
  seed = zlib.crc32(repr((shape, dtype, res_dtype)).encode())
  x, scale = testing.random_inputs(seed, shape, dtype, scale_dtype)
  residual = None
  if res_dtype is not None:
    residual, _ = testing.random_inputs(seed + 1, shape, res_dtype)
  return x, residual, scale


def _static_scale(mode, n, quant_dtype, top=8.0):
  """A static scale that maps |y| <= `top` to the full range: a scalar, or
  per channel varying by 3x across channels."""
  base = top / quantize.qmax(quant_dtype)
  if mode == "scalar":
    return quantize.check_quant_scale(base, n)
  ramp = 0.5 + (np.arange(n) % 7) / 4.0
  return quantize.check_quant_scale(jnp.asarray(base * ramp, jnp.float32), n)


# --- the float64 oracle -----------------------------------------------------

def _f64(a) -> np.ndarray:
  return np.asarray(a).astype(np.float64)


def oracle_h(x, residual) -> np.ndarray:
  """h = x + residual in numpy float32, rounded once to residual's dtype."""
  total = np.asarray(x).astype(np.float32) + np.asarray(residual).astype(
      np.float32)
  return total.astype(np.asarray(residual).dtype)


def oracle_y(x, residual, scale, epsilon=EPS, scale_offset=0.0,
             cast_order="float32") -> np.ndarray:
  """y in float64: `testing.oracle`, or, for the Hugging Face cast order,
  xhat rounded to the normalized input's dtype before the scale."""
  h = x if residual is None else oracle_h(x, residual)
  if cast_order == "float32":
    return testing.oracle(h, scale, epsilon, scale_offset)
  xhat = testing.oracle(h, None, epsilon)
  xhat = _f64(xhat.astype(np.float32).astype(np.asarray(h).dtype))
  return xhat * (scale_offset + _f64(scale)) if scale is not None else xhat


half_step = testing.half_step
relative_error_bound = testing.quantized_relative_error


def assert_quantized_close(y_q, s, y64: np.ndarray, quant_dtype, rel: float,
                           ) -> None:
  """y_q * s within half a quantization step of y64 (`testing.
  quantized_excess`, which says why); saturated elements exactly +-qmax."""
  worst = testing.quantized_excess(y_q, s, y64, quant_dtype, rel)
  assert worst.excess <= 0, (
      f"{quant_dtype}: error / bound {worst.ratio:.4g} at {worst.where}: "
      f"q={_f64(y_q)[worst.where]!r}")


def assert_scales_close(s, y64: np.ndarray, quant_dtype, n: int) -> None:
  """Dynamic scales against the oracle's (`testing.scales_excess`)."""
  assert np.shape(s) == y64.shape[:-1] + (1,)
  worst = testing.scales_excess(s, y64, quant_dtype, n)
  assert worst.excess <= 0, (
      f"scale error / bound {worst.ratio:.4g} at {worst.where}")


def assert_top_code(y_q, quant_dtype) -> None:
  """With a dynamic scale each row's largest |y_q| is exactly qmax: its amax
  element maps to qmax up to a float32 rounding, which saturates or rounds
  to qmax in every quant dtype."""
  top = np.max(np.abs(_f64(y_q)), axis=-1)
  np.testing.assert_array_equal(top, quantize.qmax(quant_dtype))


# --- numerics against the oracle ---------------------------------------------

# (shape, x dtype, residual dtype or None, quant dtype, scale mode, extra).
# Every width (896, 4096, 5120, 14336 and odd ones), input dtype, quant dtype,
# scale mode and residual case appears; 16411 runs the chunked loops, (301, 96)
# several rows a program with a partial last block, (9, 1) a single column.
CASES = [
    ((13, 896), "bfloat16", None, "float8_e4m3fn", "dynamic", {}),
    ((4, 896), "float32", "float32", "int8", "channel", {}),
    ((11, 896), "float32", None, "float8_e4m3fn", "scalar", {}),
    ((13, 896), "bfloat16", "bfloat16", "float8_e5m2", "scalar", {}),
    ((2, 3, 4096), "bfloat16", "bfloat16", "float8_e5m2", "dynamic", {}),
    ((5, 4096), "float16", None, "int8", "dynamic", {}),
    ((4, 4096), "float32", None, "float8_e4m3fn", "scalar", {}),
    ((3, 4096), "float32", "float32", "float8_e4m3fn", "scalar", {}),
    ((3, 5120), "float16", "float32", "float8_e4m3fn", "dynamic", {}),
    ((3, 5120), "bfloat16", None, "float8_e5m2", "channel", {}),
    ((2, 14336), "bfloat16", None, "float8_e4m3fn", "dynamic", {}),
    ((2, 14336), "float32", "float32", "int8", "dynamic", {}),
    ((2, 14336), "float16", None, "float8_e5m2", "scalar", {}),
    ((3, 4099), "float32", None, "float8_e5m2", "dynamic", {}),
    ((5, 4099), "bfloat16", None, "float8_e4m3fn", "dynamic", {}),
    ((6, 4099), "bfloat16", "bfloat16", "int8", "scalar", {}),
    ((3, 4099), "float32", "float32", "float8_e4m3fn", "channel", {}),
    ((2, 16411), "float32", None, "int8", "dynamic", {}),
    ((2, 16411), "bfloat16", "bfloat16", "float8_e4m3fn", "channel", {}),
    ((301, 96), "float32", "float32", "float8_e5m2", "dynamic", {}),
    ((9, 1), "float16", None, "float8_e4m3fn", "dynamic", {}),
    ((5, 1000), "bfloat16", None, "int8", "dynamic", {"no_scale": True}),
    ((5, 1000), "float32", None, "float8_e4m3fn", "dynamic",
     {"scale_offset": 1.0, "epsilon": 1e-2}),
    ((5, 1000), "bfloat16", "bfloat16", "int8", "dynamic",
     {"cast_order": "hf"}),
    ((5, 1000), "float16", None, "float8_e4m3fn", "channel",
     {"cast_order": "hf", "scale_offset": 1.0}),
]


def _case_id(case):
  shape, dtype, res, qd, mode, extra = case
  parts = ["x".join(map(str, shape)), dtype, f"res-{res}" if res else "",
           qd, mode] + [f"{k}={v}" for k, v in extra.items()]
  return "-".join(p for p in parts if p)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_float64_oracle(impl, case):
  shape, dtype, res_dtype, quant_dtype, mode, extra = case
  n = shape[-1]
  extra = dict(extra)
  no_scale = extra.pop("no_scale", False)
  x, residual, scale = _inputs(shape, dtype, res_dtype)
  if no_scale:
    scale = None
  elif extra.get("scale_offset"):
    scale = scale - 1.0
  quant_scale = None if mode == "dynamic" else _static_scale(mode, n,
                                                             quant_dtype)
  y_q, s, h = _quantized(impl, quant_dtype=quant_dtype, **extra)(
      x, residual, scale, quant_scale)

  assert y_q.shape == x.shape and y_q.dtype == jnp.dtype(quant_dtype)
  if residual is None:
    assert h is None
  else:
    assert h.dtype == residual.dtype
    np.testing.assert_array_equal(np.asarray(h), oracle_h(x, residual))
  norm_dtype = x.dtype if residual is None else residual.dtype
  y64 = oracle_y(x, residual, scale, extra.get("epsilon", EPS),
                 extra.get("scale_offset", 0.0),
                 extra.get("cast_order", "float32"))
  rel = relative_error_bound(n, extra.get("cast_order", "float32"),
                             norm_dtype)
  if mode == "dynamic":
    assert s.shape == shape[:-1] + (1,) and s.dtype == jnp.float32
    assert_scales_close(s, y64, quant_dtype, n)
    assert_top_code(y_q, quant_dtype)
  else:
    assert s is None
    s = quant_scale
  assert_quantized_close(y_q, s, y64, quant_dtype, rel)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["dynamic", "channel"])
def test_chunked_loop_and_partial_blocks(impl, mode, monkeypatch):
  """The two- and three-pass loops (rows not held in registers) at a small
  width, with a partial last chunk and a partial last block of rows."""
  monkeypatch.setattr(triton_config, "MAX_ONE_PASS_COLS", 512)
  config = triton_config.Config(block_rows=2, block_cols=256, num_warps=4,
                                num_stages=2)
  assert not config.resident(1000)
  x, residual, scale = _inputs((7, 1000), "bfloat16", "float32")
  quant_scale = None if mode == "dynamic" else _static_scale(mode, 1000,
                                                             "int8")
  y_q, s, h = _quantized(impl, quant_dtype="int8", config=config)(
      x, residual, scale, quant_scale)
  np.testing.assert_array_equal(np.asarray(h), oracle_h(x, residual))
  y64 = oracle_y(x, residual, scale)
  if mode == "dynamic":
    assert_scales_close(s, y64, "int8", 1000)
  else:
    s = quant_scale
  assert_quantized_close(y_q, s, y64, "int8", relative_error_bound(1000))


# The dynamic scale's amax from max |x * scale| and rstd (Config.fold_amax)
# or reduced over y: (shape, x dtype, residual dtype, quant dtype, extra,
# config); without a scale (one chunk, held), with an offset (looped),
# with a residual (held), and with a residual looped: rows in chunks of 256
# past MAX_ONE_PASS_COLS (set to 512), a partial last chunk.
FOLD_CASES = [
    ((5, 1000), "bfloat16", None, "int8", {"no_scale": True},
     triton_config.Config(block_rows=1, block_cols=1024, num_warps=4)),
    ((5, 1000), "float32", None, "float8_e4m3fn",
     {"scale_offset": 1.0, "epsilon": 1e-2},
     triton_config.Config(block_rows=2, block_cols=256, num_warps=4)),
    ((3, 256), "bfloat16", "bfloat16", "float8_e5m2", {},
     triton_config.Config(block_rows=1, block_cols=256, num_warps=2)),
    ((7, 1000), "bfloat16", "float32", "int8", {},
     triton_config.Config(block_rows=2, block_cols=256, num_warps=4,
                          num_stages=2)),
    # The float32 layouts' kind: chunks held on a persistent grid loading
    # the next row ahead with the scale held (several steps a program).
    ((11, 500), "float32", None, "float8_e4m3fn", {},
     triton_config.Config(block_rows=1, block_cols=128, num_warps=4,
                          programs_per_sm=1, prefetch=True, hold_scale=True)),
    # A narrow chunk past the whole ones (Config.split_tail), reduced on
    # its own: 390 as 3 x 128 and 8, the last partial.
    ((5, 390), "bfloat16", None, "float8_e4m3fn", {},
     triton_config.Config(block_rows=2, block_cols=128, num_warps=4,
                          split_tail=True)),
]


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
@pytest.mark.parametrize("case", FOLD_CASES,
                         ids=["no-scale", "offset", "residual", "looped",
                              "persistent", "split-tail"])
def test_amax_folded_or_not(impl, fold, case, monkeypatch):
  """Both ways of taking a row's amax against the oracle; folded, a NaN
  row and an Inf row still get scale +inf and leave the others' bits."""
  shape, dtype, res_dtype, quant_dtype, extra, config = case
  monkeypatch.setattr(triton_config, "MAX_ONE_PASS_COLS", 512)
  config = dataclasses.replace(config, fold_amax=fold)
  extra = dict(extra)
  x, residual, scale = _inputs(shape, dtype, res_dtype)
  if extra.pop("no_scale", False):
    scale = None
  elif extra.get("scale_offset"):
    scale = scale - 1.0
  n = shape[-1]
  fn = _quantized(impl, quant_dtype=quant_dtype, config=config, **extra)
  y_q, s, _ = fn(x, residual, scale, None)
  y64 = oracle_y(x, residual, scale, extra.get("epsilon", EPS),
                 extra.get("scale_offset", 0.0))
  assert_scales_close(s, y64, quant_dtype, n)
  assert_quantized_close(y_q, s, y64, quant_dtype, relative_error_bound(n))
  bad = x.at[1, 7].set(jnp.nan).at[2, n - 1].set(jnp.inf)
  dirty = fn(bad, residual, scale, None)
  good = np.array([0] + list(range(3, shape[0])))
  for c, d in zip((y_q, s), dirty):
    np.testing.assert_array_equal(_bits(d)[good], _bits(c)[good])
  np.testing.assert_array_equal(np.asarray(dirty[1])[[1, 2], 0], np.inf)


def test_fold_amax_where_measured():
  """get_quant_config folds the amax where the H200 sweep measured it
  faster (triton/config.py, _QUANT_FOLD_AMAX_WIDE_BYTES and
  _QUANT_DYNAMIC_WIDE), never with a static scale or a residual."""
  folds = lambda n, dtype, **kw: triton_config.get_quant_config(
      1, n, dtype, **kw).fold_amax
  for n, dtype in ((4096, "bfloat16"), (8192, "bfloat16"),
                   (4099, "bfloat16"), (14336, "bfloat16"),
                   (32768, "bfloat16"), (1024, "float32"), (4096, "float32"),
                   (4099, "float32"), (5120, "float32"), (14336, "float32")):
    assert folds(n, dtype), (n, dtype)
    assert not folds(n, dtype, static=True)
    assert not folds(n, dtype, residual=True)
  # 896 in either dtype: rows a warp each, measured unfolded
  # (_WARP_ROWS_COLS).
  for n, dtype in ((896, "bfloat16"), (3072, "bfloat16"),
                   (5120, "bfloat16"), (896, "float32")):
    assert not folds(n, dtype), (n, dtype)


def test_float32_static_takes_dynamic_layout():
  """Float32 rows held in registers get the dynamic scale's launch with a
  static scale too (triton/config.py, _QUANT_FLOAT32_CHUNKS; the other
  layouts ran float32 16384 x 8192 slower than XLA on an H200), the amax
  not folded, but for the launch measured with 4099's narrow last chunk
  (16 warps, _NARROW_TAIL_LAUNCH); bf16 rows, looped rows and residuals
  keep their own."""
  get = lambda n, dtype, **kw: triton_config.get_quant_config(1, n, dtype,
                                                              **kw)
  for n in (896, 4096, 4099, 5120, 8192, 14336):
    dynamic = get(n, "float32")
    assert get(n, "float32", static=True) == dataclasses.replace(
        dynamic, fold_amax=False, num_warps=16 if n == 4099
        else dynamic.num_warps), n
    assert dynamic.prefetch and dynamic.hold_scale and dynamic.programs_per_sm
  assert get(14336, "bfloat16", static=True) != dataclasses.replace(
      get(14336, "bfloat16"), fold_amax=False)
  assert not get(4096, "float32", residual=True).prefetch
  looped = triton_config.MAX_ONE_PASS_COLS * 2
  assert get(looped, "float32", static=True) == get(
      looped, "float32", residual=True)


def test_float32_residual_takes_chunks_of_2048():
  """Float32 rows with a residual whose n is a multiple of 2048 from 4096
  to 14336 are held as chunks of 2048 on 16 warps, on a persistent grid past
  8192, with a static or a dynamic scale (triton/config.py,
  _QUANT_FLOAT32_RESIDUAL_CHUNK; the bf16 rows' layouts ran float32 16384 x
  8192 with a static scale no faster than XLA on an H200); other widths and
  bf16 rows keep their own."""
  get = lambda n, dtype, **kw: triton_config.get_quant_config(
      1, n, dtype, residual=True, **kw)
  chunks = triton_config.Config(block_rows=1, block_cols=2048, num_warps=16,
                                cache_hints=True)
  for static in (False, True):
    for n in (4096, 6144, 8192):
      assert get(n, "float32", static=static) == chunks, (n, static)
    for n in (10240, 14336):
      assert get(n, "float32", static=static) == dataclasses.replace(
          chunks, programs_per_sm=2, prefetch=True, hold_scale=True), n
    for n, dtype in ((2048, "float32"), (4099, "float32"),
                     (5120, "float32"), (16384, "float32"),
                     (8192, "bfloat16"), (4096, "bfloat16")):
      assert get(n, dtype, static=static) != chunks, (n, dtype)
      assert not get(n, dtype, static=static).programs_per_sm, (n, dtype)


# A persistent grid (each program loops over every grid-th block of rows),
# with the scale held across the loop and the next rows loaded ahead or not;
# blocks of 1, 2 and 4 rows, one, two and four chunks a row.
PERSISTENT_CONFIGS = [
    triton_config.Config(block_rows=1, block_cols=256, num_warps=4,
                         programs_per_sm=1, prefetch=True, hold_scale=True),
    triton_config.Config(block_rows=2, block_cols=128, num_warps=4,
                         programs_per_sm=1),
    triton_config.Config(block_rows=4, block_cols=256, num_warps=4,
                         programs_per_sm=2, prefetch=True),
    # Rows of 200 held as four chunks of 64, the last partial, loaded ahead
    # with the scale held: the layout get_quant_config gives 4099.
    triton_config.Config(block_rows=1, block_cols=64, num_warps=2,
                         programs_per_sm=2, prefetch=True, hold_scale=True),
    # The same with the columns past the last whole chunk in a narrower
    # one (Config.split_tail): 200 as (64, 64, 64, 8); as 6 x 32 and 8 on
    # blocks of 2 rows.
    triton_config.Config(block_rows=1, block_cols=64, num_warps=2,
                         programs_per_sm=2, prefetch=True, hold_scale=True,
                         split_tail=True),
    triton_config.Config(block_rows=2, block_cols=32, num_warps=1,
                         programs_per_sm=1, prefetch=True, split_tail=True),
]


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["dynamic", "channel"])
@pytest.mark.parametrize("config", PERSISTENT_CONFIGS, ids=str)
def test_persistent_grid(impl, mode, config):
  """Rows handled by a persistent grid: against the oracle, and bit for bit
  what one block a program gives (the same arithmetic a row; compiled, or
  interpreted on a CPU). Rows for three steps a program and a partial
  fourth, on any SM count."""
  n = 200
  m = 3 * config.programs_per_sm * platform.sm_count() * config.block_rows + 5
  programs = config.num_programs(m, platform.sm_count())
  assert config.resident(n) and pl.cdiv(m, programs * config.block_rows) > 3
  x, residual, scale = _inputs((m, n), "bfloat16", "float32")
  quant_dtype = "float8_e4m3fn" if mode == "dynamic" else "int8"
  quant_scale = (None if mode == "dynamic"
                 else _static_scale(mode, n, quant_dtype))
  y_q, s, h = _quantized(impl, quant_dtype=quant_dtype, config=config)(
      x, residual, scale, quant_scale)
  np.testing.assert_array_equal(np.asarray(h), oracle_h(x, residual))
  y64 = oracle_y(x, residual, scale)
  if mode == "dynamic":
    assert_scales_close(s, y64, quant_dtype, n)
  assert_quantized_close(y_q, quant_scale if s is None else s, y64,
                         quant_dtype, relative_error_bound(n))
  one_block = dataclasses.replace(config, programs_per_sm=0, prefetch=False,
                                  hold_scale=False)
  want = _quantized(impl, quant_dtype=quant_dtype, config=one_block)(
      x, residual, scale, quant_scale)
  for got, expected in zip((y_q, s, h), want):
    if expected is not None:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


# --- properties ---------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("quant_dtype", QUANT_DTYPES)
def test_static_scale_too_small_saturates(impl, quant_dtype):
  """A static scale 100x too small: values clip to +-qmax, never NaN or Inf
  or a wrapped int8; float16 inputs near their maximum too."""
  n = 896
  x, _, scale = _inputs((6, n), "float16")
  x = x.at[0].set((x[0] * (6e4 / jnp.abs(x[0]).max())).astype(x.dtype))
  for mode in ("scalar", "channel"):
    quant_scale = _static_scale(mode, n, quant_dtype, top=0.08)
    y_q, _, _ = _quantized(impl, quant_dtype=quant_dtype)(x, None, scale,
                                                           quant_scale)
    q = _f64(y_q)
    assert np.all(np.isfinite(q))
    assert np.all(np.abs(q) <= quantize.qmax(quant_dtype))
    y64 = oracle_y(x, None, scale)
    assert np.mean(np.abs(y64 / _f64(quant_scale))
                   > quantize.qmax(quant_dtype)) > 0.5
    assert_quantized_close(y_q, quant_scale, y64, quant_dtype,
                           relative_error_bound(n))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("quant_dtype", QUANT_DTYPES)
def test_zero_rows(impl, quant_dtype):
  """A row of zeros: dynamic scale MIN_SCALE (finite, > 0), y_q zero, no
  NaN; static: zeros."""
  x, _, scale = _inputs((6, 256), "bfloat16")
  x = x.at[jnp.array([0, 3])].set(0)
  fn = _quantized(impl, quant_dtype=quant_dtype)
  y_q, s, _ = fn(x, None, scale, None)
  s = np.asarray(s)
  np.testing.assert_array_equal(s[[0, 3]], np.float32(quantize.MIN_SCALE))
  assert np.all(np.isfinite(s)) and np.all(s > 0)
  np.testing.assert_array_equal(_f64(y_q)[[0, 3]], 0.0)
  y64 = oracle_y(x, None, scale)
  assert_quantized_close(y_q, s, y64, quant_dtype, relative_error_bound(256))
  y_q, _, _ = fn(x, None, scale, _static_scale("scalar", 256, quant_dtype))
  np.testing.assert_array_equal(_f64(y_q)[[0, 3]], 0.0)


def _bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("quant_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("mode", ["dynamic", "scalar"])
def test_nan_and_inf_stay_in_their_row(impl, quant_dtype, mode):
  """NaN in row 1 and Inf in row 2 (of rows that share a program): the other
  rows' bits equal a clean run's; the bad rows are flagged (dynamic: scale
  +inf, so every dequantized value is NaN; static fp8: NaN in the row)."""
  x, residual, scale = _inputs((6, 256), "bfloat16", "bfloat16")
  bad = x.at[1, 7].set(jnp.nan).at[2, 100].set(jnp.inf)
  quant_scale = None if mode == "dynamic" else _static_scale(mode, 256,
                                                             quant_dtype)
  fn = _quantized(impl, quant_dtype=quant_dtype)
  clean = fn(x, residual, scale, quant_scale)
  dirty = fn(bad, residual, scale, quant_scale)
  good = np.array([0, 3, 4, 5])
  for c, d in zip(clean, dirty):
    if c is not None:
      np.testing.assert_array_equal(_bits(d)[good], _bits(c)[good])
  y_q, s, _ = dirty
  if mode == "dynamic":
    np.testing.assert_array_equal(np.asarray(s)[[1, 2], 0], np.inf)
    with np.errstate(invalid="ignore"):     # 0 * inf
      assert np.all(np.isnan(_f64(y_q)[[1, 2]] * np.asarray(s)[[1, 2]]))
  elif quant_dtype != "int8":
    assert np.all(np.isnan(_f64(y_q)[1]))   # NaN row: all of y is NaN
    assert np.isnan(_f64(y_q)[2, 100])      # Inf: NaN there, 0 elsewhere
  else:                                     # int8 has no NaN: 0
    np.testing.assert_array_equal(_f64(y_q)[1], 0.0)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("quant_dtype", QUANT_DTYPES)
def test_batch_invariance(impl, quant_dtype):
  """A row's bits (y_q and its scale) do not depend on the batch size or its
  position in the batch."""
  x, residual, scale = _inputs((37, 896), "bfloat16", "bfloat16")
  fn = _quantized(impl, quant_dtype=quant_dtype)
  full = [_bits(a) for a in fn(x, residual, scale, None)]
  perm = np.random.default_rng(0).permutation(37)
  for rows in (slice(0, 1), slice(20, 23), perm):
    part = fn(x[rows], residual[rows], scale, None)
    for p, f in zip(part, full):
      np.testing.assert_array_equal(_bits(p), f[rows])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_jit_vmap_eval_shape(impl):
  x, residual, scale = _inputs((3, 5, 256), "bfloat16", "bfloat16")
  fn = _quantized(impl, quant_dtype="float8_e4m3fn")
  shapes = jax.eval_shape(fn, x, residual, scale, None)
  assert shapes[0].shape == x.shape and shapes[1].shape == (3, 5, 1)
  batched = jax.jit(jax.vmap(fn, in_axes=(0, 0, None, None)))(
      x, residual, scale, None)
  direct = fn(x, residual, scale, None)
  for b, d in zip(batched, direct):
    np.testing.assert_array_equal(_bits(b), _bits(d))


# --- the per-element helpers ----------------------------------------------------

def test_round_half_even_matches_numpy():
  ties = np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)
  near = np.concatenate([np.nextafter(ties, np.float32(np.inf)),
                         np.nextafter(ties, np.float32(-np.inf))])
  rand = np.random.default_rng(0).uniform(-130, 130, 1 << 16)
  v = np.concatenate([ties, near, rand.astype(np.float32),
                      np.float32([0.0, -0.0, 2.0**22 + 0.5, np.nan])])
  got = np.asarray(jax.jit(quantize.round_half_even)(v))
  np.testing.assert_array_equal(got, np.round(v))


@pytest.mark.parametrize("quant_dtype", QUANT_DTYPES)
def test_saturate_cast(quant_dtype):
  top = quantize.qmax(quant_dtype)
  v = np.float32([np.nan, np.inf, -np.inf, 2 * top, -2 * top, top, 1.5,
                  2.5, -2.5, 0.3])
  got = _f64(jax.jit(functools.partial(quantize.saturate_cast,
                                       quant_dtype=quant_dtype))(v))
  want = np.clip(v, -top, top)
  if quant_dtype == "int8":
    want = np.where(np.isnan(want), 0, np.round(want))
  else:
    want = _f64(want.astype(quant_dtype))
  np.testing.assert_array_equal(got, want)


# --- argument checks --------------------------------------------------------------

def test_check_args_accepts_and_canonicalizes():
  x = jnp.zeros((2, 8), jnp.bfloat16)
  for name in QUANT_DTYPES:
    for spelling in (name, jnp.dtype(name), getattr(jnp, name)):
      assert quantize.check_args(x, spelling, None) == (jnp.dtype(name), None)
  _, q = quantize.check_args(x, "int8", 0.5)
  assert q.shape == () and q.dtype == jnp.float32
  _, q = quantize.check_args(x, "int8", np.float64([0.5]))
  assert q.shape == () and q.dtype == jnp.float32
  _, q = quantize.check_args(x, "int8", jnp.ones((8,), jnp.bfloat16))
  assert q.shape == (8,) and q.dtype == jnp.float32
  # A traced scale cannot be checked for its value, only for shape and type.
  jax.jit(lambda q: quantize.check_args(x, "int8", q)[1])(jnp.float32(-1.0))


@pytest.mark.parametrize("quant_dtype,quant_scale,error,match", [
    ("float16", None, TypeError, "quant_dtype=float16 is not supported"),
    ("float8_e4m3fnuz", None, TypeError, "not supported"),
    ("uint8", None, TypeError, "not supported"),
    ("nope", None, TypeError, "quant_dtype must be a dtype"),
    ("int8", np.ones((2, 8), np.float32), ValueError, r"shape \(8,\)"),
    ("int8", np.ones((9,), np.float32), ValueError, "quant_scale.shape"),
    ("int8", 0.0, ValueError, "finite and >="),
    ("int8", -1.0, ValueError, "finite and >="),
    ("int8", float("inf"), ValueError, "finite and >="),
    ("int8", float("nan"), ValueError, "finite and >="),
    ("int8", 1e-39, ValueError, "finite and >="),      # subnormal
    ("int8", np.float64([1e-50]), ValueError, "finite and >="),  # 0 in f32
    ("int8", np.array([1.0] * 7 + [0.0], np.float32), ValueError, "among"),
    ("int8", True, TypeError, "quant_scale must be a float"),
    ("int8", np.ones((8,), np.int32), TypeError, "floating-point"),
    ("int8", "1.0", TypeError, "quant_scale must be None"),
], ids=str)
def test_check_args_rejects(quant_dtype, quant_scale, error, match):
  x = jnp.zeros((2, 8), jnp.float32)
  with pytest.raises(error, match=match):
    quantize.check_args(x, quant_dtype, quant_scale)


def test_fp8_needs_sm89(monkeypatch):
  monkeypatch.setattr(platform, "compute_capability", lambda: 8.0)
  for quant_dtype in ("float8_e4m3fn", "float8_e5m2"):
    with pytest.raises(NotImplementedError, match="compute capability"):
      triton_quantize.check_supported(4, 896, quant_dtype)
  triton_quantize.check_supported(4, 896, "int8")
  monkeypatch.setattr(platform, "compute_capability", lambda: 9.0)
  triton_quantize.check_supported(4, 896, "float8_e4m3fn")


# --- the CUDA lowering, on CPU ------------------------------------------------------

LOWERING_SHAPES = [
    ((3, 896), "bfloat16", "bfloat16"),   # rows a warp each (with a
                                          # residual, static scales only)
    ((5, 896), "float32", None),          # rows a warp each, persistent
    ((2, 14336), "float32", "float32"),   # 7 chunks held in registers
    ((2, 16411), "bfloat16", None),       # chunked loops, prime N
    ((301, 96), "float32", "float32"),    # several rows per program
    ((5, 4099), "bfloat16", None),        # a narrow last chunk, persistent
    ((9, 1), "float16", None),
]


# Every quant dtype, scale mode and residual case at the first shape; every
# quant dtype with a dynamic and a per-channel scale at the others.
LOWERING_CASES = [
    (0, quant_dtype, mode, residual)
    for quant_dtype in QUANT_DTYPES
    for mode in ("dynamic", "scalar", "channel")
    for residual in (False, True)
] + [
    (shape_i, quant_dtype, mode, False)
    for shape_i in range(1, len(LOWERING_SHAPES))
    for quant_dtype in QUANT_DTYPES
    for mode in ("dynamic", "channel")
]


def _lowering_id(case):
  shape_i, quant_dtype, mode, residual = case
  shape = "x".join(map(str, LOWERING_SHAPES[shape_i][0]))
  return f"{shape}-{quant_dtype}-{mode}" + ("-residual" if residual else "")


@pytest.mark.parametrize("shape_i,quant_dtype,mode,residual", LOWERING_CASES,
                         ids=[_lowering_id(c) for c in LOWERING_CASES])
def test_lowers_for_cuda_with_one_named_kernel(shape_i, quant_dtype, mode,
                                                residual, monkeypatch):
  """Every variant lowers through Pallas's Triton backend for CUDA (float8
  and int8 stores, the masks, the loops): one custom call, named."""
  shape, dtype, scale_dtype = LOWERING_SHAPES[shape_i]
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)
  n = shape[-1]
  x = jnp.zeros(shape, dtype)
  res = jnp.zeros(shape, dtype) if residual else None
  scale = None if scale_dtype is None else jnp.zeros((n,), scale_dtype)
  quant_scale = None if mode == "dynamic" else _static_scale(mode, n,
                                                             quant_dtype)
  hf = shape_i == 3
  fn = functools.partial(triton_quantize.forward, epsilon=EPS,
                         scale_offset=1.0 if hf else 0.0,
                         quant_dtype=quant_dtype,
                         cast_order="hf" if hf else "float32")
  calls = _kernel_calls(export_for_cuda(fn, x, res, scale, quant_scale))
  assert len(calls) == 1, calls
  assert triton_quantize.KERNEL_NAME in calls[0]


# --- the example ----------------------------------------------------------------

def test_fp8_matmul_example():
  """examples/fp8_matmul.py: the quantized projection is within its bound of
  the float32 matmul of the unquantized norm, for every quant dtype."""
  from examples import fp8_matmul
  errors = fp8_matmul.main([])
  assert set(errors) == set(QUANT_DTYPES)
