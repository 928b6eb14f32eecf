"""Shared settings and tiny models for the test suite."""

import os

# No hub lookups in tests (they would hang for ~20 s offline).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
