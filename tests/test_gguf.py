"""GGUF import (models.load_gguf_checkpoint, data.load_tokenizer) against
transformers: the original PyTorch model the file was written from, and
transformers' own GGUF reader (its own dequantisation and Q/K handling).

The files are written here with gguf.GGUFWriter the way llama.cpp's
converter writes them (tensor names, Q/K row permutation, tokenizer
metadata), so no download is needed.
"""

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

from blockllm_jax import data  # noqa: E402
from blockllm_jax import models  # noqa: E402

from tests.gguf_files import chatml_bpe  # noqa: E402
from tests.gguf_files import write_llama_gguf  # noqa: E402
from tests.test_hf_checkpoint import _hf_model as hf_llama  # noqa: E402

HEADS, KV_HEADS = 4, 2
TEXT = "The capital of France is Paris; 12 + 35 = 47, don't you think?\n  Yes."


@pytest.fixture(scope="module")
def bpe():
  return chatml_bpe()


def _hf_model(vocab, tie):
  """A random transformers LLaMA (norms included), GQA, rope theta 5e4."""
  return hf_llama(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  max_position_embeddings=128)


def _write_gguf(path, model, bpe, qtype, **options):
  """Writes a transformers model as llama.cpp's converter would."""
  config = {k: getattr(model.config, k) for k in (
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
      "max_position_embeddings", "tie_word_embeddings")}
  config["rope_theta"] = 50000.0
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return write_llama_gguf(path, config, tensors, bpe, qtype.name, **options)


