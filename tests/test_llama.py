"""The Flax LLaMA's settings, rotary frequencies and LoRA adapters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from blockllm_jax.models import LORA_TARGETS
from blockllm_jax.models import Llama3RopeScaling
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import LlamaSettings
from blockllm_jax.models import add_lora
from blockllm_jax.models import is_lora_path
from blockllm_jax.models import lora_mask
from blockllm_jax.models import merge_lora
from blockllm_jax.models import rope_frequencies
from blockllm_jax.models import settings_from_hf_config

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 12)))

# config.json of meta-llama/Llama-3.2-1B, as published.
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192,
                     "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}


def _init(settings, seed=0):
  model = LlamaForCausalLM(settings)
  return model, model.init(jax.random.PRNGKey(seed), TOKENS)["params"]


def _strip_adapters(params):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")})


def _random_b(params, seed=1):
  """Gives every lora_b random values (a trained adapter)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (0.05 * jax.random.normal(next(keys), x.shape)
                    if p[-1].key == "lora_b" else x), params)


# --- settings ----------------------------------------------------------------

def test_settings_head_dim_default_and_explicit():
  assert LlamaSettings(**TINY).head_dim == 8
  settings = LlamaSettings(**TINY, head_dim=16)
  assert settings.head_dim == 16
  _, params = _init(settings)
  attn = params["model"]["layers_0"]["self_attn"]
  assert attn["q_proj"]["kernel"].shape == (32, 4 * 16)
  assert attn["k_proj"]["kernel"].shape == (32, 2 * 16)
  assert attn["o_proj"]["kernel"].shape == (4 * 16, 32)
  # Resolved head_dim compares equal to the implicit one; settings hash.
  assert LlamaSettings(**TINY) == LlamaSettings(**TINY, head_dim=8)
  assert hash(LlamaSettings(**TINY, lora_targets=["q_proj"]))


def test_settings_reject_invalid():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlamaSettings(**{**TINY, "num_key_value_heads": 3})
  with pytest.raises(ValueError, match="embed_tokens"):
    LlamaSettings(**TINY, lora_rank=4, lora_targets=("embed_tokens",))
  with pytest.raises(ValueError, match="lm_head"):
    LlamaSettings(**TINY, tie_word_embeddings=True, lora_targets=("lm_head",))


def test_settings_from_published_llama_32_config():
  s = settings_from_hf_config(LLAMA_32_1B)
  assert (s.head_dim, s.num_key_value_heads, s.tie_word_embeddings) == (64, 8, True)
  assert s.rope_theta == 500000.0 and s.rms_norm_eps == 1e-5
  assert s.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
  # The same through a dict given to the dataclass directly.
  assert LlamaSettings(**{**TINY, "rope_scaling": LLAMA_32_1B["rope_scaling"]}
                       ).rope_scaling == s.rope_scaling


def test_settings_transformers_config_round_trip():
  transformers = pytest.importorskip("transformers")
  config = transformers.LlamaConfig(**TINY, head_dim=16, rope_theta=123456.0,
                                    tie_word_embeddings=True)
  settings = LlamaSettings.from_config(config, lora_rank=2)
  assert settings.rope_theta == 123456.0 and settings.head_dim == 16
  assert settings.lora_rank == 2
  # transformers defaults missing kv heads to the head count.
  mha = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
  assert settings_from_hf_config(mha).num_key_value_heads == 4
  for s in (dataclasses.replace(settings, lora_rank=0),
            settings_from_hf_config(LLAMA_32_1B)):
    again = transformers.LlamaConfig(**s.to_config_dict())
    assert LlamaSettings.from_config(again) == s


# --- rotary frequencies against transformers ---------------------------------

