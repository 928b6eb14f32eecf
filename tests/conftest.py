"""Shared settings and tiny models for the test suite."""

import os

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

