"""How JAX's partitioner runs the ops on sharded arrays, without gathers.

An op here is a per-device function (`local`) applied to each device's
shard. Which device holds which shard is decided in one of three ways, and
the ops work under each:

- Auto mesh axes (`jax.jit` with `NamedSharding` inputs; the default): the
  partitioner (Shardy, or GSPMD) chooses the shardings. `custom_partitioning`
  teaches it the ops: leading axes keep x's sharding, the hidden axis too,
  and the scale follows x's hidden axis. Its Shardy rule and its GSPMD
  callbacks say the same thing.
- Explicit mesh axes (sharding in types): the shardings are known at trace
  time, and `shard_map` applies the per-device function.
- Inside the user's `shard_map` (every mesh axis manual): the arrays already
  are shards; the per-device function runs on them as they are.

Communication, per op, whatever decided the shardings: none for the rows
when only leading axes are sharded; one psum of a float32 (rows, 1) vector
when the hidden axis is (the partial sums of squares; in the backward the
partial dot products; for a quantized output also a pmax of the row
maxima); one all-reduce of the float32 (N,) d(scale) over the axes that
shard the rows. Activations are never gathered.

Every array an op takes or returns is of one of these kinds, which fix its
sharding from x's:
  "x": (..., N), as x;  "r": (...,), x's rows;  "r1": (..., 1), x's rows;
  "n": (N,), as x's hidden axis;  "1": (1,), replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_rmsnorm._src import avals
from jax_rmsnorm._src import log
from jax_rmsnorm._src.reference import ForwardOutputs

# local(*arrays, hidden_axes=(mesh axes sharding x's rows' elements)).
Local = Callable[..., Sequence]



def _warn_unpartitioned(why: str) -> None:
  """A case the partitioner is not taught: say so, once per reason."""
  log.warn_once(f"jax_rmsnorm: {why} is not partitioned: if its arrays are "
                "sharded, XLA gathers them onto every device first")


def _axes(entry) -> tuple[str, ...]:
  """Mesh axis names of one PartitionSpec entry."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


class _Layout:
  """x's sharding, read as what every kind of array needs."""

  def __init__(self, sharding, ndim: int):
    spec = tuple(sharding.spec) if sharding is not None else ()
    spec += (None,) * (ndim - len(spec))
    self.leading, self.hidden = spec[:-1], spec[-1]
    self.hidden_axes = _axes(self.hidden)
    self.row_axes = tuple(a for e in self.leading for a in _axes(e))

  def spec(self, kind: str) -> P:
    return {"x": P(*self.leading, self.hidden), "r": P(*self.leading),
            "r1": P(*self.leading, None), "n": P(self.hidden),
            "1": P(None)}[kind]


def _rule(ndim: int, operands, results) -> str:
  """The Shardy rule: x's leading axes are factors a0.., its hidden axis n;
  unit axes get factors of their own."""
  lead = [f"a{i}" for i in range(ndim - 1)]
  spell = {"x": lead + ["n"], "r": lead, "r1": lead + ["u"], "n": ["n"],
           "1": ["s"]}
  side = lambda kinds: ", ".join(" ".join(spell[k]) for k in kinds)
  return f"{side(operands)} -> {side(results)}"


