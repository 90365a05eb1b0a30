"""The benchmark's code paths on a CPU: the Pallas copy of the copy ceiling
(interpret mode, and its CUDA lowering), every op of bench_op with the
kernels interpreted, and the CLI's dry run through report and plot. Times
here mean nothing; what is tested is that the GPU run will not stop on a
bug."""

from __future__ import annotations

import functools
import json
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import benchmark_rmsnorm
from benchmarks import report
from jax_rmsnorm._src import bench
from tests import test_lowering
from tests.conftest import ON_GPU


@pytest.mark.parametrize("shape,dtype,block", [
    ((1, 7), "float32", 4096),         # one partial block
    ((3, 896), "bfloat16", 1024),      # 3 blocks, the last partial
    ((4, 4096), "float16", 8192),      # exact blocks
    ((2, 3, 100), "bfloat16", 16),     # leading axes, 38 blocks
], ids=str)
@pytest.mark.parametrize("hints", [False, True], ids=["plain", "hints"])
def test_pallas_copy_copies(shape, dtype, block, hints):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
  y = jax.jit(functools.partial(bench.pallas_copy, block=block, num_warps=4,
                                cache_hints=hints, interpret=True))(x)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("block,warps", bench.COPY_CONFIGS)
@pytest.mark.parametrize("shape,hints", [((65536, 896), False),
                                         ((3, 1000), True)], ids=str)
def test_pallas_copy_lowers_for_cuda(shape, hints, block, warps, monkeypatch):
  """The Triton lowering's own rules (power-of-two blocks), on a CPU."""
  monkeypatch.setattr(bench.platform, "on_cuda_gpu", lambda: True)
  x = jnp.zeros(shape, jnp.bfloat16)
  fn = functools.partial(bench.pallas_copy, block=block, num_warps=warps,
                         cache_hints=hints)
  calls = test_lowering._kernel_calls(test_lowering.export_for_cuda(fn, x))
  assert len(calls) == 1 and bench.COPY_KERNEL_NAME in calls[0], calls


@pytest.mark.skipif(ON_GPU, reason="the dry run is for CPU machines")
@pytest.mark.parametrize("op", bench.OPS)
def test_bench_op_runs_every_op_in_interpret_mode(op):
  row = bench.bench_op(op, 5, 256, "bfloat16", iterations=1, interpret=True)
  assert row["op"] == op and row["implementations"] == "xla triton"
  assert row["bytes"] == bench.OP_BYTES[op](5, 256, "bfloat16", "bfloat16")
  assert row["copy_us"] == min(
      t for t in (row["xla_copy_us"], row["pallas_copy_us"]) if t)
  for name in ("xla", "triton"):
    assert row[f"{name}_ok"], (name, row[f"{name}_error_over_bound"])
    assert 0 <= row[f"{name}_error_over_bound"] <= 1
  assert "triton_xla_ratio" in row and "xla_xla_ratio" not in row
  assert "triton" in bench.format_table([row])
  assert bench.summaries([row])["triton"]["all_numerics_ok"]


@pytest.mark.skipif(ON_GPU, reason="the dry run is for CPU machines")
@pytest.mark.parametrize("op", ["backward", "step"])
def test_bench_op_takes_a_float32_scale_beside_bf16_rows(op):
  """Flax's RMSNorm keeps its scale in float32 (param_dtype): the case
  `--scale-dtype float32` times; its bytes and checks use that dtype."""
  row = bench.bench_op(op, 5, 256, "bfloat16", iterations=1, interpret=True,
                       scale_dtype="float32")
  assert row["scale_dtype"] == "float32"
  assert row["bytes"] == bench.OP_BYTES[op](5, 256, "bfloat16", "float32")
  assert row["bytes"] > bench.OP_BYTES[op](5, 256, "bfloat16", "bfloat16")
  assert row["triton_ok"], row["triton_error_over_bound"]


@pytest.mark.skipif(ON_GPU, reason="the dry run is for CPU machines")
def test_benchmark_cli_dry_run_writes_records_report_reads(tmp_path, capsys):
  status = benchmark_rmsnorm.main([
      "--interpret", "--max-elements", "4096", "--dtypes", "bfloat16",
      "--iterations", "1", "--out", str(tmp_path)])
  assert status == 0
  records = sorted(tmp_path.glob("*.json"))
  assert sorted(p.name.split("_")[0] for p in records) == sorted(bench.OPS)
  for path in records:
    data = json.loads(path.read_text())
    assert data["implementations"] == ["triton"]
    assert data["summaries"]["triton"]["all_numerics_ok"]
    assert path.with_suffix(".csv").exists()
  capsys.readouterr()
  assert report.main([str(p) for p in records]) == 0
  text = capsys.readouterr().out
  assert text.count("| bfloat16 | 1 x 4096 |") == len(bench.OPS)
  assert "Pallas Triton us" in text and "error / bound" in text


