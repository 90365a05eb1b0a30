"""Benchmarks the RMSNorm kernels against XLA on this machine's GPU.

For every (M, N, dtype) of the shared shape list and every op (forward:
rms_norm; backward: its dx and d(scale), from the saved residuals, against
XLA's autodiff of the reference; add: add_rms_norm against XLA's unfused
add then normalize; step: y, dx and d(scale) from one jit, against the same
with XLA; quant, quant-static, quant-residual, quant-static-residual:
rms_norm_quantized to float8_e4m3fn, against XLA's fusion of the
reference): CUPTI median kernel time of each implementation asked for, XLA's,
and the copy ceiling (the faster of XLA's x * 2 and a Pallas copy kernel),
all in the same run on the same card; GB/s from an explicit byte count, % of
the copy bandwidth, time(XLA) / time(implementation), and each output's
worst error / bound against the float64 oracle (<= 1 passes).

  python -m benchmarks.benchmark_rmsnorm                 # full sweep
  python -m benchmarks.benchmark_rmsnorm --ops backward step --max-elements 1e7
  python -m benchmarks.benchmark_rmsnorm --ops step --min-elements 8e6
  python -m benchmarks.benchmark_rmsnorm --implementations triton mosaic

Writes <out>/<op>_<card>.{json,csv,png}; exit status 1 if a check fails.
`python -m benchmarks.speed_table <out>/*_<card>.json` then writes the
automatic choice's table for this GPU generation into the package.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import sys

import jax

from jax_rmsnorm._src import bench
from jax_rmsnorm._src import platform
from jax_rmsnorm._src import shapes
from jax_rmsnorm._src import validation

NO_GPU = ("no NVIDIA GPU here; the benchmark times compiled kernels against "
          "XLA with CUPTI: run it on a GPU, or run `python -m jax_rmsnorm` "
          "for the CPU self-check")


def _progress(items, **kwargs):
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return items
  return tqdm(items, **kwargs)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.benchmark_rmsnorm", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ops", nargs="+", choices=bench.OPS,
                 default=list(bench.OPS))
  p.add_argument("--implementations", nargs="+",
                 choices=validation.KERNEL_IMPLEMENTATIONS + ("auto",),
                 default=["triton"],
                 help="kernel families timed beside XLA (default: triton); "
                 "auto: implementation=None, the speed table's choice")
  p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
  p.add_argument("--scale-dtype", default=None,
                 help="the scale's dtype (default: x's, as the records "
                 "in benchmarks/results have it; float32 is Flax's "
                 "RMSNorm default, param_dtype). Write such records to "
                 "their own --out: the speed table reads one per op")
  p.add_argument("--max-elements", type=float, default=math.inf,
                 help="skip shapes with more elements (quick runs)")
  p.add_argument("--min-elements", type=float, default=0,
                 help="skip shapes with fewer elements (e.g. 8e6: the "
                 "large shapes only)")
  p.add_argument("--shapes", nargs="+", default=None, metavar="MxN",
                 help="only these shapes of the list (e.g. 65536x896), "
                 "every dtype asked for")
  p.add_argument("--merge", action="store_true",
                 help="write the rows run into the op's record in --out "
                 "(replacing those of the same shape and dtype, keeping the "
                 "others), which then says so: a re-run of a few shapes "
                 "after a change that touches them alone")
  p.add_argument("--iterations", type=int, default=50)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results"))
  p.add_argument("--interpret", action="store_true",
                 help="a CPU dry run of the code paths: the kernels in "
                 "Pallas interpret mode, wall-clock times that mean nothing "
                 "(use with a small --max-elements)")
  return p


def write(stem: str, record: dict) -> None:
  """<stem>.json (the record), .csv (its rows), .png (a plot, if
  matplotlib is installed)."""
  rows = record["rows"]
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1)
  with open(stem + ".csv", "w", newline="") as f:
    # Every key of every row: a refusal adds <name>_refused to its rows.
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  try:
    from benchmarks import plot  # pylint: disable=g-import-not-at-top
    plot.plot_op(stem + ".json", stem + ".png")
  except ImportError as e:
    print(f"no plot ({e}); run python -m benchmarks.plot {stem}.json")


def merge_rows(path: str, rows: list[dict]) -> tuple[list[dict], str]:
  """The rows of the record at `path` with `rows` in place of those of the
  same (m, n, dtype), in the list's order, and the record's note of what
  was merged (its earlier note kept)."""
  with open(path) as f:
    old = json.load(f)
  key = lambda row: (row["m"], row["n"], row["dtype"])
  new = {key(row): row for row in rows}
  if set(bench.implementations_of(rows)) != set(old["implementations"]):
    raise ValueError(f"{path} holds {old['implementations']}, the new rows "
                     f"{bench.implementations_of(rows)}")
  kept = [row for row in old["rows"] if key(row) not in new]
  order = {shape: i for i, shape in enumerate(shapes.BENCHMARK_SHAPES)}
  merged_rows = sorted(kept + rows, key=lambda row: order.get(key(row), -1))
  names = ", ".join(f"{dtype} {m}x{n}" for m, n, dtype in new)
  note = (f"{names} re-run (JAX {jax.__version__}, "
          f"{datetime.date.today()}) into the record of an earlier run")
  if old.get("merged"):
    note = f"{old['merged']}; then {note}"
  return merged_rows, note


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  if not (args.interpret or platform.on_cuda_gpu()):
    print(f"benchmark_rmsnorm: {NO_GPU}", file=sys.stderr)
    return 1
  card = jax.devices()[0].device_kind
  todo = [s for s in shapes.BENCHMARK_SHAPES
          if s[2] in args.dtypes
          and args.min_elements <= s[0] * s[1] <= args.max_elements
          and (args.shapes is None or f"{s[0]}x{s[1]}" in args.shapes)]
  if not todo:
    print("benchmark_rmsnorm: no shape left by --dtypes, --shapes and "
          "--min/--max-elements", file=sys.stderr)
    return 1
  os.makedirs(args.out, exist_ok=True)
  ok = True
  for op in args.ops:
    try:
      rows = [bench.bench_op(op, m, n, dtype,
                             implementations=args.implementations,
                             iterations=args.iterations,
                             interpret=args.interpret,
                             scale_dtype=args.scale_dtype)
              for m, n, dtype in _progress(todo, desc=f"{op} on {card}")]
    except NotImplementedError as e:
      print(f"benchmark_rmsnorm: {op}: {e}", file=sys.stderr)
      return 1
    stem = os.path.join(args.out,
                        f"{op}_" + re.sub(r"\W+", "_", card).strip("_"))
    merged = None
    if args.merge:
      rows, merged = merge_rows(stem + ".json", rows)
    per_impl = bench.summaries(rows)
    ok = ok and all(s["all_numerics_ok"] for s in per_impl.values())
    print(f"{op} ({bench.BYTES_MOVED[op]})   card: {card}   jax "
          f"{jax.__version__}   {bench.timer()}, median of {args.iterations}")
    print(bench.format_table(rows))
    for impl, summary in per_impl.items():
      print(f"{impl}: {bench.format_summary(summary)}")
    record = dict(
        op=op, card=card, generation=platform.generation(),
        jax=jax.__version__, timer=bench.timer(),
        iterations=args.iterations, interpret=args.interpret,
        bytes_moved=bench.BYTES_MOVED[op],
        implementations=bench.implementations_of(rows),
        # The first implementation's summary, as older records had it.
        summary=per_impl[args.implementations[0]],
        summaries=per_impl, rows=rows)
    if merged:
      record["merged"] = merged
    write(stem, record)
    print(f"wrote {stem}.{{json,csv,png}}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
