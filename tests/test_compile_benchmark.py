"""examples/compile_benchmark.py at CI size: each compile runs in a worker
process and comes back as a row per (depth, method), with tables and a plot;
a failing worker fails the sweep loudly (no timing asserted)."""

import argparse
import json
import os

import pytest

from tests.test_finetune_demo import load_example

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SMALL = ["--width", "32", "--vocab", "64", "--seq", "8", "--repeat", "1"]


@pytest.fixture(scope="module")
def compile_benchmark():
  return load_example("compile_benchmark")


def test_sweep_reports_every_method_and_depth(compile_benchmark, tmp_path):
  rows = compile_benchmark.main(
      SMALL + ["--layers", "1", "2", "--methods", "blockllm-lean",
               "--out", str(tmp_path)])
  # AdamW is always measured: the ratios and slopes are against it.
  assert sorted((r["layers"], r["method"]) for r in rows) == [
      (1, "adamw"), (1, "blockllm-lean"), (2, "adamw"), (2, "blockllm-lean")]
  for r in rows:
    assert len(r["compile_cpu_all"]) == 1
    assert r["compile_cpu_s"] == r["compile_cpu_min_s"] > 0
    assert r["compile_wall_s"] > 0
    # Tracing and lowering are part of the timed work, not all of it.
    assert 0 < r["lower_cpu_s"] < r["compile_cpu_s"]
  # The compiled programs themselves came back: more layers, more HLO; the
  # lean step's conditional weight gradients make it larger than AdamW's.
  lines = {(r["layers"], r["method"]): r["hlo_lines"] for r in rows}
  assert lines[2, "adamw"] > lines[1, "adamw"]
  assert lines[1, "blockllm-lean"] > lines[1, "adamw"]
  assert json.loads((tmp_path / "results.json").read_text()) == rows
  tables = (tmp_path / "compile.md").read_text()
  assert "| 2 | blockllm-lean |" in tables and "s per layer" in tables
  assert (tmp_path / "compile.png").stat().st_size > 0


def test_a_failing_worker_fails_the_sweep(compile_benchmark, tmp_path):
  # Width 30 over four heads is an odd head size, which rotary embeddings
  # refuse: the worker's model cannot be built, and the sweep says which
  # compile failed and why.
  with pytest.raises(RuntimeError, match=r"compiling adamw at 1 layers"
                     r"(.|\n)*head_dim must be even"):
    compile_benchmark.main(["--width", "30", "--layers", "1", "--methods",
                            "adamw", "--repeat", "1", "--out", str(tmp_path)])


def test_worker_refuses_an_unknown_method(compile_benchmark, capsys):
  with pytest.raises(SystemExit):
    compile_benchmark.main(["--measure-one", "sgd", "2"])
  assert "unknown method 'sgd'" in capsys.readouterr().err


def test_workers_get_the_sweeps_model_options(compile_benchmark):
  # Every model option goes to the worker, and comes back the same value.
  parser = argparse.ArgumentParser()
  compile_benchmark.add_model_options(parser)
  for argv in (["--width", "48", "--vocab", "80", "--batch", "2", "--seq",
                "12", "--scan-layers", "--remat"], []):
    args = parser.parse_args(argv)
    flags = compile_benchmark.model_flags(args)
    assert parser.parse_args(flags) == args
    assert sorted(vars(args)) == sorted(
        flag[2:].replace("-", "_") for flag in compile_benchmark.MODEL_OPTIONS)
