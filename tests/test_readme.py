"""Every python block of the README runs as written (on CPU, at the sizes
it shows), so the README cannot drift from the code."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
  exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"),
       {"__name__": "__readme__"})


def test_results_at_a_glance_are_the_records():
  """The README's table "At a glance" is `python -m benchmarks.report
  --summary` over the H200's auto records, as committed."""
  from benchmarks import report
  from tests.test_dispatch import H200_RECORD_OPS
  auto = README.parent / "benchmarks" / "results" / "auto"
  paths = [auto / f"{op}_NVIDIA_H200.json" for op in H200_RECORD_OPS]
  want = [l for l in report.summary(paths).splitlines() if l.startswith("|")]
  text = README.read_text().splitlines()
  start = text.index(want[0])
  assert text[start:start + len(want)] == want
