"""The Flax layers drop in for flax.nnx.RMSNorm / flax.linen.RMSNorm."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax
from flax import linen as nn
from flax import nnx

import jax_rmsnorm.linen
import jax_rmsnorm.nnx
from jax_rmsnorm._src import testing
from tests.conftest import IMPLEMENTATIONS

N = 96
# (x dtype, dtype, param_dtype): what flax users run, mixed precision included.
COMBOS = [c for c in itertools.product(
    ["float32", "bfloat16", "float16"], [None, "bfloat16", "float32"],
    ["float32", "bfloat16"])]


def _x(dtype, shape=(2, 5, N), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(
      dtype)


def assert_matches_flax(ours, theirs):
  """Same dtype; values within two roundings of the output dtype (each
  implementation rounds once, from float32 math in a different order)."""
  assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
  dtype = ours.dtype
  ref = np.asarray(theirs, np.float64)
  bound = 2 * testing.tolerance(dtype, N) * np.abs(ref) + float(
      jnp.finfo(dtype).tiny)
  err = np.abs(np.asarray(ours, np.float64) - ref)
  assert np.all(err <= bound), float(np.max(err - bound))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("x_dtype,dtype,param_dtype", COMBOS, ids=str)
def test_nnx_layer_matches_flax(impl, x_dtype, dtype, param_dtype):
  kwargs = dict(dtype=dtype, param_dtype=param_dtype,
                scale_init=nnx.initializers.normal(1.0))
  theirs = nnx.RMSNorm(N, rngs=nnx.Rngs(0), **kwargs)
  ours = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(1), implementation=impl[0],
                                 interpret=impl[1], **kwargs)
  nnx.update(ours, nnx.state(theirs))  # flax's state loads unchanged.
  x = _x(x_dtype)
  assert_matches_flax(nnx.jit(ours)(x), theirs(x))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("x_dtype,dtype,param_dtype", COMBOS, ids=str)
def test_linen_layer_matches_flax(impl, x_dtype, dtype, param_dtype):
  kwargs = dict(dtype=dtype, param_dtype=param_dtype,
                scale_init=nn.initializers.normal(1.0))
  theirs = nn.RMSNorm(**kwargs)
  ours = jax_rmsnorm.linen.RMSNorm(implementation=impl[0], interpret=impl[1],
                                   **kwargs)
  x = _x(x_dtype)
  params = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == (
      jax.tree.map(jnp.shape, params))
  assert_matches_flax(jax.jit(ours.apply)(params, x), theirs.apply(params, x))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_defaults_state_and_no_scale(impl):
  ours = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0), implementation=impl[0],
                                 interpret=impl[1])
  theirs = nnx.RMSNorm(N, rngs=nnx.Rngs(0))
  assert ours.epsilon == theirs.epsilon == 1e-6
  assert isinstance(ours, nnx.RMSNorm)
  assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(
      jnp.shape, nnx.state(theirs))
  x = _x("bfloat16")
  assert_matches_flax(ours(x), theirs(x))
  bare = jax_rmsnorm.nnx.RMSNorm(N, use_scale=False, rngs=nnx.Rngs(0),
                                 implementation=impl[0], interpret=impl[1])
  assert_matches_flax(bare(x), nnx.RMSNorm(N, use_scale=False,
                                           rngs=nnx.Rngs(0))(x))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradients_match_flax(impl):
  kwargs = dict(dtype=jnp.float32, scale_init=nnx.initializers.normal(1.0))
  theirs = nnx.RMSNorm(N, rngs=nnx.Rngs(0), **kwargs)
  ours = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0), implementation=impl[0],
                                 interpret=impl[1], **kwargs)
  x, dy = _x("float32"), _x("float32", seed=1)

  def loss(model, x):
    return jnp.sum(model(x) * dy)

  g_theirs = nnx.grad(loss, argnums=(0, 1))(theirs, x)
  g_ours = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(ours, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    err = testing.relative_error(a, np.asarray(b, np.float64))
    assert err <= 1e-5, err  # float32 both, different summation orders.


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_add_and_normalize_is_the_unfused_residual_step(impl, dtype):
  ours = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0), dtype=dtype,
                                 implementation=impl[0], interpret=impl[1])
  theirs = nnx.RMSNorm(N, rngs=nnx.Rngs(0), dtype=dtype)
  x, residual = _x("bfloat16"), _x("bfloat16", seed=2)
  y, h = ours.add_and_normalize(x, residual)
  np.testing.assert_array_equal(np.asarray(h), np.asarray(x + residual))
  assert_matches_flax(y, theirs(x + residual))


UNSUPPORTED = [
    ("reduction_axes", dict(reduction_axes=(-2, -1)), "reduction_axes"),
    ("feature_axes", dict(feature_axes=0), "feature_axes"),
    ("axis_name", dict(axis_name="batch"), "axis_name='batch'"),
    ("axis_index_groups", dict(axis_index_groups=[[0]]), "axis_index_groups"),
]


@pytest.mark.parametrize("desc,kwargs,fragment", UNSUPPORTED,
                         ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_options_say_so(desc, kwargs, fragment):
  del desc
  x = _x("float32")
  layer = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0), **kwargs)
  with pytest.raises(NotImplementedError, match=fragment):
    layer(x)
  module = jax_rmsnorm.linen.RMSNorm(**kwargs)
  with pytest.raises(NotImplementedError, match=fragment):
    module.init(jax.random.key(0), x)


def test_mask_and_bad_input_say_so():
  x = _x("float32")
  layer = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="mask"):
    layer(x, mask=jnp.ones(x.shape, bool))
  with pytest.raises(NotImplementedError, match="mask"):
    jax_rmsnorm.linen.RMSNorm().init(jax.random.key(0), x,
                                     mask=jnp.ones(x.shape, bool))
  with pytest.raises(TypeError, match="x must be a floating-point"):
    layer(jnp.ones((2, N), jnp.int32))
  with pytest.raises(ValueError, match="scale must have shape"):
    layer(jnp.ones((2, N + 1)))


LAYER_BAD = [
    ("x of rank 0", jnp.float32(1.0), ValueError, "at least one axis"),
    ("x a list", [[1.0] * N], TypeError, "x must be a jax.Array"),
    ("x float64", np.ones((2, N)), TypeError, "x.dtype=float64"),
    ("x complex", jnp.ones((2, N), jnp.complex64), TypeError,
     "x must be a floating-point"),
    ("wrong width", jnp.ones((2, N - 1)), ValueError, "scale must have shape"),
]


@pytest.mark.parametrize("desc,x,exc,fragment", LAYER_BAD,
                         ids=[b[0] for b in LAYER_BAD])
def test_layers_refuse_bad_input_clearly(desc, x, exc, fragment):
  with pytest.raises(exc, match=fragment):
    jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0))(x)
  # linen checks a stored parameter's shape itself, as for flax's layer.
  linen_exc = flax.errors.ScopeParamShapeError if desc == "wrong width" else exc
  with pytest.raises(linen_exc, match="scale" if desc == "wrong width"
                     else fragment):
    jax_rmsnorm.linen.RMSNorm().apply(
        {"params": {"scale": jnp.ones(N)}}, x)
  with pytest.raises(TypeError, match="out_dtype"):
    jax_rmsnorm.nnx.RMSNorm(N, dtype=jnp.int32, rngs=nnx.Rngs(0))(
        jnp.ones((2, N)))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_layers_take_zero_rows(impl):
  x = jnp.zeros((0, 3, N), jnp.bfloat16)
  y = jax_rmsnorm.nnx.RMSNorm(N, rngs=nnx.Rngs(0), implementation=impl[0],
                              interpret=impl[1])(x)
  assert y.shape == x.shape and y.dtype == jnp.float32  # promoted, as flax


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nnx_quantize_method(impl):
  """The layer's quantize method: the layer's scale and epsilon, y_q and
  per-token scales that dequantize to the layer's float32 output within
  half an fp8 step; a static scale; with a residual, h too."""
  layer = jax_rmsnorm.nnx.RMSNorm(N, epsilon=1e-5, rngs=nnx.Rngs(0),
                                  scale_init=nnx.initializers.normal(1.0),
                                  implementation=impl[0], interpret=impl[1])
  x = _x("bfloat16")
  y = np.asarray(jax_rmsnorm.rms_norm(x, layer.scale[...], epsilon=1e-5,
                                      out_dtype=jnp.float32,
                                      implementation="xla"))
  y_q, row_scales = nnx.jit(lambda m, x: m.quantize(x))(layer, x)
  assert y_q.dtype == jnp.float8_e4m3fn and row_scales.shape == (2, 5, 1)
  deq = np.asarray(y_q.astype(jnp.float32)) * np.asarray(row_scales)
  # e4m3 keeps 3 mantissa bits: half a step is 2**-4 of the value.
  assert np.all(np.abs(deq - y) <= 2.0**-4 * np.abs(y) + 1e-6), np.max(
      np.abs(deq - y) - 2.0**-4 * np.abs(y))
  y_q = layer.quantize(x, quant_dtype=jnp.int8, quant_scale=0.05)
  assert y_q.dtype == jnp.int8
  # One code off at most, where y sits at a rounding tie within float32
  # error (the kernel's y is the reference's up to its sum order).
  codes = np.clip(np.round(y / 0.05), -127, 127)
  assert np.max(np.abs(np.asarray(y_q, np.float64) - codes)) <= 1
  y_q, row_scales, h = layer.quantize(x, residual=x)
  np.testing.assert_array_equal(np.asarray(h), np.asarray(x + x))