@pytest.mark.skipif(ON_GPU, reason="the dry run is for CPU machines")
def test_benchmark_cli_merges_rows_into_a_record(tmp_path, capsys):
  """--shapes with --merge re-runs some rows into the op's record: those
  rows replaced in place, the others kept as they were, the record saying
  what was merged; a record of other implementations is refused."""
  common = ["--interpret", "--ops", "forward", "--dtypes", "bfloat16",
            "--iterations", "1", "--out", str(tmp_path)]
  assert benchmark_rmsnorm.main(common + ["--max-elements", "70000"]) == 0
  (path,) = tmp_path.glob("forward_*.json")
  before = json.loads(path.read_text())
  shapes_before = [(r["m"], r["n"]) for r in before["rows"]]
  assert len(shapes_before) > 2 and (16, 4096) in shapes_before
  assert "merged" not in before
  assert benchmark_rmsnorm.main(
      common + ["--shapes", "16x4096", "--merge"]) == 0
  after = json.loads(path.read_text())
  assert [(r["m"], r["n"]) for r in after["rows"]] == shapes_before
  for old, new in zip(before["rows"], after["rows"]):
    assert (old == new) == ((old["m"], old["n"]) != (16, 4096)), old["m"]
  assert "bfloat16 16x4096 re-run" in after["merged"]
  assert after["summaries"]["triton"]["all_numerics_ok"]
  with pytest.raises(ValueError, match="holds"):
    benchmark_rmsnorm.main(common + ["--shapes", "16x4096", "--merge",
                                     "--implementations", "auto"])
  capsys.readouterr()


def test_report_reads_the_recorded_h100_results(capsys):
  """Older records: one flat summary, no implementations list."""
  results = pathlib.Path(__file__).parent.parent / "benchmarks" / "results"
  assert report.main(
      [str(results / "backward_NVIDIA_H100_80GB_HBM3.json")]) == 0
  assert "| bfloat16 | 32768 x 4096 |" in capsys.readouterr().out


def test_report_summary_matches_the_rows(capsys):
  """--summary's line of a record (the H200's auto quant record) against the
  same numbers taken from its rows here: the geometric means, the least
  XLA / ours over the rows of 8Mi elements or more, the worst row."""
  path = (pathlib.Path(__file__).parent.parent / "benchmarks" / "results"
          / "auto" / "quant_NVIDIA_H200.json")
  rows = json.loads(path.read_text())["rows"]
  ratios = np.array([r["auto_xla_ratio"] for r in rows])
  large = np.array([r["m"] * r["n"] >= 8 * 2**20 for r in rows])
  got = report.summary_row(json.loads(path.read_text()))
  assert got["impl"] == "auto" and got["large"] == large.sum() > 0
  np.testing.assert_allclose(got["geomean"], np.exp(np.log(ratios).mean()))
  np.testing.assert_allclose(got["large_geomean"],
                             np.exp(np.log(ratios[large]).mean()))
  least = rows[int(np.flatnonzero(large)[ratios[large].argmin()])]
  assert got["large_ratio"][0] == (
      least["auto_xla_ratio"],
      f"{least['dtype']} {least['m']} x {least['n']}")
  np.testing.assert_allclose(got["slowest"][0], 1 / ratios.min())
  assert report.main(["--summary", str(path)]) == 0
  assert f"| quant | {got['geomean']:.2f}x" in capsys.readouterr().out


def test_records_merged_from_two_runs_tell_not_run_from_refused(capsys,
                                                                tmp_path):
  """A record whose rows come from runs with different implementations
  (the H200 quant records): a row that never ran mosaic is "not run", one
  that ran and has no time refused it, and the summary counts only the
  latter; the speed table sees mosaic on the rows that ran it."""
  def row(n, impls, mosaic_us):
    r = dict(op="quant", m=4096, n=n, dtype="float32",
             implementations=" ".join(impls), copy_us=1.0, xla_us=2.0,
             triton_us=1.0, triton_gbps=1.0, triton_pct_copy=50.0,
             triton_xla_ratio=2.0, triton_error_over_bound=0.5,
             triton_ok=True)
    if "mosaic" in impls and mosaic_us is not None:
      r.update(mosaic_us=mosaic_us, mosaic_gbps=1.0, mosaic_pct_copy=50.0,
               mosaic_xla_ratio=2.0 / mosaic_us,
               mosaic_error_over_bound=0.5, mosaic_ok=True)
    return r
  rows = [row(4096, ["xla", "triton"], None),
          row(8192, ["xla", "triton", "mosaic"], 0.5),
          row(4099, ["xla", "triton", "mosaic"], None)]
  assert bench.implementations_of(rows) == ["triton", "mosaic"]
  summary = bench.summaries(rows)["mosaic"]
  assert summary["refused"] == 1 and summary["geomean_xla_over_impl"] == 4.0
  path = tmp_path / "quant_merged.json"
  path.write_text(json.dumps(dict(op="quant", card="card", jax="0", rows=rows,
                                  iterations=1, merged="two runs",
                                  summaries=bench.summaries(rows))))
  assert report.main([str(path)]) == 0
  text = capsys.readouterr().out
  lines = {l.split("|")[2].strip(): l for l in text.splitlines()
           if l.startswith("| float32")}
  assert "not run" in lines["4096 x 4096"]
  assert "refused" in lines["4096 x 4099"]
  assert "not run" not in lines["4096 x 8192"]
  assert "merged from two runs" in text


