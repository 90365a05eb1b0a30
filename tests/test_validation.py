"""Bad input is refused with a clear error at trace time, never compiled."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_rmsnorm
from tests.conftest import assert_close, oracle, random_inputs

X = jnp.ones((4, 8), jnp.float32)
S = jnp.ones((8,), jnp.float32)

BAD = [
    # (description, kwargs for rms_norm, exception, message fragment)
    ("scale too short", dict(scale=jnp.ones(7)), ValueError, "scale must have shape (8,)"),
    ("scale of rank 2", dict(scale=jnp.ones((1, 8))), ValueError, "scale must have shape (8,)"),
    ("x of rank 0", dict(x=jnp.float32(1.0)), ValueError, "at least one axis"),
    ("N = 0", dict(x=jnp.ones((3, 0))), ValueError, "last axis of x must be non-empty"),
    ("integer x", dict(x=jnp.ones((4, 8), jnp.int32)), TypeError, "x must be a floating-point"),
    ("bool x", dict(x=jnp.ones((4, 8), bool)), TypeError, "x must be a floating-point"),
    ("complex x", dict(x=jnp.ones((4, 8), jnp.complex64)), TypeError, "x must be a floating-point"),
    ("float64 x", dict(x=np.ones((4, 8), np.float64)), TypeError, "x.dtype=float64 is not supported"),
    ("integer scale", dict(scale=jnp.ones(8, jnp.int32)), TypeError, "scale must be a floating-point"),
    ("list x", dict(x=[[1.0, 2.0]]), TypeError, "x must be a jax.Array or numpy.ndarray, got list"),
    ("epsilon zero", dict(epsilon=0.0), ValueError, "epsilon must be finite and > 0, got epsilon=0.0"),
    ("epsilon negative", dict(epsilon=-1e-6), ValueError, "epsilon must be finite and > 0"),
    ("epsilon NaN", dict(epsilon=float("nan")), ValueError, "epsilon must be finite and > 0"),
    ("epsilon inf", dict(epsilon=float("inf")), ValueError, "epsilon must be finite and > 0"),
    ("epsilon string", dict(epsilon="1e-6"), TypeError, "epsilon must be a real Python number"),
    ("epsilon array", dict(epsilon=np.ones(2)), TypeError, "epsilon must be a real Python number"),
    ("offset inf", dict(scale_offset=float("inf")), ValueError, "scale_offset must be finite"),
    ("offset without scale", dict(scale=None, scale_offset=1.0), ValueError, "needs a scale"),
    ("unknown implementation", dict(implementation="cuda"), ValueError, "unknown implementation 'cuda'"),
    ("empty implementation", dict(implementation=()), ValueError, "is empty"),
    ("implementation type", dict(implementation=3), TypeError, "implementation must be None"),
    ("interpret with xla", dict(implementation="xla", interpret=True), ValueError, "interpret=True runs a Pallas kernel"),
    ("interpret not bool", dict(interpret="yes"), TypeError, "interpret must be a bool"),
    ("out_dtype int", dict(out_dtype=jnp.int32), TypeError, "out_dtype=dtype('int32') is not supported"),
    ("out_dtype float64", dict(out_dtype=np.float64), TypeError, "out_dtype=dtype('float64') is not supported"),
    ("out_dtype nonsense", dict(out_dtype="fp8-ish"), TypeError, "out_dtype must be a dtype"),
    ("cast_order unknown", dict(cast_order="torch"), ValueError, "unknown cast_order='torch'"),
    ("cast_order None", dict(cast_order=None), ValueError, "unknown cast_order=None"),
]
# add_rms_norm only: the residual.
BAD_RESIDUAL = [
    ("residual of another shape", dict(residual=jnp.ones((4, 9))), ValueError, "residual must have x's shape (4, 8), got residual.shape=(4, 9)"),
    ("residual broadcastable", dict(residual=jnp.ones((8,))), ValueError, "residual must have x's shape"),
    ("integer residual", dict(residual=jnp.ones((4, 8), jnp.int32)), TypeError, "residual must be a floating-point"),
    ("float64 residual", dict(residual=np.ones((4, 8))), TypeError, "residual.dtype=float64 is not supported"),
    ("list residual", dict(residual=[[1.0] * 8] * 4), TypeError, "residual must be a jax.Array"),
    ("residual None", dict(residual=None), TypeError, "residual must be a jax.Array"),
]


def _norm(x=X, scale=S, **kwargs):
  return jax_rmsnorm.rms_norm(x, scale, **kwargs)


def _add_norm(x=X, scale=S, residual=X, **kwargs):
  return jax_rmsnorm.add_rms_norm(x, residual, scale, **kwargs)


CASES = ([pytest.param(_norm, *case, id=f"rms_norm-{case[0]}") for case in BAD]
         + [pytest.param(_add_norm, *case, id=f"add_rms_norm-{case[0]}")
            for case in BAD + BAD_RESIDUAL])


@pytest.mark.parametrize("call,desc,kwargs,exc,fragment", CASES)
def test_bad_input_raises_clearly(call, desc, kwargs, exc, fragment):
  del desc
  with pytest.raises(exc) as info:
    call(**kwargs)
  assert fragment in str(info.value)
  # The same error comes at trace time under jit, before lowering; the
  # reference entry point validates identically.
  with pytest.raises(exc):
    jax.eval_shape(functools.partial(call, **kwargs))
  if call is _norm and "implementation" not in kwargs and (
      "interpret" not in kwargs):
    with pytest.raises(exc):
      jax_rmsnorm.rms_norm_reference(
          kwargs.get("x", X), kwargs.get("scale", S),
          **{k: v for k, v in kwargs.items() if k not in ("x", "scale")})


def test_traced_epsilon_is_refused():
  with pytest.raises(TypeError, match="epsilon must be a static Python float"):
    jax.jit(lambda eps: jax_rmsnorm.rms_norm(X, S, epsilon=eps))(1e-6)
  with pytest.raises(TypeError, match="epsilon must be a static Python float"):
    jax.jit(lambda eps: jax_rmsnorm.add_rms_norm(X, X, S, epsilon=eps))(1e-6)


def test_checks_hold_with_chex_asserts_disabled():
  """chex can be switched off; the kernel still refuses a wrong scale."""
  chex.disable_asserts()
  try:
    with pytest.raises(ValueError, match=r"scale.shape=\(7,\)"):
      jax_rmsnorm.rms_norm(X, jnp.ones(7), interpret=True)
    with pytest.raises(ValueError, match=r"scale.shape=\(7,\)"):
      jax_rmsnorm.add_rms_norm(X, X, jnp.ones(7), interpret=True)
  finally:
    chex.enable_asserts()


@pytest.mark.parametrize("implementation,interpret",
                         [("xla", False), ("triton", True)])
def test_numpy_inputs_and_numpy_scalars_work(implementation, interpret):
  x, scale = random_inputs(0, (3, 40), "float32")
  y = jax_rmsnorm.rms_norm(np.asarray(x), np.asarray(scale),
                           epsilon=np.float32(1e-5), scale_offset=np.int64(0),
                           implementation=implementation, interpret=interpret)
  assert_close(y, oracle(x, scale, 1e-5), "float32", 40)


@pytest.mark.parametrize("implementation,interpret",
                         [("xla", False), ("triton", True)])
def test_add_rms_norm_takes_numpy_inputs(implementation, interpret):
  x, scale = random_inputs(1, (3, 40), "float32")
  residual, _ = random_inputs(2, (3, 40), "float32")
  y, h = jax_rmsnorm.add_rms_norm(
      np.asarray(x), np.asarray(residual), np.asarray(scale),
      implementation=implementation, interpret=interpret)
  np.testing.assert_array_equal(np.asarray(h), np.asarray(x + residual))
  assert_close(y, oracle(h, scale), "float32", 40)
