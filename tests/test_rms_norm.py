"""One test body for every implementation: numerics, transforms, dispatch."""

from __future__ import annotations

import dataclasses
import functools
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import jax_rmsnorm
from jax_rmsnorm._src import log
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import speed_table
from jax_rmsnorm._src.triton import common
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import forward as triton_forward
from tests.conftest import (IMPLEMENTATIONS, ON_GPU, assert_close,
                            interpreted, oracle, random_inputs, requires_gpu)

DTYPES = ["float32", "bfloat16", "float16"]
# Odd shapes: one column, prime widths, non-powers of two, no leading axis,
# several leading axes, a power of two and a few (a narrow last chunk,
# Config.split_tail), rows past the one-pass limit (chunked kernel).
SHAPES = [(1, 1), (7,), (5, 7), (3, 896), (13, 5120), (2, 3, 1536),
          (4, 4096), (3, 4099), (2, 14336), (2, 16411)]


def _norm(impl, **kwargs):
  name, interpret = impl
  return jax.jit(functools.partial(jax_rmsnorm.rms_norm, implementation=name,
                                   interpret=interpret, **kwargs))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_oracle(impl, dtype, shape):
  x, scale = random_inputs(zlib.crc32(repr((shape, dtype)).encode()), shape,
                            dtype)
  y = _norm(impl)(x, scale)
  assert y.dtype == x.dtype and y.shape == x.shape
  assert_close(y, oracle(x, scale), dtype, shape[-1])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_options(impl, dtype):
  """No scale; a scale of another dtype; Gemma's offset; another epsilon."""
  x, scale32 = random_inputs(1, (6, 1000), dtype, "float32")
  n = x.shape[-1]
  assert_close(_norm(impl)(x, None), oracle(x), dtype, n)
  assert_close(_norm(impl)(x, scale32), oracle(x, scale32), dtype, n)
  y = _norm(impl, scale_offset=1.0, epsilon=1e-2)(x, scale32 - 1.0)
  assert_close(y, oracle(x, scale32 - 1.0, 1e-2, 1.0), dtype, n)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_large_and_tiny_magnitudes(impl):
  """float16 near its maximum must not overflow: squares are float32."""
  x, _ = random_inputs(2, (4, 640), "float32")
  for mag in (6e4, 1e-3):
    xs = (x * mag / jnp.abs(x).max()).astype("float16")
    assert_close(_norm(impl)(xs, None), oracle(xs), "float16", 640)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_zero_rows_give_empty_result(impl):
  x = jnp.zeros((0, 3, 128), jnp.bfloat16)
  y = _norm(impl)(x, jnp.ones((128,), jnp.bfloat16))
  assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_and_eval_shape(impl):
  x, scale = random_inputs(3, (3, 5, 896), "bfloat16")
  fn = functools.partial(jax_rmsnorm.rms_norm, implementation=impl[0],
                         interpret=impl[1])
  y = jax.jit(jax.vmap(fn, in_axes=(0, None)))(x, scale)
  assert_close(y, oracle(x, scale), "bfloat16", 896)
  # vmap over the scale too: one scale per batch entry.
  scales = jnp.stack([scale, scale * 2, scale * 3])
  y = jax.jit(jax.vmap(fn))(x, scales)
  assert_close(y, oracle(x, scales[:, None, :]), "bfloat16", 896)
  out = jax.eval_shape(fn, x, scale)
  assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_batch_invariance_and_determinism(impl):
  """A row's bits do not depend on the batch size, its position or the run."""
  x, scale = random_inputs(4, (37, 5120), "bfloat16")
  fn = _norm(impl)
  full = np.asarray(fn(x, scale))
  np.testing.assert_array_equal(np.asarray(fn(x, scale)), full)
  np.testing.assert_array_equal(np.asarray(fn(x[:1], scale)), full[:1])
  np.testing.assert_array_equal(np.asarray(fn(x[20:23], scale)), full[20:23])
  perm = np.random.default_rng(0).permutation(37)
  np.testing.assert_array_equal(np.asarray(fn(x[perm], scale)), full[perm])


