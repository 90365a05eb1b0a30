"""Output types of the kernels, right inside `shard_map` too.

Under `shard_map(..., check_vma=True)` every value records the manual mesh
axes it varies over, and a `pallas_call` must say so of its outputs: they
vary over every axis any input varies over. Outside `shard_map` that set is
empty.
"""

from __future__ import annotations

import jax


def varying_axes(*arrays) -> frozenset:
  """Manual mesh axes any of `arrays` varies over (empty outside shard_map)."""
  axes = frozenset()
  for a in arrays:
    if a is None:
      continue
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    if mat is not None:
      axes |= mat.varying
  return axes


def manual_axes() -> tuple[str, ...]:
  """The mesh axes of the enclosing shard_map (empty outside one)."""
  return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """A kernel output of `shape` and `dtype` that varies as the inputs `like`
  do (inside shard_map), or a plain one."""
  if not manual_axes():
    return jax.ShapeDtypeStruct(shape, dtype)
  axes = varying_axes(*like)
  return jax.ShapeDtypeStruct(
      shape, dtype,
      manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
