"""What the Mosaic GPU kernels share: the one `plgpu.kernel` launch, the
register layout of a chunk of rows, the row blocks of a CTA and the pipeline
over them, the in-kernel rounding, and the limits of what they can run."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_rmsnorm._src import reference
from jax_rmsnorm._src.mosaic import config as mosaic_config

# ---------------------------------------------------------------------------
# Interpret mode: the parameters' class moved from a private module (JAX
# 0.10) to `plgpu` (0.11+); the interpreter keeps global state that must be
# reset after a kernel raised.

try:
  _InterpretParams = plgpu.InterpretGPUParams
except AttributeError:  # JAX 0.10
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import (  # pylint: disable=g-import-not-at-top
        InterpretGPUParams as _InterpretParams)
  except ImportError:
    _InterpretParams = None


def interpret_available() -> bool:
  """Whether this JAX has the Mosaic GPU interpreter (CPU emulation)."""
  return _InterpretParams is not None


def interpret_params(interpret) -> Any:
  """The `interpret=` argument of plgpu.kernel for a bool (or params)."""
  if interpret is False or interpret is None:
    return None
  if interpret is True:
    if _InterpretParams is None:
      raise NotImplementedError(
          f"JAX {jax.__version__} has no Mosaic GPU interpret mode")
    return _InterpretParams()
  return interpret  # Already interpret parameters (tests pass their own).


def reset_interpreter() -> None:
  """Resets the Mosaic GPU interpreter after a kernel raised in it."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  gpu_callbacks.reset_gpu_interpret_mode_state()


# ---------------------------------------------------------------------------
# Limits.

def check_supported(m: int, n: int, dtype=None, *,
                    backward: bool = False) -> None:
  """Raises NotImplementedError where the kernels cannot run (m rows of n,
  of any supported dtype; `dtype` is x's, or None for any).

  - A row must start on a 16-byte boundary: the rows are moved by bulk TMA
    copies, which need 16-byte aligned addresses and sizes (n * itemsize a
    multiple of 16: n a multiple of 8 for 16-bit dtypes, of 4 for float32).
  - A row must hold at least one chunk of 128 columns (one per thread).
  - Pallas's TMA copies into shared memory move multiples of 128 bytes: a
    block holds a multiple of `config.row_multiple(n)` rows (1 where n is a
    multiple of 64, up to 8), so there must be at least that many rows.
  - Rows of up to 16384 elements run for every combination of dtypes;
    wider rows where one row of each operand, in the widest case for x's
    dtype, fits in shared memory once (`config.get_config`).
  """
  itemsizes = (2, 4) if dtype is None else (np.dtype(dtype).itemsize,)
  for itemsize in itemsizes:
    if (n * itemsize) % 16:
      raise NotImplementedError(
          f"rows of {n} elements of {itemsize} bytes do not start on "
          "16-byte boundaries, which the Mosaic kernels' TMA copies need "
          f"(n a multiple of {16 // itemsize})")
  if n < mosaic_config.MIN_COLS:
    raise NotImplementedError(
        f"rows of {n} elements are shorter than the Mosaic kernels' "
        f"smallest chunk ({mosaic_config.MIN_COLS} columns)")
  multiple = mosaic_config.row_multiple(n)
  if m < multiple:
    raise NotImplementedError(
        f"{m} rows of {n} elements: the Mosaic kernels copy blocks of a "
        f"multiple of {multiple} rows (128-byte TMA copies)")
  if n > mosaic_config.ALWAYS_SUPPORTED_COLS:
    # The widest case for x's dtype: every other operand float32, the
    # outputs not in place, the scale and dh left in GMEM if need be.
    x_itemsize = max(itemsizes)
    try:
      if backward:
        mosaic_config.get_config(n, (x_itemsize + 4) * n, 4,
                                 4 * (n + mosaic_config.THREADS * 4), 1,
                                 4 * n, 4 * n)
      else:
        mosaic_config.get_config(n, (x_itemsize + 8) * n, 4, 0, 1, 4 * n)
    except NotImplementedError as e:
      raise NotImplementedError(f"rows of {n} elements: {e}") from e


