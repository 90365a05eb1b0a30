"""What runs: the speed table, the automatic choice, and life without a
kernel family (a future JAX may remove Pallas's Triton backend)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from jax_rmsnorm._src import speed_table
from tests.conftest import assert_close, oracle, random_inputs, requires_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The ops of the H200 records the shipped table was written from (README:
# `python -m benchmarks.speed_table` over their records).
H200_RECORD_OPS = ("forward", "step") + tuple(
    op for op in speed_table.OPS if op.startswith("quant"))


def _h200_records() -> list[dict]:
  return [json.loads((ROOT / "benchmarks" / "results"
                      / f"{op}_NVIDIA_H200.json").read_text())
          for op in H200_RECORD_OPS]


def test_shipped_table_is_what_the_records_give():
  """The package's table for sm90 is the one `benchmarks.speed_table`
  makes from the committed H200 records: a record re-run without the table
  rewritten (or a table edited by hand) fails here."""
  from benchmarks import speed_table as writer
  made = writer.table_of(_h200_records())["ops"]
  shipped = speed_table._table()["generations"]["sm90"]  # pylint: disable=protected-access
  assert made == shipped


def test_speed_table_is_a_pure_lookup():
  """Same answer for the same class, whatever the batch within it; every
  entry names a known implementation."""
  table = speed_table._table()  # pylint: disable=protected-access
  for generation, ops in table["generations"].items():
    for op, entries in ops.items():
      assert op in speed_table.OPS, (generation, op)
      for cls, name in entries.items():
        assert name in ("mosaic", "triton", "xla"), (generation, op, cls)
        assert len(cls.split("/")) == 3, cls
  for op in speed_table.OPS:
    for m, other in ((2048, 4096), (8192, 32768)):
      assert (speed_table.choose(op, "sm90", m, 4096, "bfloat16")
              == speed_table.choose(op, "sm90", other, 4096, "bfloat16"))
    assert speed_table.choose(op, None, 1, 8, "float32") == (
        speed_table.DEFAULT)
  assert speed_table.shape_class(16, 4096, jnp.bfloat16) == (
      "bfloat16/decode/medium")
  assert speed_table.shape_class(1024, 4099, "float32") == (
      "float32/small/unaligned")
  assert speed_table.shape_class(32768, 4096, "float32") == (
      "float32/large/medium")
  # Aligned rows by width: the kernels hold them differently.
  assert [speed_table.shape_class(m, n, "bfloat16")
          for m, n in ((65536, 896), (32768, 1024), (32768, 1152),
                       (4096, 8192), (4096, 8320), (4096, 14336),
                       (1024, 65536), (4096, 14337))] == [
              "bfloat16/large/narrow", "bfloat16/large/narrow",
              "bfloat16/large/medium", "bfloat16/large/medium",
              "bfloat16/large/wide", "bfloat16/large/wide",
              "bfloat16/large/wide", "bfloat16/large/unaligned"]
  # A mid class without records of its own takes the large class's
  # choice (bf16 rows of 14336: the records hold 4096 x 14336 alone).
  for op in speed_table.OPS:
    assert (speed_table.choose(op, "sm90", 2048, 14336, "bfloat16")
            == speed_table.choose(op, "sm90", 4096, 14336, "bfloat16"))
  assert "bfloat16/mid/wide" not in speed_table._table()[  # pylint: disable=protected-access
      "generations"]["sm90"]["backward"]
  # Sizes: from 8M elements, and from 32M, where the launch weighs less.
  assert [speed_table.shape_class(m, 4096, "bfloat16")
          for m in (1, 16, 17, 2047, 2048, 8191, 8192, 32768)] == [
              "bfloat16/decode/medium", "bfloat16/decode/medium",
              "bfloat16/small/medium", "bfloat16/small/medium",
              "bfloat16/mid/medium", "bfloat16/mid/medium",
              "bfloat16/large/medium", "bfloat16/large/medium"]


_WITHOUT_TRITON = textwrap.dedent("""
    import logging, sys
    sys.modules["jax.experimental.pallas.triton"] = None  # as if removed
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import jax, jax.numpy as jnp, numpy as np
    import jax_rmsnorm, jax_rmsnorm.nnx, jax_rmsnorm.linen
    from jax_rmsnorm._src import platform
    platform.on_cuda_gpu = lambda: True      # an NVIDIA GPU, pre-Hopper
    platform.compute_capability = lambda: 8.0
    x = jnp.linspace(-1, 1, 3 * 256, dtype=jnp.float32).reshape(3, 256)
    for _ in range(2):
      y = jax.eval_shape(jax_rmsnorm.rms_norm, x)
    try:
      jax_rmsnorm.rms_norm(x, implementation="triton")
    except NotImplementedError as e:
      print("named:", e)
    print("ok", y.shape)
