"""examples/benchmark.py at CI size: every stage runs and reports, and the
memory figures have the structure the methods imply (no timing asserted)."""

import json

import numpy as np
import pytest

from tests.test_finetune_demo import load_example

SMALL = ["--sizes", "tiny", "--batch", "1", "--seq", "16", "--no-progress"]


@pytest.fixture(scope="module")
def benchmark():
  return load_example("benchmark")


@pytest.fixture(scope="module")
def memory_and_speed(benchmark, tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  rows = benchmark.main(SMALL + ["--stages", "memory", "speed", "--speed-steps",
                                 "2", "--warmup", "1", "--out", str(out)])
  return out, rows, benchmark


def test_every_method_gets_memory_and_speed_rows(memory_and_speed):
  out, rows, benchmark = memory_and_speed
  for stage in ("memory", "speed"):
    assert sorted(r["method"] for r in rows if r["stage"] == stage) == sorted(
        benchmark.METHODS)
  saved = json.loads((out / "results.json").read_text())
  assert len(saved["rows"]) == len(rows) and saved["jax"]
  tables = (out / "tables.md").read_text()
  assert all(f"| {m} |" in tables for m in benchmark.METHODS)
  assert (out / "memory_bars.png").stat().st_size > 0
  assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0
             for r in rows if r["stage"] == "speed")


def test_memory_structure_matches_the_methods(memory_and_speed):
  _, rows, _ = memory_and_speed
  memory = {r["method"]: r for r in rows if r["stage"] == "memory"}
  params = memory["adamw"]["params"]
  # AdamW keeps two float32 moments per parameter (plus a step count).
  assert abs(memory["adamw"]["state_bytes"] - 8 * params) < 64
  # The block methods keep moments for a fraction of the parameters.
  for method in ("blockllm", "blockllm-lean", "badam", "bread-sgd"):
    assert memory[method]["state_bytes"] < 0.5 * memory["adamw"]["state_bytes"]
  assert memory["lora"]["state_bytes"] < 0.5 * memory["adamw"]["state_bytes"]
  # The lean path drops the full gradient the plain path holds.
  assert memory["blockllm-lean"]["temp"] < memory["blockllm"]["temp"]
  assert memory["blockllm-lean"]["total"] < memory["blockllm"]["total"]
  # The memory model (weights + state + held gradient) leaves out only
  # activations and workspace: below the compiled total, and not far.
  for r in memory.values():
    assert 0.4 * r["total"] <= r["model_bytes"] <= 1.1 * r["total"], r


def test_quality_stages_report_the_sweep(benchmark, tmp_path):
  methods = ["adamw", "blockllm-lean"]
  rows = benchmark.main(SMALL + [
      "--stages", "pretrain", "finetune", "--methods", *methods,
      "--quality-size", "tiny", "--quality-steps", "3", "--quality-batch", "2",
      "--quality-seq", "16", "--eval-batches", "1", "--finetune-steps", "2",
      "--lr-factors", "1", "3",
      "--finetune-args", "--pretrain-steps 2 --train-examples 32 "
      f"--eval-examples 8 --hidden-size 32 --layers 2 --cache-dir {tmp_path}",
      "--out", str(tmp_path)])
  pretrain = [r for r in rows if r["stage"] == "pretrain"]
  finetune = [r for r in rows if r["stage"] == "finetune"]
  assert [r["method"] for r in pretrain] == methods
  assert [r["method"] for r in finetune] == methods
  for r in pretrain:
    assert len(r["sweep"]) == 2 and len(r["losses"]) == 3
    assert r["eval_loss"] == min(r["sweep"].values())
    assert np.isclose(r["perplexity"], np.exp(r["eval_loss"]))
  for r in finetune:
    assert len(r["sweep"]) == 2 and 0.0 <= r["exact_match"] <= 1.0
  assert (tmp_path / "pretrain_loss.png").stat().st_size > 0
  assert (tmp_path / "finetune_loss.png").stat().st_size > 0
