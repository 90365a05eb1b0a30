"""What the Triton kernels share: the one pallas_call, the in-kernel
rounding, and the limits of what they can run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import reference
from jax_rmsnorm._src.triton import config as triton_config


def round_trip(value: jax.Array, dtype, interpret: bool) -> jax.Array:
  """float32 `value` rounded to `dtype`, as float32, inside a kernel.

  Triton keeps the two converts. Interpret mode runs the kernel through XLA,
  which may drop the pair (excess precision): there reduce_precision rounds.
  """
  if interpret:
    return reference.round_to(value, dtype)
  return value.astype(dtype).astype(jnp.float32)


def ds(start, size: int) -> pl.Slice:
  """`pl.ds` with an int32 start: in x64 mode a Python int start would be
  int64 beside the int32 program ids, which Pallas cannot mix."""
  if isinstance(start, int):
    start = jnp.int32(start)
  return pl.ds(start, size)


def columns(ref, start, size: int):
  """`ref[..., start:start + size]` of a 1-D or 2-D ref, every index int32
  (a bare `:` would be an int64 zero in x64 mode)."""
  if ref.ndim == 1:
    return ref.at[ds(start, size)]
  return ref.at[ds(0, ref.shape[0]), ds(start, size)]


def check_supported(m: int, n: int, dtype=None, *,
                    backward: bool = False) -> None:
  """Raises NotImplementedError where the kernels cannot run (m rows of n,
  of any supported dtype)."""
  del dtype
  if n > triton_config.MAX_COLS:
    raise NotImplementedError(
        f"rows of {n} elements exceed the Triton kernels' limit of "
        f"{triton_config.MAX_COLS}")
  if m * n > triton_config.MAX_ELEMENTS:
    raise NotImplementedError(
        f"{m * n} elements exceed the Triton kernels' int32 indexing "
        f"({triton_config.MAX_ELEMENTS})")
  if backward and pl.next_power_of_2(n) > triton_config.MAX_ONE_PASS_COLS:
    raise NotImplementedError(
        f"the Triton backward holds a row in registers; rows of {n} elements "
        f"exceed its limit of {triton_config.MAX_ONE_PASS_COLS}")


def launch(kernel, *, name: str, config: triton_config.Config, grid,
           in_specs, out_specs, out_shape, interpret: bool,
           input_output_aliases=None):
  """The one pallas_call of every Triton kernel here."""
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=name,
      input_output_aliases=input_output_aliases or {},
  )
