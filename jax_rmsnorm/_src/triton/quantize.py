"""RMSNorm (optionally fused with a residual add) straight to float8/int8:
Pallas, lowered through the Triton backend. A sibling of forward.py: the
same row layout (`common.RowBlock`), launch (`common.launch`) and masking,
its own launch configuration (`triton_config.get_quant_config`), which may
put the rows on a persistent grid as the backward does; the arithmetic of
`quantize.reference`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import avals
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import quantize
from jax_rmsnorm._src import validation
from jax_rmsnorm._src.triton import common
from jax_rmsnorm._src.triton import config as triton_config

logger = logging.getLogger("jax_rmsnorm")

KERNEL_NAME = "jax_rmsnorm_quant"
# Pallas's Triton lowering refuses float8_e4m3fn casts below sm_89 (Triton's
# float32 -> float8 conversions are the cvt.rn.satfinite.{e4m3,e5m2}x2.f32
# instructions of Ada and Hopper); float8_e5m2 below sm_89 is untried.
_MIN_FP8_CAPABILITY = 8.9


def check_supported(m: int, n: int, quant_dtype) -> None:
  """Raises NotImplementedError where the quantized kernel cannot run: the
  forward kernel's limits (`common.check_supported`; no row-length limit
  below MAX_COLS: long rows loop), and float8 outputs on an NVIDIA GPU older
  than sm_89. Without a GPU (interpret mode, export) fp8 is accepted."""
  common.check_supported(m, n)
  quant_dtype = quantize.canonicalize_quant_dtype(quant_dtype)
  capability = platform.compute_capability()
  if (quant_dtype != jnp.int8 and capability is not None
      and capability < _MIN_FP8_CAPABILITY):
    raise NotImplementedError(
        f"the Triton kernel's {quant_dtype} output needs compute capability "
        f">= {_MIN_FP8_CAPABILITY} (Ada, Hopper); this GPU has {capability}")


def _quantize_kernel(*refs, n: int, m: int, eps: float, offset: float,
                     quant_dtype, has_residual: bool, has_scale: bool,
                     static: str | None, round_normalized: bool,
                     config: triton_config.Config, grid: common.RowGrid,
                     interpret: bool):
  """Normalizes and quantizes rows of `n` columns.

  Refs: x, [residual], [scale], [inv_scale], y_q, [h], [row_scales].
  static: None (dynamic per-row scales, written to row_scales), "scalar"
  (inv_scale of shape (1,)) or "channel" (inv_scale of shape (n,)).

  The program's blocks of rows, and whether it loads the next ahead and
  holds the scale: `common.each_row_block` (`grid`, `config`).

  resident (or one chunk): the row's chunks are loaded once and held in
  registers: x (+ residual) is read once, y_q (+ h) written once. Otherwise
  (rows padded past MAX_ONE_PASS_COLS) loops over the chunks: one pass sums
  squares (and writes h), a dynamic scale takes a second for the row's amax
  unless config.fold_amax, the last quantizes; each pass re-reads the inputs
  and recomputes y with the same arithmetic, so the bits do not depend on
  the path.

  config.fold_amax (a dynamic scale, default cast order): the first pass
  also reduces max |x * scale|, and the amax is its product with rstd
  (`quantize.amax_from_scaled`); otherwise the amax is reduced over y.
  """
  refs = list(refs)
  x_ref = refs.pop(0)
  r_ref = refs.pop(0) if has_residual else None
  scale_ref = refs.pop(0) if has_scale else None
  inv_ref = refs.pop(0) if static else None
  q_ref = refs.pop(0)
  h_ref = refs.pop(0) if has_residual else None
  s_ref = refs.pop(0) if static is None else None
  num_chunks, resident = config.num_chunks(n), config.resident(n)
  # Hopper's float32 -> float8 conversion saturates (satfinite); interpret
  # mode's (XLA's) does not, and int8 needs the clip before rounding.
  clip = interpret or quant_dtype == jnp.int8
  round_to = ((x_ref.dtype if r_ref is None else r_ref.dtype)
              if round_normalized else None)

  def rows(block, loaded, held):
    """Normalizes and quantizes `block`'s rows; `loaded`: their chunks'
    `load_input`, or None to load them here; `held`: the scale's chunks."""
    load_row = block.row_loader(loaded, x_ref, r_ref, h_ref,
                                interpret=interpret)

    def normalized(k, x):
      return block.normalized(k, x, rstd, round_to=round_to,
                              scale_ref=scale_ref, held=held, offset=offset,
                              interpret=interpret)

    def chunk_amax(y):
      return jnp.max(quantize.abs_nan_as_inf(y), axis=1, keepdims=True)

    def scaled_abs(k, x):
      """|x * (offset + scale)| of chunk k: reduced beside the squares,
      it gives the amax without a second reduction after rstd
      (`quantize.amax_from_scaled`)."""
      return quantize.abs_nan_as_inf(block.scaled(
          k, x, scale_ref=scale_ref, held=held, offset=offset))

    def write(k, y):
      mask, col_mask = block.masks(k)
      if static == "channel":
        inv_k = block.load(inv_ref, k, col_mask)[None, :]
      else:
        inv_k = inv
      block.store(q_ref, k, quantize.saturate_cast(y * inv_k, quant_dtype,
                                                   clip=clip), mask)

    # Pass 1: the sum of squares (and h), with a dynamic scale in the
    # default cast order also max |x * scale| (`quantize.amax_from_scaled`).
    fold_amax = (config.fold_amax and static is None
                 and round_to is None)
    xs, sq, max_scaled = block.sum_squares(
        load_row, num_chunks, resident,
        max_of=scaled_abs if fold_amax else None, interpret=interpret)
    rstd = jax.lax.rsqrt(sq / jnp.float32(n) + jnp.float32(eps))
    if xs is not None:
      ys = [normalized(k, x) for k, x in enumerate(xs)]

    # The scale: static (its reciprocal computed outside), or the row's amax.
    if static == "scalar":
      inv = plgpu.load(inv_ref)[None, :]           # (1, 1)
    elif static is None:
      if fold_amax:
        amax = quantize.amax_from_scaled(max_scaled, rstd)
      elif xs is not None:
        amax = chunk_amax(ys[0])
        for y in ys[1:]:
          amax = jnp.maximum(amax, chunk_amax(y))  # never NaN: maxnum is exact
      else:
        def chunk_max(k, acc):
          return jnp.maximum(acc, chunk_amax(normalized(
              k, load_row(k, write_h=False))))
        amax = jax.lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks),
                                 chunk_max,
                                 jnp.zeros((block.block_rows, 1),
                                           jnp.float32))
      row_scale = quantize.dynamic_scale(amax, quant_dtype)   # (rows, 1)
      inv = jnp.float32(1) / row_scale
      block.store_rows(s_ref, row_scale[:, 0])

    # Last pass: quantize and store.
    if xs is not None:
      for k, y in enumerate(ys):
        write(k, y)
    else:
      @pl.loop(jnp.int32(0), jnp.int32(num_chunks))
      def _(k):
        write(k, normalized(k, load_row(k, write_h=False)))

  common.each_row_block(rows, grid=grid, config=config, m=m, n=n,
                        x_ref=x_ref, r_ref=r_ref, scale_ref=scale_ref,
                        offset=offset)


