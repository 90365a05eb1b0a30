"""The kernels lower for CUDA, checked on a CPU machine.

Interpret mode proves indexing and arithmetic but not the Triton lowering's
own rules (power-of-two arrays, for one). `jax.export` for the "cuda"
platform runs that lowering without a GPU; JAX 0.11+ also needs an abstract
H100 to pick the compute capability.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import jax_rmsnorm
from jax_rmsnorm._src import platform
from jax_rmsnorm._src.triton import backward as triton_backward
from jax_rmsnorm._src.triton import forward as triton_forward
from jax_rmsnorm._src.triton import quantize as triton_quantize
from jax_rmsnorm._src.triton.config import MAX_ONE_PASS_COLS

TRITON_CALL = "__gpu$xla.gpu.triton"


def _abstract_h100():
  if not hasattr(jax.sharding, "AbstractDevice"):  # JAX 0.10
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("d",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def export(fn, *args, platforms=("cuda",)) -> jax.export.Exported:
  """`fn(*args)` exported for `platforms` (CUDA lowered on this CPU host)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  with _abstract_h100():
    return jax.export.export(jax.jit(fn), platforms=list(platforms),
                             disabled_checks=checks)(*args)


def export_for_cuda(fn, *args) -> str:
  """The StableHLO text of `fn(*args)` lowered for CUDA."""
  return export(fn, *args).mlir_module()


def _kernel_calls(text: str) -> list[str]:
  return [l for l in text.splitlines() if TRITON_CALL in l]


_REAL_ON_CUDA_GPU = platform.on_cuda_gpu


@pytest.fixture(autouse=True)
def _pretend_cuda(monkeypatch):
  # The CPU test machine has no GPU, so the platform check is bypassed here;
  # everything else (configs, masks, the Triton lowering) is the real path.
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)


@pytest.mark.parametrize("shape,dtype,scale_dtype,offset", [
    ((3, 896), "bfloat16", "bfloat16", 0.0),
    ((2, 7, 1536), "float16", "float32", 1.0),
    ((5, 5120), "float32", "float32", 0.0),
    ((2, 14336), "bfloat16", "float32", 0.0),
    ((3, 14336), "float32", "float32", 0.0),     # 7 chunks in registers
    ((4, 16384), "float32", "bfloat16", 0.0),
    ((2, 16411), "float32", "float32", 0.0),      # chunked, prime N
    ((2, 65536), "bfloat16", "bfloat16", 0.0),    # chunked
    ((9, 1), "float16", None, 0.0),
    ((1, 7), "bfloat16", None, 0.0),
    ((300, 96), "float32", "float32", 1.0),       # several rows per program
    ((3, 4099), "bfloat16", "bfloat16", 0.0),     # a narrow last chunk of 4
    ((2, 257), "float32", "float32", 0.0),        # the narrowest, 4 for 1
], ids=str)
def test_forward_lowers_with_one_named_kernel(shape, dtype, scale_dtype,
                                              offset):
  x = jnp.zeros(shape, dtype)
  scale = None if scale_dtype is None else jnp.zeros(shape[-1:], scale_dtype)
  fn = functools.partial(jax_rmsnorm.rms_norm, scale_offset=offset,
                         implementation="triton")
  calls = _kernel_calls(export_for_cuda(fn, x, scale))
  assert len(calls) == 1, calls
  assert triton_forward.KERNEL_NAME in calls[0]


# (shape, x dtype, residual dtype or None, scale dtype or None, cast order).
GRAD_CASES = [
    ((3, 896), "bfloat16", None, "float32", "float32"),
    ((13, 5120), "float32", None, "float32", "hf"),
    ((2, 14336), "bfloat16", "bfloat16", "bfloat16", "float32"),
    ((3, 14336), "float32", "float32", "float32", "float32"),
    ((4, 16384), "bfloat16", None, "float32", "float32"),
    ((2, 3, 4096), "float16", "float32", "float32", "hf"),
    ((9, 1), "float16", None, None, "float32"),
    ((300, 96), "float32", "float32", None, "float32"),
]


@pytest.mark.parametrize("shape,dtype,res_dtype,scale_dtype,cast_order",
                         GRAD_CASES, ids=str)
