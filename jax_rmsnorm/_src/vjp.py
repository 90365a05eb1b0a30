"""Differentiation rules of the ops, whatever backend runs them.

- First order (`jax.grad`, `jax.vjp`): a `custom_vjp`. Its primal is the
  plain forward (under jit without a gradient nothing else runs). Under
  differentiation the forward also saves a float32 rstd per row, and the
  backward op computes dx and d(scale) from x (h, for add_rms_norm), dy
  [, dh] and rstd. Cotangents that are zero (an unused h or y) are not
  materialized.
- Second order (grad of grad, `jax.jvp` of `jax.grad`): the forward and the
  backward ops each carry a `custom_jvp` rule built on the reference's
  arithmetic (`reference.forward`/`backward`), so the kernels run the first
  order and XLA the derivative of it.
- Where XLA's training step is the faster (`apply_xla_gradient`): the
  forward kernel without a gradient, XLA's autodiff of the reference with
  one.

Both ops are applied shard by shard through `partitioning`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jax_rmsnorm._src import partitioning
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import validation


@dataclasses.dataclass(frozen=True)
class Ops:
  """The per-device forward and backward chosen by dispatch, and the
  options they run with."""
  forward: partitioning.Local
  backward: partitioning.Local
  opts: validation.Options
  x_dtype: jnp.dtype  # dx is returned in x's dtype (h's is residual's)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4))
def _forward(ops: Ops, x, residual, scale, save_rstd: bool):
  return partitioning.forward(ops.forward, x, residual, scale,
                              save_rstd=save_rstd)


@_forward.defjvp
def _forward_jvp(ops, save_rstd, primals, tangents):
  def ref(x, residual, scale):
    return reference.forward(x, residual, scale, save_rstd=save_rstd,
                             **ops.opts.forward_kwargs())
  _, out_tangents = jax.jvp(ref, primals, tangents)
  return _forward(ops, *primals, save_rstd), out_tangents


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _backward(ops: Ops, x, dy, dh, scale, rstd):
  return partitioning.backward(ops.backward, x, dy, dh, scale, rstd)


@_backward.defjvp
def _backward_jvp(ops, primals, tangents):
  def ref(x, dy, dh, scale, rstd):
    return reference.backward(x, dy, dh, scale, rstd,
                              **ops.opts.backward_kwargs())
  _, out_tangents = jax.jvp(ref, primals, tangents)
  return _backward(ops, *primals), out_tangents


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def apply_xla_gradient(ops: Ops, x, residual, scale):
  """(y, h) from the forward kernel; differentiated as XLA differentiates the
  reference (for shapes where XLA's training step is the faster one): under
  jit without a gradient only the kernel runs, under a gradient XLA fuses
  the reference's forward and backward as it would on its own."""
  out = _forward(ops, x, residual, scale, False)
  return out.y, out.h


@apply_xla_gradient.defjvp
def _apply_xla_gradient_jvp(ops, primals, tangents):
  def ref(x, residual, scale):
    out = reference.forward(x, residual, scale, **ops.opts.forward_kwargs())
    return out.y, out.h
  return jax.jvp(ref, primals, tangents)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def apply(ops: Ops, x, residual, scale):
  """(y, h) of rms_norm (h None) or add_rms_norm, differentiable."""
  out = _forward(ops, x, residual, scale, False)
  return out.y, out.h


def _apply_fwd(ops, x, residual, scale):
  # symbolic_zeros: the primals come wrapped, with whether they are perturbed.
  x, residual, scale = (None if a is None else a.value
                        for a in (x, residual, scale))
  out = _forward(ops, x, residual, scale, True)
  normalized = x if residual is None else out.h
  return (out.y, out.h), (normalized, scale, out.rstd)


def _is_zero(ct) -> bool:
  return isinstance(ct, SymbolicZero)


def _apply_bwd(ops, saved, cotangents):
  normalized, scale, rstd = saved
  dy, dh = cotangents
  has_residual = dh is not None  # h's cotangent, when there is an h.
  dh = None if dh is None or _is_zero(dh) else dh
  if _is_zero(dy):  # Only h is used: its cotangent passes straight through.
    dx = (jnp.zeros(normalized.shape, normalized.dtype) if dh is None
          else dh.astype(normalized.dtype))
    dscale = None if scale is None else jnp.zeros(scale.shape, jnp.float32)
  else:
    dx, dscale = _backward(ops, normalized, dy, dh, scale, rstd)
  if dscale is not None:
    dscale = dscale.astype(scale.dtype)
  # d(x) in x's dtype; d(residual) is the same gradient, in h's dtype.
  return (dx.astype(ops.x_dtype), dx if has_residual else None, dscale)


apply.defvjp(_apply_fwd, _apply_bwd, symbolic_zeros=True)