@pytest.mark.parametrize("interpret", [pytest.param(True, id="interpret"),
                                       pytest.param(False, id="gpu",
                                                    marks=requires_gpu)])
@pytest.mark.parametrize("config,max_one_pass", [
    # Two passes: a loop over 4 chunks of 256, the last one partial.
    (triton_config.Config(block_rows=2, block_cols=256, num_warps=4,
                          num_stages=2), 512),
    # One pass, 4 chunks of 256 held in registers.
    (triton_config.Config(block_rows=2, block_cols=256, num_warps=2), 16384),
    # One pass, one padded chunk, 4 rows a program.
    (triton_config.Config(block_rows=4, block_cols=1024, num_warps=2), 16384),
], ids=str)
def test_explicit_configs(config, max_one_pass, interpret, monkeypatch):
  """Each kernel path at a non-power of two, with the row count not a
  multiple of block_rows."""
  monkeypatch.setattr(triton_config, "MAX_ONE_PASS_COLS", max_one_pass)
  assert config.resident(1000) == (max_one_pass > 512)
  x, scale = random_inputs(5, (7, 1000), "float32")
  y = jax.jit(lambda x, scale: triton_forward.forward(
      x, None, scale, epsilon=1e-6, scale_offset=0.0, interpret=interpret,
      config=config).y)(x, scale)
  assert_close(y, oracle(x, scale), "float32", 1000)


def test_split_tail_chunks():
  """Config.split_tail: the columns past the last whole chunk in one
  chunk of the next power of two, at least 4; nothing changes where n is a multiple
  of block_cols or below it; rows past MAX_ONE_PASS_COLS (looped, a
  traced chunk index) refuse it."""
  widths = lambda n, cols: triton_config.Config(
      1, cols, 4, split_tail=True).chunk_widths(n)
  assert widths(4099, 2048) == (2048, 2048, 4)
  assert widths(4099, 4096) == (4096, 4)
  assert widths(4097, 4096) == (4096, 4)   # _NARROW_TAIL_MIN_COLS
  assert widths(130, 64) == (64, 64, 4)
  assert widths(14336, 4096) == (4096, 4096, 4096, 2048)
  assert widths(5000, 4096) == (4096, 1024)
  assert widths(4096, 1024) == (1024,) * 4
  assert widths(1000, 2048) == (2048,)
  assert triton_config.Config(1, 2048, 4).chunk_widths(4099) == (2048,) * 3
  for n, cols in ((4099, 2048), (14336, 4096), (1000, 256), (200, 64)):
    config = triton_config.Config(1, cols, 4, split_tail=True)
    assert config.num_chunks(n) == len(config.chunk_widths(n))
    assert 0 <= sum(config.chunk_widths(n)) - n < min(config.chunk_widths(n))
  looped = triton_config.Config(1, 8192, 4, split_tail=True)
  assert not looped.resident(20000)
  with pytest.raises(ValueError, match="split_tail"):
    common.row_grid(looped, 4, 20000)


def test_narrow_tail_where_measured():
  """Rows a power of two and a few columns long that do not start on 16
  bytes (4099) are held as chunks of that power of two and one narrow
  chunk, launch otherwise kept, in the forward and every quantized
  kernel (triton/config.py, _NARROW_TAIL_BELOW: faster on an H200);
  rows on 16 bytes (4104), wider tails (14336, 5120), powers of two and
  rows past the one-pass limit (16411) keep their chunks."""
  heuristics = [triton_config.get_config] + [
      functools.partial(triton_config.get_quant_config, static=static,
                        residual=residual)
      for static in (False, True) for residual in (False, True)]
  for get in heuristics:
    for dtype in ("bfloat16", "float32", "float16"):
      config = get(1, 4099, dtype)
      widths = config.chunk_widths(4099)
      assert widths in ((4096, 4), (2048, 2048, 4)), (get, dtype, config)
      assert config.split_tail
      for n in (4104, 14336, 5120, 4096, 16411):
        assert not get(1, n, dtype).split_tail, (get, n, dtype)
  assert triton_config.get_config(1, 1030, "bfloat16").chunk_widths(1030) == (
      1024, 8)