def test_training_step_lowers_to_forward_and_backward_kernels(
    shape, dtype, res_dtype, scale_dtype, cast_order):
  """grad of rms_norm / add_rms_norm: one forward and one backward kernel,
  with a residual, a scale, dh and the cast order in every combination."""
  x = jnp.zeros(shape, dtype)
  residual = None if res_dtype is None else jnp.zeros(shape, res_dtype)
  scale = None if scale_dtype is None else jnp.zeros(shape[-1:], scale_dtype)

  def loss(x, residual, scale):
    kwargs = dict(cast_order=cast_order, implementation="triton")
    if residual is None:
      y, h = jax_rmsnorm.rms_norm(x, scale, **kwargs), x
    else:
      y, h = jax_rmsnorm.add_rms_norm(x, residual, scale, **kwargs)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))

  calls = _kernel_calls(export_for_cuda(jax.grad(loss, argnums=(0, 1, 2)),
                                        x, residual, scale))
  names = sorted(name for c in calls for name in (
      triton_forward.KERNEL_NAME, triton_backward.KERNEL_NAME) if name in c)
  assert names == sorted([triton_backward.KERNEL_NAME,
                          triton_forward.KERNEL_NAME]), calls


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
def test_automatic_choice_is_made_per_platform_at_lowering(grad,
                                                           monkeypatch):
  """implementation=None on this CPU host: an export for CUDA carries the
  kernels (not the reference, silently); one for CUDA and CPU carries both
  and runs here with the reference's values."""
  monkeypatch.setattr(platform, "on_cuda_gpu", _REAL_ON_CUDA_GPU)
  x = jax.random.normal(jax.random.key(0), (6, 640), jnp.bfloat16)
  scale = jnp.linspace(0.5, 1.5, 640, dtype=jnp.float32)

  def loss(x, scale):
    return jnp.sum(jax_rmsnorm.rms_norm(x, scale).astype(jnp.float32) ** 2)

  fn = jax.grad(loss, argnums=(0, 1)) if grad else jax_rmsnorm.rms_norm
  for platforms in (["cuda"], ["cuda", "cpu"]):
    exported = export(fn, x, scale, platforms=platforms)
    calls = _kernel_calls(exported.mlir_module())
    assert len(calls) == 1 + grad, calls
  got = exported.call(x, scale)
  want = jax.jit(fn)(x, scale)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _cache_hints(fn, *args) -> dict[str, tuple[set, set]]:
  """{kernel name: (the L2 eviction policies of its loads, of its stores)}
  of the Pallas kernels traced in fn(*args), loops inside them included."""
  found = {}

  def subjaxprs(eqn):
    for param in eqn.params.values():
      for p in param if isinstance(param, (tuple, list)) else (param,):
        p = getattr(p, "jaxpr", p)
        if hasattr(p, "eqns"):
          yield p

  def walk(jaxpr, hints):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "pallas_call":
        kernel = found.setdefault(str(eqn.params["name"]), (set(), set()))
        walk(eqn.params["jaxpr"], kernel)
        continue
      if hints is not None and "load" in name:
        hints[0].add(eqn.params.get("eviction_policy"))
      elif hints is not None and "swap" in name:
        hints[1].add(eqn.params.get("eviction_policy"))
      for sub in subjaxprs(eqn):
        walk(sub, hints)

  walk(jax.make_jaxpr(fn)(*args).jaxpr, None)
  return found


@pytest.mark.parametrize("shape,dtype", [
    ((3, 896), "bfloat16"),      # several rows a program
    ((5, 5120), "float32"),      # halves, persistent
    ((4, 4096), "bfloat16"),     # one block, persistent, loaded ahead
    ((2, 14336), "bfloat16"),    # chunks of 8 KiB, persistent
    ((2, 65536), "float32"),     # two passes over HBM
], ids=str)
def test_forward_and_quantized_kernels_stream_with_cache_hints(shape, dtype):
  """The forward (and add_rms_norm's) loads its rows evict_last and stores
  evict_first (Config.cache_hints, measured to win on an H200), as does the
  quantized kernel; the backward, where they were not, carries no hint."""
  x = jnp.zeros(shape, dtype)
  scale = jnp.zeros(shape[-1:], dtype)
  forward = _cache_hints(functools.partial(
      jax_rmsnorm.rms_norm, implementation="triton"), x, scale)
  # x loaded evict_last (the scale without a hint), y stored evict_first.
  assert forward == {triton_forward.KERNEL_NAME: (
      {None, "evict_last"}, {"evict_first"})}, forward

  # The backward kernel holds a row in registers: rows up to its limit.
  backward = pl.next_power_of_2(shape[-1]) <= MAX_ONE_PASS_COLS

  def others(x, scale):
    y, h = jax_rmsnorm.add_rms_norm(x, x, scale, implementation="triton")
    q, _ = jax_rmsnorm.rms_norm_quantized(x, scale, implementation="triton")
    if not backward:
      return y, h, q
    y2, pull = jax.vjp(lambda a: jax_rmsnorm.rms_norm(
        a, scale, implementation="triton"), x)
    return y, h, q, pull(y2)

  hints = _cache_hints(others, x, scale)
  # With a residual (and, for the backward, rstd) the forward writes more.
  assert hints.pop(triton_forward.KERNEL_NAME) == (
      {None, "evict_last"},
      {None, "evict_first"} if backward else {"evict_first"}), hints
  # x loaded evict_last, the codes stored evict_first (the scale and the
  # row scales, a value a row, without a hint).
  assert hints.pop(triton_quantize.KERNEL_NAME) == (
      {None, "evict_last"}, {None, "evict_first"}), hints
  assert set(hints) == (
      {triton_backward.KERNEL_NAME} if backward else set()), hints
  for kernel, policies in hints.items():
    assert policies == ({None}, {None}), (kernel, policies)