# ---------------------------------------------------------------------------
# Layouts. A chunk of a block is (block_rows, 128 * vec): each thread holds
# `vec` contiguous columns of every row, the 4 warps and 32 lanes side by
# side along the columns. A row's sum is taken within a thread, across the
# lanes (shuffles) and across the warps (through shared memory), in an
# order that depends on vec only, never on block_rows.

def chunk_layout(vec: int):
  return plgpu.Layout.TILED(
      plgpu.Tiling(((1, mosaic_config.THREADS * vec), (32 * vec,), (vec,))),
      warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)


def column_layout(vec: int):
  """A (128 * vec,) vector laid out as one row of a chunk (scale, d(scale))."""
  return chunk_layout(vec).reduce(0)


def row_layout(vec: int):
  """A (block_rows,) vector of per-row values (rstd), in every thread."""
  return chunk_layout(vec).reduce(1)


class Chunks:
  """How a row of n columns is read in chunks of `cols`: the full chunks
  0..count-1, then (if cols does not divide n) a last chunk at n - cols,
  which overlaps the one before by `overlap` columns.

  Kernels that write in place visit the tail first (`visit`) and write its
  result last, with a warpgroup barrier on both sides: its reads happen
  before other threads overwrite the chunk it overlaps, its write after
  they read that chunk (the overlapping columns then get the same value
  twice). It is masked out of every sum over the row.
  """

  # Up to this many full chunks are unrolled in Python by `visit`.
  UNROLL = 8

  def __init__(self, n: int, cols: int):
    if n < cols:
      raise ValueError(f"rows of {n} are shorter than a chunk of {cols}")
    self.n, self.cols = n, cols
    self.count = n // cols
    self.has_tail = n % cols != 0
    self.tail_start = n - cols
    self.overlap = self.count * cols - self.tail_start if self.has_tail else 0

  @property
  def padded_cols(self) -> int:
    """Columns of the per-chunk sums over rows (d(scale)): one slot per
    chunk, the tail's included."""
    return (self.count + self.has_tail) * self.cols

  def is_tail(self, k) -> bool:
    return isinstance(k, int) and self.has_tail and k == self.count

  def visit(self, body: Callable[[Any, Any], Any], carry: Any = None, *,
            unroll: int = UNROLL, step: int = 2) -> Any:
    """carry = body(k, carry) over the tail (k == count, if any) and then
    the full chunks k = 0..count-1; the first call gets carry None when
    None is given (it returns the initial carry). Up to `unroll` full
    chunks are unrolled in Python (k an int); more run in a lax.fori_loop
    (k traced) over groups of `step` chunks."""
    if self.has_tail:
      carry = body(self.count, carry)
    if self.count <= unroll:
      for k in range(self.count):
        carry = body(k, carry)
      return carry
    first = 0
    if carry is None:
      carry, first = body(0, None), 1
    groups = (self.count - first) // step

    def group(g, carry):
      for j in range(step):
        carry = body(first + g * step + j, carry)
      return carry

    carry = lax.fori_loop(0, groups, group, carry)
    for k in range(first + groups * step, self.count):
      carry = body(k, carry)
    return carry

  def start(self, k) -> Any:
    """First column of chunk k (the tail is k == count)."""
    if isinstance(k, int) and k == self.count:
      return self.tail_start
    return k * self.cols

  def fold(self, per_slot: jax.Array) -> jax.Array:
    """(..., padded_cols) sums per chunk slot -> (..., n) sums per column:
    the tail slot's first `overlap` columns are the previous chunk's."""
    if not self.has_tail:
      return per_slot
    full = self.count * self.cols
    return jnp.concatenate(
        [per_slot[..., :full], per_slot[..., full + self.overlap:]], axis=-1)


# ---------------------------------------------------------------------------
# In-kernel helpers.

