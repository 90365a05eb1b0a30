"""Shared test helpers: implementations, inputs and the closeness check."""

from __future__ import annotations

import contextlib
import os
import platform as platform_module

# tests/multidevice runs in a process of its own (test_sharding.py starts
# it) with 8 CPU devices, set before JAX starts.
if os.environ.get("JAX_RMSNORM_MULTIDEVICE"):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             "--xla_force_host_platform_device_count=8")

# Under pytest-xdist (the README's `-n 2`) each worker is a process of its
# own, on the same GPU where there is one: none may take JAX's default 75%
# of its memory up front.
if os.environ.get("PYTEST_XDIST_WORKER"):
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Interpreted kernels run through XLA's CPU compiler, which always lets a
# multiply fuse into the add after it (an FMA: one rounding instead of two)
# and decides so per fusion. A persistent grid and one block a program, or
# a row alone and in a batch, are different XLA programs, which could then
# differ by an ulp (seen: the persistent-grid tests' rstd and row scales,
# one row in hundreds, with XLA's -O0 in CI). Capping XLA's CPU ISA at AVX,
# which has no FMA, keeps every product rounded on x86, so that the
# bit-for-bit comparisons between interpreted programs test the kernels'
# indexing and arithmetic, not XLA's contraction choices. Compiled kernels
# are not touched: it is XLA's CPU flag only.
if (platform_module.machine() in ("x86_64", "AMD64")
    and "xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_max_isa=AVX")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jax_rmsnorm._src import platform
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.testing import oracle, random_inputs  # noqa: F401

ON_GPU = platform.on_cuda_gpu()
requires_gpu = pytest.mark.skipif(
    not ON_GPU, reason="compiled Pallas kernels need an NVIDIA GPU")

# A test that runs kernels in interpret mode only (the cases below, and
# test_mosaic's `requires_interpret`): `_interpreted_on_the_cpu`.
interpreted = pytest.mark.interpreted

# (implementation, interpret): the interpreted kernel and the reference run
# everywhere; the compiled kernel runs, and is declared to run, on a GPU only.
IMPLEMENTATIONS = [
    pytest.param(("xla", False), id="xla"),
    pytest.param(("triton", True), id="triton-interpret", marks=interpreted),
    pytest.param(("triton", False), id="triton-gpu", marks=requires_gpu),
]
# The Pallas kernels only: properties XLA's reference does not promise (its
# autodiff's reduction order changes with the batch size, for one).
KERNEL_IMPLEMENTATIONS = IMPLEMENTATIONS[1:]


@pytest.fixture(autouse=True)
def _interpreted_on_the_cpu(request):
  """On a GPU host, tests marked `interpreted` run on its CPU device, as in
  CI: there XLA's GPU compiler took minutes a case over Mosaic GPU's
  interpreter (an H200, benchmarks/results/gpu_tests_h200_run27_full.log),
  and fused an interpreted kernel's arithmetic differently from one program
  to the next (one ulp of a scale between two grids of the same kernel)."""
  cpu = _CPU if request.node.get_closest_marker("interpreted") else None
  with contextlib.nullcontext() if cpu is None else jax.default_device(cpu):
    yield


def _cpu_device():
  """The CPU device of a GPU host (None elsewhere, or where JAX_PLATFORMS
  leaves the CPU out)."""
  if not ON_GPU:
    return None
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


_CPU = _cpu_device()


def assert_close(y, ref: np.ndarray, dtype, n: int) -> None:
  """Every element within `testing.worst_excess`'s bound; NaN or Inf fail."""
  worst = testing.worst_excess(y, ref, dtype, n)
  assert worst.excess <= 0, (
      f"error / bound = {worst.ratio:.3g} at {worst.where}: got "
      f"{np.asarray(y)[worst.where]!r}, want {ref[worst.where]!r}")


# tests/multidevice is collected only in its own process.
collect_ignore = ([] if os.environ.get("JAX_RMSNORM_MULTIDEVICE")
                  else ["multidevice"])
