"""The command lines on a CPU machine: every CLI's --help works and names
the command to type; the benchmark refuses a machine without a GPU in one
line, no traceback."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import ON_GPU

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every module under benchmarks/ that runs as a script is a CLI.
BENCHMARK_CLIS = sorted(
    f"benchmarks.{path.stem}" for path in (ROOT / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text())
CLIS = ["jax_rmsnorm.__main__"] + BENCHMARK_CLIS


def _prog(module: str) -> str:
  return "python -m " + module.removesuffix(".__main__")


def test_every_benchmark_script_is_listed():
  assert {"benchmarks.benchmark_rmsnorm", "benchmarks.report",
          "benchmarks.plot", "benchmarks.tune_triton",
          "benchmarks.sanitize_kernels"} <= set(BENCHMARK_CLIS)


@pytest.mark.parametrize("module", CLIS)
def test_help_exits_0_and_names_the_command(module, capsys):
  main = importlib.import_module(module).main
  with pytest.raises(SystemExit) as exit_info:
    main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  assert text.startswith(f"usage: {_prog(module)} "), text[:200]
  assert "__main__.py" not in text
  # Examples in the description keep their lines (RawDescriptionHelpFormatter).
  for line in importlib.import_module(module).__doc__.splitlines():
    if line.startswith("  python -m "):
      assert line in text.splitlines(), line


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                if p]))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(ON_GPU, reason="the refusal is for machines without one")
def test_benchmark_on_cpu_fails_in_one_line_without_traceback():
  result = _run("-m", "benchmarks.benchmark_rmsnorm", "--ops", "forward")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr + result.stdout
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines == [
      "benchmark_rmsnorm: no NVIDIA GPU here; the benchmark times compiled "
      "kernels against XLA with CUPTI: run it on a GPU, or run `python -m "
      "jax_rmsnorm` for the CPU self-check"], result.stderr


def test_report_help_runs_as_a_script():
  """The crash this file was written for: `report --help` read '--help' as
  a file."""
  result = _run("-m", "benchmarks.report", "--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage: python -m benchmarks.report ")