class ChunkIO:
  """Loads and stores of one chunk (rows, cols) of a row block, as float32
  in `chunk_layout(vec)`. A block of one row is read as a (cols,) vector
  and broadcast (JAX 0.10's Mosaic cannot fold a (1, cols) window of a
  longer row); its stores go through a sum over the one row (exact)."""

  def __init__(self, rows: int, cols: int, vec: int, interpret: bool):
    self.rows, self.cols, self.interpret = rows, cols, interpret
    self.layout = chunk_layout(vec)
    self.column_layout = column_layout(vec)

  def _window(self, ref, col):
    if self.rows == 1:
      return ref.at[0, pl.ds(col, self.cols)]
    return ref.at[:, pl.ds(col, self.cols)]

  def get(self, ref, col, *, gmem: bool = False) -> jax.Array:
    """ref[:, col:col + cols] as float32 (ref a (rows, n) window)."""
    window = self._window(ref, col)
    if self.rows == 1:
      layout = self.column_layout
    else:
      layout = self.layout
    if gmem:
      value = load_gmem(window, layout, self.interpret)
    else:
      value = load(window, layout, self.interpret)
    value = value.astype(jnp.float32)
    if self.rows == 1:
      value = with_layout(
          lax.broadcast_in_dim(value, (1, self.cols), (1,)), self.layout,
          self.interpret)
    return value

  def put(self, ref, col, value: jax.Array) -> None:
    """ref[:, col:col + cols] = value (rounded to ref's dtype)."""
    if self.rows == 1:
      value = jnp.sum(value, axis=0)
    self._window(ref, col)[...] = value.astype(ref.dtype)


def load(ref, layout, interpret: bool) -> jax.Array:
  """ref[...] in `layout` (plain in interpret mode, which has no layouts)."""
  value = ref[...]
  return value if interpret else plgpu.layout_cast(value, layout)


def load_gmem(ref, layout, interpret: bool) -> jax.Array:
  """ref[...] straight from GMEM into `layout` (no shared memory)."""
  if interpret:
    return ref[...]
  try:  # JAX 0.11+: the index is part of the ref.
    return plgpu.load(ref, layout=layout, optimized=False)
  except TypeError:  # JAX 0.10 wants it separately.
    return plgpu.load(ref, (), layout=layout, optimized=False)


def with_layout(value: jax.Array, layout, interpret: bool) -> jax.Array:
  """Assigns the layout of a value just made (a broadcast, an iota)."""
  return value if interpret else plgpu.layout_cast(value, layout)


def load_rows(ref, start, rows: int, layout, interpret: bool) -> jax.Array:
  """ref[start:start + rows], a (rows,) GMEM vector, into `row_layout`."""
  return load_gmem(ref.at[pl.ds(start, rows)], layout, interpret)


def store_rows(ref, start, value: jax.Array) -> None:
  """ref[start:start + rows] = value, a (rows,) vector in `row_layout` (in
  every thread), straight to GMEM, one scalar store per row: a vector store
  of a few float32 at any row would not cover whole 32-byte sectors, which
  JAX 0.12's Mosaic requires of GMEM transfers."""
  for i in range(value.shape[0]):
    ref[start + i] = jnp.sum(value[i:i + 1])


def iota(shape, dimension: int, layout, interpret: bool) -> jax.Array:
  return with_layout(lax.broadcasted_iota(jnp.int32, shape, dimension),
                     layout, interpret)


def round_trip(value: jax.Array, dtype, interpret: bool) -> jax.Array:
  """float32 `value` rounded to `dtype`, as float32, inside a kernel.

  On the GPU the two converts stay. Interpret mode runs the body through
  XLA, which may drop the pair (excess precision): reduce_precision there.
  """
  if interpret:
    return reference.round_to(value, dtype)
  return value.astype(dtype).astype(jnp.float32)


def sync() -> None:
  """Orders this warpgroup's shared memory accesses (and makes its writes
  visible to the TMA unit): fence.proxy.async and a warpgroup barrier."""
  plgpu.commit_smem()


# ---------------------------------------------------------------------------
# Rows split between warpgroups.

