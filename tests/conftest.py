"""Shared settings and tiny models for the test suite."""

import os

import jax

# No hub lookups in tests (they would hang for ~20 s offline).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Eight simulated CPU devices for the sharding tests (test_sharding.py); the
# other tests run on the first one, as before. Must precede any computation.
jax.config.update("jax_num_cpu_devices", 8)
