"""Runs every Pallas kernel once at odd and extreme shapes and checks the
results: the workload `benchmarks/gpu_reliability.sh` runs under
compute-sanitizer (memcheck, racecheck). Exit status 1 on a wrong result.

  python -m benchmarks.sanitize_kernels [--interpret]
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import api
from jax_rmsnorm._src import testing
from jax_rmsnorm._src import triton_config

# (M, N, dtype): M = 13 with Qwen's 896 and 5120 (padded to 8192), the
# longest row the backward holds, the longest the forward takes (chunked).
SHAPES = [(13, 896, "bfloat16"), (13, 5120, "float32"), (13, 5120, "float16"),
          (13, triton_config.MAX_ONE_PASS_COLS, "bfloat16"),
          (2, triton_config.MAX_COLS, "float32")]


def check(m: int, n: int, dtype: str, interpret: bool = False) -> bool:
  kernel = dict(implementation="triton", interpret=interpret)
  x, scale = testing.random_inputs(m + n, (m, n), dtype, "float32")
  other, _ = testing.random_inputs(m + n + 1, (m, n), dtype)
  y = jax.jit(functools.partial(api.rms_norm, **kernel))(x, scale)
  worst = testing.worst_excess(y, testing.oracle(x, scale), dtype, n)[0]
  y, h = jax.jit(functools.partial(api.add_rms_norm, **kernel))(
      x, other, scale)
  worst = max(worst, testing.worst_excess(y, testing.oracle(h, scale), dtype,
                                          n)[0])

  def loss(x, r, s):
    y, h = api.add_rms_norm(x, r, s, **kernel)
    return jnp.sum(y.astype(jnp.float32) * other.astype(jnp.float32)
                   + h.astype(jnp.float32))

  dx, dr, ds = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, other, scale)
  ref = testing.oracle_grad(h, scale, other, dh=jnp.ones_like(h))
  errors = (testing.relative_error(dr, ref.dx, ref.dx_size)
            - testing.grad_tolerance(dtype, n),
            testing.relative_error(dx, ref.dx, ref.dx_size)
            - testing.grad_tolerance(dtype, n),
            testing.relative_error(ds, ref.dscale)
            - testing.scale_grad_tolerance("float32", m, n))
  worst = max(worst, *errors)
  print(f"{dtype:9s} {m:3d} x {n:<8d} forward, add+norm, backward: "
        f"{'ok' if worst <= 0 else 'FAILED'} ({worst:.2e})", flush=True)
  return worst <= 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  interpret = "--interpret" in argv  # A CPU dry run, small shapes only.
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  shapes = SHAPES[:2] if interpret else SHAPES
  ok = all([check(*shape, interpret=interpret) for shape in shapes])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