class Op:
  """A per-device function with the kinds of its arrays; it returns a tuple
  (None where an output is absent). `summed` names the outputs that are
  sums over the local rows (d(scale)): they are all-reduced over the mesh
  axes that shard the rows, once."""

  def __init__(self, local: Local, in_kinds: Sequence[str],
               out_kinds: Sequence[str], summed: Sequence[int] = ()):
    self.in_kinds, self.out_kinds = tuple(in_kinds), tuple(out_kinds)
    self.local = lambda *args, hidden_axes=(): tuple(
        local(*args, hidden_axes=hidden_axes))
    self.summed = frozenset(summed)

  def per_device(self, hidden_axes, row_axes):
    """The function each device runs, its sums reduced over `row_axes`."""
    def fn(*args):
      outs = list(self.local(*args, hidden_axes=hidden_axes))
      for i in self.summed:
        if outs[i] is not None and row_axes:
          outs[i] = jax.lax.psum(outs[i], row_axes)
      return tuple(outs)
    return fn

  def _specs(self, layout, values, kinds, wrap=lambda spec: spec):
    return tuple(None if v is None else wrap(layout.spec(k))
                 for v, k in zip(values, kinds))

  def __call__(self, *args):
    if avals.manual_axes():
      # d(scale) sums over the rows of every device the inputs vary over
      # where the scale does not: its cotangent must vary as the scale does.
      varying = avals.varying_axes(*args)
      fixed = avals.varying_axes(*[a for a, k in zip(args, self.in_kinds)
                                   if k in ("n", "1")])
      return self.per_device((), tuple(sorted(varying - fixed)))(*args)
    mesh = _explicit_mesh(args[0])
    if mesh is not None:
      return self._explicit(mesh, *args)
    return self._batchable()(*args)

  def _explicit(self, mesh, *args):
    layout = _Layout(jax.typeof(args[0]).sharding, args[0].ndim)
    args = [_reshard(a, layout.spec(k)) for a, k in zip(args, self.in_kinds)]
    fn = self.per_device(layout.hidden_axes, layout.row_axes)
    shapes = self._out_shapes(args)
    return _shard_map(fn, mesh, self._specs(layout, shapes, self.out_kinds))(
        *args)

  def _out_shapes(self, args):
    """The outputs' shapes (None where absent), from unsharded stand-ins:
    Pallas does not trace arrays whose types carry shardings."""
    return jax.eval_shape(self.local, *[
        None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
        for a in args])

  def _partitioned(self, args, shapes):
    """custom_partitioning of the op (Auto axes)."""
    op = self

    def shardings(mesh, layout, values, kinds):
      return op._specs(layout, values, kinds,
                       lambda spec: NamedSharding(mesh, spec))

    def infer(mesh, arg_shapes, result_shape):
      layout = _Layout(arg_shapes[0].sharding, len(arg_shapes[0].shape))
      return shardings(mesh, layout, result_shape, op.out_kinds)

    def partition(mesh, arg_shapes, result_shape):
      layout = _Layout(arg_shapes[0].sharding, len(arg_shapes[0].shape))
      return (mesh, op.per_device(layout.hidden_axes, layout.row_axes),
              shardings(mesh, layout, result_shape, op.out_kinds),
              shardings(mesh, layout, arg_shapes, op.in_kinds))

    present = lambda values, kinds: [k for v, k in zip(values, kinds)
                                     if v is not None]
    fn = custom_partitioning(lambda *args: op.local(*args))
    fn.def_partition(
        partition=partition, infer_sharding_from_operands=infer,
        sharding_rule=_rule(args[0].ndim, present(args, op.in_kinds),
                            present(shapes, op.out_kinds)))
    return fn

  def _batchable(self):
    """The partitioned op, under vmap too (custom_partitioning has no
    batching rule): batched rows are more leading axes; a batched vector
    operand (the scale) is handed to the unpartitioned op under vmap."""
    op = self

    @jax.custom_batching.custom_vmap
    def run(*args):
      if jax.device_count() == 1:
        # Nothing to partition (custom_partitioning would be inlined; it
        # cannot be lowered for an abstract device, as CUDA exports from a
        # CPU host are).
        return op.local(*args)
      if args[0].ndim < 2:
        _warn_unpartitioned(f"x of shape {args[0].shape} (no leading axis)")
        return op.local(*args)
      return op._partitioned(args, op._out_shapes(args))(*args)

    @run.def_vmap
    def _(axis_size, in_batched, *args):
      vectors = ("n", "1")
      if any(b for b, k in zip(in_batched, op.in_kinds) if k in vectors):
        if jax.device_count() > 1:
          _warn_unpartitioned("vmap over the scale")
        in_axes = tuple(None if a is None else (0 if b else None)
                        for a, b in zip(args, in_batched))
        out = jax.vmap(op.local, in_axes=in_axes, axis_size=axis_size)(*args)
        return out, tuple(None if o is None else True for o in out)
      args = [a if a is None or b or k in vectors else
              jnp.broadcast_to(a, (axis_size,) + a.shape)
              for a, b, k in zip(args, in_batched, op.in_kinds)]
      out = run(*args)
      # Row-shaped outputs carry the batch; sums over rows (d(scale)) sum
      # over it too.
      return out, tuple(None if o is None else k not in vectors
                        for o, k in zip(out, op.out_kinds))

    return run


def _explicit_mesh(x):
  """The mesh of x's type when it has Explicit axes (sharding in types)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.axis_names:
    return None
  explicit = jax.sharding.AxisType.Explicit
  if not any(t == explicit for t in mesh.axis_types):
    return None
  return mesh


def _shard_map(fn, mesh, out_specs):
  """shard_map over x's explicit mesh, in_specs from the arguments' types.
  The collectives are explicit here (psums over the axes the layout
  names), so vma checking has nothing to add; it is off because Pallas's
  interpret mode trips it (an invarying pad value inside a varying
  kernel)."""
  return jax.shard_map(fn, mesh=mesh, out_specs=out_specs, check_vma=False)


def _reshard(value, spec):
  if value is None or tuple(jax.typeof(value).sharding.spec) == tuple(spec):
    return value
  return jax.sharding.reshard(value, spec)


# ------------------------------------------------------------------- ops

def forward(local: Local, x, residual, scale, *,
            save_rstd: bool) -> ForwardOutputs:
  """local(x, residual, scale, save_rstd=, hidden_axes=) -> (y, h, rstd),
  shard by shard."""
  op = Op(functools.partial(local, save_rstd=save_rstd), ("x", "x", "n"),
          ("x", "x", "r"))
  return ForwardOutputs(*op(x, residual, scale))


def backward(local: Local, x, dy, dh, scale, rstd):
  """local(x, dy, dh, scale, rstd, hidden_axes=) -> (dx, float32 d(scale)
  summed over the local rows), shard by shard; d(scale) comes back summed
  over every row."""
  return Op(local, ("x", "x", "x", "n", "r"), ("x", "n"), summed=(1,))(
      x, dy, dh, scale, rstd)


def quantize(local: Local, x, residual, scale, quant_scale):
  """local(x, residual, scale, quant_scale, hidden_axes=) -> (y_q,
  row_scales (..., 1) or None, h or None), shard by shard. quant_scale is
  None, (1,) or (N,)."""
  kind = "1" if quant_scale is not None and quant_scale.shape == (1,) else "n"
  return Op(local, ("x", "x", "n", kind), ("x", "r1", "x"))(
      x, residual, scale, quant_scale)
