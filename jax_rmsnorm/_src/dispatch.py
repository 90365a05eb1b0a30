"""Which implementation runs: decided here, once per call, for the forward
and the backward together.

- A name given (`"triton"`, `"mosaic"`, `"xla"`) runs that one or raises
  NotImplementedError; a sequence is tried in order, each op taking the first
  name that supports it.
- `implementation=None` picks per platform at lowering time
  (`per_platform.call`, platform_dependent's equivalent): on CUDA the implementation that the speed
  table (`speed_table.choose`) names for this card generation, dtype and
  shape class, where it can run; everywhere else the reference. One jitted
  or exported function carries both. Falling back from a kernel on a GPU
  logs one WARNING per reason and process; a table choice of XLA (faster
  there) logs at DEBUG.

Rows sharded over the hidden axis are computed with the reference's
arithmetic and one psum (`reference.forward`'s `hidden_axes`), whichever
implementation was chosen.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import jax

from jax_rmsnorm._src import per_platform
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import reference
from jax_rmsnorm._src import speed_table
from jax_rmsnorm._src import validation
from jax_rmsnorm._src import vjp

logger = logging.getLogger("jax_rmsnorm")

_KERNEL_MODULES = {
    "triton": ("jax_rmsnorm._src.triton.forward",
               "jax_rmsnorm._src.triton.backward",
               "jax_rmsnorm._src.triton.common"),
    "mosaic": ("jax_rmsnorm._src.mosaic.forward",
               "jax_rmsnorm._src.mosaic.backward",
               "jax_rmsnorm._src.mosaic.common"),
}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logger.warning("%s", message)


@dataclasses.dataclass(frozen=True)
class _Backend:
  forward: object   # forward(x, residual, scale, **options) -> ForwardOutputs
  backward: object  # backward(x, dy, dh, scale, rstd, **options)
  check: object     # check_supported(m, n, dtype, *, backward) or raises


_XLA = _Backend(reference.forward, reference.backward,
                lambda m, n, dtype, backward=False: None)


@functools.cache
def _kernel_backend(name: str) -> _Backend:
  """The kernel family `name`; NotImplementedError where this JAX lacks it
  (a future JAX may remove Pallas's Triton backend)."""
  try:
    fwd, bwd, common = (importlib.import_module(m)
                        for m in _KERNEL_MODULES[name])
  except ImportError as e:
    raise NotImplementedError(
        f"the {name!r} kernels cannot be imported with JAX "
        f"{jax.__version__}: {e}") from e
  return _Backend(fwd.forward, bwd.backward, common.check_supported)


def _backend(name: str) -> _Backend:
  return _XLA if name == "xla" else _kernel_backend(name)


def _check(name: str, m: int, n: int, dtype, *, backward: bool,
           interpret: bool = False, need_gpu: bool = True) -> None:
  """Raises NotImplementedError, saying why, where `name` cannot run: the
  kernels' limits, whether this JAX has them, and, unless interpreted, the
  GPU they need (`need_gpu=False`: the CUDA branch of an automatic choice,
  which may be lowered on a host without one)."""
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
  _backend(name).check(m, n, dtype, backward=backward)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What runs: `forward` and `backward` name implementations; with `auto`
  they run on CUDA and the reference elsewhere, chosen at lowering time."""
  forward: str
  backward: str
  auto: bool
  interpret: bool


def plan(names: tuple[str, ...], fallback: bool, interpret: bool, m: int,
         n: int, dtype) -> Plan:
  """Resolves the implementation(s) asked for at this shape (x's, all
  devices together) and dtype; raises NotImplementedError if none can."""
  if names is None:
    return _auto_plan(m, n, dtype)
  chosen = []
  for backward in (False, True):
    errors = []
    for name in names:
      try:
        _check(name, m, n, dtype, backward=backward, interpret=interpret)
      except NotImplementedError as e:
        errors.append(e)
        continue
      if errors:
        logger.debug("rms_norm %s: %s; running %r",
                     "backward" if backward else "forward", errors[-1], name)
      chosen.append(name)
      break
    else:
      if not fallback and backward:
        # The forward can run: raise only if a gradient is taken.
        chosen.append(chosen[0])
        continue
      raise errors[-1]
  return Plan(chosen[0], chosen[1], auto=False, interpret=interpret)


# The automatic choice's order of kernels after the table's own.
_KERNEL_PREFERENCE = ("mosaic", "triton")


def _auto_plan(m, n, dtype) -> Plan:
  """implementation=None: per op, the table's choice for CUDA; where that
  kernel cannot run, the next kernel that can, else XLA."""
  chosen, fallbacks = [], {}
  for op, backward in (("forward", False), ("backward", True)):
    best = speed_table.choose(op, platform.generation(), m, n, dtype)
    if best == "xla":
      logger.debug("rms_norm %s: XLA is the faster choice at (%d, %d) %s",
                   op, m, n, dtype)
      chosen.append(best)
      continue
    candidates = [best] + [k for k in _KERNEL_PREFERENCE if k != best]
    reasons = []
    for name in candidates + ["xla"]:
      try:
        _check(name, m, n, dtype, backward=backward, need_gpu=False)
      except NotImplementedError as e:
        reasons.append(f"{name!r}: {e}")
        continue
      chosen.append(name)
      break
    if name != best:
      fallbacks.setdefault((name, reasons[0]), []).append(op)
  for (name, reason), ops in fallbacks.items():
    message = (f"jax_rmsnorm: the {' and '.join(ops)} of {m} rows of {n} "
               f"({jax.numpy.dtype(dtype).name}) run on {name!r}, not "
               f"{reason}")
    if platform.on_cuda_gpu():  # A performance cliff: say so, once.
      _warn_once(message)
    else:
      logger.debug("%s", message)
  return Plan(chosen[0], chosen[1], auto=True, interpret=False)


def _per_platform(plan: Plan, name: str, kernel_fn, reference_fn):
  """The kernel on CUDA and the reference elsewhere when auto; else the one
  chosen."""
  if name == "xla":
    return reference_fn
  if not plan.auto:
    return kernel_fn

  def run(*args, **kwargs):
    return per_platform.call(functools.partial(kernel_fn, **kwargs),
                             functools.partial(reference_fn, **kwargs), *args)
  return run


def _local_forward(plan: Plan, opts: validation.Options, x, residual, scale,
                   *, save_rstd: bool, hidden_axes=()):
  kwargs = dict(opts.forward_kwargs(), save_rstd=save_rstd)
  if hidden_axes:
    return reference.forward(x, residual, scale, hidden_axes=hidden_axes,
                             **kwargs)
  kernel = functools.partial(_backend(plan.forward).forward,
                             interpret=plan.interpret)
  fn = _per_platform(plan, plan.forward, kernel, reference.forward)
  return fn(x, residual, scale, **kwargs)


def _local_backward(plan: Plan, opts: validation.Options, x, dy, dh, scale,
                    rstd, *, hidden_axes=()):
  kwargs = opts.backward_kwargs()
  if hidden_axes:
    return reference.backward(x, dy, dh, scale, rstd,
                              hidden_axes=hidden_axes, **kwargs)
  kernel = functools.partial(_backend(plan.backward).backward,
                             interpret=plan.interpret)
  fn = _per_platform(plan, plan.backward, kernel, reference.backward)
  return fn(x, dy, dh, scale, rstd, **kwargs)


def run(x, residual, scale, opts: validation.Options, *, names, fallback,
        interpret: bool):
  """(y, h) of validated, non-empty arrays, by the implementation chosen
  (`names` None: automatic)."""
  n = x.shape[-1]
  p = plan(names, fallback, interpret, x.size // n, n, x.dtype)
  logger.debug("rms_norm: %s for x %s %s", p, x.shape, x.dtype)
  if p.forward == p.backward == "xla":
    # XLA's own autodiff of the reference: what XLA fuses best.
    out = reference.forward(x, residual, scale, **opts.forward_kwargs())
    return out.y, out.h
  ops = vjp.Ops(forward=functools.partial(_local_forward, p, opts),
                backward=functools.partial(_local_backward, p, opts),
                opts=opts, x_dtype=x.dtype)
  return vjp.apply(ops, x, residual, scale)
