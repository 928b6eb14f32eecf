"""The main job's pipeline end to end on a tiny configuration."""

import importlib.util
from pathlib import Path

import numpy as np

from blockllm_jax import data

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune_llama.py"


def _load_demo():
  spec = importlib.util.spec_from_file_location("finetune_llama", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_demo_runs_and_blockllm_lowers_the_answer_loss(tmp_path, capsys):
  demo = _load_demo()
  out = demo.main([
      "--hidden-size", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
      "--pretrain-steps", "150", "--steps", "100", "--batch-size", "16",
      "--lr", "1e-2", "--sparsity", "0.7",
      "--train-examples", "200", "--eval-examples", "16", "--patience", "5",
      "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"),
      "--no-progress"])
  printed = capsys.readouterr().out
  assert "exact match" in printed and "blockllm" in printed and "adamw" in printed
  assert (tmp_path / "out" / "finetune_loss.png").stat().st_size > 0
  rows = {r["optimizer"]: r for r in out["results"]}
  ours = rows["blockllm"]
  assert np.mean(ours["losses"][-10:]) < 0.9 * np.mean(ours["losses"][:5])
  assert ours["state_bytes"] < 0.25 * rows["adamw"]["state_bytes"]
  assert ours["step_memory"] < rows["adamw"]["step_memory"]
  assert ours["reselections"] >= 1


def test_instruction_set_masks_only_the_answer():
  tok = data.ByteTokenizer()
  examples = data.make_instruction_set(50, seed=3)
  assert len(set(tok.decode(t[:p]) for t, p in
                 zip(examples.tokens, examples.prompt_length))) == 50
  for tokens, mask, start, answer in zip(*examples):
    answer_tokens = tokens[mask > 0]
    assert tok.decode(answer_tokens[:-1]) == answer
    assert answer_tokens[-1] == tok.EOS
    assert tokens[start - 1] == tok.SEP
