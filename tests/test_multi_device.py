"""Runs tests/test_sharding.py on 8 simulated CPU devices, in a subprocess.

Several CPU devices split XLA's threads between them, which would slow the
rest of the suite and change its float summation order, so only this
subprocess gets them (``BLOCKLLM_TEST_CPU_DEVICES``, read by conftest.py).
"""

import os
from pathlib import Path
import subprocess
import sys

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(len(jax.devices()) >= 8,
                    reason="test_sharding.py runs directly here")
def test_sharding_suite_on_8_simulated_cpu_devices():
  env = dict(os.environ, BLOCKLLM_TEST_CPU_DEVICES="8")
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0",
       "tests/test_sharding.py"], env=env, cwd=ROOT, capture_output=True,
      text=True)
  report = done.stdout[-8000:] + done.stderr[-3000:]
  assert done.returncode == 0, report
  assert " passed" in done.stdout and "skipped" not in done.stdout, report
