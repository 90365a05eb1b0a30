"""What the Triton kernels share: the one pallas_call, the in-kernel
rounding, and the limits of what they can run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_rmsnorm._src import platform
from jax_rmsnorm._src import reference
from jax_rmsnorm._src.triton import config as triton_config


def round_trip(value: jax.Array, dtype, interpret: bool) -> jax.Array:
  """float32 `value` rounded to `dtype`, as float32, inside a kernel.

  Triton keeps the two converts. Interpret mode runs the kernel through XLA,
  which may drop the pair (excess precision): there reduce_precision rounds.
  """
  if interpret:
    return reference.round_to(value, dtype)
  return value.astype(dtype).astype(jnp.float32)


def row_sum(value: jax.Array, interpret: bool) -> jax.Array:
  """The sums of a (rows, cols) block's rows, (rows, 1), inside a kernel.

  Triton reduces in its own fixed order. Interpret mode runs the kernel
  through XLA, whose CPU reduce picks an order per program and per vector
  width: on an AVX-512 host two grids of one forward gave 13 of 797 rstd
  one ulp apart. There the columns are added as a fixed pairwise tree
  (cols is a power of two, as Triton's blocks are), the same on every grid
  and every host.
  """
  if not interpret:
    return jnp.sum(value, axis=1, keepdims=True)
  cols = value.shape[1]
  assert cols & (cols - 1) == 0, value.shape
  while cols > 1:
    cols //= 2
    value = value[:, :cols] + value[:, cols:]
  return value


def ds(start, size: int) -> pl.Slice:
  """`pl.ds` with an int32 start: in x64 mode a Python int start would be
  int64 beside the int32 program ids, which Pallas cannot mix."""
  if isinstance(start, int):
    start = jnp.int32(start)
  return pl.ds(start, size)


def columns(ref, start, size: int):
  """`ref[..., start:start + size]` of a 1-D or 2-D ref, every index int32
  (a bare `:` would be an int64 zero in x64 mode)."""
  if ref.ndim == 1:
    return ref.at[ds(start, size)]
  return ref.at[ds(0, ref.shape[0]), ds(start, size)]


def eviction_hints(on: bool) -> tuple[dict, dict]:
  """(load, store) keyword arguments of the L2 eviction hints of
  Config.cache_hints: rows loaded evict_last, outputs stored evict_first;
  none where not `on`."""
  if not on:
    return {}, {}
  return (dict(eviction_policy="evict_last"),
          dict(eviction_policy="evict_first"))


class RowBlock:
  """The rows one program of a row-wise kernel handles: `block_rows` rows of
  an (m, n) array, read as chunks of `block_cols` columns. Masks cover the
  last, partial block of rows and chunk of columns; they are None where
  nothing is out of bounds (known statically for a Python int chunk index),
  so those loads and stores stay unmasked."""

  def __init__(self, *, m: int, n: int, block_rows: int, block_cols: int,
               first_row=None, cache_hints: bool = False, widths=None):
    """first_row: None where each program's refs are its own block of rows
    (program i, rows i * block_rows on); else the first row of this block
    in refs that hold every row (a persistent program's loop step), whose
    rows are then always masked (a last step may lie past the end).
    cache_hints: `load_input` loads with L2 priority evict_last and `store`
    stores evict_first (Config.cache_hints). widths: the chunks' widths
    (Config.chunk_widths), where they are not all block_cols; chunks are
    then indexed by Python ints only."""
    self.m, self.n = m, n
    self.widths = widths
    if widths is not None and len(set(widths)) == 1:
      self.widths = None

    self.load_hint, self.store_hint = eviction_hints(cache_hints)
    self.block_rows, self.block_cols = block_rows, block_cols
    self.shape = (block_rows, block_cols)
    self.whole = first_row is not None
    self.first_row = (first_row if self.whole
                      else pl.program_id(0) * block_rows)
    self.rows = self.first_row + jax.lax.broadcasted_iota(
        jnp.int32, self.shape, 0)
    self.need_rows = self.whole or m % block_rows != 0

  def span(self, k) -> tuple:
    """(first column, width) of chunk `k`."""
    if self.widths is None:
      return k * self.block_cols, self.block_cols
    if not isinstance(k, int):
      raise ValueError(f"chunks of widths {self.widths} need a static index")
    return sum(self.widths[:k]), self.widths[k]

  def masks(self, k):
    """(element mask, column mask) of chunk `k`."""
    start, width = self.span(k)
    need_cols = not isinstance(k, int) or start + width > self.n
    shape = (self.block_rows, width)
    mask = None
    if self.need_rows:
      rows = (self.rows if width == self.block_cols else self.first_row
              + jax.lax.broadcasted_iota(jnp.int32, shape, 0))
      mask = rows < self.m
    if need_cols:
      cols = start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
      mask = cols < self.n if mask is None else mask & (cols < self.n)
    col_mask = None
    if need_cols:
      col_mask = start + jax.lax.iota(jnp.int32, width) < self.n
    return mask, col_mask

  def chunk(self, ref, k):
    start, width = self.span(k)
    if self.whole and ref.ndim == 2:
      return ref.at[ds(self.first_row, self.block_rows), ds(start, width)]
    return columns(ref, start, width)

  def load(self, ref, k, mask, **hint):
    if mask is None:
      return plgpu.load(self.chunk(ref, k), **hint)
    return plgpu.load(self.chunk(ref, k), mask=mask, other=0.0, **hint)

  def store(self, ref, k, value, mask):
    value = value.astype(ref.dtype)
    if mask is None:
      plgpu.store(self.chunk(ref, k), value, **self.store_hint)
    else:
      plgpu.store(self.chunk(ref, k), value, mask=mask, **self.store_hint)

  def store_rows(self, ref, values):
    """A (block_rows,) vector, one value per row, into a (m,) ref."""
    if self.whole:
      ref = ref.at[ds(self.first_row, self.block_rows)]
    if not self.need_rows:
      plgpu.store(ref, values)
      return
    row_ids = self.first_row + jax.lax.iota(jnp.int32, self.block_rows)
    plgpu.store(ref, values, mask=row_ids < self.m)

  def scale_chunk(self, scale_ref, k, offset: float):
    """Chunk k of the scale plus `offset`, float32, as a (1, width) row."""
    w = self.load(scale_ref, k, self.masks(k)[1]).astype(jnp.float32)
    return (jnp.float32(offset) + w)[None, :]

  def scaled(self, k, v, *, scale_ref, held, offset: float):
    """v of chunk k times the scale's chunk plus offset (`held[k]`, or
    loaded here); v itself without a scale."""
    if scale_ref is None:
      return v
    return v * (held[k] if held is not None
                else self.scale_chunk(scale_ref, k, offset))

  def normalized(self, k, x, rstd, *, round_to, scale_ref, held,
                 offset: float, interpret: bool):
    """y of chunk k, float32, as reference.forward computes it: x * rstd,
    rounded to `round_to` first where given (cast order "hf"), times the
    scale's chunk plus offset (`held[k]`, or loaded here)."""
    y = x * rstd
    if round_to is not None:
      y = round_trip(y, round_to, interpret)
    return self.scaled(k, y, scale_ref=scale_ref, held=held, offset=offset)

  def load_input(self, k, x_ref, r_ref):
    """Chunk k of x (and of the residual, else None), in their dtypes."""
    mask = self.masks(k)[0]
    return (self.load(x_ref, k, mask, **self.load_hint),
            None if r_ref is None
            else self.load(r_ref, k, mask, **self.load_hint))

  def normalized_input(self, k, loaded, r_ref, h_ref, *, write_h: bool,
                       interpret: bool):
    """The row to normalize from chunk k's `load_input`, as float32: x, or
    with a residual h = x + residual rounded to residual's dtype (written
    out when `write_h`)."""
    x, r = loaded
    x = x.astype(jnp.float32)
    if r_ref is None:
      return x
    h = x + r.astype(jnp.float32)
    if write_h:
      self.store(h_ref, k, h, self.masks(k)[0])
    return round_trip(h, r_ref.dtype, interpret)

  def row_loader(self, loaded, x_ref, r_ref, h_ref, *, interpret: bool):
    """load_row(k, write_h) -> `normalized_input` of chunk k, from
    `loaded` (the chunks' `load_input`, loaded ahead) or, None, loaded
    there."""
    def load_row(k, write_h):
      chunk = (self.load_input(k, x_ref, r_ref) if loaded is None
               else loaded[k])
      return self.normalized_input(k, chunk, r_ref, h_ref, write_h=write_h,
                                   interpret=interpret)
    return load_row

  def sum_squares(self, load_row, num_chunks: int, resident: bool,
                  max_of=None, *, interpret: bool):
    """(the chunks held in registers, or None; the rows' sums of squares,
    (rows, 1); with `max_of`, the rows' max of max_of(k, x) over their
    chunks, (rows, 1), else None). The chunks of block_cols are summed
    elementwise, then reduced once; narrower chunks (Config.split_tail)
    are reduced each and added after, in order. `resident` (or one
    chunk): every chunk is loaded once and kept, one pass over HBM;
    otherwise a loop that the caller's later passes repeat."""
    def fold(k, x, acc):
      sq, mx = x * x, None if max_of is None else max_of(k, x)
      if acc is None:
        return sq, mx
      return acc[0] + sq, None if mx is None else jnp.maximum(acc[1], mx)

    def reduced(acc):
      sq, mx = acc
      return (row_sum(sq, interpret),
              None if mx is None else jnp.max(mx, axis=1, keepdims=True))

    if num_chunks == 1 or resident:
      xs = [load_row(k, write_h=True) for k in range(num_chunks)]
      acc = tails = None
      for k, x in enumerate(xs):
        if self.span(k)[1] == self.block_cols:
          acc = fold(k, x, acc)
        else:
          tails = (tails or []) + [reduced(fold(k, x, None))]
      sq, mx = reduced(acc)
      for tail_sq, tail_mx in tails or ():
        sq = sq + tail_sq
        mx = None if mx is None else jnp.maximum(mx, tail_mx)
      return xs, sq, mx

    def step(k, acc):
      return fold(k, load_row(k, write_h=True), acc)
    zeros = jnp.zeros(self.shape, jnp.float32)
    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), step,
                            (zeros, None if max_of is None else zeros))
    return (None,) + reduced(acc)