def forward(x: jax.Array, residual: jax.Array | None,
            scale: jax.Array | None, quant_scale: jax.Array | None, *,
            epsilon: float, scale_offset: float, quant_dtype,
            cast_order: str = "float32", interpret: bool = False,
            config: triton_config.Config | None = None
            ) -> quantize.QuantizedOutputs:
  """RMSNorm of validated, non-empty `x` (plus `residual`), quantized to
  `quant_dtype`, in one kernel: `quantize.reference`'s arithmetic.

  quant_scale: None for dynamic per-row scales (returned as row_scales, of
  shape x.shape[:-1] + (1,), float32), or a validated static float32 scale
  of shape () or (N,) (`quantize.check_quant_scale`); its reciprocal is
  computed here by XLA, as in the reference.

  Returns (y_q, row_scales or None, h or None). Raises NotImplementedError
  where `check_supported` does; rows past MAX_ONE_PASS_COLS are handled in
  chunks, two passes over the inputs (three for a dynamic scale without
  config.fold_amax).
  """
  n = x.shape[-1]
  m = x.size // n
  quant_dtype = quantize.canonicalize_quant_dtype(quant_dtype)
  validation.require_operand_shapes(x, residual, scale)
  if quant_scale is not None and quant_scale.shape not in ((), (1,), (n,)):
    raise ValueError(f"{quant_scale.shape=} must be (), (1,) or ({n},)")
  check_supported(m, n, quant_dtype)
  static = None
  if quant_scale is not None:
    static = "channel" if quant_scale.shape == (n,) else "scalar"
  if config is None:
    config = triton_config.get_quant_config(m, n, x.dtype,
                                            platform.device_kind(),
                                            residual=residual is not None,
                                            static=static is not None,
                                            per_channel=static == "channel")
  logger.debug("rms_norm triton quantized forward: rows=%d n=%d dtype=%s "
               "quant_dtype=%s scale=%s residual=%s %s", m, n, x.dtype,
               quant_dtype, static or "dynamic", residual is not None, config)
  grid = common.row_grid(config, m, n)
  block = grid.block
  args, in_specs, row_block = common.row_operands(
      x, residual, scale, block_rows=block[0], block_cols=block[1],
      whole=bool(grid.steps))
  if static is not None:
    inv = jnp.float32(1) / quant_scale.astype(jnp.float32)
    if static == "scalar":
      args.append(inv.reshape(1))
      in_specs.append(pl.BlockSpec((1,), lambda i: (0,)))
    else:
      args.append(inv)
      in_specs.append(pl.BlockSpec(block[1:], lambda i: (0,)))
  like = (x, residual, scale, quant_scale)
  out_shape = [avals.out_struct((m, n), quant_dtype, *like)]
  out_specs = [row_block]
  if residual is not None:
    out_shape.append(avals.out_struct((m, n), residual.dtype, *like))
    out_specs.append(row_block)
  if static is None:
    out_shape.append(avals.out_struct((m,), jnp.float32, *like))
    out_specs.append(grid.row_spec())
  kernel = functools.partial(
      _quantize_kernel, n=n, m=m, eps=epsilon, offset=scale_offset,
      quant_dtype=quant_dtype, has_residual=residual is not None,
      has_scale=scale is not None, static=static,
      round_normalized=cast_order == "hf", config=config, grid=grid,
      interpret=interpret)
  outs = common.launch(kernel, name=KERNEL_NAME, config=config,
                       grid=(grid.programs,),
                       in_specs=in_specs, out_specs=out_specs,
                       out_shape=out_shape, interpret=interpret)(*args)
  outs = list(outs)
  y_q = outs.pop(0).reshape(x.shape)
  h = outs.pop(0).reshape(x.shape) if residual is not None else None
  row_scales = (outs.pop(0).reshape(x.shape[:-1] + (1,)) if static is None
                else None)
  return quantize.QuantizedOutputs(y_q, row_scales, h)