@pytest.mark.parametrize("overrides", [
    {}, {"rope_theta": 500000.0, "head_dim": 128},
    {"rope_scaling": LLAMA_32_1B["rope_scaling"], "rope_theta": 500000.0,
     "head_dim": 64},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
], ids=["default", "theta", "llama3-1B", "llama3-short"])
def test_rope_frequencies_match_transformers(overrides):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
  config = transformers.LlamaConfig(**TINY, max_position_embeddings=131072,
                                    **overrides)
  rope = config.rope_parameters["rope_type"]
  init = (LlamaRotaryEmbedding.compute_default_rope_parameters
          if rope == "default" else ROPE_INIT_FUNCTIONS[rope])
  expected, attention_factor = init(config)
  assert attention_factor == 1.0
  ours = rope_frequencies(LlamaSettings.from_config(config))
  # torch's float32 pow may differ from the correctly rounded one by an ulp.
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1.2e-7, atol=0)


# --- LoRA ---------------------------------------------------------------------

def test_lora_zero_b_equals_base_model():
  settings = LlamaSettings(**TINY, lora_rank=4)
  model, params = _init(settings)
  base_settings = dataclasses.replace(settings, lora_rank=0)
  base = LlamaForCausalLM(base_settings).apply(
      {"params": _strip_adapters(params)}, TOKENS)
  np.testing.assert_array_equal(model.apply({"params": params}, TOKENS), base)
  q = params["model"]["layers_1"]["self_attn"]["q_proj"]
  assert q["lora_a"].shape == (32, 4) and q["lora_b"].shape == (4, 32)
  assert not jnp.any(q["lora_b"])
  # PEFT's kaiming-uniform init of A: U(-1/sqrt(in), 1/sqrt(in)).
  down_a = params["model"]["layers_0"]["mlp"]["down_proj"]["lora_a"]
  assert down_a.shape == (64, 4)
  assert 0.6 / 8 < jnp.max(jnp.abs(down_a)) <= 1 / 8


def test_lora_merge_matches_unmerged():
  settings = LlamaSettings(**TINY, lora_rank=4, lora_alpha=8.0,
                           lora_targets=LORA_TARGETS + ("lm_head",))
  model, params = _init(settings)
  params = _random_b(params)
  unmerged = model.apply({"params": params}, TOKENS)
  merged_settings, merged = merge_lora(settings, params)
  assert merged_settings.lora_rank == 0
  assert not any(is_lora_path(p) for p in traverse_util.flatten_dict(merged))
  merged_logits = LlamaForCausalLM(merged_settings).apply({"params": merged}, TOKENS)
  base = LlamaForCausalLM(merged_settings).apply(
      {"params": _strip_adapters(params)}, TOKENS)
  assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3  # B matters
  np.testing.assert_allclose(merged_logits, unmerged, atol=1e-5, rtol=0)
  # Independent of merge_lora: one kernel by hand.
  q = params["model"]["layers_0"]["self_attn"]["q_proj"]
  np.testing.assert_allclose(
      merged["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"],
      np.asarray(q["kernel"]) + 2.0 * np.asarray(q["lora_a"]) @ np.asarray(q["lora_b"]),
      atol=1e-6)


def test_lora_mask_selects_exactly_the_adapters():
  settings = LlamaSettings(**TINY, lora_rank=2, lora_targets=("q_proj", "v_proj"))
  _, params = _init(settings)
  mask = traverse_util.flatten_dict(lora_mask(params))
  selected = {"/".join(p) for p, m in mask.items() if m}
  expected = {f"model/layers_{i}/self_attn/{proj}/{ab}" for i in range(2)
              for proj in ("q_proj", "v_proj") for ab in ("lora_a", "lora_b")}
  assert selected == expected
  assert mask.keys() == traverse_util.flatten_dict(params).keys()
  assert is_lora_path("model/layers_0/self_attn/q_proj/lora_b")
  assert not is_lora_path(("model", "layers_0", "self_attn", "q_proj", "kernel"))


def test_lora_mask_trains_only_adapters():
  settings = LlamaSettings(**TINY, lora_rank=2)
  model, params = _init(settings)
  tx = optax.multi_transform({True: optax.adam(1e-2), False: optax.set_to_zero()},
                             lora_mask(params))
  loss = lambda p: jnp.mean(model.apply({"params": p}, TOKENS) ** 2)
  updates, _ = tx.update(jax.jit(jax.grad(loss))(params), tx.init(params), params)
  new = traverse_util.flatten_dict(optax.apply_updates(params, updates))
  for path, old in traverse_util.flatten_dict(params).items():
    changed = not np.array_equal(new[path], old)
    # lora_a gets no gradient while B is zero; B must move.
    assert changed == (path[-1] == "lora_b"), path