def test_narrow_tail_launch_where_measured(monkeypatch):
  """With a narrow chunk, rows of 4096 and a few columns take the launch
  measured there (triton/config.py, _NARROW_TAIL_LAUNCH) without a
  residual (a scale a column: its own); with one, and at other widths
  (2051, 8195), the launch the heuristic gives without that table is
  kept."""
  launch = lambda c: (c.block_cols, c.num_warps, c.programs_per_sm)
  quant = triton_config.get_quant_config
  heuristics = {
      "forward": triton_config.get_config,
      "dynamic": quant,
      "static": functools.partial(quant, static=True),
      "channel": functools.partial(quant, per_channel=True),
      None: functools.partial(quant, residual=True),
  }
  measured = {
      ("forward", "bfloat16"): (4096, 16, 2),
      ("forward", "float32"): (4096, 16, 2),
      ("dynamic", "bfloat16"): (2048, 4, 4),
      ("dynamic", "float32"): (4096, 8, 2),   # kept (the fastest)
      ("static", "bfloat16"): (4096, 4, 4),
      ("static", "float32"): (4096, 16, 2),
      ("channel", "bfloat16"): (4096, 4, 8),   # kept
      ("channel", "float32"): (4096, 16, 2),
      (None, "bfloat16"): (4096, 4, 0),
      (None, "float32"): (4096, 8, 0),
  }
  with_table = {(kernel, dtype, n): get(1, n, dtype)
                for kernel, get in heuristics.items()
                for dtype in ("bfloat16", "float32")
                for n in (4099, 2051, 8195)}
  monkeypatch.setattr(triton_config, "_NARROW_TAIL_LAUNCH", {})
  for (kernel, dtype, n), config in with_table.items():
    assert config.split_tail, (kernel, dtype, n)
    without = heuristics[kernel](1, n, dtype)
    if n == 4099:
      assert launch(config) == measured[kernel, dtype], (kernel, dtype)
      assert (config == without) == (
          (kernel, dtype) in (("dynamic", "float32"),
                              ("channel", "bfloat16"), (None, "bfloat16"),
                              (None, "float32"))), (kernel, dtype)
    else:
      assert config == without, (kernel, dtype, n)


# A persistent grid (each program loops over every grid-th block of rows):
# the next rows loaded ahead or not, the scale held across the loop or
# re-read; blocks of 1 and 2 rows, rows of one padded chunk and of four.
FORWARD_PERSISTENT_CONFIGS = [
    triton_config.Config(block_rows=1, block_cols=256, num_warps=4,
                         programs_per_sm=1, prefetch=True, hold_scale=True),
    triton_config.Config(block_rows=2, block_cols=256, num_warps=4,
                         programs_per_sm=2),
    triton_config.Config(block_rows=1, block_cols=64, num_warps=2,
                         programs_per_sm=2, prefetch=True, hold_scale=True),
    # The columns past the last whole chunk in a narrower one
    # (Config.split_tail): 200 as (64, 64, 64, 8); as 6 x 32 and 8 on
    # blocks of 2 rows.
    triton_config.Config(block_rows=1, block_cols=64, num_warps=2,
                         programs_per_sm=2, prefetch=True, hold_scale=True,
                         split_tail=True),
    triton_config.Config(block_rows=2, block_cols=32, num_warps=1,
                         programs_per_sm=1, prefetch=True, split_tail=True),
]


@pytest.mark.parametrize("interpret", [pytest.param(True, id="interpret",
                                                    marks=interpreted),
                                       pytest.param(False, id="gpu",
                                                    marks=requires_gpu)])