@dataclasses.dataclass(frozen=True)
class RowGrid:
  """How a row kernel's programs cover m rows.

  steps == 0: one block of `config.block_rows` rows a program, whose refs
  are that block. Otherwise a persistent grid: program p loops over the
  blocks p, p + programs, ... (`steps` of them) in refs that hold every row
  (`block`: padded to the last step; the rows past m are masked).
  """
  programs: int
  steps: int
  block: tuple[int, int]

  def row_spec(self) -> pl.BlockSpec:
    """The BlockSpec of a (m,) output of one value a row."""
    return pl.BlockSpec(self.block[:1], (lambda i: (0,)) if self.steps
                        else (lambda i: (i,)))


def row_grid(config: triton_config.Config, m: int, n: int) -> RowGrid:
  """The grid `config` launches for m rows of n: persistent where
  config.programs_per_sm (rows held in registers only)."""
  width = sum(config.chunk_widths(n))
  row_blocks = pl.cdiv(m, config.block_rows)
  if config.split_tail and not config.resident(n):
    raise ValueError(f"{config}: narrow chunks (split_tail) need rows held "
                     f"in registers, which {n} columns are not")
  if not config.programs_per_sm:
    return RowGrid(row_blocks, 0, (config.block_rows, width))
  if not config.resident(n):
    raise ValueError(f"{config}: a persistent grid needs rows held in "
                     f"registers, which {n} columns are not")
  programs = config.num_programs(m, platform.sm_count())
  steps = pl.cdiv(row_blocks, programs)
  return RowGrid(programs, steps, (steps * programs * config.block_rows,
                                   width))