""")


def test_package_works_without_the_triton_backend():
  """Without jax.experimental.pallas.triton the package imports, the
  automatic choice falls back (to XLA before Hopper) with one WARNING, and
  naming "triton" says why it cannot run."""
  result = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TRITON], cwd=ROOT, capture_output=True,
      text=True, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = result.stdout + result.stderr
  assert result.returncode == 0, out
  warnings = [l for l in out.splitlines() if l.startswith("WARNING")]
  assert len(warnings) == 1, out
  assert "run on 'xla'" in warnings[0] and "cannot be imported" in (
      warnings[0]), out
  assert "named: the 'triton' kernels cannot be imported" in out, out
  assert "ok (3, 256)" in out, out


_WITHOUT_TRITON_ON_HOPPER = textwrap.dedent("""
    import sys
    sys.modules["jax.experimental.pallas.triton"] = None  # as if removed
    import jax.numpy as jnp
    from jax_rmsnorm._src import dispatch, platform
    platform.on_cuda_gpu = lambda: True      # a Hopper GPU
    platform.compute_capability = lambda: 9.0
    ops = ("forward", "backward", "quant", "quant-static")
    for m, n in ((4096, 4096), (16, 1000)):
      problem = dispatch.Problem(m, n, jnp.dtype("bfloat16"),
                                 jnp.dtype("float8_e4m3fn"))
      print(m, n, dict(dispatch.plan(ops, problem, None, False).names))
""")


def test_without_the_triton_backend_hopper_runs_mosaic():
  """On Hopper without Pallas's Triton backend, every op the table gives
  to Triton falls back to its Mosaic kernel where that can run (the
  quantized output included), else to XLA (N = 1000: rows of one-byte
  codes not on 16 bytes, and too few rows for the forward's TMA blocks)."""
  result = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TRITON_ON_HOPPER], cwd=ROOT,
      capture_output=True, text=True, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = result.stdout + result.stderr
  assert result.returncode == 0, out
  plans = {tuple(map(int, line.split()[:2])):
           ast.literal_eval(line.split(" ", 2)[2])
           for line in result.stdout.splitlines() if line[:1].isdigit()}
  large = plans[(4096, 4096)]
  assert large["quant"] == large["quant-static"] == "mosaic", out
  assert large["forward"] == large["backward"] == "mosaic", out
  assert set(plans[(16, 1000)].values()) <= {"xla", "mosaic"}, out
  assert plans[(16, 1000)]["quant"] == "xla", out


def test_table_choice_of_xla_runs_the_reference(monkeypatch):
  """Where the table says XLA is faster, the program holds no kernel, and
  JAX's own autodiff of the reference."""
  from jax_rmsnorm._src.triton import forward as triton_forward
  import jax_rmsnorm
  monkeypatch.setattr(speed_table, "choose", lambda *a: "xla")
  x = jnp.ones((4, 128), jnp.float32)
  # Fresh functions each time: JAX caches traces by function.
  text = jax.jit(lambda x: jax_rmsnorm.rms_norm(x)).lower(x).as_text()
  assert triton_forward.KERNEL_NAME not in text
  assert "jax_rmsnorm_per_platform" not in str(jax.make_jaxpr(
      lambda x: jax_rmsnorm.rms_norm(x))(x))
  monkeypatch.setattr(speed_table, "choose", lambda *a: "triton")
  jaxpr = str(jax.make_jaxpr(lambda x: jax_rmsnorm.rms_norm(x))(x))
  assert "jax_rmsnorm_per_platform" in jaxpr


def test_quantized_output_asks_the_table_for_its_own_op(monkeypatch):
  """Each form of the quantized output (dynamic scale, static scale of one
  value or of one a column, with or without the residual) is its own op to
  the speed table: the kernel that wins differs between them
  (`speed_table.OPS`)."""
  import jax_rmsnorm
  asked = []
  monkeypatch.setattr(speed_table, "choose",
                      lambda op, *a: asked.append(op) or "xla")
  x = jnp.ones((4, 128), jnp.bfloat16)
  for residual in (None, x):
    for quant_scale in (None, jnp.float32(0.5), jnp.full((128,), 0.5)):
      jax_rmsnorm.rms_norm_quantized(x, residual=residual,
                                     quant_scale=quant_scale)
  assert asked == ["quant", "quant-static", "quant-channel",
                   "quant-residual", "quant-static-residual",
                   "quant-channel-residual"]
  assert set(asked) <= set(speed_table.OPS)


