"""Which implementation runs: decided here, once per call, for every op of
the call together (the forward and the backward of rms_norm and
add_rms_norm; the quantized forward of rms_norm_quantized).

- A name given (`"triton"`, `"mosaic"`, `"xla"`) runs that one or raises
  NotImplementedError; a sequence is tried in order, each op taking the first
  name that supports it.
- `implementation=None` picks per platform when the program is lowered
  (`per_platform.call`, jax.lax.platform_dependent's equivalent): on CUDA
  the implementation that the speed table (`speed_table.choose`) names for
  this GPU generation, op, dtype and shape class, where it can run, else the
  next kernel that can, else XLA; on every other platform the reference. One
  jitted or exported function carries both. A fallback from the table's
  kernel on a GPU logs one WARNING per reason and process; a table choice of
  XLA (faster there) logs at DEBUG.

Rows sharded over the hidden axis are computed with the reference's
arithmetic and one psum (`hidden_axes`), whichever implementation was
chosen.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import log
from jax_rmsnorm._src import partitioning
from jax_rmsnorm._src import per_platform
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import speed_table
from jax_rmsnorm._src import validation
from jax_rmsnorm._src import vjp

logger = log.logger

# Each kernel family's room: the module of each op, and the support check.
_KERNEL_MODULES = {
    "triton": dict(forward="jax_rmsnorm._src.triton.forward",
                   backward="jax_rmsnorm._src.triton.backward",
                   quant="jax_rmsnorm._src.triton.quantize",
                   common="jax_rmsnorm._src.triton.common"),
    "mosaic": dict(forward="jax_rmsnorm._src.mosaic.forward",
                   backward="jax_rmsnorm._src.mosaic.backward",
                   quant="jax_rmsnorm._src.mosaic.quantize",
                   common="jax_rmsnorm._src.mosaic.common"),
}
# The reference's function per op: the CPU side of every automatic choice.
_REFERENCE = {"forward": reference.forward, "backward": reference.backward,
              **{op: quantize.reference for op in speed_table.OPS
                 if op.startswith("quant")}}
# The automatic choice's order of kernels after the table's own.
_KERNEL_PREFERENCE = ("mosaic", "triton")


@functools.cache
def _module(name: str, op: str):
  """The module of kernel family `name` for `op` (one quantized kernel serves
  both quantized ops); NotImplementedError where there is none, or this JAX
  lacks what it needs (a future JAX may remove Pallas's Triton backend)."""
  path = _KERNEL_MODULES[name].get("quant" if op.startswith("quant") else op)
  if path is None:
    raise NotImplementedError(f"the {name!r} kernels have no {op} kernel")
  try:
    return importlib.import_module(path)
  except ImportError as e:
    raise NotImplementedError(
        f"the {name!r} kernels cannot be imported with JAX "
        f"{jax.__version__}: {e}") from e


def _function(name: str, op: str):
  """The function computing `op` with implementation `name`."""
  if name == "xla":
    return _REFERENCE[op]
  return getattr(_module(name, op), "backward" if op == "backward" else
                 "forward")


@dataclasses.dataclass(frozen=True)
class Problem:
  """What an op is asked to do, as far as support and speed go."""
  m: int
  n: int
  dtype: jnp.dtype
  quant_dtype: jnp.dtype | None = None

  def __str__(self):
    return f"{self.m} rows of {self.n} ({jnp.dtype(self.dtype).name})"


def _check(name: str, op: str, problem: Problem, *, interpret: bool = False,
           need_gpu: bool = True) -> None:
  """Raises NotImplementedError, saying why, where `name` cannot run `op`:
  the kernels' limits, whether this JAX has them, and, unless interpreted,
  the GPU they need (`need_gpu=False`: the CUDA side of an automatic choice,
  which may be lowered on a host without a GPU)."""
  if name == "xla":
    return
  if not interpret and (need_gpu or platform.on_cuda_gpu()):
    if not platform.on_cuda_gpu():
      raise NotImplementedError(
          f"the {name!r} implementation needs an NVIDIA GPU (default backend "
          f"is {jax.default_backend()!r}); pass interpret=True to run it in "
          "Pallas interpret mode, or use implementation='xla'")
    if name == "mosaic" and (platform.compute_capability() or 0) < 9.0:
      raise NotImplementedError(
          "the 'mosaic' kernels need compute capability 9.0 or newer "
          f"(Hopper); this GPU is {platform.device_kind()!r}")
  module = _module(name, op)
  if op.startswith("quant"):
    module.check_supported(problem.m, problem.n, problem.quant_dtype)
  else:
    _module(name, "common").check_supported(
        problem.m, problem.n, problem.dtype, backward=op == "backward")


@dataclasses.dataclass(frozen=True)
class Plan:
  """The implementation of each op; with `auto` it runs on CUDA and the
  reference everywhere else, chosen when the program is lowered."""
  names: tuple[tuple[str, str], ...]  # (op, implementation)
  auto: bool
  interpret: bool

  def __getitem__(self, op: str) -> str:
    return dict(self.names)[op]


def plan(ops: tuple[str, ...], problem: Problem, names,
         interpret: bool) -> Plan:
  """Resolves the implementation(s) asked for (`names` None: automatic) for
  each op at this problem (x's shape, all devices together); raises
  NotImplementedError if none can."""
  if names is None:
    return _auto_plan(ops, problem)
  chosen = {}
  for op in ops:
    errors = []
    for name in names:
      try:
        _check(name, op, problem, interpret=interpret)
      except NotImplementedError as e:
        errors.append(e)
        continue
      if errors:
        logger.debug("rms_norm %s: %s; running %r", op, errors[-1], name)
      chosen[op] = name
      break
    else:
      if op == "backward":
        # The forward can run: raise only if a gradient is taken.
        chosen[op] = names[0]
        continue
      raise errors[-1]
  return Plan(tuple(chosen.items()), auto=False, interpret=interpret)


def _auto_plan(ops, problem: Problem) -> Plan:
  """implementation=None: per op, the table's choice for CUDA; where that
  kernel cannot run, the next kernel that can, else XLA."""
  chosen, fallbacks = {}, {}
  for op in ops:
    best = speed_table.choose(op, platform.generation(), problem.m,
                              problem.n, problem.dtype)
    if best == "xla":
      logger.debug("rms_norm %s: XLA is the faster choice for %s", op,
                   problem)
      chosen[op] = best
      continue
    reasons = []
    for name in [best] + [k for k in _KERNEL_PREFERENCE if k != best] + [
        "xla"]:
      try:
        _check(name, op, problem, need_gpu=False)
      except NotImplementedError as e:
        reasons.append(f"{name!r}: {e}")
        continue
      chosen[op] = name
      break
    if chosen[op] != best:
      fallbacks.setdefault((chosen[op], reasons[0]), []).append(op)
  for (name, reason), fell_back in fallbacks.items():
    message = (f"jax_rmsnorm: the {' and '.join(fell_back)} of {problem} "
               f"run on {name!r}, not {reason}")
    if platform.on_cuda_gpu():  # A performance cliff: say so, once.
      log.warn_once(message)
    else:
      logger.debug("%s", message)
  return Plan(tuple(chosen.items()), auto=True, interpret=False)


def _local(plan: Plan, op: str, static: dict):
  """The per-device function of `op`: the chosen implementation (on CUDA
  only, when automatic; the reference elsewhere), or the reference's
  arithmetic with psums where rows are sharded (`hidden_axes`)."""
  name = plan[op]
  reference_fn = functools.partial(_REFERENCE[op], **static)

  def local(*args, hidden_axes=(), **kwargs):
    if hidden_axes or name == "xla":
      return reference_fn(*args, hidden_axes=hidden_axes, **kwargs)
    kernel = functools.partial(_function(name, op), interpret=plan.interpret,
                               **static, **kwargs)
    if not plan.auto:
      return kernel(*args)
    return per_platform.call(
        kernel, functools.partial(reference_fn, **kwargs), *args)
  return local


def run(x, residual, scale, opts: validation.Options, *, names,
        interpret: bool):
  """(y, h) of validated, non-empty arrays (h None without a residual)."""
  n = x.shape[-1]
  p = plan(("forward", "backward"), Problem(x.size // n, n, x.dtype), names,
           interpret)
  logger.debug("rms_norm: %s for x %s %s", p, x.shape, x.dtype)
  return execute(p, x, residual, scale, opts)


def execute(p: Plan, x, residual, scale, opts: validation.Options):
  """(y, h) by plan `p` (its forward and backward may be of different
  families: they share the contract of `reference.forward`/`backward`)."""
  if p["forward"] == p["backward"] == "xla":
    # XLA's own autodiff of the reference: what XLA fuses best.
    out = reference.forward(x, residual, scale, **opts.forward_kwargs())
    return out.y, out.h
  ops = vjp.Ops(forward=_local(p, "forward", opts.forward_kwargs()),
                backward=_local(p, "backward", opts.backward_kwargs()),
                opts=opts, x_dtype=x.dtype)
  if p.auto and p["backward"] == "xla":
    # The table found XLA's training step faster here (or the backward
    # kernel cannot run): XLA differentiates the reference.
    return vjp.apply_xla_gradient(ops, x, residual, scale)
  return vjp.apply(ops, x, residual, scale)


def run_quantized(x, residual, scale, quant_scale, opts: validation.Options,
                  quant_dtype, *, names, interpret: bool):
  """(y_q, row_scales (..., 1) or None, h or None) of validated, non-empty
  arrays; quant_scale None (dynamic), (1,) or (N,). Not differentiable."""
  n = x.shape[-1]
  problem = Problem(x.size // n, n, x.dtype, jnp.dtype(quant_dtype))
  # Dynamic and static scales (one value, or one a column), with and
  # without the residual, are separate ops to the speed table: XLA fuses a
  # static quantization into its norm, not a dynamic one, and a vector of
  # scales or the residual's tensors change which kernel wins.
  op = speed_table.quant_op(
      static=quant_scale is not None, residual=residual is not None,
      per_channel=quant_scale is not None and quant_scale.size > 1)
  p = plan((op,), problem, names, interpret)
  logger.debug("rms_norm_quantized: %s for x %s %s", p, x.shape, x.dtype)
  static = dict(epsilon=opts.epsilon, scale_offset=opts.scale_offset,
                cast_order=opts.cast_order, quant_dtype=quant_dtype)
  if p[op] == "xla":
    return tuple(quantize.reference(x, residual, scale,
                                    quant_scale=quant_scale, **static))
  return partitioning.quantize(_local(p, op, static), x, residual, scale,
                               quant_scale)
