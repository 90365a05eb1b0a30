"""The ops on sharded arrays over 8 CPU devices: values, shardings and the
communication in the compiled program.

Run by tests/test_sharding.py in a process of its own (the device count is
fixed when JAX starts); conftest.py here sets it. Every case runs the
Pallas kernels in interpret mode, so the partitioning rules are what is
tested, with the kernels' own arithmetic on each shard.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_rmsnorm
from jax_rmsnorm._src import testing
from tests.conftest import assert_close

KERNEL = dict(implementation="triton", interpret=True)
B, S, N = 8, 4, 256  # x is (B, S, N); every mesh axis divides it.

# (mesh shape, axis names, x's spec): batch; batch x sequence; hidden;
# rows x hidden; all three.
CASES = [
    ((8,), ("data",), P("data")),
    ((4, 2), ("data", "seq"), P("data", "seq")),
    ((4, 2), ("data", "model"), P(None, None, "model")),
    ((4, 2), ("data", "model"), P("data", None, "model")),
    ((2, 2, 2), ("data", "seq", "model"), P("data", "seq", "model")),
    ((2, 2, 2), ("data", "seq", "model"), P(("data", "seq"))),
]
CASE_IDS = ["batch8", "batch4xseq2", "hidden2", "batch4xhidden2",
            "batch2xseq2xhidden2", "batch(2x2)"]
AXIS_TYPES = [pytest.param(AxisType.Auto, id="auto"),
              pytest.param(AxisType.Explicit, id="explicit")]


def _mesh(shape, names, axis_type):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _hidden(spec) -> tuple:
  return P(spec[2]) if len(spec) > 2 else P()


def _inputs(seed, mesh, spec, dtype="float32"):
  x, scale = testing.random_inputs(seed, (B, S, N), dtype, "float32")
  dy, _ = testing.random_inputs(seed + 1, (B, S, N), dtype)
  residual, _ = testing.random_inputs(seed + 2, (B, S, N), dtype)
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
  return (x, scale, dy, residual), (put(x, spec), put(scale, _hidden(spec)),
                                    put(dy, spec), put(residual, spec))


COLLECTIVE = re.compile(
    r"=\s*(\w+)\[([\d,]*)\][^=]*?\b(all-gather|all-to-all|collective-permute"
    r"|all-reduce|reduce-scatter)(-start)?\(")


def collectives(hlo: str) -> list[tuple[str, int, str]]:
  """(dtype, elements, op) of each collective in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    m = COLLECTIVE.search(line)
    if m:
      dims = [int(d) for d in m.group(2).split(",") if d]
      found.append((m.group(1), int(np.prod(dims)), m.group(3)))
  return found


