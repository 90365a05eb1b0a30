"""add_rms_norm's forward, out_dtype and the cast orders, every
implementation, against the float64 oracle."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_rmsnorm
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import testing
from tests.conftest import (IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, ON_GPU,
                            assert_close, oracle, random_inputs)

SHAPES = [(1, 1), (13, 1), (1, 5120), (13, 5120), (2, 3, 896), (2, 16411)]
DTYPE_PAIRS = [("bfloat16", "bfloat16"), ("float16", "float16"),
               ("float32", "float32"), ("bfloat16", "float32")]


def _fn(impl, fn=jax_rmsnorm.add_rms_norm, **kwargs):
  name, interpret = impl
  return jax.jit(functools.partial(fn, implementation=name,
                                   interpret=interpret, **kwargs))


def _inputs(shape, dtype, res_dtype, scale_dtype="float32"):
  seed = zlib.crc32(repr((shape, dtype, res_dtype)).encode())
  x, scale = random_inputs(seed, shape, dtype, scale_dtype)
  residual, _ = random_inputs(seed + 1, shape, res_dtype)
  return x, residual, scale


def _h_exact(x, residual) -> np.ndarray:
  """x + residual rounded once to residual's dtype, from float64 numpy: the
  float32 sum of two float16/bfloat16/float32 numbers is then rounded."""
  total = np.asarray(x, np.float32) + np.asarray(residual, np.float32)
  return np.asarray(jnp.asarray(total).astype(residual.dtype))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype,res_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_matches_float64(impl, dtype, res_dtype, shape):
  x, residual, scale = _inputs(shape, dtype, res_dtype)
  y, h = _fn(impl)(x, residual, scale)
  assert h.dtype == jnp.dtype(res_dtype) and y.dtype == jnp.dtype(res_dtype)
  assert h.shape == y.shape == x.shape
  # h is the new residual stream: exactly the rounded sum, every bit.
  np.testing.assert_array_equal(np.asarray(h), _h_exact(x, residual))
  # y normalizes that rounded h.
  assert_close(y, oracle(h, scale), res_dtype, shape[-1])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_add_rms_norm_options(impl):
  """No scale, Gemma's offset, float32 out_dtype, the HF cast order."""
  x, residual, scale = _inputs((5, 1000), "bfloat16", "bfloat16")
  y, h = _fn(impl)(x, residual)
  assert_close(y, oracle(h), "bfloat16", 1000)
  y, h = _fn(impl, scale_offset=1.0)(x, residual, scale - 1.0)
  assert_close(y, oracle(h, scale - 1.0, scale_offset=1.0), "bfloat16", 1000)
  y, h = _fn(impl, out_dtype=jnp.float32)(x, residual, scale)
  assert y.dtype == jnp.float32 and h.dtype == jnp.bfloat16
  assert_close(y, oracle(h, scale), "float32", 1000)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_out_dtype(impl, dtype):
  x, scale = random_inputs(5, (6, 896), dtype, "float32")
  for out in ("float32", "bfloat16", "float16"):
    y = _fn(impl, jax_rmsnorm.rms_norm, out_dtype=out)(x, scale)
    assert y.dtype == jnp.dtype(out)
    assert_close(y, oracle(x, scale), out, 896)


def _hf_oracle(x, scale) -> np.ndarray:
  """Hugging Face LlamaRMSNorm's cast order in float64 numpy, as a tolerance
  check: normalize, round to x's dtype, multiply by the scale."""
  xhat = oracle(x)
  rounded = np.asarray(jnp.asarray(xhat, jnp.float32).astype(x.dtype),
                       np.float64)
  return rounded * np.asarray(scale, np.float64)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_hf_cast_order(impl, dtype):
  """"hf" rounds the normalized x to its dtype before the scale: with a
  scale of x's dtype the result is HF's; it differs from the float32 order
  in the last bit of some elements."""
  x, scale = random_inputs(6, (8, 2048), dtype)
  y = _fn(impl, jax_rmsnorm.rms_norm, cast_order="hf")(x, scale)
  # Two roundings to dtype: xhat's (the oracle rounds the exact xhat in the
  # same place) and y's.
  worst = testing.worst_excess(y, _hf_oracle(x, scale), dtype, 2048,
                               roundings=2)
  assert worst.excess <= 0, worst
  if dtype != "float32":
    y32 = _fn(impl, jax_rmsnorm.rms_norm)(x, scale)
    assert not np.array_equal(np.asarray(y), np.asarray(y32))


def _hf_llama_jnp(x, scale, eps=1e-6):
  """transformers' LlamaRMSNorm.forward, transcribed to jnp."""
  input_dtype = x.dtype
  hidden = x.astype(jnp.float32)
  variance = jnp.mean(hidden ** 2, axis=-1, keepdims=True)
  hidden = hidden * jax.lax.rsqrt(variance + eps)
  return scale * hidden.astype(input_dtype)


@pytest.mark.skipif(ON_GPU, reason="bit parity needs the same rsqrt and sum "
                    "order: XLA on CPU, which runs interpret mode too")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS[:2])
def test_hf_cast_order_is_bitwise_hf_on_cpu(impl):
  x, scale = random_inputs(7, (16, 4096), "bfloat16")
  y = _fn(impl, jax_rmsnorm.rms_norm, cast_order="hf")(x, scale)
  want = jax.jit(_hf_llama_jnp)(x, scale)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_add_rms_norm_batch_invariance(impl):
  x, residual, scale = _inputs((37, 5120), "bfloat16", "bfloat16")
  fn = _fn(impl)
  y, h = fn(x, residual, scale)
  y2, h2 = fn(x[20:23], residual[20:23], scale)
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(y[20:23]))
  np.testing.assert_array_equal(np.asarray(h2), np.asarray(h[20:23]))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_add_rms_norm_zero_rows(impl):
  x = jnp.zeros((0, 128), jnp.bfloat16)
  y, h = _fn(impl)(x, x.astype(jnp.float32), jnp.ones(128))
  assert y.shape == h.shape == x.shape
  assert y.dtype == h.dtype == jnp.float32


@pytest.mark.skipif(not ON_GPU, reason="compiled Pallas kernels need an "
                    "NVIDIA GPU")
@pytest.mark.parametrize("m,n,dtype", shapes.BENCHMARK_SHAPES,
                         ids=lambda v: str(v))
def test_benchmark_shapes_compiled_add(m, n, dtype):
  x, residual, scale = _inputs((m, n), dtype, dtype, dtype)
  y, h = _fn(("triton", False))(x, residual, scale)
  np.testing.assert_array_equal(np.asarray(h), _h_exact(x, residual))
  assert_close(y, oracle(h, scale), dtype, n)