@requires_gpu
def test_inputs_on_the_host_cpu_of_a_gpu_machine():
  """The choice follows the platform lowered for, not the default device:
  arrays committed to the CPU run the reference there."""
  import jax_rmsnorm
  cpu = jax.devices("cpu")[0]
  x, scale = random_inputs(1, (8, 512), "bfloat16")
  x, scale = jax.device_put(x, cpu), jax.device_put(scale, cpu)
  y = jax.jit(jax_rmsnorm.rms_norm)(x, scale)
  assert y.devices() == {cpu}
  assert_close(y, oracle(x, scale), "bfloat16", 512)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(jax_rmsnorm.rms_norm(
      x, scale).astype(jnp.float32))))(x)
  assert dx.devices() == {cpu}


def test_table_choice_of_xla_for_the_step_keeps_the_forward_kernel(
    monkeypatch):
  """Forward kernel, XLA's training step: without a gradient the kernel
  runs; under one, XLA's autodiff of the reference alone (no kernel, and the
  values of the reference's gradient)."""
  import jax_rmsnorm
  monkeypatch.setattr(speed_table, "choose",
                      lambda op, *a: "xla" if op == "backward" else "triton")
  x, scale = random_inputs(3, (4, 256), "float32")

  def loss(x, s):
    return jnp.sum(jax_rmsnorm.rms_norm(x, s) ** 2)

  assert "jax_rmsnorm_per_platform" in str(jax.make_jaxpr(
      lambda x, s: jax_rmsnorm.rms_norm(x, s))(x, scale))
  assert "jax_rmsnorm_per_platform" not in str(jax.make_jaxpr(
      jax.grad(loss, argnums=(0, 1)))(x, scale))
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
  want = jax.jit(jax.grad(lambda x, s: jnp.sum(jax_rmsnorm.rms_norm(
      x, s, implementation="xla") ** 2), argnums=(0, 1)))(x, scale)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_speed_table_writer_never_picks_a_kernel_slower_than_xla():
  """benchmarks.speed_table: per class, the kernel with the best geometric
  mean among those never slower than XLA beyond the timing noise (and
  numerically right), else XLA; the backward from the step records, each
  kernel's own forward swapped for the forward the table chose."""
  from benchmarks import speed_table as writer

  def row(m, n, xla, triton, mosaic, ok=True):
    return dict(m=m, n=n, dtype="bfloat16", xla_us=xla, triton_us=triton,
                mosaic_us=mosaic, triton_ok=ok, mosaic_ok=True,
                implementations="xla triton mosaic")

  records = [
      dict(op="forward", rows=[row(32768, 4096, 100, 95, 90),
                               row(16384, 8192, 100, 96, 103),   # mosaic
                               row(16384, 4099, 50, 55, 60),     # slower
                               row(1, 4096, 2.0, 1.8, 1.9, ok=False)]),
      dict(op="step", rows=[row(32768, 4096, 300, 200, 250)]),
  ]
  made = writer.table_of(records)["ops"]
  assert made["forward"]["bfloat16/large/medium"] == "triton"
  assert made["forward"]["bfloat16/large/unaligned"] == "xla"
  assert made["forward"]["bfloat16/decode/medium"] == "mosaic"
  assert made["backward"] == {"bfloat16/large/medium": "triton"}
  # The backward is judged in a step with the forward the table chose:
  # mosaic's step is the slower (270 against 250 us) for its forward (130
  # against the chosen triton's 90), its backward the faster (140 against
  # 160).
  swapped = writer.table_of([
      dict(op="forward", rows=[row(32768, 4096, 100, 90, 130)]),
      dict(op="step", rows=[row(32768, 4096, 300, 250, 270)])])["ops"]
  assert swapped["forward"]["bfloat16/large/medium"] == "triton"
  assert swapped["backward"]["bfloat16/large/medium"] == "mosaic"
  # 1% slower than XLA at one shape of a class is within the noise (the
  # kernel still wins the class); 3% is not (above: mosaic).
  assert writer.NOISE == 1.02
  noisy = [dict(op="forward", rows=[row(32768, 4096, 100, 90, 95),
                                    row(16384, 8192, 100, 101, 103)])]
  assert writer.table_of(noisy)["ops"]["forward"] == {
      "bfloat16/large/medium": "triton"}