def assert_communication(hlo: str, spec, *, grad: bool):
  """No gather or permute of anything; all-reduces only of float32 row
  vectors (a sharded hidden axis: one in the forward, one more in the
  backward) and, in a gradient, exactly one of the (N,) d(scale)."""
  found = collectives(hlo)
  assert not [c for c in found if c[2] != "all-reduce"], found
  hidden_sharded = len(spec) > 2 and spec[2] is not None
  rows_sharded = any(e is not None for e in tuple(spec)[:2])
  local_rows = B * S  # an upper bound on one device's rows
  row_vectors = [c for c in found if c[1] <= local_rows and c[0] == "f32"]
  others = [c for c in found if c not in row_vectors]
  if grad and rows_sharded:
    assert len(others) == 1 and others[0][0] == "f32", found
    assert others[0][1] in (N, N // 2), found  # d(scale), maybe TP-sharded
  else:
    assert not others, found
  expect_rows = (1 + grad) if hidden_sharded else 0
  assert len(row_vectors) == expect_rows, found


def _rms(x, scale, **kwargs):
  return jax_rmsnorm.rms_norm(x, scale, **KERNEL, **kwargs)


def _loss(x, scale, dy):
  return jnp.sum(_rms(x, scale).astype(jnp.float32) * dy)


def _compiled_text(fn, *args) -> str:
  return fn.lower(*args).compile().as_text()


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("shape,names,spec", CASES, ids=CASE_IDS)
def test_forward_and_gradient_sharded(shape, names, spec, axis_type):
  mesh = _mesh(shape, names, axis_type)
  (x, scale, dy, _), (xs, ss, dys, _) = _inputs(0, mesh, spec)
  with jax.set_mesh(mesh):
    fwd = jax.jit(_rms)
    y = fwd(xs, ss)
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1)))
    dx, dscale = grad(xs, ss, dys)
    fwd_hlo, grad_hlo = _compiled_text(fwd, xs, ss), _compiled_text(
        grad, xs, ss, dys)
  assert_close(y, testing.oracle(x, scale), "float32", N)
  assert y.sharding.is_equivalent_to(xs.sharding, 3), (y.sharding, spec)
  ref = testing.oracle_grad(x, scale, dy)
  worst = testing.grads_excess(dx, dscale, ref, "float32", "float32")
  assert worst.excess <= 0, worst
  assert dx.sharding.is_equivalent_to(xs.sharding, 3), dx.sharding
  assert dscale.sharding.is_equivalent_to(ss.sharding, 1), dscale.sharding
  assert_communication(fwd_hlo, spec, grad=False)
  assert_communication(grad_hlo, spec, grad=True)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("shape,names,spec", [CASES[1], CASES[3]],
                         ids=[CASE_IDS[1], CASE_IDS[3]])
def test_add_rms_norm_sharded(shape, names, spec, axis_type):
  """y and h keep x's sharding; d(x), d(residual), d(scale) are right."""
  mesh = _mesh(shape, names, axis_type)
  (x, scale, dy, res), (xs, ss, dys, rs) = _inputs(10, mesh, spec,
                                                   "bfloat16")

  def loss(x, r, s):
    y, h = jax_rmsnorm.add_rms_norm(x, r, s, **KERNEL)
    return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)
                   + h.astype(jnp.float32))

  with jax.set_mesh(mesh):
    y, h = jax.jit(functools.partial(jax_rmsnorm.add_rms_norm, **KERNEL))(
        xs, rs, ss)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    dx, dres, dscale = grad(xs, rs, ss)
    hlo = _compiled_text(grad, xs, rs, ss)
  h_ref = np.asarray(jax_rmsnorm.add_rms_norm(x, res, implementation="xla")[1])
  np.testing.assert_array_equal(np.asarray(h), h_ref)
  assert_close(y, testing.oracle(h_ref, scale), "bfloat16", N)
  for out in (y, h, dx, dres):
    assert out.sharding.is_equivalent_to(xs.sharding, 3), out.sharding
  ref = testing.oracle_grad(h_ref, scale, dy, dh=np.ones((B, S, N)))
  for d in (dx, dres):
    worst = testing.grads_excess(d, dscale, ref, "bfloat16", "float32")
    assert worst.excess <= 0, worst
  assert_communication(hlo, spec, grad=True)


def test_gspmd_partitioner():
  """The GSPMD callbacks say what the Shardy rule says."""
  shape, names, spec = CASES[3]
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    test_forward_and_gradient_sharded(shape, names, spec, AxisType.Auto)
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


@pytest.mark.parametrize("impl", [
    pytest.param(dict(implementation=None), id="auto-check_vma"),
    pytest.param(dict(KERNEL), id="kernel")])
