"""Runs tests/multidevice (8 CPU devices) in a process of its own, so that the
rest of the suite keeps its one device."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_multidevice_suite():
  env = dict(os.environ, JAX_RMSNORM_MULTIDEVICE="1", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "tests/multidevice"], cwd=ROOT, env=env, capture_output=True,
      text=True, check=False)
  assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
