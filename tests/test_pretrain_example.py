"""examples/pretrain_llama.py on a tiny configuration: training, held-out
evaluation, interruption and bit-for-bit resume, Hugging Face export."""

import json

import jax
import numpy as np
import pytest

from blockllm_jax import models
from tests.test_finetune_demo import load_example

TINY = ["--hidden-size", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
        "--seq-len", "32", "--batch-size", "8", "--steps", "40", "--warmup", "5",
        "--eval-every", "20", "--eval-batches", "2", "--save-every", "10",
        "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def pretrain():
  return load_example("pretrain_llama")


def test_pretraining_lowers_the_held_out_loss_and_exports(pretrain, tmp_path, capsys):
  out = pretrain.main(TINY + ["--out-dir", str(tmp_path)])
  assert "held-out loss" in capsys.readouterr().out
  assert (tmp_path / "pretrain_loss.png").stat().st_size > 0
  assert out["eval_steps"] == [20, 40]
  # Byte-level text starts near ln(260) = 5.6 nats; 40 steps must get well below.
  assert out["eval_losses"][-1] < 0.7 * np.log(260)
  settings, params = models.load_hf_checkpoint(out["export_dir"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out["params"])):
    np.testing.assert_array_equal(a, b)
  assert settings.num_hidden_layers == 2


def test_interrupted_pretraining_resumes_bit_for_bit(pretrain, tmp_path, monkeypatch):
  straight = pretrain.main(TINY + ["--out-dir", str(tmp_path / "a")])
  real_train = pretrain.common.train

  def interrupted_train(*args, on_step=None, **kwargs):
    def on_step_then_stop(t, loss, params):
      on_step(t, loss, params)
      if t + 1 == 27:  # after the checkpoint at 20, before the one at 30
        raise KeyboardInterrupt
    return real_train(*args, on_step=on_step_then_stop, **kwargs)

  monkeypatch.setattr(pretrain.common, "train", interrupted_train)
  with pytest.raises(KeyboardInterrupt):
    pretrain.main(TINY + ["--out-dir", str(tmp_path / "b")])
  monkeypatch.setattr(pretrain.common, "train", real_train)
  resumed = pretrain.main(TINY + ["--out-dir", str(tmp_path / "b"), "--resume"])
  assert resumed["losses"] == straight["losses"]
  assert resumed["eval_losses"] == straight["eval_losses"]


def test_pretraining_with_a_bpe_tokenizer_exports_it(pretrain, tmp_path):
  from transformers import PreTrainedTokenizerFast
  out = pretrain.main(TINY + ["--steps", "4", "--eval-every", "4", "--tokenizer", "bpe",
                              "--bpe-vocab", "300", "--out-dir", str(tmp_path)])
  tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(out["export_dir"] / "tokenizer.json"))
  assert tokenizer.decode(tokenizer.encode("def f(x): return x")) == "def f(x): return x"
  settings, _ = models.load_hf_checkpoint(out["export_dir"])
  assert settings.vocab_size == len(tokenizer)
  config = json.loads((out["export_dir"] / "config.json").read_text())
  from transformers import AutoTokenizer
  saved = AutoTokenizer.from_pretrained(out["export_dir"])
  assert (config["bos_token_id"], config["eos_token_id"]) == (
      saved.bos_token_id, saved.eos_token_id) == (1, 2)



def test_scanned_rematerialised_pretraining_learns_and_exports(pretrain, tmp_path):
  """--scan-layers --remat: layers under nn.scan (blockllm with layer_axis=0,
  one unit per layer), exported one tensor per layer as HF stores them."""
  out = pretrain.main(TINY + ["--scan-layers", "--remat", "--out-dir",
                              str(tmp_path)])
  assert out["eval_losses"][-1] < 0.7 * np.log(260)
  assert out["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
  settings, params = models.load_hf_checkpoint(out["export_dir"],
                                               scan_layers=True)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out["params"])):
    np.testing.assert_array_equal(a, b)