class RowTotals:
  """Totals over whole rows where a CTA's W warpgroups each hold a slice of
  one row (Config.warpgroups, one row a block).

  Each warpgroup reduces its slice to a float32 (cols,) vector per total
  (over its chunks, in registers; a kernel that splits rows reads chunks of
  at least mosaic_config.HANDOVER_ITEMSIZE); the others hand theirs to
  warpgroup 0 through shared memory, which combines the W vectors in the
  order of w, reduces them to one scalar and hands it back. Pallas gives
  every reduction across warps one scratch buffer at one offset:
  warpgroups reducing at once would race on it, so only warpgroup 0 does.
  Buffers and barriers come in two sets used alternately (`index`, counted
  over the kernel's handovers): warpgroup 0 has read handover i - 2's
  vectors before any warpgroup can write handover i's, and they have read
  its totals.
  """

  # op -> (combine two vectors, reduce one along an axis).
  REDUCE = {"sum": (jnp.add, jnp.sum), "max": (jnp.maximum, jnp.max)}

  def __init__(self, refs: list, slices: int, wg, vec: int,
               interpret: bool):
    """Pops its scratch refs (`scratch_types`' order) off `refs`; the
    vectors are in `column_layout(vec)`."""
    self.vectors, self.totals = refs.pop(0), refs.pop(0)
    self.ready, self.done = refs.pop(0), refs.pop(0)
    self.slices, self.wg = slices, wg
    self.layout, self.interpret = column_layout(vec), interpret

  @staticmethod
  def scratch_types(count: int, slices: int, chunk_cols: int) -> list:
    """The scratch types for up to `count` totals at once: the vectors of
    warpgroups 1..W-1 (2, W - 1, count, cols) and the totals (2, count)
    float32, and the barriers (ready: W - 1 arrivals; done)."""
    return [scratch((2, slices - 1, count, chunk_cols), jnp.float32),
            scratch((2, count), jnp.float32),
            barriers(2, slices - 1), barriers(2, 1)]

  @staticmethod
  def smem_bytes(count: int, slices: int, chunk_cols: int) -> int:
    """Shared memory of `scratch_types` (0 where rows are not split)."""
    if slices == 1:
      return 0
    return 2 * 4 * count * ((slices - 1) * chunk_cols + 1)

  def __call__(self, parts, index) -> list:
    """The row totals of `parts`, (op, vector) pairs: op "sum" or "max",
    the vector this warpgroup's (cols,) reduction of its slice. Returns
    float32 scalars, in every thread of every warpgroup."""
    parity = index % 2

    @pl.when(self.wg != 0)
    def _():
      for i, (_, part) in enumerate(parts):
        self.vectors.at[parity, self.wg - 1, i][...] = part
      plgpu.barrier_arrive(self.ready.at[parity])
      plgpu.barrier_wait(self.done.at[parity])

    @pl.when(self.wg == 0)
    def _():
      plgpu.barrier_wait(self.ready.at[parity])
      for i, (op, part) in enumerate(parts):
        combine, reduce = self.REDUCE[op]
        total = part
        for w in range(1, self.slices):
          total = combine(total, load(self.vectors.at[parity, w - 1, i],
                                      self.layout, self.interpret))
        self.totals[parity, i] = reduce(total)
      # Every thread of warpgroup 0 stores each total (the same value) and
      # reads it back below: order its threads' stores before their reads
      # (compute-sanitizer's racecheck once flagged the pair).
      sync()
      plgpu.barrier_arrive(self.done.at[parity])

    return [self.totals[parity, i] for i in range(len(parts))]


# ---------------------------------------------------------------------------
# Row blocks and the pipeline.

class Blocks:
  """The row blocks of a persistent grid of `ctas` CTAs over m rows.

  Block b covers rows [start, start + rows) with start = min(b * rows,
  m - rows): the last block is shifted back so that every copy stays in
  bounds, and overlaps the one before by `m % rows` rows, which it
  computes again (identical bits) and must not count twice in sums over
  rows (`first_new_row`). CTA c takes blocks c, c + ctas, ...
  """

  def __init__(self, m: int, rows: int, ctas: int):
    if rows > m:
      raise ValueError(f"{rows=} rows a block, but only {m=}")
    self.m, self.rows, self.ctas = m, rows, ctas
    self.count = pl.cdiv(m, rows)
    self.steps = pl.cdiv(self.count, ctas)
    self.ragged = m % rows != 0

  def block(self, cta, step):
    return cta + step * self.ctas

  def valid(self, cta, step):
    return self.block(cta, step) < self.count

  def start(self, cta, step):
    first = self.block(cta, step) * self.rows
    if not self.ragged:
      return first
    return jnp.minimum(first, self.m - self.rows)

  def first_new_row(self, cta, step):
    """Rows of the block before this index were another block's."""
    return self.block(cta, step) * self.rows - self.start(cta, step)


