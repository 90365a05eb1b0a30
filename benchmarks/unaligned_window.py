"""A prototype, not a product path: vector loads for rows that do not start
on 16 bytes, and what keeping batch invariance there would cost.

bf16 rows of 4099 start 2 bytes apart modulo 16, so the kernels load and
store them one element at a time (`benchmarks.unaligned_rows`). A kernel
could load an aligned window around each row instead, but then a row's
elements sit in other lanes at another index in the batch, and a float32
sum of squares rounds differently there: the row's scale would depend on
its position (batch invariance lost). An order-free sum needs every partial
sum exact. This script times, on the dynamic quantized output (float8_e4m3fn,
no scale, one row a program, 8192 lanes on 4 warps, beside the library's
kernel in the same layout):

- load/store "plain": the row itself, as the library does; "window": the
  aligned window, masked to the row (a runtime mask on the stores);
- the sum of squares "float32" (plain), "exact3" (three levels: squares
  rounded to grids of 2^(2 emax - 9), 2^(2 emax - 21), 2^(2 emax - 33), each
  summed exactly in float32) or "exact2" (x scaled by 2^-emax, squares
  rounded to 2^-16 and their remainders to 2^-34, each level's integer
  counts summed in int32);

and whether a row's scale keeps its bits when the batch is rolled by one
row. It needs an NVIDIA GPU; the windows are read from and written to
buffers padded by one window (the product would need a masked last row).

  python -m benchmarks.unaligned_window --out unaligned_window.json  # ~15 s

On an H200 (benchmarks/results/unaligned_window_h200.json): the exact sums
alone cost more than unaligned rows do. In the library's layout 4099 costs
2.0 us over 4104 (17.5 against 15.5); exact2 on the plain 4099 kernel took
it from 17.4 to 22.1 us, and on the window kernel at 4104 (aligned, the
same loads) exact2 added 6.1 us and exact3 24.4 (30.6, 36.7, 55.0). The
window kernel itself ran 2x to 4x slower than the plain one (30.6 us at
4104, 68.8 at 4099), as did the plain prototype at 4104 (29.2 against the
library's 15.5, its flat indexing; not investigated further). The float32
sum on the window changed 527 of 4096 rows' scales when the batch was
rolled; the exact sums and the plain kernel none. XLA (interpret mode on
CPU) folds exact2's t - ((t + c) - c) to 0 under jit; Triton kept it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import api
from jax_rmsnorm._src import bench
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import testing
from jax_rmsnorm._src.triton import config as triton_config
from jax_rmsnorm._src.triton import quantize as triton_quantize

ROWS, LANES, WARPS, EPS = 4096, 8192, 4, 1e-6
F8 = jnp.float8_e4m3fn
VARIANTS = (("plain", "float32"), ("plain", "exact2"), ("window", "float32"),
            ("window", "exact3"), ("window", "exact2"))


def _bits(v):
  return jax.lax.bitcast_convert_type(v, jnp.int32)


def _float(bits):
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _exponent_bits(x):
  """The biased exponent bits of each row's max |x| (2^emax as bits)."""
  return _bits(jnp.max(jnp.abs(x), axis=-1, keepdims=True)) & jnp.int32(
      0x7F800000)


def _exact3(x):
  p = _float(_exponent_bits(x))
  pp = p * p                                        # 2^(2 emax)
  t, total = x * x, None
  for level, shift in enumerate((14, 2, -10)):      # C = 1.5 * 2^23 * grid
    c = pp * np.float32(1.5 * 2.0 ** shift)
    h = (t + c) - c
    t = t - h
    s = jnp.sum(h, axis=-1, keepdims=True)
    total = s if level == 0 else total + s
  return total


def _wrapped(v: int) -> int:
  v %= 1 << 32
  return v - (1 << 32) if v >= 1 << 31 else v


def _exact2(x):
  e_bits = _exponent_bits(x)
  t = x * _float(jnp.int32(254 << 23) - e_bits)     # x * 2^-emax, exact
  t = t * t                                         # < 4, exact
  c1, c2 = np.float32(192.0), np.float32(1.5 * 2.0 ** -11)
  y1 = t + c1                                       # t rounded to 2^-16
  y2 = (t - (y1 - c1)) + c2                         # the rest, to 2^-34
  counts = [
      jnp.sum(_bits(y), axis=-1, keepdims=True)
      - jnp.int32(_wrapped(LANES * int(c.view(np.int32))))
      for y, c in ((y1, c1), (y2, c2))]
  scaled = (counts[0].astype(jnp.float32)
            + counts[1].astype(jnp.float32) * np.float32(2.0 ** -18))
  p = _float(e_bits)
  return scaled * np.float32(2.0 ** -16) * p * p


