"""How JAX's partitioner runs the ops on sharded arrays, without gathers.

An op here is a per-device function (`local_forward`, `local_backward`)
applied to each device's shard. Which device holds which shard is decided in
one of three ways, and the ops work under each:

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
when the hidden axis is (the partial sums of squares, in the backward the
partial dot products); one all-reduce of the float32 (N,) d(scale) over the
axes that shard the rows. Activations are never gathered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_rmsnorm._src import avals
from jax_rmsnorm._src.reference import ForwardOutputs

# local_forward(x, residual, scale, *, save_rstd, hidden_axes) -> outputs
LocalForward = Callable[..., ForwardOutputs]
# local_backward(x, dy, dh, scale, rstd, *, hidden_axes) -> (dx, dscale_f32)
LocalBackward = Callable[..., tuple]


def _axes(entry) -> tuple[str, ...]:
  """Mesh axis names of one PartitionSpec entry."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _full_spec(sharding, ndim: int) -> tuple:
  spec = tuple(sharding.spec) if sharding is not None else ()
  return spec + (None,) * (ndim - len(spec))


class _Layout:
  """x's sharding, read as what the ops need: the leading axes' specs, the
  hidden axis' spec, the mesh axes that shard rows and the hidden axis."""

  def __init__(self, spec: tuple):
    self.leading = spec[:-1]
    self.hidden = spec[-1]
    self.hidden_axes = _axes(self.hidden)
    self.row_axes = tuple(a for e in self.leading for a in _axes(e))

  def x(self, mesh):
    return NamedSharding(mesh, P(*self.leading, self.hidden))

  def rows(self, mesh):
    return NamedSharding(mesh, P(*self.leading))

  def scale(self, mesh):
    return NamedSharding(mesh, P(self.hidden))


def _rule(ndim: int, operands: str, results: str) -> str:
  """A Shardy rule over the factors of x: leading axes a0.., hidden n.
  `operands`/`results` spell each array as x (all), r (rows) or n."""
  lead = " ".join(f"a{i}" for i in range(ndim - 1))
  spell = {"x": f"{lead} n".strip(), "r": lead, "n": "n"}
  return (", ".join(spell[c] for c in operands) + " -> "
          + ", ".join(spell[c] for c in results))


def _reduce_dscale(dscale, row_axes):
  if dscale is None or not row_axes:
    return dscale
  return jax.lax.psum(dscale, row_axes)


# ---------------------------------------------------------------- contexts

