"""What the nnx and linen layers share: the checks of flax's options and the
dtype rules of flax's RMSNorm, mapped onto rms_norm's arguments."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from jax_rmsnorm._src import validation


def check_supported_options(x, *, reduction_axes, feature_axes, axis_name,
                            axis_index_groups, mask) -> None:
  """Raises NotImplementedError naming any option the kernel cannot honour
  (after the checks of x that the options' meaning depends on)."""
  x = validation.as_float_array("x", x)
  if x.ndim < 1:
    raise ValueError(f"x must have at least one axis, got {x.shape=}")
  last = (x.ndim - 1,)
  for name, axes in (("reduction_axes", reduction_axes),
                     ("feature_axes", feature_axes)):
    axes = tuple(axes) if isinstance(axes, Sequence) else (axes,)
    if tuple(a % x.ndim for a in axes) != last:
      raise NotImplementedError(
          f"{name}={axes!r}: jax_rmsnorm normalizes over the last axis only "
          "(-1); use flax's RMSNorm for other axes")
  if axis_name is not None or axis_index_groups is not None:
    raise NotImplementedError(
        f"axis_name={axis_name!r}, axis_index_groups={axis_index_groups!r}: "
        "statistics across the devices of a pmap/shard_map axis are not "
        "supported. Under jax.jit with sharded inputs (any mesh axes, the "
        "hidden axis included) the layer partitions itself and needs no "
        "axis_name; inside shard_map it normalizes each device's rows as "
        "given")
  if mask is not None:
    raise NotImplementedError("mask: masked statistics are not supported")


def result_dtype(x, scale, dtype):
  """flax's output dtype: `dtype`, else x's and the scale's promoted."""
  if dtype is not None:
    if jnp.dtype(dtype) not in validation.SUPPORTED_DTYPES:
      raise TypeError(f"out_dtype (the layer's dtype={dtype!r}) is not "
                      "supported; use float16, bfloat16, float32 or None")
    return jnp.dtype(dtype)
  return jnp.result_type(x) if scale is None else jnp.result_type(x, scale)


def narrowed(value, dtype):
  """`value` cast to `dtype` where that rounds it (flax computes in `dtype`);
  widening casts are skipped: they are exact, and the kernel reads the
  narrower array for less."""
  dtype = jnp.dtype(dtype)
  if value is None or jnp.finfo(value.dtype).bits <= jnp.finfo(dtype).bits:
    return value
  return value.astype(dtype)
