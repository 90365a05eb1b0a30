"""One call, lowered per platform: a kernel on CUDA, the reference elsewhere.

`jax.lax.platform_dependent` would say this, but it lowers each of its
branches for every platform of a multi-platform export, and Pallas refuses
to lower a compiled kernel for the CPU ("Only interpret mode is supported on
CPU backend"): `jax.export(..., platforms=["cuda", "cpu"])` fails. This
primitive has one lowering rule per platform instead, and JAX lowers each
rule for its own platform only, so the CUDA rule alone sees the kernel.
The choice is made when the program is lowered: one jitted or exported
function carries both.
"""

from __future__ import annotations

import functools

import jax
from jax.extend import core as jex_core
from jax.interpreters import batching
from jax.interpreters import mlir

per_platform_p = jex_core.Primitive("jax_rmsnorm_per_platform")
per_platform_p.multiple_results = True


class _Flat:
  """A function of flat arrays built from one of pytrees (hashable by
  identity, as primitive parameters must be)."""

  def __init__(self, fn, in_tree, out_tree=None):
    self.fn, self.in_tree, self.out_tree = fn, in_tree, out_tree

  def __call__(self, *flat):
    out = self.fn(*jax.tree.unflatten(self.in_tree, flat))
    leaves, tree = jax.tree.flatten(out)
    if self.out_tree is None:
      self.out_tree = tree
    return leaves


def call(cuda_fn, default_fn, *args):
  """`cuda_fn(*args)` where the program runs on CUDA, `default_fn(*args)`
  anywhere else. Both must return the same structure of arrays."""
  flat, in_tree = jax.tree.flatten(args)
  default = _Flat(default_fn, in_tree)
  out_avals = tuple(jax.make_jaxpr(default)(*flat).out_avals)
  outs = per_platform_p.bind(*flat, cuda=_Flat(cuda_fn, in_tree),
                             default=default, out_avals=out_avals)
  return jax.tree.unflatten(default.out_tree, outs)


def _impl(*args, **params):
  return jax.jit(functools.partial(per_platform_p.bind, **params))(*args)


per_platform_p.def_impl(_impl)
per_platform_p.def_abstract_eval(
    lambda *avals, cuda, default, out_avals: list(out_avals))


def _lowering(which: str):
  def rule(ctx, *args, cuda, default, out_avals):
    del out_avals
    fn = cuda if which == "cuda" else default
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
  return rule


mlir.register_lowering(per_platform_p, _lowering("cuda"), platform="cuda")
mlir.register_lowering(per_platform_p, _lowering("default"))


def _batch(args, dims, *, cuda, default, out_avals):
  """vmap: both functions vmapped alike, outputs batched at axis 0."""
  del out_avals
  in_axes = tuple(None if d is batching.not_mapped else d for d in dims)
  vmapped = [functools.partial(
      lambda f, *a: jax.vmap(f, in_axes=in_axes)(*a), f)
             for f in (cuda, default)]
  outs = call(vmapped[0], vmapped[1], *args)
  return outs, [0] * len(outs)


batching.primitive_batchers[per_platform_p] = _batch