def test_inside_shard_map(impl):
  """In a user's shard_map the arrays are shards already: rows normalized
  per device; d(scale) summed over the devices the rows vary across, once,
  because the scale does not vary there. The automatic choice runs with
  check_vma=True; the interpreted kernels with check_vma=False, because
  Pallas's interpret mode trips JAX's vma check on its own padding
  (test_lowering_for_cuda_in_shard_map covers the kernels with it on)."""
  check_vma = impl["implementation"] is None
  mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
  (x, scale, dy, _), _ = _inputs(20, mesh, P("data"))

  def per_device(x, scale, dy):
    y, pull = jax.vjp(
        lambda x, s: jax_rmsnorm.rms_norm(x, s, **impl), x, scale)
    return (y, *pull(dy))

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh,
                             in_specs=(P("data"), P(), P("data")),
                             out_specs=(P("data"), P("data"), P()),
                             check_vma=check_vma))
  y, dx, dscale = fn(x, scale, dy)
  assert_close(y, testing.oracle(x, scale), "float32", N)
  ref = testing.oracle_grad(x, scale, dy)
  assert testing.dx_excess(dx, ref, "float32").excess <= 0
  if check_vma:  # d(scale) is psum'd by the rule, once.
    assert testing.dscale_excess(dscale, ref, "float32").excess <= 0


def test_flax_nnx_layer_keeps_shardings():
  """nnx layer, scale annotated with nnx.with_partitioning, under nnx.jit
  with sharded activations: y and the scale keep their shardings, and the
  value is flax's."""
  from flax import nnx
  import jax_rmsnorm.nnx
  mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
  init = nnx.with_partitioning(nnx.initializers.ones_init(), ("model",))
  with jax.set_mesh(mesh):
    ours = jax_rmsnorm.nnx.RMSNorm(N, scale_init=init, rngs=nnx.Rngs(0),
                                   **KERNEL)
    theirs = nnx.RMSNorm(N, scale_init=init, rngs=nnx.Rngs(0))
    (x, *_), (xs, *_) = _inputs(30, mesh, P("data", None, "model"))
    state = nnx.state(ours)
    sharded = jax.lax.with_sharding_constraint(
        state, nnx.get_named_sharding(state, mesh))
    nnx.update(ours, sharded)
    y = nnx.jit(lambda m, x: m(x))(ours, xs)
    hlo = _compiled_text(jax.jit(lambda x: ours(x)), xs)
  assert ours.scale[...].sharding.spec == P("model"), ours.scale[...].sharding
  assert y.sharding.is_equivalent_to(xs.sharding, 3), y.sharding
  assert_close(y, np.asarray(theirs(x)), "float32", N)
  assert_communication(hlo, P("data", None, "model"), grad=False)


def test_flax_linen_layer_keeps_shardings():
  from flax import linen as nn
  import jax_rmsnorm.linen
  mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
  rules = (("embed", "model"),)
  layer = jax_rmsnorm.linen.RMSNorm(
      scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                              ("embed",)), **KERNEL)
  (x, *_), (xs, *_) = _inputs(40, mesh, P("data", None, "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(layer.init, jax.random.key(0), xs)
    specs = nn.get_partition_spec(abstract)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s),
                             nn.logical_to_mesh(specs))
    params = jax.jit(layer.init, out_shardings=shardings)(
        jax.random.key(0), xs)
    apply = jax.jit(layer.apply)
    y = apply(params, xs)
    hlo = _compiled_text(apply, params, xs)
  scale = params["params"]["scale"]
  assert nn.unbox(scale).sharding.spec == P("model"), scale
  assert y.sharding.is_equivalent_to(xs.sharding, 3), y.sharding
  assert_close(y, testing.oracle(x, np.ones(N)), "float32", N)
  assert_communication(hlo, P("data", None, "model"), grad=False)


@pytest.mark.parametrize("spec", [P("data"), P("data", None, "model")],
                         ids=["batch", "batch-hidden"])