def test_sweep_command_line_runs_each_shape_and_writes_them(tmp_path,
                                                            capsys):
  """benchmarks/sweep.py, the H200 variant sweeps' shared command line."""
  from benchmarks import sweep
  seen = []

  def run_shape(m, n, dtype, *, iterations, flag):
    seen.append((m, n, dtype, iterations, flag))
    return dict(m=m, n=n, dtype=dtype, us=1.0, us_runs=[1.0, 1.0])

  out = tmp_path / "sweep.json"
  assert sweep.main(
      ["--shape", "4", "128", "float32", "--shape", "2", "256", "bfloat16",
       "--iterations", "3", "--flag", "--out", str(out)], prog="sweep",
      doc="", shapes=[(1, 1, "float32")], run_shape=run_shape,
      add_arguments=lambda p: p.add_argument("--flag", action="store_true"),
      options=lambda args: dict(flag=args.flag)) == 0
  assert seen == [(4, 128, "float32", 3, True), (2, 256, "bfloat16", 3, True)]
  rows = json.loads(out.read_text())["rows"]
  assert [r["n"] for r in rows] == [128, 256] and "us_runs" in rows[0]
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 2 and "us_runs" not in printed[0]
  # Every entry timed once a round, rounds alternating; the median kept.
  calls = []
  stamps = iter([5.0, 1.0, 3.0, 2.0, 4.0, 6.0])

  def fake_measure(fn, *args, iterations):
    calls.append((fn(*args), iterations))
    return next(stamps)

  row = {}
  with mock.patch.object(sweep.bench, "measure_us", fake_measure):
    sweep.time_alternated(row, {"a": (lambda v: v, ("a",)),
                                "b": (lambda v: v, ("b",))},
                          iterations=7)
  assert calls == [("a", 7), ("b", 7)] * 3
  assert row == {"a_us": 4.0, "a_runs": [5.0, 3.0, 4.0],
                 "b_us": 2.0, "b_runs": [1.0, 2.0, 6.0]}
  # The configuration a Mosaic kernel launches with, traced only.
  from jax_rmsnorm._src.mosaic import forward as mosaic_forward
  config = sweep.launched_config(
      functools.partial(mosaic_forward.forward, epsilon=1e-6,
                        scale_offset=0.0),
      jax.ShapeDtypeStruct((64, 14336), jnp.bfloat16), None, None)
  assert config.warpgroups == 4 and config.block_rows == 1


def test_mosaic_forward_configs_variants_fit_and_keep_the_arithmetic():
  """benchmarks/mosaic_forward_configs.py: every variant holds two stages
  or more in the shared memory of its CTAs, keeps vec and the warpgroups
  (a row's arithmetic), and the heuristic's own launch is among them."""
  from benchmarks import mosaic_forward_configs as configs
  from jax_rmsnorm._src.mosaic import config as mosaic_config
  base = mosaic_config.Config(vec=8, block_rows=3, stages=3, ctas_per_sm=2)
  row_bytes, fixed = 3072 * 3, 3072 * 2
  found = configs.variants(base, row_bytes, fixed)
  assert found["base"] == base and len(found) > 8
  for name, c in found.items():
    assert c.vec == base.vec and c.warpgroups == 1 and c.stages >= 2
    assert c.block_rows in (1, 2, 3, 4)
    assert (c.stages * c.block_rows * row_bytes + fixed
            <= mosaic_config.smem_budget(c.ctas_per_sm)), name
  assert "c3_b3_s2" in found  # the base's block at other CTA counts
  split = mosaic_config.Config(vec=4, block_rows=1, stages=2, warpgroups=2)
  assert {c.block_rows for c in configs.variants(
      split, 14336 * 3, 14336 * 2).values()} == {1}
  # Each launch holds its chunks by the heuristic's rule where given one.
  rule = lambda c: c.block_rows <= 2
  held = configs.variants(base, row_bytes, fixed, holds=rule)
  assert all(c.hold_chunks == (c.block_rows <= 2)
             for name, c in held.items() if not name.startswith("base"))
