"""Shared settings and tiny models for the test suite."""

import atexit
import os
import shutil
import tempfile

import jax

# No hub lookups in tests (they would hang for ~20 s offline).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Simulated CPU devices, for the sharding tests, which test_sharding.py runs
# in a subprocess with BLOCKLLM_TEST_CPU_DEVICES=8: several CPU devices split
# XLA's threads between them, which would slow the rest of the suite down
# and change its float summation order. Must precede any computation.
if os.environ.get("BLOCKLLM_TEST_CPU_DEVICES"):
  jax.config.update("jax_num_cpu_devices",
                    int(os.environ["BLOCKLLM_TEST_CPU_DEVICES"]))


# XLA's compile time dominates the suite, and some programs are compiled more
# than once (an interrupted run and its resumption, the plain step next to
# each lean variant): a compilation cache private to this process (one per
# xdist worker and subprocess) serves the repeats. It changes no result: a
# hit is the executable XLA would build again.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="blockllm_jax_test_xla_")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