def test_add_lora_around_existing_weights():
  base_settings = LlamaSettings(**TINY)
  model, params = _init(base_settings)
  settings, wrapped = add_lora(base_settings, params, 4, jax.random.PRNGKey(3),
                               alpha=32.0, targets=("o_proj", "up_proj"))
  assert (settings.lora_rank, settings.lora_alpha) == (4, 32.0)
  flat = traverse_util.flatten_dict(wrapped)
  assert sum(p[-1] == "lora_a" for p in flat) == 4  # 2 layers x 2 targets
  np.testing.assert_array_equal(
      LlamaForCausalLM(settings).apply({"params": wrapped}, TOKENS),
      model.apply({"params": params}, TOKENS))
  # Same tree as the model would initialise.
  fresh = LlamaForCausalLM(settings).init(jax.random.PRNGKey(0), TOKENS)["params"]
  assert jax.tree.structure(fresh) == jax.tree.structure(wrapped)
  with pytest.raises(ValueError, match="already"):
    add_lora(settings, wrapped, 4, jax.random.PRNGKey(0))
  assert merge_lora(base_settings, params) == (base_settings, params)


# --- scanned layers and rematerialisation --------------------------------------

from blockllm_jax.models import stack_layers  # noqa: E402
from blockllm_jax.models import unstack_layers  # noqa: E402


@pytest.mark.parametrize("layout", [
    dict(scan_layers=True),
    dict(remat=True),
    dict(remat=True, remat_policy="dots_saveable"),
    dict(scan_layers=True, remat=True),
])
def test_scanned_and_rematerialised_model_equals_the_unrolled_one(layout):
  """Same logits and gradients as the plain unrolled model, from the same
  parameters (stacked for scan)."""
  settings = LlamaSettings(**TINY, lora_rank=2)
  model, params = _init(settings)
  params = _random_b(params)
  variant = LlamaForCausalLM(dataclasses.replace(settings, **layout))
  theirs = stack_layers(params) if layout.get("scan_layers") else params
  if layout.get("scan_layers"):
    got_params = variant.init(jax.random.PRNGKey(0), TOKENS)["params"]
    assert jax.tree.structure(got_params) == jax.tree.structure(theirs)
    kernel = got_params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.shape == (TINY["num_hidden_layers"], TINY["hidden_size"],
                            TINY["intermediate_size"])
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, TOKENS) ** 2)
  want, want_grads = jax.value_and_grad(loss(model))(params)
  got, got_grads = jax.value_and_grad(loss(variant))(theirs)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  if layout.get("scan_layers"):
    got_grads = unstack_layers(got_grads)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_stack_and_unstack_layers_invert_each_other():
  _, params = _init(LlamaSettings(**TINY))
  again = unstack_layers(stack_layers(params))
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="layers_2"):
    stack_layers(params, num_layers=3)


def test_lora_on_a_scanned_model_is_stacked():
  settings = LlamaSettings(**TINY, scan_layers=True)
  _, params = _init(settings)
  settings, params = add_lora(settings, params, 3, jax.random.PRNGKey(2))
  q_proj = params["model"]["layers"]["self_attn"]["q_proj"]
  assert q_proj["lora_a"].shape == (2, 32, 3)
  assert q_proj["lora_b"].shape == (2, 3, 32)
  assert settings.scan_layers and settings.lora_rank == 3
  logits = LlamaForCausalLM(settings).apply({"params": params}, TOKENS)
  merged_settings, merged = merge_lora(settings, params)
  np.testing.assert_allclose(
      LlamaForCausalLM(merged_settings).apply({"params": merged}, TOKENS),
      logits, rtol=1e-5, atol=1e-5)


def test_remat_policy_is_checked():
  with pytest.raises(ValueError, match="remat_policy"):
    LlamaSettings(**TINY, remat=True, remat_policy="everything")