@pytest.mark.parametrize("config", FORWARD_PERSISTENT_CONFIGS, ids=str)
def test_forward_persistent_grid(config, interpret):
  """The forward (with a residual, the training forward's rstd) on a
  persistent grid: against the oracle, and bit for bit what one block a
  program gives. Rows for three steps a program and a partial fourth, on
  any SM count."""
  n = 200
  m = 3 * config.programs_per_sm * platform.sm_count() * config.block_rows + 5
  programs = config.num_programs(m, platform.sm_count())
  assert config.resident(n) and pl.cdiv(m, programs * config.block_rows) > 3
  x, scale = random_inputs(11, (m, n), "bfloat16", "float32")
  residual, _ = random_inputs(12, (m, n), "bfloat16")

  def run(cfg):
    return jax.jit(lambda x, r, s: triton_forward.forward(
        x, r, s, epsilon=1e-6, scale_offset=0.0, save_rstd=True,
        interpret=interpret, config=cfg))(x, residual, scale)

  got = run(config)
  # h: x + residual in float32, rounded once to the residual's dtype.
  h = (np.asarray(x, np.float32) + np.asarray(residual, np.float32)).astype(
      np.asarray(residual).dtype)
  np.testing.assert_array_equal(np.asarray(got.h), h)
  assert_close(got.y, oracle(h, scale), "bfloat16", n)
  want = run(dataclasses.replace(config, programs_per_sm=0, prefetch=False,
                                 hold_scale=False))
  for name in ("y", "h", "rstd"):
    np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                  np.asarray(getattr(want, name)), name)


@pytest.mark.parametrize("heuristic", [
    triton_config.get_config, triton_config.get_quant_config,
    functools.partial(triton_config.get_quant_config, residual=True),
    functools.partial(triton_config.get_quant_config, static=True),
    functools.partial(triton_config.get_quant_config, residual=True,
                      static=True),
    functools.partial(triton_config.get_quant_config, per_channel=True)],
    ids=["forward", "quant", "quant-residual", "quant-static",
         "quant-static-residual", "quant-channel"])
def test_heuristic_is_pure_and_batch_independent(heuristic):
  for n in (1, 7, 896, 1000, 3072, 4096, 4099, 5120, 14336, 16385, 65536):
    for dtype in DTYPES:
      configs = {heuristic(m, n, dtype) for m in (1, 13, 4096)}
      assert len(configs) == 1, (n, dtype, configs)
      (config,) = configs
      assert config.block_cols >= n or config.num_chunks(n) > 1


def test_narrow_rows_are_held_a_warp_each():
  """Rows of at most 1024 that are a multiple of 128 but not a power of two
  are held as chunks of 128 with each row inside one warp (bf16 2 rows on 1
  warp, float32 8 on 8), without a residual, in the forward and the
  quantized kernel; with a residual, only the quantized kernel with a
  static scale, 8 rows on 8 warps, 8 programs an SM (triton/config.py,
  _WARP_ROWS_COLS: 896 measured faster on an H200); other widths keep
  their own."""
  warp_rows = {"bfloat16": triton_config.Config(2, 128, 1),
               "float32": triton_config.Config(8, 128, 8)}
  for n in (384, 640, 768, 896):
    for dtype, want in warp_rows.items():
      forward = triton_config.get_config(1, n, dtype)
      assert forward == dataclasses.replace(want, cache_hints=True), n
      want = dataclasses.replace(want, cache_hints=True)   # the L2 hints
      if dtype == "float32":   # the float32 rows' persistent grid
        want = dataclasses.replace(want, programs_per_sm=4, prefetch=True,
                                   hold_scale=True)
      for static in (False, True):
        quant = triton_config.get_quant_config(1, n, dtype, static=static)
        assert quant == want, (n, dtype, static)
      for get in (functools.partial(triton_config.get_config, residual=True),
                  functools.partial(triton_config.get_quant_config,
                                    residual=True)):
        assert get(1, n, dtype).block_cols > 128, (n, dtype)
      assert triton_config.get_quant_config(
          1, n, dtype, residual=True, static=True) == triton_config.Config(
              8, 128, 8, programs_per_sm=8, prefetch=True, hold_scale=True,
              cache_hints=True)
  for n in (512, 1000, 1024, 1152, 2048):
    for dtype in warp_rows:
      assert triton_config.get_config(1, n, dtype).block_cols != 128, n
      for static in (False, True):
        for residual in (False, True):
          assert triton_config.get_quant_config(
              1, n, dtype, static=static, residual=residual
          ).block_cols != 128, (n, dtype, static, residual)


