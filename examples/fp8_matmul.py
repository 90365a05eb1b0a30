"""RMSNorm straight to fp8 (or int8), feeding a quantized matmul: the input
projection of a decoder layer at inference.

  y_q, row_scales = rms_norm_quantized(x, scale, quant_dtype=float8_e4m3fn)
  out ~= (y_q @ w_q) * row_scales * w_scales     # fp8 operands, f32 accumulate

The activations get one float32 scale per token (dynamic, from the row's
amax), the weight one per output channel (computed once, offline). The
matmul runs on the quantized values with a float32 accumulator, and the two
scales are applied to its result: `jax.lax.dot_general(...,
preferred_element_type=jnp.float32)`, or `jax.nn.scaled_matmul` where this
JAX has it (it takes the same per-row and per-column scales as blocks of
the whole contracting axis; on Hopper XLA runs it as float32 operands into
a TF32 dot, not as an fp8 matmul). The result is checked against the
float32 matmul of the unquantized norm.

  python -m examples.fp8_matmul                  # runs on CPU too
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jax_rmsnorm import rms_norm
from jax_rmsnorm import rms_norm_quantized


# Bound on ||out - out_f32|| / ||out_f32||, about 1.6x what was measured.
# float8_e4m3fn (3 mantissa bits) rounds a value by up to half a step, 2**-5
# to 2**-4 of it: a uniform error of relative RMS 2**-5..2**-4 / sqrt(3),
# about 2.6% on average; both operands are rounded and the K products' errors
# are independent: sqrt(2) x 2.6% = 3.7% of the output, measured 3.7%.
# float8_e5m2 (2 mantissa bits) doubles it (measured 7.4%). int8, one step
# being amax / 127 of a row or column (amax about 3.5 sigma): step / sqrt(12)
# = 0.8% of sigma per operand, 1.1% measured.
TOLERANCE = {"float8_e4m3fn": 0.06, "float8_e5m2": 0.12, "int8": 0.02}
# Bound on ||scaled_matmul - out|| / ||out||: see main().
SCALED_MATMUL_AGREEMENT = 2e-3


def quantize_weight(w: jax.Array, quant_dtype) -> tuple[jax.Array, jax.Array]:
  """(K, N) float weight -> (w_q, (N,) float32 scales), per output channel,
  symmetric: w ~= w_q * scales. Offline work, done once per weight."""
  quant_dtype = jnp.dtype(quant_dtype)
  if quant_dtype == jnp.int8:
    top = 127.0
  else:
    top = float(jnp.finfo(quant_dtype).max)
  wf = w.astype(jnp.float32)
  scales = jnp.maximum(jnp.max(jnp.abs(wf), axis=0), 1e-12) / top
  q = jnp.clip(wf / scales, -top, top)
  if quant_dtype == jnp.int8:
    q = jnp.round(q)
  return q.astype(quant_dtype), scales


def quantized_matmul(y_q, row_scales, w_q, w_scales) -> jax.Array:
  """(M, K) x (K, N) on quantized operands, float32 out: the accumulator in
  float32 (int32 for int8, exact), then the token and channel scales."""
  int8 = y_q.dtype == jnp.int8
  acc = jax.lax.dot_general(
      y_q, w_q, (((1,), (0,)), ((), ())),
      preferred_element_type=jnp.int32 if int8 else jnp.float32)
  return acc.astype(jnp.float32) * row_scales * w_scales[None, :]


def scaled_matmul(y_q, row_scales, w_q, w_scales) -> jax.Array | None:
  """The same through `jax.nn.scaled_matmul` (block scales: one block of
  the whole K per row of each operand); None where this JAX lacks it or
  cannot lower it here (JAX 0.10.2 has it for GPUs only)."""
  if not hasattr(jax.nn, "scaled_matmul"):
    return None
  fn = jax.jit(lambda a, b, sa, sb: jax.nn.scaled_matmul(
      a[None], b.T[None], sa[None], sb[None, :, None],
      preferred_element_type=jnp.float32)[0])
  try:
    return fn(y_q, w_q, row_scales, w_scales)
  except NotImplementedError:
    return None


@jax.jit(static_argnames=("quant_dtype", "epsilon"))
def layer(x, norm_scale, w_q, w_scales, *, quant_dtype, epsilon):
  """RMSNorm -> quantized activations -> projection, as one jitted step;
  returns the output and the quantized activations with their scales."""
  y_q, row_scales = rms_norm_quantized(x, norm_scale, epsilon=epsilon,
                                       quant_dtype=quant_dtype)
  return quantized_matmul(y_q, row_scales, w_q, w_scales), y_q, row_scales


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=896)
  parser.add_argument("--out", type=int, default=1024)
  parser.add_argument("--quant-dtypes", nargs="+",
                      default=["float8_e4m3fn", "float8_e5m2", "int8"])
  args = parser.parse_args(argv)
  epsilon = 1e-6
  kx, ks, kw = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (args.tokens, args.hidden)).astype(jnp.bfloat16)
  norm_scale = 1.0 + 0.1 * jax.random.normal(ks, (args.hidden,))
  w = (jax.random.normal(kw, (args.hidden, args.out))
       / np.sqrt(args.hidden)).astype(jnp.bfloat16)

  # What the quantized path approximates: the float32 norm, float32 matmul.
  y32 = rms_norm(x, norm_scale, epsilon=epsilon, out_dtype=jnp.float32,
                 implementation="xla")
  want = np.asarray(jnp.dot(y32, w.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST))
  errors = {}
  for quant_dtype in args.quant_dtypes:
    w_q, w_scales = quantize_weight(w, quant_dtype)
    got, y_q, row_scales = layer(x, norm_scale, w_q, w_scales,
                                 quant_dtype=quant_dtype, epsilon=epsilon)
    got_scaled = scaled_matmul(y_q, row_scales, w_q, w_scales)
    err = float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
    line = f"{quant_dtype:>14}: relative error {err:.4f} (bound " \
           f"{TOLERANCE[quant_dtype]})"
    if got_scaled is not None:
      # The same products and scales, another way: on a CPU a float32 sum
      # of the same products (5e-7 apart); on a Hopper GPU XLA dequantizes
      # both operands to float32 and runs its default-precision dot, TF32,
      # which rounds each operand to 10 mantissa bits (2**-11 relative):
      # about 3.5e-4 norm-wise on an H200. A scale lost or misapplied is
      # off by order 1.
      agree = float(np.linalg.norm(np.asarray(got_scaled) - np.asarray(got))
                    / np.linalg.norm(np.asarray(got)))
      assert agree < SCALED_MATMUL_AGREEMENT, (quant_dtype, agree)
      line += f"; jax.nn.scaled_matmul agrees to {agree:.1e}"
    print(line)
    assert err < TOLERANCE[quant_dtype], (quant_dtype, err)
    errors[quant_dtype] = err
  return errors


if __name__ == "__main__":
  main()
