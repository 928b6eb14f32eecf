"""Hugging Face checkpoints: import, export and errors, against transformers'
own PyTorch LlamaForCausalLM."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from blockllm_jax.models import LlamaForCausalLM  # noqa: E402
from blockllm_jax.models import LlamaSettings  # noqa: E402
from blockllm_jax.models import load_hf_checkpoint  # noqa: E402
from blockllm_jax.models import save_hf_checkpoint  # noqa: E402

VOCAB = 101
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))


def _hf_model(**overrides):
  """A transformers LLaMA with random weights, norms included."""
  config = transformers.LlamaConfig(**{**TINY, **overrides},
                                    attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
              else 0.1 * torch.randn_like(p))
  return model


def _hf_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def _logits(settings, params):
  return np.asarray(LlamaForCausalLM(settings).apply({"params": params},
                                                     jnp.asarray(TOKENS)))


def _our_model(seed=0, **overrides):
  """Our model with random weights, norms included."""
  settings = LlamaSettings(**{**TINY, **overrides})
  params = LlamaForCausalLM(settings).init(jax.random.PRNGKey(seed),
                                           jnp.asarray(TOKENS))["params"]
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
  params = jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), params)
  return settings, params


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# --- import: transformers save_pretrained -> load_hf_checkpoint ---------------

IMPORT_CASES = {
    "gqa-untied": ({}, None),
    "tied-mha": ({"tie_word_embeddings": True, "num_key_value_heads": 4}, None),
    "head-dim": ({"head_dim": 16}, None),
    "llama3-rope": ({"rope_theta": 500000.0, "rope_scaling": LLAMA3}, None),
    "sharded": ({}, "20KB"),
}


@pytest.mark.parametrize("name", IMPORT_CASES)
def test_import_matches_transformers(name, tmp_path):
  overrides, shard = IMPORT_CASES[name]
  model = _hf_model(**overrides)
  model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
  assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
  settings, params = load_hf_checkpoint(tmp_path)
  expected = _hf_logits(model)
  assert np.abs(expected).max() > 1.0  # non-trivial logits
  assert _max_diff(_logits(settings, params), expected) < 1e-4
  if name == "head-dim":
    assert settings.head_dim == 16 != 32 // 4
  if name == "llama3-rope":
    # The scaling changes the result, so the match above tests it.
    plain = dataclasses.replace(settings, rope_scaling=None)
    assert _max_diff(_logits(plain, params), expected) > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_import_half_precision_exact(dtype, tmp_path):
  model = _hf_model(tie_word_embeddings=True).to(getattr(torch, dtype))
  model.save_pretrained(tmp_path)
  settings, params = load_hf_checkpoint(tmp_path)
  flat = traverse_util.flatten_dict(params)
  assert {v.dtype for v in flat.values()} == {jnp.dtype(dtype)}
  state = model.state_dict()
  pairs = {"model.embed_tokens.weight": ("model", "embed_tokens", "embedding"),
           "model.layers.1.mlp.down_proj.weight":
               ("model", "layers_1", "mlp", "down_proj", "kernel"),
           "model.norm.weight": ("model", "norm", "weight")}
  for hf_name, path in pairs.items():
    ours = np.asarray(flat[path], np.float32)
    ours = ours.T if path[-1] == "kernel" else ours
    np.testing.assert_array_equal(ours, state[hf_name].float().numpy())
  _, upcast = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
  assert upcast["model"]["norm"]["weight"].dtype == jnp.float32


def test_import_with_fresh_lora(tmp_path):
  model = _hf_model()
  model.save_pretrained(tmp_path)
  settings, params = load_hf_checkpoint(tmp_path, lora_rank=4, lora_alpha=8.0,
                                        rng=jax.random.PRNGKey(0))
  assert settings.lora_rank == 4
  assert params["model"]["layers_0"]["mlp"]["up_proj"]["lora_a"].shape == (32, 4)
  assert _max_diff(_logits(settings, params), _hf_logits(model)) < 1e-4
  with pytest.raises(ValueError, match="rng"):
    load_hf_checkpoint(tmp_path, lora_rank=4)


# --- export: save_hf_checkpoint -> transformers / load_hf_checkpoint ----------

EXPORT_CASES = {
    "gqa-untied": ({}, None),
    "tied-headdim-llama3": ({"tie_word_embeddings": True, "head_dim": 16,
                             "rope_theta": 500000.0, "rope_scaling": LLAMA3}, None),
    "sharded-int": ({}, 20_000),
    "sharded-str": ({"tie_word_embeddings": True}, "30KB"),
}


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_export_round_trip(name, tmp_path):
  overrides, shard = EXPORT_CASES[name]
  settings, params = _our_model(**overrides)
  save_hf_checkpoint(tmp_path, settings, params, max_shard_size=shard)
  index = tmp_path / "model.safetensors.index.json"
  assert index.exists() == bool(shard)
  if shard:
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "llama"
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert config["torch_dtype"] == "float32"

  hf = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  assert hf.config.tie_word_embeddings == settings.tie_word_embeddings
  assert _max_diff(_hf_logits(hf), _logits(settings, params)) < 1e-4

  loaded_settings, loaded = load_hf_checkpoint(tmp_path)
  assert loaded_settings == settings
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_export_bf16_exact(tmp_path):
  settings, params = _our_model()
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  for folder, kwargs, source in ((tmp_path / "a", {}, bf16),
                                 (tmp_path / "b", {"dtype": jnp.bfloat16}, params)):
    save_hf_checkpoint(folder, settings, source, max_shard_size="40KB", **kwargs)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = load_hf_checkpoint(folder)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(bf16)):
      assert a.dtype == jnp.bfloat16
      np.testing.assert_array_equal(a.view(jnp.uint16), b.view(jnp.uint16))
  # transformers reads the same bits.
  hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a",
                                                     dtype=torch.bfloat16)
  q = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(
      q.float().numpy(),
      np.asarray(bf16["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"],
                 np.float32).T)


def test_export_merges_lora(tmp_path):
  from blockllm_jax.models import merge_lora
  settings, params = _our_model(lora_rank=4, lora_alpha=8.0)
  merged_settings, merged = merge_lora(settings, params)  # B != 0 after noise
  save_hf_checkpoint(tmp_path / "lora", settings, params)
  save_hf_checkpoint(tmp_path / "merged", merged_settings, merged)
  read = lambda d: safetensors_numpy.load_file(str(d / "model.safetensors"))
  lora, plain = read(tmp_path / "lora"), read(tmp_path / "merged")
  assert lora.keys() == plain.keys()
  for name in lora:
    np.testing.assert_array_equal(lora[name], plain[name])
  assert ((tmp_path / "lora" / "config.json").read_text() ==
          (tmp_path / "merged" / "config.json").read_text())
  assert _max_diff(_logits(*load_hf_checkpoint(tmp_path / "lora")),
                   _logits(settings, params)) < 1e-4


def test_export_replaces_stale_shards(tmp_path):
  settings, params = _our_model()
  save_hf_checkpoint(tmp_path, settings, params, max_shard_size="20KB")
  save_hf_checkpoint(tmp_path, settings, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json",
                                                        "model.safetensors"]


# --- errors -------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
  settings, params = _our_model()
  save_hf_checkpoint(tmp_path, settings, params)
  return tmp_path


def _edit_config(folder, **changes):
  path = folder / "config.json"
  config = {**json.loads(path.read_text()), **changes}
  path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic",
                                                "factor": 2.0}}, "'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"hidden_size": None}, "hidden_size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_config_raises(saved, changes, match):
  _edit_config(saved, **changes)
  with pytest.raises(ValueError, match=match):
    load_hf_checkpoint(saved)


def _rewrite_tensors(folder, edit):
  path = folder / "model.safetensors"
  tensors = safetensors_numpy.load_file(str(path))
  edit(tensors)
  safetensors_numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_raises(saved):
  _rewrite_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"lacks tensors model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_checkpoint(saved)


def test_unexpected_tensor_raises(saved):
  def add_bias(t):
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  _rewrite_tensors(saved, add_bias)
  with pytest.raises(ValueError, match=r"unexpected tensors model\.layers\.0\.self_attn\.q_proj\.bias"):
    load_hf_checkpoint(saved)


def test_shape_mismatch_raises(saved):
  _edit_config(saved, intermediate_size=48)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\)"):
    load_hf_checkpoint(saved)


def test_missing_weights_file_raises(saved):
  (saved / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_hf_checkpoint(saved)


def test_export_rejects_params_not_matching_settings(tmp_path):
  settings, params = _our_model()
  with pytest.raises(ValueError, match="lm_head"):
    save_hf_checkpoint(tmp_path, dataclasses.replace(settings, tie_word_embeddings=True),
                       params)
  with pytest.raises(ValueError, match=r"model/layers_0/mlp/gate_proj/kernel has shape \(32, 64\)"):
    save_hf_checkpoint(tmp_path, dataclasses.replace(settings, intermediate_size=48),
                       params)
  with pytest.raises(ValueError, match="max_shard_size"):
    save_hf_checkpoint(tmp_path, settings, params, max_shard_size="lots")


def test_scanned_model_round_trip(tmp_path):
  """A scanned model exports one tensor per layer (transformers reads it)
  and imports back into either layout."""
  from blockllm_jax.models import stack_layers
  from blockllm_jax.models import unstack_layers
  settings, params = _our_model()
  scanned = dataclasses.replace(settings, scan_layers=True)
  save_hf_checkpoint(tmp_path, scanned, stack_layers(params))
  hf = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  assert _max_diff(_hf_logits(hf), _logits(settings, params)) < 1e-4
  loaded_settings, loaded = load_hf_checkpoint(tmp_path, scan_layers=True)
  assert loaded_settings == scanned
  assert _max_diff(_hf_logits(hf), _logits(loaded_settings, loaded)) < 1e-4
  for a, b in zip(jax.tree.leaves(unstack_layers(loaded)),
                  jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