def test_auto_uses_reference_on_cpu_and_kernel_on_gpu():
  """On a GPU, auto runs what the speed table names for the shape (the
  Triton kernel for float32 2048 x 256 on Hopper; a decode batch there goes
  to XLA); elsewhere the reference."""
  m, n = 2048, 256
  x, scale = random_inputs(6, (m, n), "float32")
  hlo = jax.jit(jax_rmsnorm.rms_norm).lower(x, scale).as_text()
  table = speed_table.choose("forward", platform.generation(), m, n,
                             "float32")
  assert (triton_forward.KERNEL_NAME in hlo) == (ON_GPU and table == "triton")


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_explicit_kernel_without_gpu_says_so():
  x, scale = random_inputs(7, (8, 256), "float32")
  with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
    jax_rmsnorm.rms_norm(x, scale, implementation="triton")
  # A sequence falls back, and says why at DEBUG level.
  y = jax_rmsnorm.rms_norm(x, scale, implementation=("triton", "xla"))
  assert_close(y, oracle(x, scale), "float32", 256)


def test_fallback_is_logged(caplog, monkeypatch):
  """Auto falling back from the kernel on a GPU warns once per reason."""
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)
  monkeypatch.setattr(log, "_warned", set())
  x = jnp.ones((2, triton_config.MAX_COLS + 1), jnp.bfloat16)
  with caplog.at_level(logging.WARNING, logger="jax_rmsnorm"):
    jax.eval_shape(jax_rmsnorm.rms_norm, x)
    jax.eval_shape(jax_rmsnorm.rms_norm, x)
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, caplog.text
  assert f"2 rows of {triton_config.MAX_COLS + 1}" in warnings[0].message
  assert "forward and backward" in warnings[0].message
  assert "run on 'xla'" in warnings[0].message
  with pytest.raises(NotImplementedError, match="limit"):
    jax.eval_shape(functools.partial(
        jax_rmsnorm.rms_norm, implementation="triton", interpret=True), x)


def test_launch_config_is_logged(caplog):
  x, _ = random_inputs(8, (2, 896), "bfloat16")
  with caplog.at_level(logging.DEBUG, logger="jax_rmsnorm"):
    jax.eval_shape(functools.partial(jax_rmsnorm.rms_norm, interpret=True), x)
  assert "Config(block_rows=2, block_cols=128, num_warps=1" in caplog.text


@requires_gpu
def test_compiled_program_holds_kernel_once():
  x, scale = random_inputs(9, (64, 4096), "bfloat16")
  text = jax.jit(jax_rmsnorm.rms_norm).lower(x, scale).compile().as_text()
  calls = [l for l in text.splitlines()
           if "custom-call" in l and "__gpu$xla.gpu.triton" in l]
  assert len(calls) == 1, text
  assert triton_forward.KERNEL_NAME in calls[0]


@requires_gpu
@pytest.mark.parametrize("m,n,dtype", shapes.BENCHMARK_SHAPES,
                         ids=lambda v: str(v))
def test_benchmark_shapes_compiled(m, n, dtype):
  x, scale = random_inputs(m * 7 + n, (m, n), dtype)
  y = jax.jit(functools.partial(jax_rmsnorm.rms_norm,
                                implementation="triton"))(x, scale)
  assert_close(y, oracle(x, scale), dtype, n)