def _explicit_mesh(x):
  """The mesh of x's type when it has Explicit axes (sharding in types)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.axis_names or avals.manual_axes():
    return None
  explicit = jax.sharding.AxisType.Explicit
  if not any(t == explicit for t in mesh.axis_types):
    return None
  return mesh


def _shard_map(fn, mesh, out_specs):
  """shard_map over x's explicit mesh, in_specs from the arguments' types.
  The collectives are explicit here (psum over the axes layout names), so
  vma checking has nothing to add; it is off because Pallas's interpret mode
  trips it (an invarying pad value inside a varying kernel)."""
  return jax.shard_map(fn, mesh=mesh, out_specs=out_specs, check_vma=False)


def _reshard(value, spec):
  if value is None:
    return None
  if tuple(jax.typeof(value).sharding.spec) == tuple(spec):
    return value
  return jax.sharding.reshard(value, spec)


# ---------------------------------------------------------------- forward

def forward(local: LocalForward, x, residual, scale, *,
            save_rstd: bool) -> ForwardOutputs:
  """`local` applied shard by shard under any of the three contexts."""
  if avals.manual_axes():
    return local(x, residual, scale, save_rstd=save_rstd, hidden_axes=())
  mesh = _explicit_mesh(x)
  if mesh is not None:
    return _forward_explicit(local, mesh, x, residual, scale, save_rstd)
  return _batchable_forward(local, save_rstd)(x, residual, scale)


def _forward_explicit(local, mesh, x, residual, scale, save_rstd):
  layout = _Layout(_full_spec(jax.typeof(x).sharding, x.ndim))
  x_spec, rows_spec = P(*layout.leading, layout.hidden), P(*layout.leading)
  residual = _reshard(residual, x_spec)
  scale = _reshard(scale, P(layout.hidden))
  fn = functools.partial(local, save_rstd=save_rstd,
                         hidden_axes=layout.hidden_axes)
  out_specs = ForwardOutputs(x_spec, None if residual is None else x_spec,
                             rows_spec if save_rstd else None)
  return _shard_map(fn, mesh, out_specs)(x, residual, scale)


def _partitioned_forward(local: LocalForward, save_rstd: bool):
  """custom_partitioning of `local` (Auto axes)."""
  def out_shardings(mesh, layout, residual):
    return ForwardOutputs(layout.x(mesh),
                          None if residual is None else layout.x(mesh),
                          layout.rows(mesh) if save_rstd else None)

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    x, residual, _ = arg_shapes
    layout = _Layout(_full_spec(x.sharding, len(x.shape)))
    return out_shardings(mesh, layout, residual)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    x, residual, scale = arg_shapes
    layout = _Layout(_full_spec(x.sharding, len(x.shape)))
    args = (layout.x(mesh), None if residual is None else layout.x(mesh),
            None if scale is None else layout.scale(mesh))
    fn = functools.partial(local, save_rstd=save_rstd,
                           hidden_axes=layout.hidden_axes)
    return mesh, fn, out_shardings(mesh, layout, residual), args

  op = custom_partitioning(
      lambda x, residual, scale: local(x, residual, scale,
                                       save_rstd=save_rstd, hidden_axes=()))

  def define(ndim, has_residual, has_scale):
    operands = "x" + ("x" if has_residual else "") + ("n" if has_scale else "")
    results = "x" + ("x" if has_residual else "") + ("r" if save_rstd else "")
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=_rule(ndim, operands, results))
    return op

  return define


def _one_device() -> bool:
  """Nothing can be sharded: custom_partitioning would only be inlined (and
  it cannot be exported with an abstract device, as CPU-hosted CUDA exports
  are)."""
  return jax.device_count() == 1


def _batchable_forward(local: LocalForward, save_rstd: bool):
  """The partitioned forward, under vmap too (custom_partitioning has no
  batching rule): a batched x is more leading axes; a batched scale is
  handed to Pallas's own batching of the unpartitioned kernel."""
  define = _partitioned_forward(local, save_rstd)

  @jax.custom_batching.custom_vmap
  def run(x, residual, scale):
    if x.ndim < 2 or _one_device():  # Nothing to partition.
      return local(x, residual, scale, save_rstd=save_rstd, hidden_axes=())
    return define(x.ndim, residual is not None, scale is not None)(
        x, residual, scale)

  @run.def_vmap
  def _(axis_size, in_batched, x, residual, scale):
    x_b, residual_b, scale_b = in_batched
    if scale_b:
      fn = functools.partial(local, save_rstd=save_rstd, hidden_axes=())
      in_axes = (0 if x_b else None, 0 if residual_b else None, 0)
      out = jax.vmap(fn, in_axes=in_axes, axis_size=axis_size)(
          x, residual, scale)
    else:
      x = x if x_b else _broadcast(x, axis_size)
      if residual is not None and not residual_b:
        residual = _broadcast(residual, axis_size)
      out = run(x, residual, scale)
    return out, ForwardOutputs(True, None if out.h is None else True,
                               None if out.rstd is None else True)

  return run


def _broadcast(value, size):
  return jnp.broadcast_to(value, (size,) + value.shape)


# ---------------------------------------------------------------- backward

def backward(local: LocalBackward, x, dy, dh, scale, rstd):
  """(dx, float32 d(scale) summed over every row) from `local` applied shard
  by shard under any of the three contexts."""
  if avals.manual_axes():
    dx, dscale = local(x, dy, dh, scale, rstd, hidden_axes=())
    # d(scale) sums over the rows of every device x varies over, where the
    # scale does not: the cotangent must vary as the scale does.
    axes = avals.varying_axes(x, dy, dh, rstd) - avals.varying_axes(scale)
    return dx, _reduce_dscale(dscale, tuple(sorted(axes)))
  mesh = _explicit_mesh(x)
  if mesh is not None:
    return _backward_explicit(local, mesh, x, dy, dh, scale, rstd)
  return _batchable_backward(local)(x, dy, dh, scale, rstd)