def test_lowering_for_cuda_in_shard_map(spec, monkeypatch):
  """The compiled kernels inside shard_map with check_vma=True: the forward
  and backward lower for CUDA on a CPU machine (the per-device program that
  custom_partitioning and Explicit axes run too), outputs typed with the
  right varying axes, d(scale) summed where the scale does not vary."""
  from tests.test_lowering import TRITON_CALL
  from jax_rmsnorm._src import platform
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)
  mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
  if hasattr(jax.sharding, "AbstractDevice"):  # JAX 0.11+: an abstract H100
    mesh = jax.sharding.AbstractMesh(
        (4, 2), ("data", "model"),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
            platform="cuda"))
  x = jax.ShapeDtypeStruct((B, S, N), jnp.bfloat16,
                           sharding=NamedSharding(mesh, spec))
  scale = jax.ShapeDtypeStruct((N,), jnp.float32,
                               sharding=NamedSharding(mesh, _hidden(spec)))

  def per_device(x, scale, dy):
    y, pull = jax.vjp(lambda x, s: jax_rmsnorm.rms_norm(
        x, s, implementation="triton"), x, scale)
    return (y, *pull(dy))

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh,
                             in_specs=(spec, _hidden(spec), spec),
                             out_specs=(spec, spec, _hidden(spec))))
  with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
    lowered = fn.trace(x, scale, x).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  calls = [l for l in text.splitlines() if TRITON_CALL in l]
  assert len(calls) == 2, calls  # one forward, one backward kernel


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("shape,names,spec", [CASES[1], CASES[3]],
                         ids=[CASE_IDS[1], CASE_IDS[3]])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quantized_sharded(shape, names, spec, axis_type, static):
  """rms_norm_quantized keeps x's sharding (row scales its rows'); values
  are the unsharded reference's, to the bit for y_q where the hidden axis
  is whole and within one code otherwise (a row's squares are summed in
  another order); no gathers."""
  mesh = _mesh(shape, names, axis_type)
  (x, scale, _, res), (xs, ss, _, rs) = _inputs(50, mesh, spec, "bfloat16")
  kwargs = dict(quant_scale=0.01 if static else None, **KERNEL)
  ref = jax_rmsnorm.rms_norm_quantized(x, scale, residual=res,
                                       implementation="xla",
                                       quant_scale=kwargs["quant_scale"])
  with jax.set_mesh(mesh):
    fn = jax.jit(functools.partial(jax_rmsnorm.rms_norm_quantized, **kwargs))
    out = fn(xs, ss, residual=rs)
    hlo = fn.lower(xs, ss, residual=rs).compile().as_text()
  hidden_sharded = spec[2:] and spec[2] is not None
  for got, want in zip(out, ref):
    if got.ndim == 3 and got.shape[-1] == 1:  # row scales
      rows = NamedSharding(mesh, P(*tuple(spec)[:2], None))
      assert got.sharding.is_equivalent_to(rows, 3), got.sharding
      np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                 rtol=4 * 2.0**-24 * np.sqrt(N))
      continue
    assert got.sharding.is_equivalent_to(xs.sharding, 3), got.sharding
    g, w = (np.asarray(v.astype(jnp.float32)) for v in (got, want))
    if hidden_sharded and got.dtype != jnp.bfloat16:
      codes = np.abs(g - w) / np.maximum(np.abs(w), 1e-30)
      assert np.all((g == w) | (codes <= 2.0**-2)), np.max(codes)
    else:
      np.testing.assert_array_equal(g, w)
  found = collectives(hlo)
  assert not [c for c in found if c[2] != "all-reduce"], found
  assert all(c[1] <= B * S for c in found), found  # row vectors only


def test_what_is_not_partitioned_says_so(caplog):
  """A rank-1 x and a vmapped scale are not taught to the partitioner: one
  WARNING each names them (never a silent gather)."""
  import logging
  x, scale = testing.random_inputs(60, (4, N), "float32")
  with caplog.at_level(logging.WARNING, logger="jax_rmsnorm"):
    jax.jit(lambda x: jax_rmsnorm.rms_norm(x, **KERNEL))(x[0])
    jax.jit(jax.vmap(lambda x, s: jax_rmsnorm.rms_norm(x, s, **KERNEL)))(
        x, jnp.stack([scale] * 4))
  text = caplog.text
  assert "no leading axis" in text and "vmap over the scale" in text, text
  assert "XLA gathers them" in text
