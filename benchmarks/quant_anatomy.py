"""Where the quantized kernel's time goes: the kernel beside what bounds it.

Per shape (bf16 in, float8_e4m3fn out), CUPTI median kernel times of:
XLA's `x * 2` and `x.astype(fp8)` and its row sum (read only); a plain
Pallas bf16-to-fp8 cast (one or more rows a program, or the array flat: the
byte floor a kernel of this access pattern reaches), a Pallas row sum and
the Pallas copy; then the quantized kernel with dynamic scales, with a
static scale, with no scale (what re-reading the scale every row costs),
and the forward (bf16 out). The differences place the time: the cast
against the kernel is what the reductions and the arithmetic cost.

  python -m benchmarks.quant_anatomy                 # four shapes, ~20 s on an H200
  python -m benchmarks.quant_anatomy --out anatomy.json

Needs an NVIDIA GPU (the kernels are compiled, the times are CUPTI's).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import bench
from jax_rmsnorm._src import platform
from jax_rmsnorm._src.triton import forward as triton_forward
from jax_rmsnorm._src.triton import quantize as triton_quantize

F8 = jnp.float8_e4m3fn
SHAPES = [(32768, 4096), (4096, 14336), (65536, 896), (8192, 5120)]
# (rows a program, warps) of the row-wise cast and sum; (block, warps) of
# the flat cast and copy.
ROW_LAUNCHES = [(1, 4), (1, 8), (2, 8), (4, 16)]
FLAT_LAUNCHES = [(4096, 4), (8192, 8), (16384, 16)]


def cast_rows(x, *, rows: int, warps: int):
  """x (m, n) to float8_e4m3fn, `rows` whole rows a program (n a power of
  two)."""
  m, n = x.shape

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...].astype(jnp.float32).astype(F8)
  return pl.pallas_call(
      kernel, grid=(m // rows,),
      in_specs=[pl.BlockSpec((rows, n), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((rows, n), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((m, n), F8),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))(x)


def cast_flat(x, *, block: int, warps: int):
  """x to float8_e4m3fn as a flat array, `block` elements a program: the
  row cast of x viewed as rows of `block`."""
  return cast_rows(x.reshape(-1, block), rows=1, warps=warps).reshape(x.shape)


def row_sum(x, *, rows: int, warps: int):
  """The float32 sum of each row (read only), `rows` rows a program."""
  m, n = x.shape

  def kernel(x_ref, o_ref):
    o_ref[...] = jnp.sum(x_ref[...].astype(jnp.float32), axis=1)
  return pl.pallas_call(
      kernel, grid=(m // rows,),
      in_specs=[pl.BlockSpec((rows, n), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((rows,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((m,), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))(x)


def variants(m: int, n: int):
  """(name, function, uses the scale) of one shape."""
  quant = functools.partial(triton_quantize.forward, epsilon=1e-6,
                            scale_offset=0.0, quant_dtype=F8)
  out = [("xla x * 2", lambda a: a * 2, False),
         ("xla astype fp8", lambda a: a.astype(F8), False),
         ("xla row sum (read only)",
          lambda a: jnp.sum(a.astype(jnp.float32), -1), False)]
  if n & (n - 1) == 0:
    for rows, warps in ROW_LAUNCHES:
      if rows * n <= 32768:
        out.append((f"pallas cast rows={rows} warps={warps}",
                    functools.partial(cast_rows, rows=rows, warps=warps),
                    False))
        out.append((f"pallas row sum rows={rows} warps={warps}",
                    functools.partial(row_sum, rows=rows, warps=warps), False))
  for block, warps in FLAT_LAUNCHES:
    out.append((f"pallas cast flat block={block} warps={warps}",
                functools.partial(cast_flat, block=block, warps=warps), False))
    out.append((f"pallas copy flat block={block} warps={warps}",
                functools.partial(bench.pallas_copy, block=block,
                                  num_warps=warps), False))
  out += [
      ("ours quant dynamic", lambda a, s: quant(a, None, s, None)[:2], True),
      ("ours quant static",
       lambda a, s: quant(a, None, s, jnp.float32(0.05))[0], True),
      ("ours quant dynamic, no scale",
       lambda a: quant(a, None, None, None)[:2], False),
      ("ours forward (bf16 out)", lambda a, s: triton_forward.forward(
          a, None, s, epsilon=1e-6, scale_offset=0.0).y, True),
  ]
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.quant_anatomy", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="also write the times as JSON here")
  p.add_argument("--iterations", type=int, default=30)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  if not platform.on_cuda_gpu():
    print("quant_anatomy: no NVIDIA GPU here; it times compiled kernels with "
          "CUPTI", file=sys.stderr)
    return 1
  print(f"card: {jax.devices()[0].device_kind}  jax {jax.__version__}  "
        f"CUPTI median of {args.iterations}")
  results = []
  for m, n in SHAPES:
    x = jax.random.normal(jax.random.key(0), (m, n),
                          jnp.float32).astype(jnp.bfloat16)
    w = (1 + 0.1 * jax.random.normal(jax.random.key(1), (n,),
                                     jnp.float32)).astype(jnp.bfloat16)
    print(f"=== {m}x{n} bf16; byte floor (read 2 B, write 1 B an element) "
          f"at 4.08 TB/s: {m * n * 3 / 4.08e6:.1f} us", flush=True)
    for name, fn, with_scale in variants(m, n):
      inputs = (x, w) if with_scale else (x,)
      try:
        us = bench.measure_us(jax.jit(fn), *inputs,
                              iterations=args.iterations)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{name:45s} failed: {str(e)[:200]}", flush=True)
        continue
      print(f"{name:45s} {us:9.2f} us", flush=True)
      results.append(dict(m=m, n=n, name=name, us=us))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                     results=results), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
