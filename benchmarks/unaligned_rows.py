"""What rows that do not start on 16 bytes cost the Triton kernels.

At bf16 4096 x N for N = 4099 (rows start 2 bytes apart modulo 16, so the
kernels load and store one element at a time), N = 4104 (rows on 16-byte
boundaries, the same padded layouts), N = 4096 and N = 4224: CUPTI median
kernel times of the quantized kernel (float8_e4m3fn, dynamic and static
scale) and the forward, each under the heuristic's launch and a few
explicit ones, beside XLA. Same layout, aligned or not: the difference is
the cost of the unaligned accesses; 4104 against 4096 is the cost of the
padding.

  python -m benchmarks.unaligned_rows                 # ~90 s on an H200
  python -m benchmarks.unaligned_rows --out unaligned.json

Needs an NVIDIA GPU (the kernels are compiled, the times are CUPTI's).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp

from jax_rmsnorm._src import api
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import forward as triton_forward
from jax_rmsnorm._src.triton import quantize as triton_quantize

ROWS = 4096
WIDTHS = (4099, 4104, 4096, 4224)
Config = triton_config.Config
# One row a program, as chunks of 512 to 8192 columns.
QUANT_LAUNCHES = (Config(1, 2048, 4), Config(1, 1024, 4), Config(1, 1024, 8),
                  Config(1, 512, 4), Config(1, 4096, 8), Config(1, 8192, 8))
FORWARD_LAUNCHES = (Config(1, 2048, 4), Config(1, 1024, 4), Config(1, 4096, 8),
                    Config(1, 8192, 16))


def _name(config: Config, n: int) -> str:
  grid = f" {config.programs_per_sm}/SM" if config.programs_per_sm else ""
  return (f"{config.num_chunks(n)} x {config.block_cols}, "
          f"{config.num_warps} warps{grid}")


def measure(iterations: int) -> list[dict]:
  rows = []

  def record(op, n, launch, us):
    rows.append(dict(op=op, m=ROWS, n=n, launch=launch, us=us))
    print(f"{op:12s} {ROWS} x {n:<5d} {launch:28s} {us:8.2f} us", flush=True)

  for n in WIDTHS:
    x, scale = testing.random_inputs(0, (ROWS, n), "bfloat16")
    for static in (None, jnp.float32(bench.QUANT_STATIC_SCALE)):
      op = "quant" if static is None else "quant-static"
      xla = jax.jit(functools.partial(
          api.rms_norm_quantized, quant_dtype=bench.QUANT_DTYPE,
          quant_scale=static, implementation="xla"))
      record(op, n, "xla", bench.measure_us(xla, x, scale,
                                            iterations=iterations))
      launches = (triton_config.get_quant_config(ROWS, n, "bfloat16"),
                  *QUANT_LAUNCHES)
      for config in dict.fromkeys(launches):
        fn = jax.jit(lambda a, s, config=config, q=static: (
            triton_quantize.forward(
                a, None, s, q, epsilon=1e-6, scale_offset=0.0,
                quant_dtype=bench.QUANT_DTYPE, config=config)))
        record(op, n, _name(config, n),
               bench.measure_us(fn, x, scale, iterations=iterations))
    xla = jax.jit(functools.partial(api.rms_norm_reference, epsilon=1e-6))
    record("forward", n, "xla", bench.measure_us(xla, x, scale,
                                                 iterations=iterations))
    launches = (triton_config.get_config(ROWS, n, "bfloat16"),
                *FORWARD_LAUNCHES)
    for config in dict.fromkeys(launches):
      fn = jax.jit(lambda a, s, config=config: triton_forward.forward(
          a, None, s, epsilon=1e-6, scale_offset=0.0, config=config).y)
      record("forward", n, _name(config, n),
             bench.measure_us(fn, x, scale, iterations=iterations))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.unaligned_rows", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="also write the rows to this JSON file")
  parser.add_argument("--iterations", type=int, default=20)
  args = parser.parse_args(argv)
  rows = measure(args.iterations)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                     timer=bench.timer(), rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