def each_row_block(body, *, grid: RowGrid, config: triton_config.Config,
                   m: int, n: int, x_ref, r_ref, scale_ref, offset: float):
  """Calls body(block, loaded, held) for each `RowBlock` of this program.

  loaded: the block's chunks' `load_input`, or None for body to load them
  (`RowBlock.row_loader`); held: the scale's chunks (`RowBlock.scale_chunk`)
  when config.hold_scale loads them once, before the loop, else None. On a
  persistent grid with config.prefetch, the next block's inputs are loaded
  before body reduces the current one, so that a program keeps memory busy
  while it computes. The grid changes no row's arithmetic.
  """
  num_chunks = config.num_chunks(n)

  def block_at(first_row=None):
    return RowBlock(m=m, n=n, block_rows=config.block_rows,
                    block_cols=config.block_cols, first_row=first_row,
                    cache_hints=config.cache_hints,
                    widths=config.chunk_widths(n))

  if not grid.steps:
    body(block_at(), None, None)
    return
  pid = pl.program_id(0)
  step_block = lambda t: block_at(
      (t * grid.programs + pid) * config.block_rows)
  held = None
  if config.hold_scale and scale_ref is not None:
    first = step_block(jnp.int32(0))
    held = [first.scale_chunk(scale_ref, k, offset)
            for k in range(num_chunks)]
  load = lambda block: [block.load_input(k, x_ref, r_ref)
                        for k in range(num_chunks)]
  if config.prefetch:
    def step(t, loaded):
      upcoming = load(step_block(t + 1))
      body(step_block(t), loaded, held)
      return upcoming
    jax.lax.fori_loop(jnp.int32(0), jnp.int32(grid.steps), step,
                      load(step_block(jnp.int32(0))))
  else:
    @pl.loop(jnp.int32(0), jnp.int32(grid.steps))
    def _(t):
      body(step_block(t), None, held)