def _our_logits(settings, params, tokens):
  return np.asarray(models.LlamaForCausalLM(settings).apply(
      {"params": params}, jnp.asarray(tokens)))


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _gguf_reference(path):
  """transformers' own reading of the GGUF file (its dequantisation)."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32,
      attn_implementation="eager").eval()


TOKENS = np.random.RandomState(0).randint(0, 320, (2, 11))
TYPES = {"f32": "F32", "q8_0": "Q8_0", "q4_1": "Q4_1"}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_logits_match_transformers(qtype, tie, bpe, tmp_path):
  original = _hf_model(len(bpe[0]), tie)
  path = _write_gguf(tmp_path / f"tiny.{qtype}.gguf", original, bpe,
                     gguf.GGMLQuantizationType[TYPES[qtype]])
  settings, params = models.load_gguf_checkpoint(path)
  assert (settings.num_attention_heads, settings.num_key_value_heads) == (HEADS, KV_HEADS)
  assert settings.tie_word_embeddings == tie and settings.rope_theta == 50000.0
  assert ("lm_head" in params) == (not tie)
  ours = _our_logits(settings, params, TOKENS)
  reference = _torch_logits(_gguf_reference(path), TOKENS)
  np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)
  if qtype == "f32":  # unquantised: also the model the file was written from
    np.testing.assert_allclose(ours, _torch_logits(original, TOKENS), atol=2e-4, rtol=0)
  else:  # quantised: close to the original, not equal (the check has teeth)
    exact = _torch_logits(original, TOKENS)
    relative = np.linalg.norm(ours - exact) / np.linalg.norm(exact)
    assert 1e-5 < relative < 0.3, relative


def test_gguf_to_hugging_face_and_scanned_layout(bpe, tmp_path):
  """load -> save_hf_checkpoint -> transformers; and scan_layers=True."""
  path = _write_gguf(tmp_path / "tiny.q8_0.gguf", _hf_model(len(bpe[0]), True), bpe,
                     gguf.GGMLQuantizationType.Q8_0)
  settings, params = models.load_gguf_checkpoint(path)
  tokenizer = data.load_tokenizer(path)
  models.save_hf_checkpoint(tmp_path / "hf", settings, params, tokenizer=tokenizer)
  exported = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager").eval()
  ours = _our_logits(settings, params, TOKENS)
  np.testing.assert_allclose(_torch_logits(exported, TOKENS), ours, atol=2e-4, rtol=0)
  assert data.load_tokenizer(tmp_path / "hf").encode(TEXT) == tokenizer.encode(TEXT)
  scanned, stacked = models.load_gguf_checkpoint(path, scan_layers=True)
  assert scanned.scan_layers and stacked["model"]["layers"]["mlp"]["up_proj"][
      "kernel"].shape == (2, 64, 96)
  np.testing.assert_allclose(_our_logits(scanned, stacked, TOKENS), ours, atol=1e-5)


def test_gguf_tokenizer_matches_transformers(bpe, tmp_path):
  path = _write_gguf(tmp_path / "tiny.gguf", _hf_model(len(bpe[0]), True), bpe,
                     gguf.GGMLQuantizationType.F32)
  ours = data.load_tokenizer(path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert ours.vocab_size == len(bpe[0])
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
  for text in (TEXT, "reverse banana", " leading space", "tabs\tand\nnewlines"):
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text
  # Specials in the template are parsed; the same specials typed in text are not.
  messages = [{"role": "user", "content": "add 12+35"}]
  expected = theirs.apply_chat_template(messages, add_generation_prompt=True,
                                        tokenize=False)
  assert expected.startswith("<|im_start|>user\nadd 12+35<|im_end|>")
  (prompt,) = ours.chat_prompts(["add 12+35"])
  assert prompt == theirs.encode(expected, add_special_tokens=False)
  assert prompt[0] == 1 and prompt.count(2) == 1
  assert 1 not in ours.encode("<|im_start|>")


def test_smollm_pre_tokenizer_splits_digits(bpe, tmp_path):
  """tokenizer.ggml.pre "smollm": digits one by one (llama.cpp's regex
  list, and SmolLM2's own tokenizer.json: Digits(individual_digits))."""
  path = _write_gguf(tmp_path / "tiny.gguf", _hf_model(len(bpe[0]), True), bpe,
                     gguf.GGMLQuantizationType.F32, pre="smollm")
  tok = data.load_tokenizer(path)
  pieces = tok.hf_tokenizer.convert_ids_to_tokens(tok.encode("x 2025 y"))
  assert pieces[pieces.index("Ġ") + 1:pieces.index("Ġ") + 5] == ["2", "0", "2", "5"]
  assert tok.decode(tok.encode(TEXT)) == TEXT


def test_chat_instruction_rows(bpe, tmp_path):
  """encode_instructions with a chat template: prompt turn, answer, EOS."""
  path = _write_gguf(tmp_path / "tiny.gguf", _hf_model(len(bpe[0]), True), bpe,
                     gguf.GGMLQuantizationType.F32)
  tok = data.load_tokenizer(path)
  rows = data.encode_instructions([("add 12+35", "47"), ("reverse abc", "cba")], tok,
                                  system="Be brief.")
  for tokens, mask, start, answer in zip(*rows):
    assert tok.hf_tokenizer.decode(tokens[:start]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert tok.hf_tokenizer.decode(tokens[:start]).endswith("<|im_start|>assistant\n")
    assert tok.decode(tokens[mask > 0][:-1]) == answer
    assert tokens[mask > 0][-1] == tok.eos_id and mask[:start].sum() == 0
  plain = data.encode_instructions([("add 1+1", "2")], tok, chat=False)
  assert plain.tokens[0, 0] == tok.bos_id
  with pytest.raises(ValueError, match="chat template"):
    data.encode_instructions([("a", "b")], data.ByteTokenizer(), chat=True)
  with pytest.raises(ValueError, match="system"):
    data.encode_instructions([("a", "b")], data.ByteTokenizer(), system="hi")


def test_gguf_errors_name_the_problem(bpe, tmp_path):
  model = _hf_model(len(bpe[0]), True)
  f32 = gguf.GGMLQuantizationType.F32
  with pytest.raises(ValueError, match="general.architecture 'qwen2'"):
    models.load_gguf_checkpoint(_write_gguf(tmp_path / "a.gguf", model, bpe, f32,
                                            arch="qwen2"))
  rope = {"rope_freqs.weight": np.ones(8, np.float32)}
  with pytest.raises(ValueError, match="rope_freqs.weight"):
    models.load_gguf_checkpoint(_write_gguf(tmp_path / "b.gguf", model, bpe, f32,
                                            extra=rope))
  extra = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
  with pytest.raises(ValueError, match="blk.0.attn_q.bias"):
    models.load_gguf_checkpoint(_write_gguf(tmp_path / "c.gguf", model, bpe, f32,
                                            extra=extra))
  with pytest.raises(ValueError, match="tokenizer.ggml.pre 'mystery'"):
    data.load_tokenizer(_write_gguf(tmp_path / "d.gguf", model, bpe, f32, pre="mystery"))
  (tmp_path / "e.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a GGUF file"):
    models.load_gguf_checkpoint(tmp_path / "e.gguf")
  with pytest.raises(FileNotFoundError):
    models.load_gguf_checkpoint(tmp_path / "missing.gguf")
