"""Argument checks for the public API: static shapes, dtypes and options.

Everything here runs at trace time, before anything is lowered, so bad input
fails with a ValueError/TypeError naming the argument instead of a compiler
traceback. No math lives here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16),
                    jnp.dtype(jnp.float32))
IMPLEMENTATIONS = ("mosaic", "triton", "xla")
CAST_ORDERS = ("float32", "hf")
KERNEL_IMPLEMENTATIONS = ("mosaic", "triton")


@dataclasses.dataclass(frozen=True)
class Options:
  """The static options of one call, validated (hashable)."""
  epsilon: float
  scale_offset: float
  out_dtype: jnp.dtype | None
  cast_order: str

  def forward_kwargs(self) -> dict:
    return dict(epsilon=self.epsilon, scale_offset=self.scale_offset,
                out_dtype=self.out_dtype, cast_order=self.cast_order)

  def backward_kwargs(self) -> dict:
    return dict(scale_offset=self.scale_offset, cast_order=self.cast_order)


def _checked(check, exception_type, message: str) -> None:
  """Runs a chex assertion; on failure raises `exception_type(message)`, our
  sentence first (chex's own text stays in the chained exception)."""
  try:
    check()
  except (AssertionError, TypeError, ValueError) as e:
    raise exception_type(message) from e


def _array(name: str, value):
  """`value` if it is an array (of any dtype yet); TypeError otherwise."""
  if not isinstance(value, (jax.Array, np.ndarray)):
    raise TypeError(f"{name} must be a jax.Array or numpy.ndarray, got "
                    f"{type(value).__name__} ({value!r:.80})")
  return value


def _float_dtype(name: str, value, *, cast_float64: bool = False):
  """`value` as a jax.Array of a supported dtype, checked before conversion
  (jnp.asarray would silently turn float64 into float32). With
  `cast_float64` a float64 array (x64 mode's default, for a parameter) is
  cast to float32; its gradient comes back in float64."""
  _checked(lambda: chex.assert_type(value, float), TypeError,
           f"{name} must be a floating-point array, got {name}.dtype="
           f"{value.dtype}")
  if cast_float64 and value.dtype == np.float64:
    return jnp.asarray(value).astype(jnp.float32)
  if value.dtype not in SUPPORTED_DTYPES:
    raise TypeError(
        f"{name}.dtype={value.dtype} is not supported; use one of "
        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
  return jnp.asarray(value)


def as_float_array(name: str, value) -> jax.Array:
  """`value` as a jax.Array of a supported float dtype, or TypeError."""
  return _float_dtype(name, _array(name, value))


def static_float(name: str, value, *, positive: bool) -> float:
  """Returns `value` as a Python float, or raises naming `name`."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python float, got a traced "
                    f"value {value}; pass a Python number")
  if isinstance(value, (bool, np.bool_)) or (
      np.ndim(value) != 0 or not np.issubdtype(np.asarray(value).dtype,
                                               np.number)):
    raise TypeError(f"{name} must be a real Python number, got {value!r}")
  result = float(value)
  if not math.isfinite(result) or (positive and result <= 0.0):
    raise ValueError(f"{name} must be finite{' and > 0' if positive else ''},"
                     f" got {name}={value!r}")
  return result


def check_args(x, residual, scale, epsilon, scale_offset, out_dtype,
               cast_order):
  """Validates the arguments of `rms_norm`/`add_rms_norm` (residual None for
  the former); returns (x, residual, scale, Options), canonicalized.

  Shapes are checked before dtypes, so that a wrong shape is reported as
  such whatever the dtypes; a float64 scale (x64 mode's default dtype) is
  cast to float32.
  """
  x = _array("x", x)
  if x.ndim < 1:
    raise ValueError(f"x must have at least one axis, got {x.shape=}")
  n = x.shape[-1]
  if n == 0:
    raise ValueError(f"the last axis of x must be non-empty, got {x.shape=}")
  if residual is not None:
    residual = _array("residual", residual)
    _checked(lambda: chex.assert_shape(residual, x.shape), ValueError,
             f"residual must have x's shape {x.shape}, got "
             f"{residual.shape=}")
  if scale is not None:
    scale = _array("scale", scale)
    _checked(lambda: chex.assert_shape(scale, (n,)), ValueError,
             f"scale must have shape ({n},) to match {x.shape=}, got "
             f"{scale.shape=}")
  x = _float_dtype("x", x)
  if residual is not None:
    residual = _float_dtype("residual", residual)
  if scale is not None:
    scale = _float_dtype("scale", scale, cast_float64=True)
  epsilon = static_float("epsilon", epsilon, positive=True)
  scale_offset = static_float("scale_offset", scale_offset, positive=False)
  if scale is None and scale_offset != 0.0:
    raise ValueError(f"{scale_offset=} needs a scale; with scale=None there "
                     "is no scaling")
  if out_dtype is not None:
    try:
      out_dtype = jnp.dtype(out_dtype)
    except TypeError as e:
      raise TypeError(f"out_dtype must be a dtype, got {out_dtype=}") from e
    if out_dtype not in SUPPORTED_DTYPES:
      raise TypeError(
          f"{out_dtype=} is not supported; use one of "
          f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} or None")
  if not isinstance(cast_order, str) or cast_order not in CAST_ORDERS:
    raise ValueError(f"unknown {cast_order=}; choose from {CAST_ORDERS}")
  return x, residual, scale, Options(epsilon, scale_offset, out_dtype,
                                     cast_order)


def canonicalize_implementation(implementation, interpret: bool
                                ) -> tuple[str, ...] | None:
  """The names to try, in order (one: that one or an error); None for the
  automatic choice."""
  if not isinstance(interpret, (bool, np.bool_)):
    raise TypeError(f"interpret must be a bool, got {interpret=}")
  if implementation is None:
    if not interpret:
      return None
    names = ("triton",)
  elif isinstance(implementation, str):
    names = (implementation,)
  elif isinstance(implementation, Sequence):
    names = tuple(implementation)
    if not names:
      raise ValueError(f"{implementation=} is empty; name at least one of "
                       f"{IMPLEMENTATIONS}")
  else:
    raise TypeError(f"implementation must be None, a string or a sequence of "
                    f"strings, got {implementation=}")
  for name in names:
    if name not in IMPLEMENTATIONS:
      raise ValueError(f"unknown implementation {name!r} in {implementation=};"
                       f" choose from {IMPLEMENTATIONS}")
  if interpret and not any(n in KERNEL_IMPLEMENTATIONS for n in names):
    raise ValueError(f"interpret=True runs a Pallas kernel, but "
                     f"{implementation=} names none of {KERNEL_IMPLEMENTATIONS}")
  return names


def require_operand_shapes(x, residual, scale) -> None:
  """The shapes a kernel relies on, as plain raises: they hold even with
  chex's asserts disabled (`check_args` validates the public arguments)."""
  n = x.shape[-1]
  if scale is not None and scale.shape != (n,):
    raise ValueError(f"{scale.shape=} must be ({n},)")
  if residual is not None and residual.shape != x.shape:
    raise ValueError(f"{residual.shape=} must equal {x.shape=}")