def row_operands(x, residual, scale, *, block_rows: int, block_cols: int,
                 whole: bool = False):
  """The row kernels' inputs as (m, n) views with their BlockSpecs: x and
  the residual by blocks of rows (or, `whole`, one block of every row that
  each program of a persistent grid indexes itself), the scale whole.
  Returns (args, in_specs, row_block spec) for a grid over row blocks."""
  n = x.shape[-1]
  m = x.size // n
  row_block = pl.BlockSpec((block_rows, block_cols),
                           (lambda i: (0, 0)) if whole else (lambda i: (i, 0)))
  args, in_specs = [x.reshape(m, n)], [row_block]
  if residual is not None:
    args.append(residual.reshape(m, n))
    in_specs.append(row_block)
  if scale is not None:
    args.append(scale)
    in_specs.append(pl.BlockSpec((block_cols,), lambda i: (0,)))
  return args, in_specs, row_block


def check_supported(m: int, n: int, dtype=None, *,
                    backward: bool = False) -> None:
  """Raises NotImplementedError where the kernels cannot run (m rows of n,
  of any supported dtype)."""
  del dtype
  if n > triton_config.MAX_COLS:
    raise NotImplementedError(
        f"rows of {n} elements exceed the Triton kernels' limit of "
        f"{triton_config.MAX_COLS}")
  if m * n > triton_config.MAX_ELEMENTS:
    raise NotImplementedError(
        f"{m * n} elements exceed the Triton kernels' int32 indexing "
        f"({triton_config.MAX_ELEMENTS})")
  if backward and pl.next_power_of_2(n) > triton_config.MAX_ONE_PASS_COLS:
    raise NotImplementedError(
        f"the Triton backward holds a row in registers; rows of {n} elements "
        f"exceed its limit of {triton_config.MAX_ONE_PASS_COLS}")


def launch(kernel, *, name: str, config: triton_config.Config, grid,
           in_specs, out_specs, out_shape, interpret: bool,
           input_output_aliases=None):
  """The one pallas_call of every Triton kernel here."""
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name=name,
      input_output_aliases=input_output_aliases or {},
  )