def _shard_backward(local, layout):
  def fn(x, dy, dh, scale, rstd):
    dx, dscale = local(x, dy, dh, scale, rstd,
                       hidden_axes=layout.hidden_axes)
    return dx, _reduce_dscale(dscale, layout.row_axes)
  return fn


def _backward_explicit(local, mesh, x, dy, dh, scale, rstd):
  layout = _Layout(_full_spec(jax.typeof(x).sharding, x.ndim))
  x_spec = P(*layout.leading, layout.hidden)
  dy, dh = _reshard(dy, x_spec), _reshard(dh, x_spec)
  scale_spec = None if scale is None else jax.typeof(scale).sharding.spec
  scale = _reshard(scale, P(layout.hidden))
  rstd = _reshard(rstd, P(*layout.leading))
  out_specs = (x_spec, None if scale is None else P(layout.hidden))
  dx, dscale = _shard_map(_shard_backward(local, layout), mesh, out_specs)(
      x, dy, dh, scale, rstd)
  return dx, _reshard(dscale, scale_spec)


def _partitioned_backward(local: LocalBackward):
  def out_shardings(mesh, layout, scale):
    return (layout.x(mesh), None if scale is None else layout.scale(mesh))

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    layout = _Layout(_full_spec(arg_shapes[0].sharding,
                                len(arg_shapes[0].shape)))
    return out_shardings(mesh, layout, arg_shapes[3])

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    _, _, dh, scale, _ = arg_shapes
    layout = _Layout(_full_spec(arg_shapes[0].sharding,
                                len(arg_shapes[0].shape)))
    xs = layout.x(mesh)
    args = (xs, xs, None if dh is None else xs,
            None if scale is None else layout.scale(mesh), layout.rows(mesh))
    return (mesh, _shard_backward(local, layout),
            out_shardings(mesh, layout, scale), args)

  op = custom_partitioning(
      lambda x, dy, dh, scale, rstd: local(x, dy, dh, scale, rstd,
                                           hidden_axes=()))

  def define(ndim, has_dh, has_scale):
    operands = "xx" + ("x" if has_dh else "") + ("n" if has_scale else "") + "r"
    results = "x" + ("n" if has_scale else "")
    op.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=_rule(ndim, operands, results))
    return op

  return define


def _batchable_backward(local: LocalBackward):
  define = _partitioned_backward(local)

  @jax.custom_batching.custom_vmap
  def run(x, dy, dh, scale, rstd):
    if x.ndim < 2 or _one_device():
      return local(x, dy, dh, scale, rstd, hidden_axes=())
    return define(x.ndim, dh is not None, scale is not None)(
        x, dy, dh, scale, rstd)

  @run.def_vmap
  def _(axis_size, in_batched, x, dy, dh, scale, rstd):
    x_b, dy_b, dh_b, scale_b, rstd_b = in_batched
    if scale_b:
      fn = functools.partial(local, hidden_axes=())
      in_axes = tuple(None if a is None else (0 if b else None) for a, b in
                      zip((x, dy, dh, scale, rstd), in_batched))
      dx, dscale = jax.vmap(fn, in_axes=in_axes, axis_size=axis_size)(
          x, dy, dh, scale, rstd)
      return (dx, dscale), (True, None if dscale is None else True)
    x, dy = (v if b else _broadcast(v, axis_size)
             for v, b in ((x, x_b), (dy, dy_b)))
    if dh is not None and not dh_b:
      dh = _broadcast(dh, axis_size)
    if not rstd_b:
      rstd = _broadcast(rstd, axis_size)
    # One scale for every batch entry: d(scale) sums over all of them.
    return run(x, dy, dh, scale, rstd), (True, None if scale is None
                                         else False)

  return run