SUMS = {"float32": lambda x: jnp.sum(x * x, axis=-1, keepdims=True),
        "exact3": _exact3, "exact2": _exact2}


def _kernel(x_ref, q_ref, s_ref, *, n: int, access: str, total: str):
  r = pl.program_id(0)
  start = r * n
  lanes = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
  if access == "window":
    first = pl.multiple_of((start // 16) * 16, 16)
    shift = start - first
    mask = (lanes >= shift) & (lanes < shift + n)
    end = pl.multiple_of(((shift + n + 15) // 16) * 16, 16)
    x = plgpu.load(x_ref.at[pl.ds(first, LANES)], mask=lanes[0] < end,
                   other=0.0)
    x = jnp.where(mask, x.astype(jnp.float32)[None, :], 0.0)
  else:
    first, mask = start, lanes < n
    x = plgpu.load(x_ref.at[pl.ds(start, LANES)], mask=mask[0],
                   other=0.0).astype(jnp.float32)[None, :]
  rstd = jax.lax.rsqrt(SUMS[total](x) / n + EPS)
  y = x * rstd
  scale = jnp.maximum(jnp.max(jnp.abs(y), axis=-1, keepdims=True) / 448.0,
                      1e-12)
  plgpu.store(q_ref.at[pl.ds(first, LANES)],
              (y * (1.0 / scale)).astype(F8)[0], mask=mask[0])
  plgpu.store(s_ref.at[pl.ds(r, 1)], scale[0])


def _prototype(padded, n: int, access: str, total: str, rows: int = ROWS,
               interpret: bool = False):
  size = rows * n + LANES
  return pl.pallas_call(
      functools.partial(_kernel, n=n, access=access, total=total),
      out_shape=[jax.ShapeDtypeStruct((size,), F8),
                 jax.ShapeDtypeStruct((rows,), jnp.float32)],
      grid=(rows,),
      in_specs=[pl.BlockSpec(padded.shape, lambda i: (0,))],
      out_specs=[pl.BlockSpec((size,), lambda i: (0,)),
                 pl.BlockSpec((rows,), lambda i: (0,))],
      compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
      interpret=interpret, name="unaligned_window_prototype")(padded)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.unaligned_window", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="unaligned_window.json")
  args = parser.parse_args(argv)
  if not platform.on_cuda_gpu():
    print("unaligned_window: no NVIDIA GPU here; it times compiled kernels "
          "with CUPTI", file=sys.stderr)
    return 1
  results = dict(card=jax.devices()[0].device_kind, jax=jax.__version__,
                 rows=ROWS, lanes=LANES, warps=WARPS, times={})
  for n in (4099, 4104):
    x, _ = testing.random_inputs(0, (ROWS, n), "bfloat16")
    pad = lambda a: jnp.concatenate([a.reshape(-1), jnp.zeros((LANES,),
                                                              a.dtype)])
    want = np.asarray(api.rms_norm_quantized(x, None,
                                             implementation="xla")[1])[:, 0]
    config = triton_config.Config(1, LANES, WARPS)
    library = jax.jit(lambda a: triton_quantize.forward(
        a, None, None, None, epsilon=EPS, scale_offset=0.0, quant_dtype=F8,
        config=config))
    results["times"][f"{n} library"] = dict(us=bench.measure_us(library, x))
    for access, total in VARIANTS:
      fn = jax.jit(functools.partial(_prototype, n=n, access=access,
                                     total=total))
      scales = np.asarray(fn(pad(x))[1])
      rolled = np.asarray(fn(pad(jnp.roll(x, 1, axis=0)))[1])
      results["times"][f"{n} {access} {total}"] = dict(
          us=bench.measure_us(fn, pad(x)),
          scale_rel_error=float(np.max(np.abs(scales / want - 1))),
          rows_changed_when_rolled=int(np.sum(
              np.roll(scales, 1).view(np.uint32) != rolled.view(np.uint32))))
    for key, row in results["times"].items():
      if key.startswith(str(n)):
        print(key, row, flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