def pipeline(blocks: Blocks, cta, stages: int, barrier, *,
             load: Callable[[Any, Any, Any], None],
             compute: Callable[[Any, Any, Any], None],
             store: Callable[[Any, Any, Any], None],
             before_loop: Callable[[], None] | None = None,
             first_barrier: Any = 0) -> None:
  """Runs this CTA's blocks through `stages` shared memory buffers.

  load(step, slot, start) issues the TMA copies of a block into buffer
  `slot`, arriving on `barrier.at[slot]`; compute(step, slot, start) works
  on it once that barrier says it landed; store(step, slot, start) issues
  the TMA copies of its results out of the same buffer (one bulk group).

  A buffer is loaded again once the stores of its last block have read it.
  With three or more stages, step t refills the buffer of step t - 1 after
  its own compute (stages - 2 blocks arrive while one is computed, and no
  step waits for a store it just issued; refilling it before the compute
  measured the same on an H200). With two, step t refills it before
  computing, once step t - 1's stores have read it: the only order in which
  a block arrives while one is computed. With one, the next block is loaded
  after the stores. before_loop() runs once the first loads are issued
  (waits for operands loaded once per CTA). Buffer `slot` arrives on
  barrier.at[first_barrier + slot] (a warpgroup's own barriers, where
  several split a row).
  """
  ahead = max(stages - 1, 1)

  def issue(step):
    slot = step % stages

    @pl.when(blocks.valid(cta, step))
    def _():
      load(step, slot, blocks.start(cta, step))

  for step in range(min(ahead, blocks.steps)):
    issue(step)
  if before_loop is not None:
    before_loop()

  def body(step, carry):
    slot = step % stages

    @pl.when(blocks.valid(cta, step))
    def _():
      start = blocks.start(cta, step)
      plgpu.barrier_wait(barrier.at[first_barrier + slot])
      if stages == 2:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        issue(step + 1)
      compute(step, slot, start)
      sync()  # The results in shared memory are visible to the TMA unit.
      store(step, slot, start)
      if stages != 2:
        # Only this step's stores may still be reading (none, with one
        # stage): the buffer of step - 1 (this one) takes the next block.
        plgpu.wait_smem_to_gmem(1 if stages > 2 else 0, wait_read_only=True)
        issue(step + ahead)

    return carry

  lax.fori_loop(0, blocks.steps, body, 0)
  plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------
# Launch.

def launch(body, *, name: str, out_type, scratch_types, ctas: int,
           interpret, warpgroups: int = 1) -> Callable[..., Any]:
  """The one plgpu.kernel of every Mosaic kernel here: a 1-D persistent
  grid named "ctas" of CTAs of one warpgroup (or `warpgroups`, named
  "wg"), Lane semantics (the layouts are stated), no automatic barriers
  (the bodies place their own)."""
  threads = {} if warpgroups == 1 else dict(num_threads=warpgroups,
                                            thread_name="wg")
  return plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch_types,
      grid=(ctas,),
      grid_names=("ctas",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Lane,
          unsafe_no_auto_barriers=True),
      interpret=interpret_params(interpret),
      kernel_name=name,
      **threads,
  )


def copy_in(src, dst, barrier) -> None:
  """A bulk TMA copy GMEM -> SMEM of a block known to be in bounds."""
  plgpu.copy_gmem_to_smem(src, dst, barrier,
                          oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def aligned_scale(scale: jax.Array) -> jax.Array:
  """The scale as the kernels copy it into shared memory: a TMA copy into
  shared memory moves a multiple of 128 bytes, so a scale of another length
  is padded (one small XLA op; hidden sizes that are multiples of 64 need
  none). The padding is never read."""
  pad = -(scale.size * scale.dtype.itemsize) % 128 // scale.dtype.itemsize
  if pad:
    return jnp.pad(scale, (0, pad))
  return scale


def store_out(src, dst, *, last: bool) -> None:
  """A bulk TMA copy SMEM -> GMEM; `last` closes the block's bulk group."""
  plgpu.copy_smem_to_gmem(src, dst, commit_group=last)


def scratch(shape, dtype):
  return plgpu.SMEM(tuple(shape), jnp.dtype(dtype))


def barriers(count: int, arrivals: int):
  return plgpu.Barrier(num_arrivals=arrivals, num_barriers=count)

